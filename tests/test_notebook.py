"""The Python API a notebook uses (sample.load, draw, grid, export), the README's snippets run as written, and the
exported weights used from a folder that holds nothing of this project but unet.py and ddpm.py.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm
import sample
import train
from support import checkpoints, images, runtime

ROOT = Path(__file__).resolve().parent.parent
# T = 50, so that the README's 50-step samplers run as written; 48 digits at 16x16, batch 8: 6 steps.
TINY = ["--widths", "8,16", "--img-size", "16", "--timesteps", "50", "--max-images", "48", "--batch-size", "8",
        "--grid-samples", "0", "--device", "cpu", "--data-dir", str(ROOT / "data")]


def readme_snippets():
    """Return the python code blocks of the README's "In a notebook" section, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## In a notebook", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def child_environment():
    """Return the environment of a child process: no PYTHONPATH (only its own folder is importable), one thread."""
    return {**{key: value for key, value in os.environ.items() if key != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    """The checkpoint of a tiny 1-epoch MNIST run with T = 50."""
    out = tmp_path_factory.mktemp("notebook-run")
    assert train.main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def loaded(checkpoint_path):
    """sample.load of the tiny checkpoint on the CPU: (model, schedule, config)."""
    return sample.load(str(checkpoint_path), device="cpu")


@pytest.fixture(scope="module")
def weights_path(checkpoint_path, tmp_path_factory):
    """The tiny checkpoint's weights, exported by `sample.py --export`."""
    path = tmp_path_factory.mktemp("export") / "weights.pt"
    assert sample.main(["--checkpoint", str(checkpoint_path), "--export", str(path)]) == 0
    return path


# ----------------------------------------------------------------------------- the README, as written


def test_readme_notebook_snippet_runs_as_written(checkpoint_path, tmp_path, monkeypatch, capsys):
    """The first snippet, run in a folder holding runs/quick/checkpoint.pt: 16 samples, their grid, samples.png."""
    snippet = readme_snippets()[0]
    (tmp_path / "runs" / "quick").mkdir(parents=True)
    shutil.copy(checkpoint_path, tmp_path / "runs" / "quick" / "checkpoint.pt")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    samples, grid = namespace["samples"], namespace["grid"]
    assert samples.shape == (16, 1, 16, 16) and samples.dtype == torch.float32
    assert grid.shape == (4 * 16 + 5 * 2, 4 * 16 + 5 * 2, 1) and grid.dtype == np.uint8
    np.testing.assert_array_equal(images.decode_png((tmp_path / "samples.png").read_bytes()), grid[..., 0])
    assert "left" in capsys.readouterr().err  # the progress line


def test_readme_export_snippet_runs_in_a_folder_with_only_unet_and_ddpm(weights_path, loaded, tmp_path):
    """The second snippet, in a folder holding only unet.py, ddpm.py and weights.pt (nothing else of this project
    importable), samples 16 images; its model predicts what sample.load's model predicts."""
    project = tmp_path / "other_project"
    project.mkdir()
    for name in ("unet.py", "ddpm.py"):
        shutil.copy(ROOT / name, project / name)
    shutil.copy(weights_path, project / "weights.pt")
    check = ("\nimport importlib.util\n"
             "assert importlib.util.find_spec('sample') is None and importlib.util.find_spec('support') is None\n"
             "torch.manual_seed(0)\n"
             "probe = model(torch.randn(2, 1, 16, 16), torch.tensor([3, 40]))\n"
             "torch.save({'x0': x0, 'probe': probe.detach()}, 'result.pt')\n")
    (project / "use_weights.py").write_text(readme_snippets()[1] + check)
    assert sorted(os.listdir(project)) == ["ddpm.py", "unet.py", "use_weights.py", "weights.pt"]
    process = subprocess.run([sys.executable, "-E", "use_weights.py"], cwd=project, env=child_environment(),
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    result = torch.load(project / "result.pt", weights_only=True)
    assert result["x0"].shape == (16, 1, 16, 16) and torch.isfinite(result["x0"]).all()
    model, _, _ = loaded
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(torch.randn(2, 1, 16, 16), torch.tensor([3, 40]))
    torch.testing.assert_close(result["probe"], expected, rtol=1e-5, atol=1e-6)  # other thread counts round apart


# ----------------------------------------------------------------------------- load


def test_load_gives_model_schedule_and_configuration_in_one_call(loaded, checkpoint_path):
    """load returns the EMA weights in eval mode, the checkpoint's schedule and its configuration."""
    model, schedule, config = loaded
    checkpoint = checkpoints.load_checkpoint(str(checkpoint_path))
    assert not model.training and config == checkpoint["config"]
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in checkpoint["ema"].items())
    assert schedule.timesteps == 50
    torch.testing.assert_close(schedule.betas, ddpm.Schedule.create(50, "linear").betas)


def test_load_reads_exported_weights_into_the_same_model(loaded, weights_path):
    """load of the exported weights gives the same weights, schedule and model configuration as the checkpoint's."""
    model, schedule, config = sample.load(str(weights_path), device="cpu")
    assert all(torch.equal(tensor, loaded.model.state_dict()[name]) for name, tensor in model.state_dict().items())
    assert schedule.timesteps == loaded.schedule.timesteps
    assert config == {key: loaded.config[key] for key in checkpoints.MODEL_KEYS}


def test_load_refuses_a_file_that_is_neither_with_one_line(tmp_path):
    """A torch file of something else, or exported weights of another version: CheckpointError, one line."""
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(checkpoints.CheckpointError, match="nor weights written by sample.py --export") as error:
        sample.load(str(other), device="cpu")
    assert "\n" not in str(error.value)
    torch.save({"format": checkpoints.WEIGHTS_FORMAT, "version": 99}, other)
    with pytest.raises(checkpoints.CheckpointError, match="export them again"):
        sample.load(str(other), device="cpu")


def test_weights_that_do_not_fit_their_configuration_get_one_line(weights_path, tmp_path, capsys):
    """Exported weights whose configuration names other widths: sample.py says so in one line, exit 1."""
    weights = torch.load(weights_path, weights_only=True)
    weights["config"]["widths"] = [16, 32]
    edited = tmp_path / "edited.pt"
    torch.save(weights, edited)
    assert sample.main(["--checkpoint", str(edited), "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 1
    error = capsys.readouterr().err.strip()
    assert "do not fit the model" in error and len(error.splitlines()) == 1 and "Traceback" not in error


# ----------------------------------------------------------------------------- draw and grid


@pytest.mark.parametrize("sampler, steps, eta, order", [("fast", 50, 1.0, 2), ("ddim", 50, 0.0, 1),
                                                        ("ddim", 7, 0.5, 2), ("fast", 10, 1.0, 1)])
def test_draw_fast_and_ddim_are_ddim_sample_with_their_eta_steps_and_order(loaded, sampler, steps, eta, order):
    """fast = ddpm.ddim_sample with eta 1 and order 2 over 50 steps by default; ddim = eta 0, order 1; both from the
    (seed, 0) generator. The defaults are written here, not read from sample.py, and order 1 and 2 differ on this
    model, so a wrong default eta or order fails the cases that leave it out."""
    model, schedule, config = loaded
    default_eta, default_order = {"fast": (1.0, 2), "ddim": (0.0, 1)}[sampler]
    given = {} if steps == 50 else {"steps": steps}
    given.update({} if eta == default_eta else {"eta": eta})
    given.update({} if order == default_order else {"order": order})
    # fp32 as the reference below: precision "auto" is bf16 on a CPU with native bf16 (AVX-512 BF16, AMX).
    drawn = sample.draw(model, schedule, config, n=3, sampler=sampler, seed=5, precision="fp32", progress=False,
                        **given)
    expected, _ = ddpm.ddim_sample(model, schedule, (3, 1, 16, 16), steps=steps, eta=eta, order=order,
                                   generator=runtime.seeded_generator(5, 0))
    assert torch.equal(drawn, expected)
    other_order, _ = ddpm.ddim_sample(model, schedule, (3, 1, 16, 16), steps=steps, eta=eta, order=3 - order,
                                      generator=runtime.seeded_generator(5, 0))
    assert not torch.equal(drawn, other_order)


def test_draw_in_bf16_is_the_sampler_under_bf16_autocast(loaded):
    """precision='bf16' runs the sampler under bf16 autocast (what 'auto' picks on a CPU with native bf16), and the
    precision is not ignored: the fp32 draw from the same generator differs."""
    model, schedule, config = loaded
    drawn = sample.draw(model, schedule, config, n=2, sampler="fast", steps=5, seed=3, precision="bf16",
                        progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = ddpm.ddim_sample(model, schedule, (2, 1, 16, 16), steps=5, eta=1.0, order=2,
                                       generator=runtime.seeded_generator(3, 0))
    assert torch.equal(drawn, expected.float())
    in_fp32 = sample.draw(model, schedule, config, n=2, sampler="fast", steps=5, seed=3, precision="fp32",
                          progress=False)
    assert not torch.equal(drawn, in_fp32)


def test_draw_ddpm_is_the_lecture_sampler_over_all_t_steps(loaded):
    """sampler='ddpm' is ddpm.sample (Algorithm 2, T steps) from the (seed, 0) generator."""
    model, schedule, config = loaded
    drawn = sample.draw(model, schedule, config, n=2, sampler="ddpm", seed=1, precision="fp32", progress=False)
    expected, _ = ddpm.sample(model, schedule, (2, 1, 16, 16), generator=runtime.seeded_generator(1, 0))
    assert torch.equal(drawn, expected)


def test_sample_py_writes_what_draw_returns(checkpoint_path, loaded, tmp_path):
    """The command line is a layer over the API: its .npz holds the pixels of draw's samples for the same options."""
    npz = tmp_path / "s.npz"
    assert sample.main(["--checkpoint", str(checkpoint_path), "--n", "5", "--batch-size", "2", "--sampler", "fast",
                        "--seed", "3", "--out", str(tmp_path / "s.png"), "--npz", str(npz), "--device", "cpu"]) == 0
    drawn = sample.draw(*loaded, n=5, batch_size=2, sampler="fast", seed=3, progress=False)
    np.testing.assert_array_equal(np.load(npz)["arr_0"], images.to_uint8(drawn))


@pytest.mark.parametrize("options, message", [
    (dict(sampler="fastest"), "sampler must be one of ddpm, fast, ddim"),
    (dict(sampler="fast", steps=51), "steps must be between 1 and the model's 50 timesteps"),
    (dict(sampler="ddim", steps=0), "steps must be between 1"),
    (dict(sampler="ddim", steps=2.5), "steps must be between 1"),
    (dict(sampler="ddpm", steps=10), "the ddpm sampler takes all T steps"),
    (dict(sampler="fast", eta=-1.0), "eta must be a number >= 0"),
    (dict(sampler="ddim", eta=float("nan")), "eta must be a number >= 0"),
    (dict(sampler="ddpm", order=2), "no eta and no order"),
    (dict(sampler="fast", order=3), "order must be 1 (the DDIM update) or 2"),
    (dict(sampler="ddim", order=True), "order must be 1 (the DDIM update) or 2"),
    (dict(n=0), "n must be a positive integer"),
    (dict(n=2.0), "n must be a positive integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
])
def test_draw_refuses_bad_options_with_one_line_before_sampling(loaded, options, message):
    """Each bad keyword: a ValueError (runtime.ConfigError) with one line naming it."""
    model, schedule, config = loaded
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        sample.draw(model, schedule, config, **{"n": 2, **options})
    assert isinstance(error.value, runtime.ConfigError) and "\n" not in str(error.value)


def test_grid_returns_the_pixels_and_writes_them_as_a_png(tmp_path):
    """grid: uint8 (H, W, C) of make_grid(to_uint8(samples)), ceil(sqrt(N)) a row; the PNG (in a new folder) decodes
    to it."""
    samples = torch.linspace(-1, 1, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4)
    path = tmp_path / "new" / "grid.png"
    pixels = sample.grid(samples, path=str(path))
    np.testing.assert_array_equal(pixels, images.make_grid(images.to_uint8(samples), nrow=3))
    np.testing.assert_array_equal(images.decode_png(path.read_bytes()), pixels)
    assert sample.grid(samples, nrow=5).shape == (4 + 2 * 2, 5 * 4 + 6 * 2, 3)


# ----------------------------------------------------------------------------- export


def test_export_holds_the_ema_weights_alone_in_float32_contiguous_with_configuration_and_tag(checkpoint_path, tmp_path):
    """From a checkpoint whose EMA weights are bf16 and channels_last (as the bf16 path keeps them), the export holds
    float32 contiguous copies, the model's description and a format tag, and loads with weights_only=True."""
    checkpoint = checkpoints.load_checkpoint(str(checkpoint_path))
    original = {name: tensor.clone() for name, tensor in checkpoint["ema"].items()}
    checkpoint["ema"] = {name: (tensor.to(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor)
                         .bfloat16() for name, tensor in checkpoint["ema"].items()}
    fast_path = tmp_path / "bf16.pt"
    checkpoints.save_checkpoint(str(fast_path), checkpoint)
    sample.export(str(fast_path), str(tmp_path / "weights.pt"))
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert weights["format"] == checkpoints.WEIGHTS_FORMAT and weights["version"] == checkpoints.WEIGHTS_VERSION
    assert set(weights) == set(checkpoints.WEIGHTS_KEYS)  # no optimizer state, no raw weights
    assert weights["unet"] == {"image_channels": 1, "widths": [8, 16], "time_emb_dim": 128, "blocks_per_level": 1}
    assert weights["schedule"] == {"timesteps": 50, "schedule": "linear"} and weights["img_size"] == 16
    assert weights["clip_x0"] is False
    assert weights["state_dict"].keys() == original.keys()
    for name, tensor in weights["state_dict"].items():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous(), name
        assert torch.equal(tensor, original[name].bfloat16().float()), name


def test_export_is_about_four_times_smaller_than_the_checkpoint(checkpoint_path, weights_path):
    """The checkpoint holds weights, EMA weights and Adam's two moments; the export the EMA weights only."""
    ratio = os.path.getsize(checkpoint_path) / os.path.getsize(weights_path)
    assert 3.5 < ratio < 4.5, ratio


def test_sample_py_samples_from_exported_weights(checkpoint_path, weights_path, tmp_path):
    """sample.py --checkpoint weights.pt draws exactly what it draws from the checkpoint."""
    outputs = []
    for source in (checkpoint_path, weights_path):
        npz = tmp_path / f"{source.stem}.npz"
        assert sample.main(["--checkpoint", str(source), "--n", "2", "--sampler", "ddim", "--steps", "5",
                            "--out", str(tmp_path / "x.png"), "--npz", str(npz), "--device", "cpu"]) == 0
        outputs.append(np.load(npz)["arr_0"])
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("extra", [["--npz", "x.npz"], ["--frames", "3"], ["--out", "x.png"]])
def test_export_with_sampling_flags_is_an_argparse_error(checkpoint_path, tmp_path, capsys, extra):
    """--export samples nothing, so --out, --npz or --frames beside it are refused before any work (exit 2)."""
    with pytest.raises(SystemExit) as stop:
        sample.main(["--checkpoint", str(checkpoint_path), "--export", str(tmp_path / "w.pt"), *extra])
    assert stop.value.code == 2 and "--export writes the weights only" in capsys.readouterr().err
    assert not (tmp_path / "w.pt").exists()
