"""Checkpoints: what train.py saves after every epoch (and on Ctrl-C), what sample.py and the tools read, and the
weights alone that sample.py --export writes for other projects.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, written atomically
(files.write_atomically) and read with torch.load(..., weights_only=True), which refuses any pickle that would
run code. It holds everything an exact resume needs: the weights, the EMA weights, the optimizer state, the
position (epoch, step) and the loss log. No global RNG state is needed: every random draw of the training loop
comes from a generator seeded by (seed, epoch) or (seed, rank, step).
"""
import os
import pickle

import torch

from support import files, runtime

CHECKPOINT_FORMAT = "ddpm-noise-prediction-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("format", "version", "config", "model", "ema", "optimizer", "epoch", "step_in_epoch", "step",
                   "losses")
WEIGHTS_FORMAT = "ddpm-noise-prediction-weights"
WEIGHTS_VERSION = 1
WEIGHTS_KEYS = ("format", "version", "config", "unet", "schedule", "img_size", "clip_x0", "state_dict")
MODEL_KEYS = ("channels", "img_size", "widths", "blocks_per_level", "time_emb_dim", "timesteps", "schedule")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, untrusted or for another configuration (one-line message)."""


def make_checkpoint(config, model, ema_model, optimizer, epoch, step_in_epoch, step, losses, elapsed=()):
    """Return the checkpoint dict: config, weights, EMA weights, optimizer, position (epoch, step), loss log.

    elapsed: seconds of training at the end of each step (checkpoints written before it existed lack the key).
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config,
        "model": model.state_dict(),
        "ema": ema_model.state_dict() if ema_model is not None else None,
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "step": step,
        "losses": list(losses),
        "elapsed": list(elapsed),
    }


def check_resume_config(checkpoint_config, config, explicit, path, fixed_keys, derived_keys):
    """Return the configuration to resume with: the checkpoint's, with epochs taken from the request if given.

    A flag in fixed_keys that asks for another model, data or optimisation than the checkpoint's is an error;
    derived_keys (set by the data and the launch, not by a flag) are compared whatever the flags say.
    """
    for key in fixed_keys:
        requested = config[key] if key in derived_keys else explicit.get(key, checkpoint_config[key])
        if requested != checkpoint_config[key]:
            raise CheckpointError(
                f"{path} was trained with {key}={checkpoint_config[key]}, but this run asks for {key}={requested}: "
                "resume with the run's own settings and number of processes, or start a new run in another --out"
            )
    return {**checkpoint_config, "epochs": explicit.get("epochs", checkpoint_config["epochs"])}


def save_checkpoint(path, checkpoint):
    """Write checkpoint to path atomically (write_atomically): the last good checkpoint survives any kill."""
    files.write_atomically(path, lambda stream: torch.save(checkpoint, stream))


def load_checkpoint(path, map_location="cpu"):
    """Return the checkpoint dict at path, loaded with weights_only=True; CheckpointError with one line otherwise."""
    return checked_checkpoint(read_trusted(path, map_location), path)


def read_trusted(path, map_location="cpu"):
    """Return what the torch file at path holds, loaded with weights_only=True; CheckpointError with one line otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: check the path, or train one with train.py")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unsupported content"
        raise CheckpointError(
            f"{path} was refused: it holds objects other than tensors and plain data, which could run code "
            f"({reason[:160]}); load only checkpoints written by train.py"
        ) from None
    except Exception as error:  # torch.load reports damage as many types: truncated zip, bad magic, broken pickle
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt: {str(error).splitlines()[0][:120]}); "
                              "use another checkpoint or train again") from None
    return checkpoint


def checked_checkpoint(checkpoint, path):
    """Return checkpoint (loaded from path) if it is a complete train.py checkpoint of this version; else CheckpointError."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py; pass the checkpoint.pt from a training run")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing or checkpoint["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is a checkpoint of another version or incomplete (missing {missing}); train again")
    return checkpoint


def sampling_weights(checkpoint):
    """Return the weights to sample with: the EMA weights when the run kept an EMA, else the raw weights."""
    return checkpoint["ema"] if checkpoint["ema"] is not None else checkpoint["model"]


def model_from_checkpoint(checkpoint, device, precision):
    """Return the checkpoint's sampling model on device, in eval mode, in the memory format of the precision."""
    return model_from_weights(checkpoint["config"], sampling_weights(checkpoint), device, precision)


def model_from_weights(config, state_dict, device, precision, source="the checkpoint"):
    """Return the model config describes with state_dict loaded, on device, in eval mode and the precision's layout.

    source names where config and state_dict came from, for the one-line CheckpointError if they do not fit.
    """
    try:
        model = runtime.build_model(config)
        model.load_state_dict(state_dict)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # a damaged or hand-edited file
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{source}: the weights do not fit the model its configuration describes ({reason}); "
                              "use a checkpoint written by train.py or weights written by sample.py --export") from None
    return model.to(device=device, memory_format=runtime.memory_format(precision)).eval()


def exported_weights(checkpoint):
    """Return the export of a checkpoint: its sampling weights alone, float32 and contiguous, with the model's description.

    {"format": WEIGHTS_FORMAT, "version", "state_dict": the EMA weights (else the raw ones; no optimizer),
     "unet": unet.SimpleUnet's keyword arguments, "schedule": ddpm.Schedule.create's, "img_size",
     "clip_x0": whether sampling clips x0 by default (the cosine schedule), "config": this project's MODEL_KEYS}.
    Contiguous, not channels_last, so that the tensors load into any copy of unet.py as they are.
    """
    config = checkpoint["config"]
    return {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "config": {key: config[key] for key in MODEL_KEYS},
        "unet": runtime.unet_arguments(config),
        "schedule": {"timesteps": config["timesteps"], "schedule": config["schedule"]},
        "img_size": config["img_size"],
        "clip_x0": runtime.clip_x0_by_default(config["schedule"]),
        "state_dict": {name: tensor.detach().to(device="cpu", dtype=torch.float32).clone(
            memory_format=torch.contiguous_format) for name, tensor in sampling_weights(checkpoint).items()},
    }


def load_sampling_weights(path, map_location="cpu"):
    """Return (config, state_dict) to sample with from a train.py checkpoint or a sample.py --export file at path.

    Loaded with weights_only=True; anything else is a CheckpointError with one line.
    """
    content = read_trusted(path, map_location)
    kind = content.get("format") if isinstance(content, dict) else None
    if kind == CHECKPOINT_FORMAT:
        checkpoint = checked_checkpoint(content, path)
        return checkpoint["config"], sampling_weights(checkpoint)
    if kind != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py (nor weights written by sample.py "
                              "--export); pass the checkpoint.pt from a training run")
    missing = [key for key in WEIGHTS_KEYS if key not in content]
    if missing or content["version"] != WEIGHTS_VERSION:
        raise CheckpointError(f"{path} holds exported weights of another version or incomplete (missing {missing}); "
                              "export them again with sample.py --export")
    return content["config"], content["state_dict"]
