"""What train.py, sample.py and bench.py share: devices, precision, the model from a config, checkpoints.

Checkpoints are plain dicts of tensors, numbers, strings, lists and dicts, written atomically
(temporary file in the same folder, flushed and fsynced, then renamed over the old one) and read
with torch.load(..., weights_only=True), which refuses any pickle that would run code.
"""
import contextlib
import os
import pickle
import tempfile

import numpy as np
import torch

import unet

CHECKPOINT_FORMAT = "ddpm-noise-prediction-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("format", "version", "config", "model", "ema", "optimizer", "epoch", "step_in_epoch", "step", "losses", "rng")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, untrusted or for another configuration (one-line message)."""


class ConfigError(Exception):
    """A request the hardware or the data cannot serve (one-line message)."""


def available_devices():
    """Return the device kinds this machine can run: 'cpu' always, 'cuda' and 'mps' when present."""
    kinds = ["cpu"]
    if torch.cuda.is_available():
        kinds.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        kinds.append("mps")
    return kinds


def resolve_device(name, local_rank=0):
    """Return the torch.device for 'auto' (CUDA, else MPS, else CPU), 'cpu', 'cuda' or 'mps'; refuse absent ones."""
    kinds = available_devices()
    if name == "auto":
        name = "cuda" if "cuda" in kinds else "mps" if "mps" in kinds else "cpu"
    if name not in kinds:
        raise ConfigError(f"--device {name}: no such device is visible on this machine; use --device auto or cpu")
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


def seeded_generator(*keys, device="cpu"):
    """Return a torch.Generator on device whose seed is mixed from the integer keys (numpy's SeedSequence).

    Used wherever a draw must depend only on (seed, epoch), (seed, rank, step) or (seed, batch): the same keys give
    the same numbers in any process, before or after a resume.
    """
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


def cpu_has_native_bf16():
    """Return True when the CPU computes bf16 natively (AVX-512 BF16 or AMX flags in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name, device):
    """Return 'bf16' or 'fp32': 'auto' picks bf16 autocast where the hardware runs it natively, fp32 elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(device, precision):
    """Return the context that runs the model in bf16 autocast, or a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(precision):
    """Return channels_last on the fast (bf16) path, where it speeds up convolutions, else the default layout."""
    return torch.channels_last if precision == "bf16" else torch.contiguous_format


def build_model(config):
    """Return the SimpleUnet that a configuration describes (image channels, widths, blocks, time embedding)."""
    return unet.SimpleUnet(
        image_channels=config["channels"],
        widths=tuple(config["widths"]),
        time_emb_dim=config["time_emb_dim"],
        blocks_per_level=config["blocks_per_level"],
    )


def write_atomically(path, write):
    """Write a file through write(binary_stream): into a temporary file in path's folder, fsynced, then renamed over path.

    A kill at any moment leaves either the old file or the new one under path, never a part of either; the temporary
    file is named '.<name>-XXXX.tmp', so a later run can remove one that a kill left behind.
    """
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def save_checkpoint(path, checkpoint):
    """Write checkpoint to path atomically (write_atomically): the last good checkpoint survives any kill."""
    write_atomically(path, lambda stream: torch.save(checkpoint, stream))


def load_checkpoint(path, map_location="cpu"):
    """Return the checkpoint dict at path, loaded with weights_only=True; CheckpointError with one line otherwise."""
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
    model = build_model(checkpoint["config"])
    model.load_state_dict(sampling_weights(checkpoint))
    return model.to(device=device, memory_format=memory_format(precision)).eval()
