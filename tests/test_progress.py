"""Progress where students run things: a notebook cell, nohup, CI. Off a terminal the line must still come, with time
left, at least every 30 seconds and at every tenth of the work, and never as a flood.
"""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from support.progress import Progress

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--widths", "8,16", "--img-size", "16", "--timesteps", "20", "--max-images", "48", "--batch-size", "8",
        "--grid-samples", "0", "--device", "cpu"]


class FakeClock:
    """A clock the test moves by hand: now, in seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self):
        return True


def off_terminal_progress(total, start=0):
    """Return (progress, stream, clock): a Progress writing into a StringIO (not a terminal) on a fake clock."""
    stream, clock = io.StringIO(), FakeClock()
    return Progress(total, start=start, stream=stream, clock=clock), stream, clock


def printed_lines(stream):
    """Return the lines written to a StringIO so far."""
    return stream.getvalue().splitlines()


# ----------------------------------------------------------------------------- off a terminal


def test_off_a_terminal_the_first_update_prints_a_line_with_time_left():
    """The first update prints at once (a notebook cell is not silent until the end), with the rate and time left."""
    progress, stream, clock = off_terminal_progress(1000)
    clock.now = 2.0
    progress.update(10, "step 10/1000")
    assert printed_lines(stream) == ["step 10/1000  5.0 img/s  3:18 left"]  # 10 done in 2 s: 990 left at 5/s


def test_off_a_terminal_updates_within_30_seconds_and_a_tenth_stay_silent():
    """Updates less than 30 s after the last line, within the same tenth of the work, print nothing."""
    progress, stream, clock = off_terminal_progress(1000)
    progress.update(1, "first")
    for done in range(2, 100):
        clock.now += 0.2
        progress.update(done, f"step {done}")
    assert printed_lines(stream)[1:] == []


def test_off_a_terminal_a_line_comes_at_least_every_30_seconds():
    """Slow work (a tenth takes minutes): a line every 30 s of clock, however many updates come between."""
    progress, stream, clock = off_terminal_progress(10_000)
    progress.update(1, "step 1")
    for done in range(2, 200):
        clock.now += 1.0
        progress.update(done, f"step {done}")
    lines = printed_lines(stream)
    assert [line.split()[1] for line in lines] == ["1", "31", "61", "91", "121", "151", "181"]
    assert all(line.endswith(" left") for line in lines)


def test_off_a_terminal_a_line_comes_at_every_tenth_of_the_work():
    """Fast work: one line at the first update and one as each further tenth is reached, not one per update."""
    progress, stream, clock = off_terminal_progress(100)
    for done in range(1, 100):
        clock.now += 0.01
        progress.update(done, f"step {done}")
    assert [int(line.split()[1]) for line in printed_lines(stream)] == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90]


def test_off_a_terminal_the_final_update_always_prints():
    """final=True prints even right after another line (the end of a run is always reported)."""
    progress, stream, clock = off_terminal_progress(100)
    clock.now = 9.9
    progress.update(99, "almost")
    clock.now = 10.0
    progress.update(100, "done", final=True)
    assert [line.split()[0] for line in printed_lines(stream)] == ["almost", "done"]
    assert printed_lines(stream)[-1].endswith("0:00 left")


def test_a_resumed_run_counts_its_rate_and_tenths_from_where_it_resumed():
    """start=500 of 1000: 100 more in 10 s is 10/s, so 400 left take 40 s; the next line comes at the next tenth."""
    progress, stream, clock = off_terminal_progress(1000, start=500)
    clock.now = 10.0
    progress.update(600, "resumed")
    assert printed_lines(stream) == ["resumed  10.0 img/s  0:40 left"]
    clock.now = 11.0
    progress.update(650, "same tenth")
    progress.update(700, "next tenth")
    assert printed_lines(stream)[-1].startswith("next tenth")


def test_disabled_progress_prints_nothing():
    """enabled=False (the other ranks under torchrun) prints nothing, even at the end."""
    stream = io.StringIO()
    progress = Progress(10, stream=stream, enabled=False, clock=FakeClock())
    progress.update(10, "done", final=True)
    assert stream.getvalue() == ""


def test_on_a_terminal_the_line_is_rewritten_in_place_at_every_update():
    """On a terminal each update rewrites the line ('\\r', no newline) and the final one ends it with a newline."""
    stream, clock = Terminal(), FakeClock()
    progress = Progress(3, stream=stream, clock=clock)
    for done in (1, 2, 3):
        clock.now += 1.0
        progress.update(done, f"step {done}", final=done == 3)
    written = stream.getvalue()
    assert written.count("\r") == 3 and written.count("\n") == 1 and written.endswith("\n")


# ----------------------------------------------------------------------------- the scripts, off a terminal


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The checkpoint of a tiny 1-epoch run."""
    out = tmp_path_factory.mktemp("progress-run")
    assert train.main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out / "checkpoint.pt"


def test_sample_py_into_a_pipe_prints_progress_lines_before_its_final_line(tiny_checkpoint, tmp_path):
    """sample.py with stdout and stderr into a pipe (a notebook's !python, nohup, CI): progress lines with time left
    come while it samples, not only its final line at the end."""
    process = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(tiny_checkpoint), "--n", "2",
                              "--out", str(tmp_path / "s.png"), "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=300, env=subprocess_env())
    assert process.returncode == 0, process.stdout
    lines = process.stdout.splitlines()
    assert lines[-1].startswith("2 samples (ddpm, 20 steps")
    progress_lines = [line for line in lines[:-1] if line.startswith("sampling: step")]
    assert len(progress_lines) >= 2 and all(line.endswith(" left") for line in progress_lines)
    assert progress_lines[0].startswith("sampling: step 1/20 of batch 1/1")
    assert len(progress_lines) <= 12  # the first step, each tenth, the end: no line per step


def test_train_py_off_a_terminal_reports_progress_within_each_epoch(tmp_path, capsys):
    """A 3-epoch run into a captured stdout prints progress lines with time left before its end, in every epoch."""
    assert train.main([*TINY, "--epochs", "3", "--out", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    progress_lines = [line for line in lines if line.startswith("epoch ")]
    assert all(line.endswith(" left") for line in progress_lines)
    assert {line.split()[1] for line in progress_lines} == {"1/3", "2/3", "3/3"}
    assert lines[-1].startswith("done: 3 epochs")


def subprocess_env():
    """Return the environment of a child process: one thread, so that two cores are not oversubscribed."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}
