"""Checks of what a user asks for on a command line: argparse types and the training configuration's ranges.

Every bad value gets one line that says what was wrong and what to do, before any work starts.
"""
import argparse
import math
import os

import unet
from support import data, runtime

# Seeds that both torch.Generator.manual_seed and numpy's SeedSequence take.
SEED_LIMIT = 2**64
# The keys of train.py's configuration (its DEFAULTS, plus channels and world_size) and the type of each value:
# what a checkpoint's configuration must hold before anything is built from it.
CONFIG_TYPES = {
    "dataset": str, "epochs": int, "batch_size": int, "lr": float, "adam_beta2": float, "timesteps": int, "img_size": int,
    "widths": list, "blocks_per_level": int, "time_emb_dim": int, "schedule": str, "warmup_steps": int,
    "lr_decay": str, "min_snr_gamma": float, "grad_clip": float, "ema_decay": float, "seed": int, "max_images": int, "grid_samples": int,
    "channels": int, "world_size": int,
}
FINITE_KEYS = ("lr", "adam_beta2", "min_snr_gamma", "grad_clip", "ema_decay")
LR_DECAYS = ("none", "cosine")  # train.learning_rate after the warm-up


def check_device(parser, name):
    """Return None when --device name is visible on this machine; else parser.error (exit 2) with one line."""
    try:
        runtime.resolve_device(name)
    except runtime.ConfigError as error:
        parser.error(str(error))


def positive_int(text):
    """Return text as an int > 0 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_widths(text):
    """Return the U-Net widths from '64,128,256' as a list of positive ints (an argparse type)."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers like 64,128,256, got {text!r}") from None
    if not widths or min(widths) <= 0:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def dataset_type(built_in):
    """Return the argparse type of --dataset: one of built_in, 'folder:PATH' or 'npz:PATH' (PATH made absolute).

    Absolute, so that a run resumed from another working directory reads, and compares, the same files.
    """
    def parse_dataset(text):
        """Return the --dataset value text names (a path made absolute); ArgumentTypeError if it names none."""
        kind, separator, path = text.partition(":")
        if text in built_in:
            return text
        if not (separator and kind in data.FILE_DATASETS and path):
            raise argparse.ArgumentTypeError(f"expected {', '.join(built_in)}, folder:PATH (a folder of PNG files) "
                                             f"or npz:PATH (uint8 images under arr_0), got {text!r}")
        path = os.path.abspath(os.path.expanduser(path))
        if kind == "folder" and not os.path.isdir(path):
            raise argparse.ArgumentTypeError(f"{text}: there is no folder {path}")
        if kind == "npz" and not os.path.isfile(path):
            raise argparse.ArgumentTypeError(f"{text}: there is no file {path}")
        return f"{kind}:{path}"

    return parse_dataset


def is_int(value):
    """Return True for an int that is not a bool (True would pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def has_type(value, kind):
    """Return True when value is of the configuration type kind: an int for float too, a non-empty int list."""
    if kind is list:
        return isinstance(value, list) and len(value) > 0 and all(is_int(item) for item in value)
    if kind is float:
        return is_int(value) or isinstance(value, float)
    return is_int(value) if kind is int else isinstance(value, kind)


def config_type_problem(config):
    """Return a one-line description of the first key of CONFIG_TYPES that config lacks or holds as another type."""
    for key, kind in CONFIG_TYPES.items():
        if key not in config:
            return f"it has no '{key}'"
        if not has_type(config[key], kind):
            return f"its '{key}' is {config[key]!r}, not {'a list of ints' if kind is list else 'a ' + kind.__name__}"
    return None


def seed_problem(seed):
    """Return a one-line description of why seed is not a seed the generators take, or None."""
    if not 0 <= seed < SEED_LIMIT:
        return f"--seed must be an integer in [0, 2**64), got {seed}"
    return None


def config_problem(config):
    """Return a one-line description of the first invalid value in config, or None."""
    for key in FINITE_KEYS:
        if not math.isfinite(config[key]):
            return f"--{key.replace('_', '-')} must be a finite number, got {config[key]}"
    positive = ("epochs", "batch_size", "lr", "img_size", "blocks_per_level", "time_emb_dim")
    for key in positive:
        if not config[key] > 0:
            return f"--{key.replace('_', '-')} must be positive, got {config[key]}"
    if not config["lr"] < 1e3:  # finite already (FINITE_KEYS)
        return f"--lr must be a finite learning rate, got {config['lr']}"
    if config["lr_decay"] not in LR_DECAYS:
        return f"--lr-decay must be one of {', '.join(LR_DECAYS)}, got {config['lr_decay']!r}"
    if config["timesteps"] < 2:
        return f"--timesteps must be at least 2, got {config['timesteps']}"
    if seed_problem(config["seed"]):
        return seed_problem(config["seed"])
    if config["time_emb_dim"] % 2:
        return f"the time embedding size must be even, got {config['time_emb_dim']}"
    for key in ("adam_beta2", "ema_decay"):  # decays of a moving average: 1 would never move
        if not 0 <= config[key] < 1:
            return f"--{key.replace('_', '-')} must be in [0, 1), got {config[key]}"
    for key in ("warmup_steps", "max_images", "grid_samples", "grad_clip", "min_snr_gamma"):
        if config[key] < 0:
            return f"--{key.replace('_', '-')} must not be negative, got {config[key]}"
    factor = unet.size_multiple(config["widths"])
    if config["img_size"] % factor:
        return (f"--img-size {config['img_size']} is not divisible by {factor} = 2**(levels-1) for widths "
                f"{','.join(map(str, config['widths']))}; use a multiple of {factor}, or fewer levels (--widths)")
    if min(config["widths"]) < 2:
        return "every width must be at least 2 (GroupNorm needs two channels per group)"
    try:
        unet.group_norm_groups(tuple(config["widths"]), groups=8)
    except ValueError as error:
        return f"--widths: {error}"
    return None
