"""The run folder (--out) of train.py: held by one run at a time, checked before any work, only its own files touched;
config.json, checkpoint.pt and loss.csv written atomically.

A run holds --out with an exclusive lock (flock) on --out/.lock. The kernel releases it when the process ends,
however it ends, so a SIGKILL never leaves a stale lock; the PID in the file names the holder to a refused run.
Under torchrun only rank 0 takes it.
"""
import contextlib
import fcntl
import json
import math
import os
import re
from dataclasses import dataclass

from support import files
from support.checkpoints import CheckpointError

LOCK_NAME = ".lock"
# The files train.py writes in --out: the only ones it removes (on --force) or whose leftover temporary files it
# cleans up. config.json is rewritten at every start, so --force leaves it to that.
OWN_OUTPUTS = re.compile(r"checkpoint\.pt|loss\.csv|config\.json|samples_epoch_\d{3,}\.png")
REPLACED_ON_FORCE = re.compile(r"checkpoint\.pt|loss\.csv|samples_epoch_\d{3,}\.png")


@dataclass
class Claim:
    """What a run holds of its --out: the open lock file, and the folders it created (deepest first)."""
    folder: str
    lock_file: object
    created: list


def is_own_output(name):
    """Return True when the file name is one that train.py writes in --out."""
    return OWN_OUTPUTS.fullmatch(name) is not None


def is_own_temporary(name):
    """Return True when the file name is a temporary file of write_atomically for one of train.py's outputs."""
    if not (name.startswith(files.TEMPORARY_PREFIX) and name.endswith(files.TEMPORARY_SUFFIX)):
        return False
    target = name[len(files.TEMPORARY_PREFIX):].rpartition("-")[0]
    return is_own_output(target) and files.is_temporary_of(name, target)


def missing_folders(folder):
    """Return the folders that os.makedirs(folder) would create, deepest first."""
    missing = []
    folder = os.path.abspath(folder)
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def lock_folder(folder):
    """Return the open lock file of folder, holding an exclusive flock on folder/.lock with this PID written in it.

    Raises files.OutputError naming the holder's PID when another process holds it. A run that ends removes the
    file while it still holds the lock, so a lock taken on a file that is no longer under that name is retaken.
    """
    path = os.path.join(folder, LOCK_NAME)
    while True:
        stream = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+")
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = stream.read().strip() or "unknown"
            stream.close()
            raise files.OutputError(f"{folder} is in use by another training run (PID {holder}): wait for it to end "
                                    "or stop it, or choose another --out") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(stream.fileno()).st_ino:
                break
        stream.close()
    stream.truncate(0)
    stream.write(f"{os.getpid()}\n")
    stream.flush()
    return stream


def check_contents(args, checkpoint_path):
    """Refuse a folder where an output's name is taken by a folder, a fresh start over a checkpoint (unless --force)
    and a resume without one."""
    for name in sorted(os.listdir(args.out)):
        if is_own_output(name) and os.path.isdir(os.path.join(args.out, name)):
            raise files.OutputError(f"{os.path.join(args.out, name)} is a folder, where train.py writes a file: move "
                                    "it away or choose another --out")
    exists = os.path.exists(checkpoint_path)
    if args.resume and not exists:
        raise CheckpointError(f"--resume: no checkpoint at {checkpoint_path}; start without --resume")
    if exists and not args.resume and not args.force:
        raise CheckpointError(
            f"{args.out} already holds a checkpoint: add --resume to continue that run, --force to overwrite it, "
            "or choose another --out")


def prepare_output(args, checkpoint_path):
    """Return the Claim on --out: created and locked, its contents checked, leftover temporary files of the outputs removed.

    Refused (files.OutputError, CheckpointError; nothing removed, a folder created here removed again): --out
    cannot hold files, another run holds it, see check_contents.
    """
    problem = files.creation_problem(os.path.join(args.out, LOCK_NAME))
    if problem:
        raise files.OutputError(f"--out {args.out} cannot hold the run's files: {problem}; choose another --out")
    claim = Claim(args.out, None, missing_folders(args.out))
    try:
        os.makedirs(args.out, exist_ok=True)
        claim.lock_file = lock_folder(args.out)
        check_contents(args, checkpoint_path)
    except OSError as error:
        release_output(claim)
        raise files.OutputError(f"--out {args.out} cannot hold the run's files ({files.describe_os_error(error)}); "
                                "choose another --out") from None
    except BaseException:
        release_output(claim)
        raise
    for name in os.listdir(args.out):  # left behind by a run killed while it wrote one of them
        if is_own_temporary(name):
            os.unlink(os.path.join(args.out, name))
    return claim


def release_output(claim):
    """Unlock --out (its lock file removed while still held) and remove the folders the claim created, if empty."""
    if claim is None:
        return
    if claim.lock_file is not None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(claim.folder, LOCK_NAME))
        claim.lock_file.close()
        claim.lock_file = None
    for folder in claim.created:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def grid_path(folder, epoch):
    """Return the path of the preview grid train.py writes in folder after epoch (1-based): samples_epoch_NNN.png."""
    return os.path.join(folder, f"samples_epoch_{epoch:03d}.png")


def remove_previous_outputs(folder):
    """Remove the previous run's checkpoint, loss log and grids from folder (for --force); leave every other file."""
    for name in os.listdir(folder):
        if REPLACED_ON_FORCE.fullmatch(name):
            os.unlink(os.path.join(folder, name))


def write_config(path, config):
    """Write config.json: the run's configuration as indented JSON, for people to read (atomic)."""
    files.write_bytes_atomically(path, (json.dumps(config, indent=2) + "\n").encode())


def write_loss_log(path, losses, steps_per_epoch, learning_rates, elapsed):
    """Write loss.csv: one row per step, 'step,epoch,loss,lr,elapsed_s' (atomic).

    The loss and the learning rate as Python's exact repr; elapsed_s, the seconds of training at the end of the
    step (summed over resumes) to the millisecond, is empty where unknown (steps of an older checkpoint).
    """
    rows = ["step,epoch,loss,lr,elapsed_s"] + [
        f"{step},{step // steps_per_epoch},{loss!r},{rate!r},{f'{seconds:.3f}' if math.isfinite(seconds) else ''}"
        for step, (loss, rate, seconds) in enumerate(zip(losses, learning_rates, elapsed))]
    files.write_bytes_atomically(path, ("\n".join(rows) + "\n").encode())
