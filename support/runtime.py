"""What train.py, sample.py and the tools share: devices, precision, seeded generators, the model from a config.

One device resolver (resolve_device), one precision policy (resolve_precision), one clip policy (clip_x0_by_default),
one placement of a model on its device (place_model).
"""
import contextlib

import numpy as np
import torch
from torch import nn

import unet


class ConfigError(ValueError):
    """A request the hardware, the data or the model cannot serve (one-line message)."""


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


def cuda_has_native_bf16(device):
    """Return True when the GPU computes bf16 natively: compute capability 8.0 or newer (A100, H100, RTX 30xx/40xx).

    torch.cuda.is_bf16_supported() is also True on a T4 or V100 (7.x), where bf16 is emulated and slower than fp32.
    """
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_precision(name, device):
    """Return 'bf16' or 'fp32': 'auto' picks bf16 autocast where the hardware runs it natively, fp32 elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if cuda_has_native_bf16(device) else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def clip_x0_by_default(schedule_name):
    """Return whether sampling clips the predicted x0 to [-1, 1] unless told otherwise: only under the cosine schedule.

    The cosine schedule's last beta is clipped at 0.999, so its first reverse step multiplies the noise estimate's
    error by 1/sqrt(alpha) = 32 (DDIM divides by sqrt(alphas_cumprod[-1]) ~ 1e-4): without the clip its samples are
    noise. The lecture's linear schedule samples without clipping.
    """
    return schedule_name == "cosine"


def autocast(device, precision):
    """Return the context that runs the model in bf16 autocast, or a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(precision):
    """Return channels_last on the fast (bf16) path, where it speeds up convolutions, else the default layout."""
    return torch.channels_last if precision == "bf16" else torch.contiguous_format


def unet_arguments(config):
    """Return the keyword arguments of unet.SimpleUnet for a configuration (image channels, widths, blocks, time embedding)."""
    return {
        "image_channels": config["channels"],
        "widths": list(config["widths"]),
        "time_emb_dim": config["time_emb_dim"],
        "blocks_per_level": config["blocks_per_level"],
    }


def build_model(config):
    """Return the SimpleUnet that a configuration describes (unet_arguments)."""
    return unet.SimpleUnet(**unet_arguments(config))


# PyTorch's CPU GroupNorm backward on channels_last inputs is slow when a group holds few channels; up to this many,
# ContiguousGroupNorm trains on a contiguous copy instead (measured: docs/performance.md).
CONTIGUOUS_NORM_MAX_CHANNELS_PER_GROUP = 8


class ContiguousGroupNorm(nn.GroupNorm):
    """nn.GroupNorm that, while gradients are recorded, normalizes a contiguous copy of a channels_last input and
    returns channels_last again: the same parameters, the same function, a faster backward on the CPU.

    Why: the CPU's channels_last GroupNorm backward is several times slower than the contiguous one when a group holds
    few channels (bf16, 16 channels in 8 groups at 32x32, batch 64: about 9 ms against 5 ms with the copies), while
    the convolutions want channels_last. Without gradients (sampling) the channels_last forward is as fast: no copy.
    """

    def forward(self, x):
        if not torch.is_grad_enabled() or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)


def place_model(model, device, precision):
    """Return model on device in the precision's memory format; on the CPU in channels_last, its GroupNorms with at
    most CONTIGUOUS_NORM_MAX_CHANNELS_PER_GROUP channels a group become ContiguousGroupNorm (same parameters, so
    state_dicts and checkpoints do not change)."""
    layout = memory_format(precision)
    model = model.to(device=device, memory_format=layout)
    if device.type == "cpu" and layout == torch.channels_last:
        for norm in [module for module in model.modules() if type(module) is nn.GroupNorm]:
            if norm.num_channels // norm.num_groups <= CONTIGUOUS_NORM_MAX_CHANNELS_PER_GROUP:
                norm.__class__ = ContiguousGroupNorm
    return model
