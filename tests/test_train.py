"""train.py and sample.py end to end on tiny configurations: checkpoints, grids, logs, resume, PNG and .npz output."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import ddpm
import sample
import train
from repo_paths import ROOT, readme_on_one_line
from support import checkpoints, data, images, run_state, runtime
from test_data import cifar_archive_members, cifar_batch, write_cifar_archive
from unet import count_parameters

# A configuration that trains in about a second: 48 MNIST digits at 16x16, batch 8 (6 steps an epoch).
TINY = ["--widths", "8,16", "--img-size", "16", "--timesteps", "20", "--max-images", "48", "--batch-size", "8",
        "--grid-samples", "4", "--device", "cpu"]


def run_train(out, *extra):
    """Return train.main's exit code for the tiny configuration writing to out."""
    return train.main([*TINY, "--out", str(out), *extra])


def read_losses(out):
    """Return the rows of out/loss.csv as (step, epoch, loss) tuples."""
    with open(out / "loss.csv") as stream:
        return [(int(row["step"]), int(row["epoch"]), float(row["loss"])) for row in csv.DictReader(stream)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run of 2 epochs: its output folder."""
    out = tmp_path_factory.mktemp("run")
    assert run_train(out, "--epochs", "2") == 0
    return out


def test_training_writes_checkpoint_grids_and_loss_log(trained_run):
    """After 2 epochs of 6 steps: a checkpoint at step 12, a decodable grid per epoch, a loss row per step."""
    checkpoint = checkpoints.load_checkpoint(str(trained_run / "checkpoint.pt"))
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["step"]) == (2, 0, 12)
    assert checkpoint["config"]["widths"] == [8, 16] and checkpoint["ema"] is not None
    for epoch in (1, 2):
        grid = images.decode_png((trained_run / f"samples_epoch_{epoch:03d}.png").read_bytes())
        assert grid.shape == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 cells of 16 px, 2 px padding
    losses = read_losses(trained_run)
    assert [step for step, _, _ in losses] == list(range(12))
    assert [epoch for _, epoch, _ in losses] == [0] * 6 + [1] * 6
    assert all(math.isfinite(loss) for _, _, loss in losses)
    assert losses == [(step, step // 6, loss) for step, loss in enumerate(checkpoint["losses"])]


def test_training_reduces_the_loss(tmp_path):
    """Five epochs of the tiny model bring the mean loss of the last epoch below that of the first."""
    assert run_train(tmp_path, "--epochs", "5", "--grid-samples", "0", "--lr", "0.003") == 0
    losses = read_losses(tmp_path)
    first = np.mean([loss for _, epoch, loss in losses if epoch == 0])
    last = np.mean([loss for _, epoch, loss in losses if epoch == 4])
    assert last < 0.8 * first


def test_resume_continues_from_the_checkpoint(trained_run, tmp_path, capsys):
    """--resume --epochs 3 continues at epoch 3, step 12, and ends at step 18."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((trained_run / "checkpoint.pt").read_bytes())
    assert run_train(out, "--resume", "--epochs", "3") == 0
    assert "resumed from" in capsys.readouterr().out
    assert checkpoints.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 18


def test_config_json_is_written_at_the_start_as_the_checkpoints_configuration(tmp_path, monkeypatch):
    """config.json exists before the first step is taken, and holds the configuration the checkpoint records."""
    seen_at_first_epoch = []
    original = train.train_epoch

    def train_epoch_checking_config(run, stop, progress):
        seen_at_first_epoch.append((tmp_path / "config.json").exists())
        return original(run, stop, progress)

    monkeypatch.setattr(train, "train_epoch", train_epoch_checking_config)
    assert run_train(tmp_path, "--epochs", "1", "--grid-samples", "0") == 0
    assert seen_at_first_epoch == [True]
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == checkpoints.load_checkpoint(str(tmp_path / "checkpoint.pt"))["config"]
    assert written["channels"] == 1 and written["widths"] == [8, 16] and written["dataset"] == "mnist"


def test_loss_log_holds_the_learning_rate_and_elapsed_seconds_of_each_step(trained_run):
    """loss.csv: step, epoch, loss, lr (the warm-up's lr * (step + 1) / 100), elapsed_s (increasing, as checkpointed)."""
    with open(trained_run / "loss.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "elapsed_s"]
    assert [float(row["lr"]) for row in rows] == [train.learning_rate(step, 1e-3, 100) for step in range(12)]
    seconds = [float(row["elapsed_s"]) for row in rows]
    assert seconds == sorted(seconds) and seconds[0] > 0
    checkpoint = checkpoints.load_checkpoint(str(trained_run / "checkpoint.pt"))
    assert seconds == [round(value, 3) for value in checkpoint["elapsed"]]


def test_a_checkpoint_without_elapsed_times_still_resumes(trained_run, tmp_path):
    """A checkpoint written before elapsed times were kept resumes; its steps' elapsed_s are empty, the new ones not."""
    out = tmp_path / "run"
    out.mkdir()
    checkpoint = checkpoints.load_checkpoint(str(trained_run / "checkpoint.pt"))
    del checkpoint["elapsed"]
    checkpoints.save_checkpoint(str(out / "checkpoint.pt"), checkpoint)
    assert run_train(out, "--resume", "--epochs", "3", "--grid-samples", "0") == 0
    with open(out / "loss.csv") as stream:
        seconds = [row["elapsed_s"] for row in csv.DictReader(stream)]
    assert seconds[:12] == [""] * 12 and all(float(value) > 0 for value in seconds[12:]) and len(seconds) == 18


def test_a_checkpoint_from_before_the_adam_beta2_flag_reads_as_the_lecture_adam(trained_run, tmp_path):
    """A checkpoint whose configuration has no 'adam_beta2' (written before the flag existed, all with torch's default
    Adam) loads as 0.999; resuming it with another --adam-beta2 is refused, with the default it resumes."""
    out = tmp_path / "run"
    out.mkdir()
    checkpoint = checkpoints.load_checkpoint(str(trained_run / "checkpoint.pt"))
    assert checkpoint["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    del checkpoint["config"]["adam_beta2"]
    torch.save(checkpoint, out / "checkpoint.pt")
    assert checkpoints.load_checkpoint(str(out / "checkpoint.pt"))["config"]["adam_beta2"] == 0.999
    assert run_train(out, "--resume", "--epochs", "3", "--adam-beta2", "0.99") == 1
    assert run_train(out, "--resume", "--epochs", "3") == 0
    assert checkpoints.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 18


def test_a_checkpoint_from_before_the_learning_rate_decay_resumes_with_a_constant_rate(trained_run, tmp_path):
    """A checkpoint whose configuration has no 'lr_decay' (written before the flag existed) loads as 'none' and
    resumes with the constant learning rate it was trained with."""
    out = tmp_path / "run"
    out.mkdir()
    checkpoint = checkpoints.load_checkpoint(str(trained_run / "checkpoint.pt"))
    del checkpoint["config"]["lr_decay"]
    torch.save(checkpoint, out / "checkpoint.pt")
    assert checkpoints.load_checkpoint(str(out / "checkpoint.pt"))["config"]["lr_decay"] == "none"
    assert run_train(out, "--resume", "--epochs", "3", "--grid-samples", "0", "--warmup-steps", "100") == 0
    with open(out / "loss.csv") as stream:
        rates = [float(row["lr"]) for row in csv.DictReader(stream)]
    assert rates == pytest.approx([1e-3 * (step + 1) / 100 for step in range(18)], rel=1e-12)


@given(lr=st.floats(1e-6, 1.0), warmup_steps=st.integers(0, 300), quarter=st.integers(1, 500))
def test_cosine_decay_is_a_half_cosine_from_lr_to_zero_after_the_warm_up(lr, warmup_steps, quarter):
    """With decay_steps = total - warm-up = 4 * quarter: the warm-up is the constant schedule's; the rate is lr at the
    end of the warm-up, lr (1 + 1/sqrt 2) / 2 a quarter of the way (a straight line would give 0.75 lr), lr / 2 halfway,
    lr (1 - 1/sqrt 2) / 2 at three quarters, exactly 0 at total_steps and after; it never rises after the warm-up."""
    total = warmup_steps + 4 * quarter
    rate = lambda step: train.learning_rate(step, lr, warmup_steps, "cosine", total)  # noqa: E731
    for step in range(warmup_steps):
        assert rate(step) == train.learning_rate(step, lr, warmup_steps)
    assert rate(warmup_steps) == lr
    assert math.isclose(rate(warmup_steps + quarter), lr * (1 + 2 ** -0.5) / 2, rel_tol=1e-12)
    assert math.isclose(rate(warmup_steps + 2 * quarter), lr / 2, rel_tol=1e-12)
    assert math.isclose(rate(warmup_steps + 3 * quarter), lr * (1 - 2 ** -0.5) / 2, rel_tol=1e-9)
    assert rate(total) == 0.0 and rate(total + 7) == 0.0
    after = [rate(step) for step in range(warmup_steps, total + 1)]
    assert all(later <= earlier for earlier, later in zip(after, after[1:]))
    assert all(0 < value <= lr for value in after[:-1])


def test_the_quick_preset_decays_its_learning_rate_and_the_lecture_does_not():
    """The lecture's configuration keeps its constant lr after the warm-up; --preset quick decays it (cosine), and an
    explicit --lr-decay overrides the preset; an unknown decay is an argparse error."""
    assert train.parse_config([])[0]["lr_decay"] == "none"
    assert train.parse_config(["--preset", "quick"])[0]["lr_decay"] == "cosine"
    assert train.parse_config(["--preset", "quick", "--lr-decay", "none"])[0]["lr_decay"] == "none"
    with pytest.raises(SystemExit):
        train.parse_config(["--lr-decay", "linear"])


def test_an_image_size_the_presets_levels_cannot_halve_is_refused_in_one_line_that_names_the_way_out(capsys):
    """Each level but the last halves the image, so the side must be a multiple of 2**(levels-1): for the quick
    preset's widths that is 8 (28 is refused, naming the multiple and --widths), and with fewer widths 28 is fine."""
    levels = len(train.PRESETS["quick"]["widths"])
    factor = 2 ** (levels - 1)
    size = 32 - factor // 2  # a multiple of factor / 2, not of factor
    with pytest.raises(SystemExit):
        train.parse_config(["--preset", "quick", "--img-size", str(size)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--img-size {size} is not divisible by {factor}" in error
    assert f"use a multiple of {factor}" in error and "--widths" in error
    fewer = ",".join(str(width) for width in train.PRESETS["quick"]["widths"][:-1])
    config, _ = train.parse_config(["--preset", "quick", "--img-size", str(size), "--widths", fewer])
    assert config["img_size"] == size and len(config["widths"]) == levels - 1


def test_preset_values_are_overridden_by_explicit_flags():
    """--preset quick sets its widths, learning rate and epochs; an explicit flag (--epochs, --lr) wins over the
    preset; the rest are the lecture's."""
    config, _ = train.parse_config(["--preset", "quick", "--epochs", "3"])
    assert config["epochs"] == 3
    assert config["widths"] == train.PRESETS["quick"]["widths"] and config["lr"] == train.PRESETS["quick"]["lr"]
    assert config["timesteps"] == 600 and config["img_size"] == 32 and config["schedule"] == "linear"
    assert train.parse_config(["--preset", "quick", "--lr", "1e-3"])[0]["lr"] == 1e-3
    lecture, _ = train.parse_config([])
    assert (lecture["epochs"], lecture["batch_size"], lecture["lr"], lecture["timesteps"], lecture["img_size"]) == (
        25, 128, 1e-3, 600, 32)
    assert lecture["widths"] == [64, 128, 256]


def test_adam_beta2_sets_the_decay_of_the_optimizers_second_moment():
    """--adam-beta2 B reaches the Adam of train.py: after two steps with (clipped) gradients g1 and g2 its second moment
    is v = B * (1 - B) * g1^2 + (1 - B) * g2^2 (v_t = B v_(t-1) + (1 - B) g_t^2 from v_0 = 0). The default is 0.999,
    torch's and the lecture's Adam; B = 0.99 and 0.999 give second moments about 10 times apart."""
    assert train.parse_config([])[0]["adam_beta2"] == 0.999
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 16, 16, generator=generator) * 2 - 1
    t, noise = torch.tensor([0, 5, 10, 19]), torch.randn(4, 1, 16, 16, generator=generator)
    second_moments = {}
    for beta2 in (0.99, 0.999):
        config, _ = train.parse_config([*TINY, "--adam-beta2", str(beta2)])
        config["channels"] = 1
        run = run_state.Run(config=config, out="", device=torch.device("cpu"), precision="fp32", rank=0, world_size=1)
        run_state.build_model_and_optimizer(run)
        gradients = []
        for _ in range(2):
            train.train_step(run.model, run.optimizer, x0, t, noise, run.schedule, 1e-3, config["grad_clip"],
                             run.device, "fp32")
            gradients.append([parameter.grad.clone() for parameter in run.model.parameters()])
        for parameter, g1, g2 in zip(run.model.parameters(), *gradients):
            expected = beta2 * (1 - beta2) * g1**2 + (1 - beta2) * g2**2
            torch.testing.assert_close(run.optimizer.state[parameter]["exp_avg_sq"], expected, rtol=1e-5, atol=1e-12)
        second_moments[beta2] = sum(run.optimizer.state[p]["exp_avg_sq"].sum() for p in run.model.parameters())
    assert 5 < second_moments[0.99] / second_moments[0.999] < 20


def test_train_step_with_min_snr_gamma_steps_on_the_min_snr_weighted_loss():
    """train_step(min_snr_gamma=G) returns get_loss weighted by ddpm.min_snr_weights(t, G) and takes its SGD step
    (w - lr * grad of that loss); G = 0, the default, is the lecture's L_simple. The batch mixes nearly clean steps
    (t = 0, 1, weights far below 1) with noisy ones, so the two losses and their steps differ."""
    config, _ = train.parse_config([*TINY, "--grad-clip", "0"])
    assert config["min_snr_gamma"] == 0.0 and train.parse_config(["--min-snr-gamma", "5"])[0]["min_snr_gamma"] == 5.0
    config["channels"] = 1
    schedule = ddpm.Schedule.create(config["timesteps"])
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 16, 16, generator=generator) * 2 - 1
    t, noise = torch.tensor([0, 1, 10, 19]), torch.randn(4, 1, 16, 16, generator=generator)
    device, lr = torch.device("cpu"), 0.1
    results = {}
    for gamma in (0.0, 5.0):
        torch.manual_seed(0)
        model = runtime.build_model(config)
        reference = runtime.build_model(config)
        reference.load_state_dict(model.state_dict())
        weights = ddpm.min_snr_weights(schedule, t, gamma) if gamma else None
        expected = ddpm.get_loss(reference, x0, schedule, t=t, noise=noise, weights=weights)
        expected.backward()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        loss = train.train_step(model, optimizer, x0, t, noise, schedule, lr, 0, device, "fp32", gamma)
        assert loss.item() == expected.item()
        for stepped, before in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(stepped.detach(), before.detach() - lr * before.grad, rtol=0, atol=1e-7)
        results[gamma] = loss.item()
    assert ddpm.min_snr_weights(schedule, t, 5.0)[:2].max() < 0.5
    assert results[5.0] < results[0.0]


def test_sample_writes_png_grid_and_npz_that_agree(trained_run, tmp_path):
    """sample.py writes a PNG that decodes to the grid of the .npz's uint8 (N, H, W, C) samples, and a frames PNG."""
    out, npz = tmp_path / "s.png", tmp_path / "s.npz"
    code = sample.main(["--checkpoint", str(trained_run / "checkpoint.pt"), "--n", "5", "--batch-size", "2",
                        "--out", str(out), "--npz", str(npz), "--frames", "3", "--device", "cpu"])
    assert code == 0
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    samples = np.load(npz)["arr_0"]
    assert samples.shape == (5, 16, 16, 1) and samples.dtype == np.uint8
    grid = images.decode_png(png)
    np.testing.assert_array_equal(grid, images.make_grid(samples, nrow=3)[..., 0])
    frames = images.decode_png((tmp_path / "s-frames.png").read_bytes())
    assert frames.shape == (2 * 16 + 3 * 2, 3 * 16 + 4 * 2)  # 2 samples (first batch) x 3 snapshots


def test_sample_is_reproducible_for_a_seed_and_differs_across_seeds(trained_run, tmp_path):
    """The same --seed gives the same images; another seed gives others (DDPM, fast and DDIM)."""
    def draw(seed, sampler):
        path = tmp_path / f"{sampler}{seed}.npz"
        steps = [] if sampler == "ddpm" else ["--steps", "5"]
        assert sample.main(["--checkpoint", str(trained_run / "checkpoint.pt"), "--n", "3", "--seed", str(seed),
                            "--sampler", sampler, *steps, "--out", str(tmp_path / "x.png"),
                            "--npz", str(path), "--device", "cpu"]) == 0
        return np.load(path)["arr_0"]

    for sampler in ("ddpm", "fast", "ddim"):
        np.testing.assert_array_equal(draw(1, sampler), draw(1, sampler))
        assert not np.array_equal(draw(1, sampler), draw(2, sampler))


class FirstInputs(torch.nn.Module):
    """The wrapped noise predictor, recording the x it is called with first in each batch (its x_T)."""

    def __init__(self, model, timesteps):
        super().__init__()
        self.model, self.timesteps, self.first_inputs = model, timesteps, []

    def forward(self, x, t):
        if int(t[0]) == self.timesteps - 1:
            self.first_inputs.append(x.clone())
        return self.model(x, t)


@pytest.mark.parametrize("sampler", ["ddpm", "fast"])
def test_more_samples_with_the_same_seed_extend_the_run_and_start_from_noise_no_model_changes(trained_run, sampler):
    """Batch b draws from a generator seeded by (seed, b) alone. So asking for more images with the same seed and
    batch size returns the earlier run's whole batches bit for bit, then new ones (the README's 1,000 600-step
    samples of the lecture's configuration begin with its earlier 256); and x_T does not depend on the weights, so
    two checkpoints sampled with one seed start from the same noise (what every paired comparison relies on).
    """
    model, schedule, config = sample.load(str(trained_run / "checkpoint.pt"), device="cpu", precision="fp32")
    steps = None if sampler == "ddpm" else 5

    def draw(network, n):
        return sample.generate(network, schedule, config, n, sampler=sampler, steps=steps, seed=3, batch_size=2,
                               precision="fp32")[0]

    four, six = draw(model, 4), draw(model, 6)
    assert torch.equal(six[:4], four)
    assert not torch.equal(six[4:], six[:2]) and not torch.equal(six[2:4], six[:2])
    other = runtime.build_model(config).eval()
    recorders = [FirstInputs(model, config["timesteps"]), FirstInputs(other, config["timesteps"])]
    for recorder in recorders:
        draw(recorder, 4)
    assert [len(recorder.first_inputs) for recorder in recorders] == [2, 2]
    for mine, theirs in zip(*(recorder.first_inputs for recorder in recorders)):
        assert torch.equal(mine, theirs)
    assert not torch.equal(draw(other, 4), four)


def test_cifar10_trains_in_colour_end_to_end(tmp_path):
    """--dataset cifar10 on a tiny archive in the real format trains a 3-channel model and writes RGB grids."""
    rng = np.random.default_rng(0)
    write_cifar_archive(tmp_path / data.CIFAR10_FILE, cifar_archive_members([cifar_batch(rng, 8) for _ in range(5)]))
    out = tmp_path / "run"
    code = train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--widths", "8,16", "--img-size", "16",
                       "--timesteps", "10", "--batch-size", "8", "--epochs", "1", "--grid-samples", "4",
                       "--device", "cpu", "--out", str(out)])
    assert code == 0
    checkpoint = checkpoints.load_checkpoint(str(out / "checkpoint.pt"))
    assert checkpoint["config"]["channels"] == 3 and checkpoint["step"] == 5
    grid = images.decode_png((out / "samples_epoch_001.png").read_bytes())
    assert grid.shape == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2, 3)


