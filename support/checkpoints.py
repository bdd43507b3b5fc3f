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

import ddpm
from support import arguments, files, runtime

CHECKPOINT_FORMAT = "ddpm-noise-prediction-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("format", "version", "config", "model", "ema", "optimizer", "epoch", "step_in_epoch", "step",
                   "losses")
# Configuration keys added after checkpoints of this version were first written, each with the value that does
# what the runs before it did: an older checkpoint reads as if it had recorded them.
ADDED_CONFIG_KEYS = {"lr_decay": "none", "min_snr_gamma": 0.0, "adam_beta2": 0.999}
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


def check_resume_config(checkpoint_config, config, explicit, path, fixed_keys, derived_keys, origins=None):
    """Return the configuration to resume with: the checkpoint's, with epochs taken from the request if given.

    A flag in fixed_keys that asks for another model, data or optimisation than the checkpoint's is an error;
    derived_keys (set by the data and the launch, not by a flag) are compared whatever the flags say. origins
    names where a requested value came from when it was not a flag of its own (e.g. '--preset quick').
    """
    origins = origins or {}
    for key in fixed_keys:
        requested = config[key] if key in derived_keys else explicit.get(key, checkpoint_config[key])
        if requested != checkpoint_config[key]:
            origin = f" ({origins[key]})" if key in origins else ""
            raise CheckpointError(
                f"{path} was trained with {key}={checkpoint_config[key]}, but this run asks for {key}={requested}"
                f"{origin}: resume with the run's own settings and number of processes, or start a new run in "
                "another --out"
            )
    return {**checkpoint_config, "epochs": explicit.get("epochs", checkpoint_config["epochs"])}


def check_resume_data(checkpoint_config, data_split, num_images, path):
    """Raise CheckpointError unless the run in path was trained on the split and number of images this run reads.

    Checkpoints that did not record their data (written before data_split was) are not checked.
    """
    if "data_split" not in checkpoint_config:
        return
    trained = (checkpoint_config["data_split"], checkpoint_config.get("num_images"))
    if trained != (data_split, num_images):
        raise CheckpointError(
            f"{path} was trained on {trained[1]} images of the {trained[0]}, but this run reads {num_images} images "
            f"of the {data_split}: resume with the data it was trained on (a --download adds the MNIST train split "
            "to --data-dir), or start a new run in another --out")


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
        raise CheckpointError(
            f"{path} was refused: it holds objects other than tensors and plain data, which could run code "
            f"({first_line(error, 160)}); load only checkpoints written by train.py"
        ) from None
    except Exception as error:  # torch.load reports damage as many types: truncated zip, bad magic, broken pickle
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt: {first_line(error)}); "
                              "use another checkpoint or train again") from None
    return checkpoint


def checked_checkpoint(checkpoint, path):
    """Return checkpoint (loaded from path) if it is a complete train.py checkpoint of this version; else CheckpointError."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py; pass the checkpoint.pt from a training run")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing or checkpoint["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is a checkpoint of another version or incomplete (missing {missing}); train again")
    if isinstance(checkpoint["config"], dict):
        checkpoint["config"] = {**ADDED_CONFIG_KEYS, **checkpoint["config"]}
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise CheckpointError(f"{path} cannot be used: {problem}; use a checkpoint.pt as train.py wrote it, or train again")
    return checkpoint


def first_line(error, limit=120):
    """Return the first line of an exception's message, at most limit characters (its type's name if it has none)."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]


def checkpoint_problem(checkpoint):
    """Return what makes a loaded checkpoint unusable, in a few words, or None when nothing does.

    Checked before anything is built from it: the configuration (every key, its type and range), the position
    and the loss log (one loss per step), the form of the optimizer state, weights that fit the configuration.
    """
    config = checkpoint["config"]
    if not isinstance(config, dict):
        return f"its configuration is a {type(config).__name__}, not a dict"
    problem = arguments.config_type_problem(config) or arguments.config_problem(config)
    if not problem and config["schedule"] not in ddpm.BETA_SCHEDULES:
        problem = f"schedule {config['schedule']!r} is none of {sorted(ddpm.BETA_SCHEDULES)}"
    if not problem and config["channels"] not in (1, 3):
        problem = f"channels={config['channels']}, where images have 1 or 3"
    if problem:
        return f"its configuration is invalid ({problem})"
    for key in ("epoch", "step_in_epoch", "step"):
        if not arguments.is_int(checkpoint[key]) or checkpoint[key] < 0:
            return f"its '{key}' is {checkpoint[key]!r}, not a count of steps or epochs"
    losses = checkpoint["losses"]
    if not isinstance(losses, list) or len(losses) != checkpoint["step"] or not all(
            isinstance(loss, float) for loss in losses):
        return f"its loss log is not one number per step for its {checkpoint['step']} steps"
    optimizer = checkpoint["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        return "its optimizer state is not an optimizer's state_dict"
    return weights_problem(checkpoint)


def weights_problem(checkpoint):
    """Return how the checkpoint's weights or EMA weights do not fit the network of its configuration, or None.

    The network is built on the meta device: its parameter names and shapes, without memory for the weights.
    """
    with torch.device("meta"):
        expected = runtime.build_model(checkpoint["config"]).state_dict()
    if (checkpoint["ema"] is None) != (checkpoint["config"]["ema_decay"] == 0):
        return "its EMA weights do not fit its ema_decay"
    for key in ("model", "ema"):
        weights = checkpoint[key]
        if weights is None and key == "ema":
            continue
        if not isinstance(weights, dict) or weights.keys() != expected.keys():
            return f"its {key} weights do not fit the network its configuration describes (other parameter names)"
        for name, tensor in weights.items():
            if not isinstance(tensor, torch.Tensor) or tensor.shape != expected[name].shape:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                return (f"its {key} weights do not fit the network its configuration describes ({name} is {shape}, "
                        f"the network's is {tuple(expected[name].shape)})")
    return None


def load_optimizer_state(optimizer, checkpoint, path):
    """Load the checkpoint's optimizer state into optimizer (in place); CheckpointError when it does not fit.

    load_state_dict checks the parameter groups only; a moment of the wrong shape would fail at the first step,
    so every tensor kept for a parameter (Adam's exp_avg, exp_avg_sq) must have that parameter's shape.
    """
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise CheckpointError(f"{path}: its optimizer state does not fit the model ({first_line(error)}); "
                              "train again") from None
    problem = optimizer_state_problem(optimizer)
    if problem:
        raise CheckpointError(f"{path}: its optimizer state does not fit the model ({problem}); train again")


def optimizer_state_problem(optimizer):
    """Return which per-parameter state of a loaded optimizer does not have its parameter's shape, or None.

    A scalar (Adam's step count) is not a per-element state and is not checked.
    """
    for group in optimizer.param_groups:
        for index, parameter in enumerate(group["params"]):
            for name, value in optimizer.state.get(parameter, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
                    return f"{name} of parameter {index} is {tuple(value.shape)}, the parameter's {tuple(parameter.shape)}"
    return None


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
        raise CheckpointError(f"{source}: the weights do not fit the model its configuration describes "
                              f"({first_line(error)}); "
                              "use a checkpoint written by train.py or weights written by sample.py --export") from None
    return runtime.place_model(model, device, precision).eval()


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
