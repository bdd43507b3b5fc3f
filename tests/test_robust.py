"""What survives what: kills, Ctrl-C, exact resume, untrusted or wrong checkpoints, bad data, bad arguments, divergence.

Each failure a user can cause must end in one clear line and a non-zero exit, never a traceback, a silently
wrong result, code run from a file, or a lost checkpoint.
"""
import gzip
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddpm
import sample
import train
from support import checkpoints

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--widths", "8,16", "--img-size", "16", "--timesteps", "20", "--max-images", "48", "--batch-size", "8",
        "--grid-samples", "0", "--device", "cpu"]
BAD_ARGUMENTS = [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "-1"], "--batch-size must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be"),
    (["--timesteps", "1"], "--timesteps must be at least 2"),
    (["--img-size", "15"], "not divisible by 2"),
    (["--device", "tpu"], "invalid choice"),
    (["--widths", "a,b"], "comma-separated integers"),
    (["--ema-decay", "1"], "--ema-decay must be in"),
    (["--resume", "--force"], "contradict"),
]


def run_train(out, *extra):
    """Return train.main's exit code for the tiny configuration writing to out."""
    return train.main([*TINY, "--out", str(out), *extra])


def one_line_error(captured):
    """Return stderr's single line (asserting there is exactly one, and no traceback)."""
    lines = [line for line in captured.err.strip().splitlines() if line]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def subprocess_env():
    """Return an environment for child training processes: one thread each, so that two cores are not oversubscribed."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def loss_log(out):
    """Return the rows of out/loss.csv (below its header) as lists of strings."""
    return [line.split(",") for line in (out / "loss.csv").read_text().splitlines()[1:]]


def same_state(first, second):
    """Return True when two state dicts hold bit-identical tensors under the same names."""
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


# ----------------------------------------------------------------------------- 1. kill at any moment


def test_sigkill_at_random_moments_always_leaves_a_checkpoint_that_loads_and_resumes(tmp_path):
    """SIGKILL at random moments of a run that checkpoints every epoch (6 steps): the checkpoint always loads and resumes.

    The kills are bounded: 6 kills, each 0-0.5 s after the run wrote a new checkpoint, on a model large enough
    (widths 32,64) that writing a checkpoint takes a noticeable share of an epoch.
    """
    out = tmp_path / "run"
    arguments = [sys.executable, "train.py", *TINY, "--widths", "32,64", "--epochs", "1000", "--out", str(out)]
    rng = random.Random(0)
    assert subprocess.run([*arguments, "--epochs", "1"], cwd=ROOT, env=subprocess_env(), capture_output=True).returncode == 0
    steps_seen = []
    for _ in range(6):
        written = (out / "checkpoint.pt").stat().st_mtime_ns
        process = subprocess.Popen([*arguments, "--resume"], cwd=ROOT, env=subprocess_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while (out / "checkpoint.pt").stat().st_mtime_ns == written and time.monotonic() < deadline:
            time.sleep(0.01)  # wait until the run has written a new checkpoint, so each kill finds progress
        time.sleep(rng.uniform(0, 0.5))  # then kill anywhere: mid-step, mid-write, between epochs
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        checkpoint = checkpoints.load_checkpoint(str(out / "checkpoint.pt"))
        steps_seen.append(checkpoint["step"])
        assert checkpoint["step"] % 6 == 0 and checkpoint["step_in_epoch"] == 0
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > 6, steps_seen
    final = subprocess.run([*arguments, "--resume", "--epochs", str(steps_seen[-1] // 6 + 1)], cwd=ROOT,
                           env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert checkpoints.load_checkpoint(str(out / "checkpoint.pt"))["step"] == steps_seen[-1] + 6
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


# ----------------------------------------------------------------------------- 2. Ctrl-C


def test_ctrl_c_saves_at_the_current_step_and_resume_continues_there(tmp_path):
    """SIGINT mid-run: exit code 130, one line naming the step; the checkpoint holds that step; --resume goes on from it."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train.py", *TINY, "--epochs", "100000", "--out", str(out)], cwd=ROOT,
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    message = [line for line in stdout.splitlines() if line.startswith("interrupted at step")]
    assert len(message) == 1 and "Traceback" not in stderr
    step = int(message[0].split()[3])
    checkpoint = checkpoints.load_checkpoint(str(out / "checkpoint.pt"))
    assert checkpoint["step"] == step and checkpoint["step_in_epoch"] == step % 6
    resumed = subprocess.run([sys.executable, "train.py", *TINY, "--epochs", str(step // 6 + 2), "--out", str(out),
                              "--resume"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {step}" in resumed.stdout
    assert checkpoints.load_checkpoint(str(out / "checkpoint.pt"))["step"] == (step // 6 + 2) * 6


# ----------------------------------------------------------------------------- 3. exact resume


def interrupt_at(monkeypatch, step_to_stop):
    """Make the step_to_stop-th training step (1-based) deliver a SIGINT to this process, as a Ctrl-C would."""
    original, calls = train.train_step, []

    def train_step_then_interrupt(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(train, "train_step", train_step_then_interrupt)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    """fp32 on CPU: 3 epochs straight == 1 epoch, resume to 2, stop at a mid-epoch step by Ctrl-C, resume to 3.

    Weights, EMA weights, optimizer state and loss log (all but its elapsed seconds) are bit-identical: the data
    order, the timesteps and the noise of every step depend only on (seed, epoch) and (seed, rank, step), and the
    optimizer and RNG states travel in the checkpoint.
    """
    fp32 = ("--precision", "fp32")
    straight, pieced = tmp_path / "straight", tmp_path / "pieced"
    assert run_train(straight, "--epochs", "3", *fp32) == 0
    assert run_train(pieced, "--epochs", "1", *fp32) == 0
    assert run_train(pieced, "--epochs", "2", "--resume", *fp32) == 0
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        assert run_train(pieced, "--epochs", "3", "--resume", *fp32) == 130
    assert checkpoints.load_checkpoint(str(pieced / "checkpoint.pt"))["step"] == 15
    assert run_train(pieced, "--epochs", "3", "--resume", *fp32) == 0
    first = checkpoints.load_checkpoint(str(straight / "checkpoint.pt"))
    second = checkpoints.load_checkpoint(str(pieced / "checkpoint.pt"))
    assert same_state(first["model"], second["model"])
    assert same_state(first["ema"], second["ema"])
    assert first["losses"] == second["losses"] and len(first["losses"]) == 18
    straight_log, pieced_log = loss_log(straight), loss_log(pieced)
    assert [row[:4] for row in straight_log] == [row[:4] for row in pieced_log]  # step, epoch, loss, lr
    pieced_seconds = [float(row[4]) for row in pieced_log]  # elapsed_s goes on across the resumes
    assert pieced_seconds == sorted(pieced_seconds) and pieced_seconds[0] > 0
    first_moments = [state["exp_avg"] for state in first["optimizer"]["state"].values()]
    second_moments = [state["exp_avg"] for state in second["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(first_moments, second_moments))


# ----------------------------------------------------------------------------- 4. untrusted checkpoints


class FileCreatingPayload:
    """A pickle payload: unpickling it would call open(marker, 'w') and so create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoint_carrying_code_is_refused_and_the_code_does_not_run(tmp_path, capsys):
    """A checkpoint whose pickle would run code is refused by load and by sample.py; the payload never runs."""
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "model": FileCreatingPayload(str(marker))}, evil)
    with pytest.raises(checkpoints.CheckpointError, match="refused"):
        checkpoints.load_checkpoint(str(evil))
    assert sample.main(["--checkpoint", str(evil), "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 1
    assert "refused" in one_line_error(capsys.readouterr())
    assert not marker.exists()


# ----------------------------------------------------------------------------- 5. wrong checkpoints


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A tiny finished run of 1 epoch: its output folder."""
    out = tmp_path_factory.mktemp("good")
    assert run_train(out, "--epochs", "1") == 0
    return out


def test_missing_foreign_and_truncated_checkpoints_get_one_clear_line(good_run, tmp_path, capsys):
    """Missing file, a non-checkpoint, a torch file of something else, a truncated checkpoint: one line, exit 1."""
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("these are not weights\n")
    other_torch_file = tmp_path / "tensor.pt"
    torch.save({"weights": torch.zeros(3)}, other_torch_file)
    truncated = tmp_path / "truncated.pt"
    content = (good_run / "checkpoint.pt").read_bytes()
    truncated.write_bytes(content[: len(content) // 2])
    cases = [(tmp_path / "absent.pt", "no checkpoint at"), (not_a_checkpoint, "not a readable checkpoint"),
             (other_torch_file, "not a checkpoint written by train.py"), (truncated, "not a readable checkpoint")]
    for path, expected in cases:
        assert sample.main(["--checkpoint", str(path), "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 1
        assert expected in one_line_error(capsys.readouterr())


@pytest.mark.parametrize("flag, value", [("--img-size", "32"), ("--timesteps", "30"), ("--widths", "16,32"),
                                         ("--dataset", "cifar10"), ("--lr", "0.01")])
def test_resume_with_a_different_configuration_is_refused(good_run, tmp_path, capsys, flag, value):
    """--resume with a flag that contradicts the checkpoint's configuration: one line naming the key, exit 1."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((good_run / "checkpoint.pt").read_bytes())
    assert run_train(out, "--resume", "--epochs", "2", flag, value) == 1
    line = one_line_error(capsys.readouterr())
    assert "was trained with" in line and flag.lstrip("-").replace("-", "_") in line
    assert checkpoints.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 6


# ----------------------------------------------------------------------------- 6. bad data


def mnist_folder(tmp_path, images_bytes):
    """Return a data folder holding the bundled labels and the given (gzip) images file."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(images_bytes)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes((ROOT / "data" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    return folder


def test_missing_or_damaged_data_gets_one_clear_line(tmp_path, capsys):
    """Missing files, a truncated gzip, wrong magic numbers: one line, exit 1, no checkpoint written."""
    real = gzip.decompress((ROOT / "data" / "t10k-images-idx3-ubyte.gz").read_bytes())
    cases = {
        "missing": None,
        "truncated": gzip.compress(real)[:5000],
        "magic": gzip.compress(b"\x00\x00\x09\x03" + real[4:]),
        "short": gzip.compress(real[:-100]),
    }
    for name, payload in cases.items():
        case_folder = tmp_path / name
        case_folder.mkdir()
        folder = case_folder if payload is None else mnist_folder(case_folder, payload)
        out = tmp_path / f"out-{name}"
        assert train.main([*TINY, "--data-dir", str(folder), "--epochs", "1", "--out", str(out)]) == 1, name
        one_line_error(capsys.readouterr())
        assert not (out / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- 7. bad arguments


@pytest.mark.parametrize("arguments, message", BAD_ARGUMENTS)
def test_bad_arguments_get_an_argparse_error_before_any_work(tmp_path, capsys, arguments, message):
    """Each invalid flag ends with exit 2 and an argparse-style message naming it; nothing is written."""
    with pytest.raises(SystemExit) as stop:
        train.main([*TINY, "--out", str(tmp_path / "run"), *arguments])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_requested_without_a_gpu_is_an_argparse_error(tmp_path, capsys):
    """--device cuda on a machine without CUDA: exit 2 with a message, for train.py and sample.py alike."""
    for main in (train.main, sample.main):
        with pytest.raises(SystemExit) as stop:
            main(["--device", "cuda", "--checkpoint", "x.pt"] if main is sample.main else [*TINY[:-2], "--device", "cuda"])
        assert stop.value.code == 2
        assert "no such device" in capsys.readouterr().err


def test_batch_larger_than_the_data_is_a_clear_error(tmp_path, capsys):
    """A batch larger than the images available: one line saying so, exit 1."""
    assert run_train(tmp_path / "run", "--max-images", "4") == 1
    assert "more than the 4 images" in one_line_error(capsys.readouterr())


# ----------------------------------------------------------------------------- 8. divergence


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A NaN loss at step 8 (epoch 2) stops with a message naming step 8, exit 1; the epoch-1 checkpoint stays."""
    out = tmp_path / "run"
    assert run_train(out, "--epochs", "1") == 0
    before = (out / "checkpoint.pt").read_bytes()
    original, calls = ddpm.get_loss, []

    def loss_that_turns_nan(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(ddpm, "get_loss", loss_that_turns_nan)
    assert run_train(out, "--epochs", "3", "--resume") == 1
    assert "non-finite at step 8 (epoch 2)" in capsys.readouterr().out
    assert (out / "checkpoint.pt").read_bytes() == before


# ----------------------------------------------------------------------------- 9. output safety


def test_fresh_run_into_a_folder_with_a_checkpoint_asks_for_resume_or_force(good_run, tmp_path, capsys):
    """A new run over an existing checkpoint is refused (naming --resume and --force); with --force it starts over."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((good_run / "checkpoint.pt").read_bytes())
    assert run_train(out, "--epochs", "1") == 1
    line = one_line_error(capsys.readouterr())
    assert "--resume" in line and "--force" in line
    assert checkpoints.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 6
    assert run_train(out, "--epochs", "2", "--force") == 0
    assert checkpoints.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 12


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    """--resume in a folder without a checkpoint: one line, exit 1."""
    assert run_train(tmp_path / "empty", "--resume") == 1
    assert "no checkpoint at" in one_line_error(capsys.readouterr())