def test_precision_auto_follows_the_hardware():
    """auto is bf16 exactly when the CPU has native bf16; explicit choices are kept."""
    cpu = torch.device("cpu")
    assert runtime.resolve_precision("auto", cpu) == ("bf16" if runtime.cpu_has_native_bf16() else "fp32")
    assert runtime.resolve_precision("fp32", cpu) == "fp32"


@pytest.fixture
def fake_gpu(monkeypatch):
    """Return a function that makes torch report one CUDA GPU of the given compute capability.

    torch.cuda.is_bf16_supported() is faked True at every capability, as torch reports it on a T4 or V100 too.
    """
    def install(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)

    return install


@pytest.mark.parametrize("capability, gpu", [((7, 0), "V100"), ((7, 5), "T4, the free Colab GPU")])
def test_precision_auto_is_fp32_on_a_gpu_that_only_emulates_bf16(fake_gpu, capability, gpu):
    """Compute capability below 8.0: auto means fp32, although is_bf16_supported() says True there."""
    fake_gpu(capability)
    assert torch.cuda.is_bf16_supported()
    assert runtime.resolve_precision("auto", torch.device("cuda:0")) == "fp32", gpu


@pytest.mark.parametrize("capability, gpu", [((8, 0), "A100"), ((8, 6), "RTX 30xx"), ((8, 9), "RTX 40xx"),
                                             ((9, 0), "H100")])
