"""The run folder (--out) of train.py: claimed before any work; config.json, checkpoint.pt and loss.csv written
atomically."""
import json
import math
import os

from support import files
from support.checkpoints import CheckpointError


def prepare_output(args, checkpoint_path):
    """Create --out; refuse to start afresh over an existing checkpoint unless --force, or to resume without one."""
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.out):  # left behind by a run killed while it wrote a checkpoint or the loss log
        if name.startswith(".") and name.endswith(".tmp"):
            os.unlink(os.path.join(args.out, name))
    exists = os.path.exists(checkpoint_path)
    if args.resume and not exists:
        raise CheckpointError(f"--resume: no checkpoint at {checkpoint_path}; start without --resume")
    if exists and not args.resume and not args.force:
        raise CheckpointError(
            f"{args.out} already holds a checkpoint: add --resume to continue that run, --force to overwrite it, "
            "or choose another --out")


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
