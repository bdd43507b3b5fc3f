"""The one progress line of train.py and sample.py, on a terminal and off it (a notebook, nohup, CI logs)."""
import math
import os
import sys
import time

LINE_WIDTH = 96


def format_duration(seconds):
    """Return seconds as 'M:SS', or 'H:MM:SS' from an hour on ('?' when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    if hours:
        return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{rest // 60}:{rest % 60:02d}"


def say(text, stream=None, end="\n"):
    """Print text to stream (default: stdout) and flush it; if it cannot be written (its reader has gone, a closed
    pipe as in `python train.py | head` or a closed terminal; or the file it goes to is on a full disk), send this
    and every later line to os.devnull and carry on.

    The checkpoint, the samples and the report files are the work; the lines only describe it, so a reader that
    stops reading must not stop (or lose) the work.
    """
    stream = sys.stdout if stream is None else stream
    try:
        print(text, end=end, file=stream, flush=True)
    except OSError:  # BrokenPipeError (EPIPE), EIO from a hung-up terminal, ENOSPC
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):  # a stream without a file descriptor: each later line fails quietly here
            pass


class Progress:
    """A line '<text>  <rate> <unit>  <M:SS> left' about `total` units of work, `done` of them so far.

    On a terminal the line is rewritten in place at every update. Elsewhere (output into a file, a pipe or a
    notebook cell) a new line is printed at the first update, then whenever `every_seconds` have passed or another
    tenth of the work is done, and at every `final` update: never silent for long, never a flood.
    The rate counts only the work done since this object was made (a resumed run starts at `start`).
    """

    def __init__(self, total, start=0, unit="img/s", scale=1.0, stream=None, enabled=True, every_seconds=30.0,
                 clock=time.perf_counter):
        self.total, self.start, self.unit, self.scale = total, start, unit, scale
        self.stream = stream if stream is not None else sys.stdout
        self.enabled, self.every_seconds, self.clock = enabled, every_seconds, clock
        self.interactive = enabled and self.stream.isatty()
        self.started_at = clock()
        self.last_printed_at, self.last_tenth = None, (10 * start) // max(total, 1)

    def due(self, done, now, final):
        """Return True when this update should print (always on a terminal; see the class docstring elsewhere)."""
        if self.interactive or final or self.last_printed_at is None:
            return True
        return now - self.last_printed_at >= self.every_seconds or (10 * done) // max(self.total, 1) > self.last_tenth

    def update(self, done, text, final=False):
        """Print the progress line for `done` units if it is due; `final` ends an in-place line with a newline."""
        now = self.clock()
        if not self.enabled or not self.due(done, now, final):
            return
        self.last_printed_at, self.last_tenth = now, (10 * done) // max(self.total, 1)
        elapsed = now - self.started_at
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else float("nan")
        line = f"{text}  {rate * self.scale:.1f} {self.unit}  {format_duration(left)} left"
        if self.interactive:
            say("\r" + line.ljust(LINE_WIDTH), self.stream, end="\n" if final else "")
        else:
            say(line, self.stream)
