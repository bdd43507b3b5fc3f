"""What survives what: kills, Ctrl-C, exact resume, untrusted or wrong checkpoints, bad data, bad arguments, divergence.

Each failure a user can cause must end in one clear line and a non-zero exit, never a traceback, a silently
wrong result, code run from a file, or a lost checkpoint.
"""
import concurrent.futures
import errno
import gzip
import json
import os
import queue
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import ddpm
import sample
import train
from support import arguments, checkpoints, run_state

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
    (["--adam-beta2", "1"], "--adam-beta2 must be in"),
    (["--adam-beta2", "-0.5"], "--adam-beta2 must be in"),
    (["--adam-beta2", "nan"], "--adam-beta2 must be a finite number"),
    (["--resume", "--force"], "contradict"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
    (["--min-snr-gamma", "-1"], "--min-snr-gamma must not be negative"),
    (["--min-snr-gamma", "inf"], "--min-snr-gamma must be a finite number"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number"),
    (["--ema-decay", "nan"], "--ema-decay must be"),
    (["--lr", "inf"], "--lr must be"),
    (["--seed", "-1"], "--seed must be"),
    (["--seed", str(2**70)], "--seed must be"),
]
BAD_SAMPLE_ARGUMENTS = [
    (["--eta", "nan"], "--eta must be"),
    (["--eta", "inf"], "--eta must be"),
    (["--eta", "-1"], "--eta must be"),
    (["--eta", "1.5"], "--eta must be"),
    (["--order", "3"], "invalid choice"),
    (["--seed", "-1"], "--seed must be"),
    (["--seed", str(2**70)], "--seed must be"),
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


class OutputLines:
    """The lines a child process prints on stdout, read by a thread, so that a test can wait for one with a timeout."""

    def __init__(self, process):
        self.lines, self.queue = [], queue.Queue()
        self.thread = threading.Thread(target=self.read, args=(process.stdout,), daemon=True)
        self.thread.start()

    def read(self, stream):
        """Put each line of stream on the queue, then None when the stream ends."""
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, pattern, timeout=120):
        """Return the first line that matches the regular expression pattern; fail if the output ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} within {timeout} s; output so far:\n{''.join(self.lines)}")
            if line is None:
                pytest.fail(f"the run ended before printing a line matching {pattern!r}:\n{''.join(self.lines)}")
            self.lines.append(line)
            if re.match(pattern, line):
                return line

    def rest(self):
        """Return everything printed, once the process has closed its stdout."""
        self.thread.join(timeout=60)
        while not self.queue.empty():
            line = self.queue.get_nowait()
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)


def start_train(out, *extra, stderr_path):
    """Return (process, OutputLines) of `python train.py` on the tiny configuration, stderr into stderr_path."""
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, "train.py", *TINY, "--out", str(out), *extra], cwd=ROOT,
                                   env=subprocess_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
    return process, OutputLines(process)


def same_state(first, second):
    """Return True when two state dicts hold bit-identical tensors under the same names."""
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


# ----------------------------------------------------------------------------- 1. kill at any moment


def kill_at_random_moments(out, kills, seed):
    """Start, then SIGKILL, `kills` runs in out (the first fresh, the others --resume), each 0-0.5 s after it wrote a
    new checkpoint; then resume once more for one epoch to its end. Return ((step, step_in_epoch) of the checkpoint
    each kill left, the last run's process): the caller asserts."""
    arguments = [sys.executable, "train.py", *TINY, "--widths", "32,64", "--epochs", "1000", "--out", str(out)]
    rng = random.Random(seed)

    def written():
        """Return the checkpoint's modification time in ns, None before the first one."""
        return (out / "checkpoint.pt").stat().st_mtime_ns if (out / "checkpoint.pt").exists() else None

    steps_seen = []
    for kill in range(kills):
        before = written()
        process = subprocess.Popen([*arguments, *(["--resume"] if kill else [])], cwd=ROOT, env=subprocess_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while written() == before and time.monotonic() < deadline:
            time.sleep(0.01)  # wait until the run has written a new checkpoint, so each kill finds progress
        time.sleep(rng.uniform(0, 0.5))  # then kill anywhere: mid-step, mid-write, between epochs
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        checkpoint = checkpoints.load_checkpoint(str(out / "checkpoint.pt"))
        steps_seen.append((checkpoint["step"], checkpoint["step_in_epoch"]))
    final = subprocess.run([*arguments, "--resume", "--epochs", str(steps_seen[-1][0] // 6 + 1)], cwd=ROOT,
                           env=subprocess_env(), capture_output=True, text=True, timeout=120)
    return steps_seen, final


def test_sigkill_at_random_moments_always_leaves_a_checkpoint_that_loads_and_resumes(tmp_path):
    """SIGKILL at random moments of a run that checkpoints every epoch (6 steps): the checkpoint always loads and resumes.

    6 kills in two runs of 3, side by side in two folders (each child uses one thread, so the two cores serve one
    run each): the first of each run fresh, the others of --resume, each 0-0.5 s after the run wrote a new
    checkpoint, on a model large enough (widths 32,64) that writing a checkpoint takes a noticeable share of an
    epoch. Every kill leaves an epoch's checkpoint that loads, further on than the one before; a last --resume
    trains one more epoch from it, and no temporary file stays.
    """
    folders = [tmp_path / "run_a", tmp_path / "run_b"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        chains = [pool.submit(kill_at_random_moments, out, 3, seed) for seed, out in enumerate(folders)]
        results = [chain.result(timeout=300) for chain in chains]
    for out, (seen, final) in zip(folders, results):
        steps = [step for step, _ in seen]
        assert all(step % 6 == 0 and step_in_epoch == 0 for step, step_in_epoch in seen), seen
        assert steps == sorted(steps) and steps[-1] > 6, seen
        assert final.returncode == 0, final.stderr
        assert checkpoints.load_checkpoint(str(out / "checkpoint.pt"))["step"] == steps[-1] + 6
        assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


# ----------------------------------------------------------------------------- 2. Ctrl-C


def test_ctrl_c_saves_at_the_current_step_and_resume_continues_there(tmp_path):
    """SIGINT mid-run: exit code 130, one line naming the step; the checkpoint holds that step; --resume goes on from it.

    The signal goes out when the run has printed its first progress line (after the first steps, so the handler is
    set), not after a sleep: the test does not depend on how fast the machine is.
    """
    out = tmp_path / "run"
    process, output = start_train(out, "--epochs", "100000", stderr_path=tmp_path / "stderr.txt")
    output.wait_for(r"epoch \d+/")
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    stdout, stderr = output.rest(), (tmp_path / "stderr.txt").read_text()
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


def test_a_reader_that_stops_reading_stops_neither_training_nor_sampling(tmp_path):
    """`python train.py | head -0`: the pipe is closed before the run prints anything, yet it trains every step and
    saves (exit 0, no traceback); `python sample.py ... | head -0` likewise still writes its grid and .npz.

    Without the guard the first line printed raises BrokenPipeError, an OSError: the run stops with an error and
    the work since the last epoch's checkpoint is lost. Closing at once, not after a line or a sleep, makes every
    line meet the closed pipe however fast the machine is.
    """
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train.py", *TINY, "--epochs", "2", "--out", str(out)], cwd=ROOT,
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "error" not in stderr
    assert checkpoints.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 2 * 6
    sampling = subprocess.Popen([sys.executable, "sample.py", "--checkpoint", str(out / "checkpoint.pt"), "--n", "4",
                                 "--sampler", "fast", "--steps", "5", "--out", str(tmp_path / "grid.png"), "--npz",
                                 str(tmp_path / "samples.npz")], cwd=ROOT, env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampling.stdout.close()
    stderr = sampling.stderr.read()
    assert sampling.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and (tmp_path / "grid.png").is_file() and (tmp_path / "samples.npz").is_file()


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
@pytest.mark.parametrize("ignored_before", [False, True], ids=["terminal", "nohup"])
def test_closing_the_terminal_saves_like_ctrl_c_but_nohup_keeps_the_run_going(ignored_before):
    """SIGHUP gets the handler that SIGINT and SIGTERM get (the one the Ctrl-C test above drives: save at this
    step, then stop), unless it was ignored when the run started, as under nohup: then it stays ignored."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN if ignored_before else signal.SIG_DFL)
        stop = run_state.StopRequest()
        replaced = run_state.install_stop_request(stop)
        assert signal.getsignal(signal.SIGINT) is stop and signal.getsignal(signal.SIGTERM) is stop
        assert (signal.getsignal(signal.SIGHUP) is signal.SIG_IGN) == ignored_before
        assert (signal.SIGHUP in replaced) == (not ignored_before)
        if not ignored_before:
            assert signal.getsignal(signal.SIGHUP) is stop
            os.kill(os.getpid(), signal.SIGHUP)
            assert stop.signal_name == "SIGHUP"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def test_a_run_with_a_cosine_learning_rate_decay_resumes_bit_identically_and_only_with_its_epochs(tmp_path, monkeypatch,
                                                                                                    capsys):
    """--lr-decay cosine: 2 epochs straight == stopped by Ctrl-C at step 3, then resumed; the learning rate of each
    step depends on the run's length, so a resume asking for other --epochs is refused with one line."""
    cosine = ("--precision", "fp32", "--lr-decay", "cosine", "--warmup-steps", "2", "--epochs", "2")
    straight, pieced = tmp_path / "straight", tmp_path / "pieced"
    assert run_train(straight, *cosine) == 0
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        assert run_train(pieced, *cosine) == 130
    capsys.readouterr()
    assert run_train(pieced, *cosine, "--resume", "--epochs", "3") == 1
    message = capsys.readouterr().err.strip()
    assert "decays its learning rate to zero over 2 epochs" in message and "--epochs 2" in message
    assert "\n" not in message
    assert run_train(pieced, *cosine, "--resume") == 0
    first = checkpoints.load_checkpoint(str(straight / "checkpoint.pt"))
    second = checkpoints.load_checkpoint(str(pieced / "checkpoint.pt"))
    assert same_state(first["model"], second["model"]) and same_state(first["ema"], second["ema"])
    assert first["losses"] == second["losses"] and len(first["losses"]) == 12
    rates = [float(row[3]) for row in loss_log(pieced)]
    assert rates == [train.learning_rate(step, 1e-3, 2, "cosine", 12) for step in range(12)]
    assert rates[1] == 1e-3 and rates[-1] < 0.03 * 1e-3  # full after the warm-up, nearly zero at the end


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
                                         ("--dataset", "cifar10"), ("--lr", "0.01"), ("--min-snr-gamma", "5"),
                                         ("--adam-beta2", "0.99")])
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
    cases = {  # compresslevel 1: the 7.8 MB file in a fraction of a second instead of seconds
        "missing": None,
        "truncated": gzip.compress(real, compresslevel=1)[:5000],
        "magic": gzip.compress(b"\x00\x00\x09\x03" + real[4:], compresslevel=1),
        "short": gzip.compress(real[:-100], compresslevel=1),
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


def test_a_refused_run_leaves_no_folder_behind(tmp_path, capsys):
    """A run refused before it wrote anything (no checkpoint to resume, missing data) removes the --out it created."""
    assert run_train(tmp_path / "new" / "run", "--resume") == 1
    assert "no checkpoint at" in one_line_error(capsys.readouterr())
    assert train.main([*TINY, "--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "other")]) == 1
    one_line_error(capsys.readouterr())
    assert sorted(os.listdir(tmp_path)) == []


def test_force_replaces_the_previous_runs_outputs_and_keeps_the_users_files(tmp_path):
    """--force with fewer epochs: the old run's later grids go with its checkpoint and log; the user's files stay."""
    out = tmp_path / "run"
    assert run_train(out, "--epochs", "2", "--grid-samples", "4") == 0
    (out / "notes.txt").write_text("my notes\n")
    (out / "samples_epoch_002.png.keep").write_bytes((out / "samples_epoch_002.png").read_bytes())
    assert run_train(out, "--epochs", "1", "--grid-samples", "4", "--force") == 0
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "loss.csv", "notes.txt",
                                       "samples_epoch_001.png", "samples_epoch_002.png.keep"]
    assert checkpoints.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 6
    assert json.loads((out / "config.json").read_text())["epochs"] == 1  # the new run's configuration


# ----------------------------------------------------------------------------- 10. one run per folder


def test_a_run_in_a_folder_another_run_holds_is_refused_naming_its_pid(tmp_path, capsys):
    """While a run trains in --out, another start there (fresh, --resume or --force) is refused with one line naming
    the running process; the running run's files (an in-flight temporary file) are untouched. A SIGKILL frees the
    folder: the lock is the kernel's, it dies with the process."""
    out = tmp_path / "run"
    process, output = start_train(out, "--epochs", "100000", stderr_path=tmp_path / "stderr.txt")
    try:
        output.wait_for("model:")  # printed after set-up: the run holds --out
        in_flight = out / ".checkpoint.pt-inflight.tmp"
        in_flight.write_bytes(b"half a checkpoint")
        for flags in ([], ["--resume"], ["--force"]):
            assert run_train(out, "--epochs", "1", *flags) == 1
            assert f"PID {process.pid}" in one_line_error(capsys.readouterr())
        assert in_flight.read_bytes() == b"half a checkpoint"
    finally:
        process.kill()
        process.wait(timeout=60)
    assert run_train(out, "--epochs", "1", "--force") == 0


def test_two_runs_started_together_in_one_folder_one_trains_the_other_is_refused(tmp_path):
    """Two train.py started at the same moment with the same --out: exactly one trains (exit 0); the other is refused
    with one line (the folder is in use, or already holds the first one's checkpoint), exit 1, no traceback."""
    command = [sys.executable, "train.py", *TINY, "--epochs", "3", "--out", str(tmp_path / "run")]
    processes = [subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [process.communicate(timeout=180) for process in processes]
    codes = [process.returncode for process in processes]
    assert sorted(codes) == [0, 1], results
    refused_stderr = results[codes.index(1)][1]
    assert len(refused_stderr.strip().splitlines()) == 1 and "Traceback" not in refused_stderr
    assert checkpoints.load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["step"] == 18


def test_only_this_projects_own_temporary_files_are_removed_and_only_by_the_run_that_holds_the_folder(
        good_run, tmp_path, capsys):
    """A refused start removes nothing; the run that holds the folder removes the temporary files a kill left of its
    own outputs (checkpoint, loss log, grids, config) and nothing else (a user's .notes.tmp stays)."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(good_run / "checkpoint.pt", out / "checkpoint.pt")
    own = [".checkpoint.pt-a1b2c3d4.tmp", ".loss.csv-x_y9z8w7.tmp", ".samples_epoch_002.png-k3j4h5g6.tmp",
           ".config.json-q1w2e3r4.tmp"]
    users = [".notes.tmp", ".checkpoint.pt.tmp", ".mydata.pt-a1b2c3d4.tmp", "checkpoint.pt-a1b2c3d4.tmp"]
    for name in own + users:
        (out / name).write_text("x")
    assert run_train(out, "--epochs", "1") == 1  # refused: the folder holds a checkpoint
    one_line_error(capsys.readouterr())
    assert set(own + users) <= set(os.listdir(out))
    assert run_train(out, "--epochs", "1", "--resume") == 0
    assert sorted(name for name in os.listdir(out) if name.endswith(".tmp")) == sorted(users)


# ----------------------------------------------------------------------------- 11. outputs checked before any work


def count_calls(monkeypatch, module, name):
    """Replace module.name by a wrapper that records its calls; return the list of calls."""
    original, calls = getattr(module, name), []

    def recorded(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    return calls


@pytest.mark.parametrize("case", ["out_is_a_file", "out_below_a_file", "checkpoint_is_a_folder", "grid_is_a_folder",
                                  "loss_log_is_a_folder"])
def test_an_out_that_cannot_take_the_outputs_is_refused_before_any_step(tmp_path, monkeypatch, capsys, case):
    """--out a file, below a file, or holding a folder under the name of an output: one line naming the path and
    why, exit 1, before the first training step."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    out = tmp_path / "run"
    if case.endswith("is_a_folder"):
        name = {"checkpoint_is_a_folder": "checkpoint.pt", "grid_is_a_folder": "samples_epoch_001.png",
                "loss_log_is_a_folder": "loss.csv"}[case]
        (out / name).mkdir(parents=True)
        named = out / name
    else:
        out = a_file if case == "out_is_a_file" else a_file / "run"
        named = a_file
    steps = count_calls(monkeypatch, train, "train_step")
    assert run_train(out, "--epochs", "1", "--grid-samples", "4") == 1
    assert str(named) in one_line_error(capsys.readouterr())
    assert not steps


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused_before_any_step(tmp_path, monkeypatch, capsys):
    """A read-only --out: one line naming it, exit 1, before the first training step."""
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    steps = count_calls(monkeypatch, train, "train_step")
    try:
        assert run_train(out, "--epochs", "1") == 1
    finally:
        out.chmod(0o755)
    assert str(out) in one_line_error(capsys.readouterr())
    assert not steps


@pytest.mark.parametrize("case", ["out_below_a_file", "out_is_a_folder", "npz_below_a_file", "npz_is_a_folder",
                                  "frames_is_a_folder"])
def test_sample_refuses_outputs_it_cannot_write_before_sampling(good_run, tmp_path, monkeypatch, capsys, case):
    """sample.py with an output it cannot create (below a file, a folder under its name): one line naming the path,
    exit 1, before any sampling step."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    paths = {"out": tmp_path / "s.png", "npz": tmp_path / "s.npz"}
    named = {"out_below_a_file": a_file, "npz_below_a_file": a_file, "out_is_a_folder": tmp_path / "s.png",
             "npz_is_a_folder": tmp_path / "s.npz", "frames_is_a_folder": tmp_path / "s-frames.png"}[case]
    if case.endswith("below_a_file"):
        paths[case.split("_")[0]] = a_file / "s.png" if case.startswith("out") else a_file / "s.npz"
    else:
        named.mkdir()
    sampled = count_calls(monkeypatch, sample, "generate")
    code = sample.main(["--checkpoint", str(good_run / "checkpoint.pt"), "--n", "2", "--out", str(paths["out"]),
                        "--npz", str(paths["npz"]), "--frames", "2", "--device", "cpu"])
    assert code == 1
    assert str(named) in one_line_error(capsys.readouterr())
    assert not sampled


def test_sample_npz_must_be_an_npz_other_than_the_checkpoint(good_run, tmp_path, capsys):
    """--npz must end in .npz and must not name the checkpoint it reads (argparse error, exit 2): the checkpoint
    survives, whatever the spelling of its path."""
    checkpoint = tmp_path / "checkpoint.pt"
    shutil.copy(good_run / "checkpoint.pt", checkpoint)
    saved_as_npz = tmp_path / "run.npz"
    shutil.copy(good_run / "checkpoint.pt", saved_as_npz)
    cases = [(["--checkpoint", str(checkpoint), "--npz", str(checkpoint)], ".npz"),
             (["--checkpoint", str(checkpoint), "--npz", str(tmp_path / "samples")], ".npz"),
             (["--checkpoint", str(saved_as_npz), "--npz", str(tmp_path / "sub" / ".." / "run.npz")], "checkpoint")]
    for flags, message in cases:
        with pytest.raises(SystemExit) as stop:
            sample.main([*flags, "--out", str(tmp_path / "s.png"), "--device", "cpu"])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
    for path in (checkpoint, saved_as_npz):
        assert path.read_bytes() == (good_run / "checkpoint.pt").read_bytes()
    assert not (tmp_path / "s.png").exists()


def test_every_output_gets_the_permissions_the_umask_gives(tmp_path):
    """Under umask 022, checkpoint.pt, loss.csv, the epoch grid, the sample PNGs and the .npz are all 0644 (files
    written through a private temporary file must not keep its 0600)."""
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        assert run_train(out, "--epochs", "1", "--grid-samples", "4") == 0
        assert sample.main(["--checkpoint", str(out / "checkpoint.pt"), "--n", "2", "--sampler", "ddim", "--steps", "2",
                            "--out", str(tmp_path / "s.png"), "--npz", str(tmp_path / "s.npz"), "--frames", "2",
                            "--device", "cpu"]) == 0
    finally:
        os.umask(previous)
    written = [out / "checkpoint.pt", out / "loss.csv", out / "samples_epoch_001.png", tmp_path / "s.png",
               tmp_path / "s.npz", tmp_path / "s-frames.png"]
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == {
        path.name: oct(0o644) for path in written}


# ----------------------------------------------------------------------------- 12. the loss log and the data of a resume


def test_resume_rewrites_a_loss_log_that_a_kill_left_short(good_run, tmp_path):
    """A kill between the checkpoint's rename and loss.csv's leaves the log short; any start from the checkpoint
    rewrites it from the losses the checkpoint holds (here one with nothing left to train)."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(good_run / "checkpoint.pt", out / "checkpoint.pt")
    full_log = (good_run / "loss.csv").read_text()
    (out / "loss.csv").write_text("".join(full_log.splitlines(keepends=True)[:3]))
    assert run_train(out, "--resume", "--epochs", "1") == 0
    assert (out / "loss.csv").read_text() == full_log


def test_resume_on_another_data_split_is_refused_naming_both(tmp_path, capsys):
    """A run trained on the bundled test split, resumed after --download added the training split: one line naming
    both splits, exit 1, the checkpoint untouched."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(ROOT / "data" / name, data_dir / name)
    out = tmp_path / "run"
    flags = [*TINY, "--data-dir", str(data_dir), "--out", str(out)]
    assert train.main([*flags, "--epochs", "1"]) == 0
    capsys.readouterr()
    for test_name, train_name in (("t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"),
                                  ("t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz")):
        shutil.copy(data_dir / test_name, data_dir / train_name)  # what --download leaves (here with test digits)
    before = (out / "checkpoint.pt").read_bytes()
    assert train.main([*flags, "--epochs", "2", "--resume"]) == 1
    line = one_line_error(capsys.readouterr())
    assert "MNIST test split" in line and "MNIST train split" in line
    assert (out / "checkpoint.pt").read_bytes() == before


def test_preset_on_resume_follows_the_rule_of_explicit_flags(good_run, tmp_path, capsys):
    """--preset quick on --resume of a run trained without it: refused like an explicit flag, naming the key."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(good_run / "checkpoint.pt", out / "checkpoint.pt")
    assert run_train(out, "--resume", "--preset", "quick") == 1
    line = one_line_error(capsys.readouterr())
    assert "was trained with lr=0.001" in line and "lr=0.002" in line and "--preset quick" in line


# ----------------------------------------------------------------------------- 13. what a run says


def test_divergence_before_the_first_checkpoint_says_that_none_was_written(tmp_path, monkeypatch, capsys):
    """A NaN loss from the first step of a fresh run: the message says no checkpoint exists (none was written)."""
    original = ddpm.get_loss
    monkeypatch.setattr(ddpm, "get_loss", lambda *args, **kwargs: original(*args, **kwargs) * float("nan"))
    out = tmp_path / "run"
    assert run_train(out, "--epochs", "1") == 1
    message = [line for line in capsys.readouterr().out.splitlines() if "non-finite" in line]
    assert len(message) == 1 and "no checkpoint" in message[0].lower() and "stays" not in message[0], message
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("timesteps, schedule, signal_left", [("50", "linear", "0.78"), ("600", "linear", None),
                                                               ("50", "cosine", None)])
def test_training_warns_when_x_T_keeps_signal_that_sampling_does_not_start_from(tmp_path, capsys, timesteps,
                                                                               schedule, signal_left):
    """sqrt(alphas_cumprod[T-1]) > 0.1 (linear schedule, T = 50: 0.78) gets a warning naming the value at the start;
    the lecture's T = 600 (0.048) and the cosine schedule do not."""
    assert run_train(tmp_path / "run", "--epochs", "1", "--timesteps", timesteps, "--schedule", schedule) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    if signal_left is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and f"= {signal_left}" in warnings[0], warnings


# ----------------------------------------------------------------------------- 14. one line instead of a traceback


@pytest.mark.parametrize("arguments, message", BAD_SAMPLE_ARGUMENTS)
def test_bad_sample_arguments_get_an_argparse_error_before_any_work(good_run, tmp_path, capsys, arguments, message):
    """sample.py: a non-finite or out-of-range --eta, an --order other than 1 or 2, a --seed no generator takes:
    exit 2 naming the flag."""
    with pytest.raises(SystemExit) as stop:
        sample.main(["--checkpoint", str(good_run / "checkpoint.pt"), "--sampler", "ddim", "--out",
                     str(tmp_path / "s.png"), "--device", "cpu", *arguments])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()


def test_the_checkpoint_configuration_check_knows_every_key_of_train_py():
    """arguments.CONFIG_TYPES, which a checkpoint's configuration is checked against, holds every key of train.py's
    configuration with the type of its default, so a new flag cannot slip past the check."""
    set_from_the_data = {"channels"}  # load_dataset sets it from the images read
    assert set(arguments.CONFIG_TYPES) == set(train.DEFAULTS) | set(train.DERIVED_KEYS) | set_from_the_data
    assert {key: type(value) for key, value in train.DEFAULTS.items()} == {
        key: arguments.CONFIG_TYPES[key] for key in train.DEFAULTS}


def crafted_checkpoint(good_run, path, case):
    """Write at path the good run's checkpoint changed as case says: empty, a config key missing, of the wrong
    type or out of range, or weights that do not fit the config."""
    if case == "empty":
        path.write_bytes(b"")
        return
    checkpoint = checkpoints.load_checkpoint(str(good_run / "checkpoint.pt"))
    config = checkpoint["config"]
    if case == "missing_key":
        del config["widths"]
    elif case == "wrong_type":
        config["timesteps"] = "20"
    elif case == "out_of_range":
        config["img_size"] = 0
    elif case == "weights_do_not_fit":
        config["widths"] = [16, 32]
    elif case == "ema_does_not_fit":
        checkpoint["ema"] = {name: tensor[:1] for name, tensor in checkpoint["ema"].items()}
    elif case == "position":
        checkpoint["step"] = "six"
    torch.save(checkpoint, path)


CRAFTED_CHECKPOINTS = {"empty": "not a readable checkpoint", "missing_key": "widths", "wrong_type": "timesteps",
                       "out_of_range": "img-size", "weights_do_not_fit": "do not fit",
                       "ema_does_not_fit": "do not fit", "position": "step"}


@pytest.mark.parametrize("case", sorted(CRAFTED_CHECKPOINTS))
def test_crafted_checkpoints_get_one_line_from_sample_and_from_resume(good_run, tmp_path, capsys, case):
    """An empty checkpoint, one whose config lacks a key, has a wrong type or value, or whose weights do not fit it:
    sample.py and train.py --resume each say so in one line (exit 1) before building a model."""
    out = tmp_path / "run"
    out.mkdir()
    crafted_checkpoint(good_run, out / "checkpoint.pt", case)
    assert sample.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "s.png"),
                        "--device", "cpu"]) == 1
    assert CRAFTED_CHECKPOINTS[case] in one_line_error(capsys.readouterr())
    assert run_train(out, "--resume", "--epochs", "2") == 1
    assert CRAFTED_CHECKPOINTS[case] in one_line_error(capsys.readouterr())


def test_optimizer_moments_of_the_wrong_shape_are_refused_on_resume_in_one_line(good_run, tmp_path, capsys):
    """Adam moments cut to another shape pass load_state_dict (it checks only the parameter groups) and would fail
    at the first step with a traceback: --resume says so in one line naming the optimizer state (exit 1), and
    sample.py, which needs no optimizer, still samples from the same file."""
    out = tmp_path / "run"
    out.mkdir()
    checkpoint = checkpoints.load_checkpoint(str(good_run / "checkpoint.pt"))
    state = checkpoint["optimizer"]["state"]
    first = min(state)
    state[first]["exp_avg"] = state[first]["exp_avg"].flatten()[:1].clone()
    torch.save(checkpoint, out / "checkpoint.pt")
    assert run_train(out, "--resume", "--epochs", "2") == 1
    line = one_line_error(capsys.readouterr())
    assert "optimizer state does not fit" in line and "exp_avg" in line
    assert sample.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "s.png"), "--n", "2",
                        "--sampler", "fast", "--steps", "2", "--device", "cpu"]) == 0


@pytest.mark.parametrize("case", ["data_file_is_a_folder", "data_dir_is_a_file"])
def test_data_paths_of_the_wrong_kind_get_one_line(tmp_path, capsys, case):
    """A data file that is a folder, a --data-dir that is a file: one line naming the path, exit 1."""
    if case == "data_file_is_a_folder":
        data_dir = mnist_folder(tmp_path, b"")
        (data_dir / "t10k-images-idx3-ubyte.gz").unlink()
        (data_dir / "t10k-images-idx3-ubyte.gz").mkdir()
        named = data_dir / "t10k-images-idx3-ubyte.gz"
    else:
        data_dir = named = tmp_path / "a_file"
        data_dir.write_text("not a folder\n")
    assert train.main([*TINY, "--data-dir", str(data_dir), "--out", str(tmp_path / "run")]) == 1
    assert str(named) in one_line_error(capsys.readouterr())


def test_disk_full_while_saving_keeps_the_old_files_and_says_which_path(good_run, tmp_path, monkeypatch, capsys):
    """No space left while the checkpoint (or sample.py's grid) is written: one line naming the file and the reason,
    exit 1; the previous checkpoint stays whole and no temporary file is left."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(good_run / "checkpoint.pt", out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()

    def disk_full_for(name_part):
        """Return an os.fsync that fails with ENOSPC on files whose path contains name_part."""
        def fsync(descriptor):
            if name_part in os.readlink(f"/proc/self/fd/{descriptor}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(descriptor)
        return fsync

    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", disk_full_for(".checkpoint.pt-"))
    assert run_train(out, "--resume", "--epochs", "2") == 1
    line = one_line_error(capsys.readouterr())
    assert str(out / "checkpoint.pt") in line and os.strerror(errno.ENOSPC) in line
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    monkeypatch.setattr(os, "fsync", disk_full_for(str(tmp_path)))
    assert sample.main(["--checkpoint", str(out / "checkpoint.pt"), "--n", "2", "--sampler", "ddim", "--steps", "2",
                        "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 1
    stderr = capsys.readouterr().err  # the progress lines of the sampling, then the error
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in stderr
    assert str(tmp_path / "s.png") in errors[0] and os.strerror(errno.ENOSPC) in errors[0]
    assert sorted(os.listdir(tmp_path)) == ["run"]
