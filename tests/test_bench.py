"""Smoke tests of bench.py: its help, a seconds-long --tiny run whose last line is the JSON of every figure, and
the FLOP count it reports, held against a count by hand."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train
from support import run_state
from tools import bench

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
TOP_LEVEL_KEYS = {"mode", "device", "device_name", "torch", "threads", "fast_precision", "fast_memory_format",
                  "torch_compile", "timing", "load_average_before", "load_average_after", "training", "sampling",
                  "peak_matmul", "memory"}
TRAINING_KEYS = {"model", "widths", "blocks_per_level", "parameters", "batch_size", "baseline_images_per_s",
                 "fast_images_per_s", "speedup", "forward_flops_per_image", "baseline_flops_per_s", "fast_flops_per_s",
                 "baseline_fraction_of_fp32_peak", "fast_fraction_of_peak"}
SAMPLING_KEYS = {"model", "batch_size", "timed_steps_per_draw", "ddpm600_baseline_images_per_s",
                 "ddpm600_fast_images_per_s", "speedup", "ddim50_fast_images_per_s"}


def run_bench(*flags):
    """Return the finished `python -m tools.bench FLAGS` process (stdout and stderr captured as text)."""
    return subprocess.run([sys.executable, "-m", "tools.bench", *flags], cwd=HERE, capture_output=True, text=True, timeout=120)


def test_help_lists_every_flag(capsys):
    """`bench.py --help` exits 0 and names --quick, --tiny, --device and --batch-size.

    In this process: the tiny run below starts `python -m tools.bench` in a process of its own already."""
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--quick", "--tiny", "--device", "--batch-size"):
        assert flag in help_text


def test_tiny_run_ends_with_consistent_json_of_every_figure():
    """`bench.py --tiny` prints a table and, as its last line, JSON with every figure, positive and consistent:

    speedup = fast / baseline images/s;  training FLOP/s = 3 * forward FLOPs * images/s;
    fraction of peak = FLOP/s / the matmul peak of the path's precision; the table names the same images/s.
    """
    completed = run_bench("--tiny")
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    results = json.loads(lines[-1])
    assert set(results) == TOP_LEVEL_KEYS
    assert results["mode"] == "tiny" and results["device"] in ("cpu", "cuda")
    (training,) = results["training"]
    assert set(training) == TRAINING_KEYS
    assert set(results["sampling"]) == SAMPLING_KEYS
    peaks = results["peak_matmul"]
    for figures in (training, results["sampling"], peaks):
        for key, value in figures.items():
            if isinstance(value, float):
                assert math.isfinite(value) and value > 0, key
    assert math.isclose(training["speedup"], training["fast_images_per_s"] / training["baseline_images_per_s"])
    assert math.isclose(training["fast_flops_per_s"],
                        3 * training["forward_flops_per_image"] * training["fast_images_per_s"])
    assert math.isclose(training["baseline_fraction_of_fp32_peak"],
                        training["baseline_flops_per_s"] / peaks["fp32_flops_per_s"])
    fast_peak = peaks[f"{results['fast_precision']}_flops_per_s"]
    assert math.isclose(training["fast_fraction_of_peak"], training["fast_flops_per_s"] / fast_peak)
    sampling = results["sampling"]
    assert math.isclose(sampling["speedup"],
                        sampling["ddpm600_fast_images_per_s"] / sampling["ddpm600_baseline_images_per_s"])
    for path in ("baseline", "fast"):
        assert results["memory"][path]["peak_bytes"] >= results["memory"][path]["training_bytes"] > 0
    table = "\n".join(lines[:-1])
    assert f"{training['baseline_images_per_s']:.1f}" in table and f"{training['fast_images_per_s']:.1f}" in table


def test_forward_flops_match_a_count_by_hand():
    """One level (widths 8), 8x8 image, time embedding 16: the FLOPs are 2 x the multiply-adds of every conv and linear.

    time MLP 2 * 16*16;  stem 1*8*9*64;  down and middle blocks: 16*8 + 2 * 8*8*9*64 each;
    up block: 16*8 + 16*8*9*64 + 8*8*9*64 + 16*8*64 (1x1 shortcut);  head 8*1*9*64
    = 276,352 multiply-adds = 552,704 FLOPs.
    """
    config = {**train.DEFAULTS, "channels": 1, "widths": [8], "time_emb_dim": 16, "img_size": 8}
    multiply_adds = (2 * 16 * 16 + 1 * 8 * 9 * 64 + 2 * (16 * 8 + 2 * 8 * 8 * 9 * 64)
                     + 16 * 8 + 16 * 8 * 9 * 64 + 8 * 8 * 9 * 64 + 16 * 8 * 64 + 8 * 1 * 9 * 64)
    assert bench.forward_flops_per_image(config, torch.device("cpu")) == 2 * multiply_adds == 552_704


def test_the_fast_path_trains_with_train_pys_optimizer(monkeypatch):
    """The bench's fast path builds its optimizer as train.py does (run_state.build_optimizer), so a flag that changes
    train.py's Adam, such as --adam-beta2, changes the benchmarked step too."""
    build_optimizer = run_state.build_optimizer
    built = []

    def spy(model, config, device):
        built.append(build_optimizer(model, config, device))
        return built[-1]

    monkeypatch.setattr(run_state, "build_optimizer", spy)
    config = {**train.DEFAULTS, "channels": 1, "widths": [8, 16], "time_emb_dim": 16, "adam_beta2": 0.99}
    step = bench.fast_training_step(config, 2, torch.device("cpu"), "fp32")
    step()
    assert len(built) == 1
    assert built[0].param_groups[0]["betas"] == (0.9, 0.99)