def test_precision_auto_is_bf16_on_a_gpu_that_computes_it_natively(fake_gpu, capability, gpu):
    """Compute capability 8.0 or newer: auto means bf16 autocast."""
    fake_gpu(capability)
    assert runtime.resolve_precision("auto", torch.device("cuda:0")) == "bf16", gpu


def test_explicit_precision_is_kept_on_any_gpu(fake_gpu):
    """--precision fp32 or bf16 is used as asked, whatever the capability."""
    fake_gpu((7, 5))
    assert runtime.resolve_precision("bf16", torch.device("cuda:0")) == "bf16"
    fake_gpu((9, 0))
    assert runtime.resolve_precision("fp32", torch.device("cuda:0")) == "fp32"


def test_preview_grid_is_the_stochastic_fast_route_from_the_same_noise_every_time(trained_run):
    """train.py's preview grid: the same seed gives the same grid (each epoch starts from the same x_T and step noise),
    and it is the fast route (eta = 1: the posterior's noise, second-order update), not deterministic DDIM (eta = 0)."""
    checkpoint = checkpoints.load_checkpoint(str(trained_run / "checkpoint.pt"))
    config = checkpoint["config"]
    model = checkpoints.model_from_checkpoint(checkpoint, torch.device("cpu"), "fp32")
    schedule = ddpm.Schedule.create(config["timesteps"], config["schedule"])
    grid = sample.preview_grid(model, schedule, config, torch.device("cpu"), "fp32")
    assert np.array_equal(grid, sample.preview_grid(model, schedule, config, torch.device("cpu"), "fp32"))
    shape = (config["grid_samples"], config["channels"], config["img_size"], config["img_size"])
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(config["seed"]))
    fast, _ = ddpm.ddim_sample(model, schedule, shape, steps=min(50, config["timesteps"]), eta=1.0, order=2, x_T=x_T,
                               generator=runtime.seeded_generator(config["seed"], 1))
    assert np.array_equal(grid, images.make_grid(images.to_uint8(fast), nrow=2))
    deterministic, _ = ddpm.ddim_sample(model, schedule, shape, steps=min(sample.PREVIEW_STEPS, config["timesteps"]),
                                        eta=0.0, x_T=x_T)
    deterministic_grid = images.make_grid(images.to_uint8(deterministic), nrow=2)
    assert grid.shape == deterministic_grid.shape and not np.array_equal(grid, deterministic_grid)


