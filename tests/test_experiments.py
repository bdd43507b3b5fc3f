"""experiments.py end to end on its tiny plan (a subprocess, as the lead runs it), and its pieces of arithmetic."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ddpm
from support import images
from tools import evaluate, experiments

deltas = st.lists(st.one_of(st.none(), st.floats(-100, 100, allow_nan=False)), min_size=0, max_size=8)

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("fid", "confidence", "confident_fraction", "class_entropy_nats", "dark_mean", "midtone_fraction")


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, trained):
    """Run `experiments.py --tiny --device cpu` in a fresh process on one thread; return (out folder, results).

    Its evaluation cache starts with a copy of the session's 2-epoch classifier (tests/conftest.py), which the run
    loads as the cache of the bundled split instead of training the 10-epoch one: the tiny run checks the plumbing,
    not the classifier.
    """
    root = tmp_path_factory.mktemp("experiments")
    out = root / "out"
    _, cache, cache_dir = trained
    os.makedirs(root / "eval_cache")
    shutil.copy(evaluate.cache_path(cache_dir, cache["split"]), evaluate.cache_path(str(root / "eval_cache"), cache["split"]))
    completed = subprocess.run(
        [sys.executable, "-m", "tools.experiments", "--tiny", "--device", "cpu", "--out", str(out), "--work", str(root / "work"),
         "--eval-cache", str(root / "eval_cache")],
        cwd=REPOSITORY, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    return out, json.loads((out / "results.json").read_text())


def test_tiny_run_scores_every_planned_experiment_with_finite_figures(tiny_results):
    """Every experiment of the plan (Q1 a-g, Q2 z = 0 and both DDIM rows) has finite figures and a sampling time > 0."""
    _, results = tiny_results
    planned = [spec["name"] for spec in experiments.experiment_plan(20, experiments.TINY["ddim_steps"], True)]
    assert [record["name"] for record in results["experiments"]] == planned
    assert all(run["exit_code"] == 0 for run in results["runs"].values())
    for record in results["experiments"]:
        assert all(math.isfinite(record["figures"][key]) for key in FIGURES), record["name"]
        assert record["sampling"]["seconds"] > 0 and record["figures"]["fid"] >= 0
    assert all(f"| {name} |" in results["markdown"] for name in planned if name.startswith(tuple("abcdefg")))


def test_tables_show_each_experiments_recognized_fraction_in_its_own_row(tiny_results):
    """Each Q1 row and each Q2 row of the markdown carries its samples' confident_fraction (evaluate's "recognized",
    top softmax above 0.9) as a percentage, in the column after FID change (Q1) or FID (Q2); the real digits' too."""
    _, results = tiny_results
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in results["markdown"].splitlines()
            if line.startswith("| ")}
    for record in results["experiments"]:
        recognized = record["figures"]["confident_fraction"]
        assert 0 <= recognized <= 1
        if record["question"] == "Q1":
            assert rows[record["name"]][5] == f"{recognized:.1%}", record["name"]
        else:
            assert rows[record["what"]][5] == f"{recognized:.1%}", record["name"]
    assert rows["real digits"][5] == f"{results['real_digits']['confident_fraction']:.1%}"


def test_grids_png_has_one_row_of_sixteen_samples_per_experiment(tiny_results):
    """grids.png decodes to rows x 16 cells of 16x16 pixels with 2-pixel padding, one row per results.json experiment."""
    out, results = tiny_results
    grid = images.decode_png((out / "grids.png").read_bytes())
    rows = len(results["experiments"])
    assert results["grids_png_rows"] == [record["name"] for record in results["experiments"]]
    assert grid.shape == (rows * (16 + 2) + 2, 16 * (16 + 2) + 2)
    assert images.decode_png((out / "a_lecture.png").read_bytes()).shape == (2 * 18 + 2, 8 * 18 + 2)  # 16 samples, 8 a row


def test_ddpm_without_noise_is_the_reverse_mean_iterated_and_ignores_the_global_rng():
    """With z = 0: x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)) for t = T-1 .. 0."""
    schedule = ddpm.Schedule.create(10)

    def model(x, t):
        return 0.3 * x + 0.01 * t.float().reshape(-1, 1, 1, 1)

    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = x_T
    for t in reversed(range(10)):
        expected = ddpm.reverse_mean(expected, torch.full((3,), t), model(expected, torch.full((3,), t)), schedule)
    torch.manual_seed(0)
    first = experiments.ddpm_without_noise(model, schedule, x_T)
    torch.manual_seed(1)
    second = experiments.ddpm_without_noise(model, schedule, x_T)
    torch.testing.assert_close(first, expected)
    assert torch.equal(first, second)


@given(deltas)
def test_largest_improvements_are_the_two_most_negative_deltas(values):
    """largest_improvements returns the changes with the two lowest negative deltas, lowest first; None is unmeasured."""
    changes = [{"change": f"change {index}", "delta_fid": value} for index, value in enumerate(values)]
    negative = sorted((value, index) for index, value in enumerate(values) if value is not None and value < 0)
    assert experiments.largest_improvements(changes, "delta_fid") == [f"change {index}" for _, index in negative[:2]]


def test_the_experiments_train_the_network_their_figures_were_measured_with():
    """docs/lecture_questions.md's runs used the quick preset's network of their time: widths 8, 16, 64, 64, one block
    a level, batch 64, at lr 1e-3 held after the warm-up. If the preset changes, the experiments' base run must not
    change with it (the figures would no longer be the ones the runs give)."""
    config = experiments.base_config(experiments.parse_args([]))
    assert config["widths"] == [8, 16, 64, 64] and config["blocks_per_level"] == 1
    assert config["lr"] == 1e-3 and config["lr_decay"] == "none" and config["batch_size"] == 64