def test_readme_states_the_parameter_counts_of_the_lectures_network_and_of_the_quick_preset():
    """The README's "6.21M parameters by default" and "the quick preset: 0.65M" are the counts of the networks
    train.py builds for its defaults and for --preset quick (MNIST, one channel)."""
    readme = readme_on_one_line()
    for config, stated in ((train.DEFAULTS, "6.21M parameters by default"),
                           ({**train.DEFAULTS, **train.PRESETS["quick"]}, "the quick preset: 0.65M")):
        count = count_parameters(runtime.build_model({**config, "channels": 1}))
        assert stated in readme and f"{count / 1e6:.2f}M" in stated, (count, stated)


def test_readme_states_the_quick_presets_widths_epochs_steps_and_learning_rate():
    """The README's quick-preset paragraph names the recipe train.PRESETS["quick"] holds: its widths, its epochs of the
    8,000 digits train.py reads (the bundled split less the 2,000 evaluate keeps), the steps they make, its rate."""
    readme = readme_on_one_line()
    quick = train.PRESETS["quick"]
    digits = data.MNIST_TEST_DIGITS - data.HELD_OUT_TEST_DIGITS
    steps = quick["epochs"] * (digits // quick["batch_size"])
    widths = ", ".join(str(width) for width in quick["widths"])
    rate = f"{quick['lr']:.0e}".replace("e-0", "e-")  # 0.002 -> 2e-3, as the README writes it
    for stated in (f"widths ({widths})", f"batch {quick['batch_size']}, {quick['epochs']} epochs of the {digits:,} digits",
                   f"({steps:,} steps)", f"learning rate ({rate})"):
        assert stated in readme, stated
