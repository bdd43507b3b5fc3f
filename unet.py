"""The noise-prediction network eps_theta(x_t, t) of the lecture: a small U-Net.

Lecture -> code:
- "the timestep t is encoded like a position in the Transformer"   -> SinusoidalPositionEmbeddings
- "a small MLP turns it into the time embedding, added in every block" -> SimpleUnet.time_mlp, ResidualBlock.time_projection
- "down path 32x32 -> 16x16 -> 8x8 with 64 -> 128 -> 256 channels"  -> SimpleUnet.down_levels, SimpleUnet.downsamples
- "a symmetric up path; skip connections are concatenated"          -> SimpleUnet.up_levels, SimpleUnet.upsamples
- "the output is the predicted noise, the same shape as the image"  -> SimpleUnet.forward

Where it departs from the lecture's notebook, and why: residual blocks with GroupNorm (BatchNorm in train mode makes
one image's prediction depend on the rest of its batch); each block's second conv starts at zero, so every block starts
as its shortcut and the network trains steadily from the first step; nearest up-sampling then a conv instead of a
transposed conv (no checkerboard artefacts). No attention.

Shape flow for the defaults (B images, 1 x 32 x 32):
    stem 1 -> 64 @32 | down: 64 @32 -> 128 @16 -> 256 @8 | middle 256 @8 | up: 256 @8 -> 128 @16 -> 64 @32 | head 64 -> 1 @32

Imports only torch and math, so this file can be copied alone into another project.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalPositionEmbeddings(nn.Module):
    """Transformer position encoding (Vaswani et al. 2017, section 3.5) of integer timesteps."""

    def __init__(self, dim):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"time embedding dim must be an even number >= 4, got {dim}; use e.g. 32 or 128")
        self.dim = dim

    def forward(self, timesteps):
        """Return the (B, dim) float32 embedding of the timesteps (B,).

        half = dim // 2,  frequency_i = 10000 ** (-i / (half - 1)) for i = 0 .. half - 1
        (geometric from exactly 1 down to 1/10000), and
        embedding[b] = [sin(t_b * frequency_0), ..., sin(t_b * frequency_{half-1}),
                        cos(t_b * frequency_0), ..., cos(t_b * frequency_{half-1})].
        Always float32, autocast or not: bfloat16 would round t * frequency (up to 1000 rad) to steps of 4 rad.
        """
        if timesteps.dim() != 1:
            raise ValueError(f"timesteps must have shape (B,), got {tuple(timesteps.shape)}; pass one timestep per image")
        half = self.dim // 2
        with torch.autocast(device_type=timesteps.device.type, enabled=False):
            exponents = torch.arange(half, device=timesteps.device, dtype=torch.float32) / (half - 1)
            frequencies = torch.exp(-math.log(10000.0) * exponents)
            angles = timesteps.to(torch.float32)[:, None] * frequencies[None, :]
            return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class ResidualBlock(nn.Module):
    """Residual block of Ho et al. (2020), without dropout: two 3x3 convs with the time embedding added between."""

    def __init__(self, in_channels, out_channels, time_emb_dim, num_groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, out_channels))
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # Zero start: the block begins as its shortcut, so a deep stack starts as a shallow, well-conditioned net.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x, time_embedding):
        """Return the block's output, shape (B, out_channels, H, W) for x of shape (B, in_channels, H, W).

        h = conv1(silu(norm1(x))) + time_projection(time_embedding)   (one value per image and channel)
        output = shortcut(x) + conv2(silu(norm2(h)))
        """
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_projection(time_embedding)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Upsample(nn.Module):
    """Doubles the resolution: nearest-neighbour x2, then a 3x3 conv (channels unchanged)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        """Return conv3x3(nearest_x2(x)), shape (B, C, 2H, 2W) for x of shape (B, C, H, W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def group_norm_groups(widths, groups):
    """Return the GroupNorm group count used in every norm of the network: min(groups, smallest width // 2).

    Each group keeps at least two channels: a group of one channel would subtract exactly the per-channel
    time projection added just before norm2, cutting the time input out of the block.
    Every width must be a multiple of it, so that concatenated skips (sums of widths) are multiples too.
    """
    num_groups = min(groups, min(widths) // 2)
    if any(width % num_groups for width in widths):
        raise ValueError(
            f"widths {tuple(widths)} are not all multiples of the {num_groups} GroupNorm groups "
            f"(min(groups={groups}, smallest width // 2)); use widths that are multiples of {groups}"
        )
    return num_groups


def size_multiple(widths):
    """Return 2**(levels - 1), levels = len(widths): an image side the U-Net takes must be a multiple of it.

    Each of the len(widths) - 1 down-samplings halves the side, and the up path must return to exactly the sizes
    of the skips it concatenates.
    """
    return 2 ** (len(widths) - 1)


def check_architecture(image_channels, widths, blocks_per_level, groups):
    """Return None if the arguments describe a U-Net that can be built; raise a one-line ValueError if not."""
    if image_channels < 1:
        raise ValueError(f"image_channels must be >= 1, got {image_channels}")
    if not widths or min(widths) < 2:
        raise ValueError(f"widths must be a non-empty sequence of channel counts >= 2, got {widths}")
    if blocks_per_level < 1:
        raise ValueError(f"blocks_per_level must be >= 1, got {blocks_per_level}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")


def level_blocks(in_channels, width, blocks_per_level, time_emb_dim, num_groups):
    """Return the blocks_per_level residual blocks of one level: in_channels -> width, then width -> width."""
    return nn.ModuleList(
        ResidualBlock(in_channels if k == 0 else width, width, time_emb_dim, num_groups)
        for k in range(blocks_per_level)
    )


class SimpleUnet(nn.Module):
    """U-Net predicting the noise eps_theta(x_t, t) (Ho et al. 2020, Algorithm 1) from a noisy image and its timestep."""

    def __init__(self, image_channels=1, widths=(64, 128, 256), time_emb_dim=128, blocks_per_level=1, groups=8):
        """widths[i] is the channel count at resolution H / 2**i; there are len(widths) - 1 down-samplings.

        time_emb_dim: size of the sinusoidal embedding and of the time MLP.
        blocks_per_level: residual blocks per level on the way down and on the way up (the lecture has 1).
        groups: the largest GroupNorm group count to use (see group_norm_groups).
        """
        super().__init__()
        widths = tuple(widths)
        check_architecture(image_channels, widths, blocks_per_level, groups)
        num_groups = group_norm_groups(widths, groups)
        self.image_channels = image_channels
        self.widths = widths

        self.time_mlp = nn.Sequential(
            SinusoidalPositionEmbeddings(time_emb_dim),
            nn.Linear(time_emb_dim, time_emb_dim),
            nn.SiLU(),
            nn.Linear(time_emb_dim, time_emb_dim),
        )
        self.stem = nn.Conv2d(image_channels, widths[0], kernel_size=3, padding=1)
        # down_levels[i], up_levels[i] run at resolution H / 2**i with widths[i] channels.
        self.down_levels = nn.ModuleList(
            level_blocks(widths[max(level - 1, 0)], width, blocks_per_level, time_emb_dim, num_groups)
            for level, width in enumerate(widths)
        )
        # downsamples[i] takes level i to level i + 1; upsamples[i] takes level i + 1 back to level i.
        self.downsamples = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1) for width in widths[:-1]
        )
        self.middle = ResidualBlock(widths[-1], widths[-1], time_emb_dim, num_groups)
        self.upsamples = nn.ModuleList(Upsample(width) for width in widths[1:])
        # The first up block of a level sees the features from below concatenated with that level's skip.
        channels_from_below = widths[1:] + widths[-1:]
        self.up_levels = nn.ModuleList(
            level_blocks(below + width, width, blocks_per_level, time_emb_dim, num_groups)
            for below, width in zip(channels_from_below, widths)
        )
        self.head = nn.Sequential(
            nn.GroupNorm(num_groups, widths[0]),
            nn.SiLU(),
            nn.Conv2d(widths[0], image_channels, kernel_size=3, padding=1),
        )

    def check_inputs(self, x, t):
        """Return None if x (B, image_channels, H, W) and t (B,) fit the network; raise a one-line ValueError if not.

        H and W must be multiples of size_multiple(widths) = 2**(levels - 1).
        """
        if x.dim() != 4:
            raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}; add a batch or channel axis")
        if x.shape[1] != self.image_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels but the model was built for image_channels={self.image_channels}"
            )
        factor = size_multiple(self.widths)
        for size in x.shape[2:]:
            if size % factor:
                raise ValueError(
                    f"image size {size} is not divisible by {factor} = 2**(levels-1) for widths {self.widths}; "
                    f"use a multiple of {factor}"
                )
        if tuple(t.shape) != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}; one timestep per image")

    def forward(self, x, t):
        """Return the predicted noise eps_theta(x_t, t), the same shape as x.

        x: (B, image_channels, H, W) noisy images x_t; t: (B,) integer timesteps.
        time = MLP(sinusoidal(t)); h = stem(x);
        down: for each level, its blocks(h, time), keep h as that level's skip, then halve with a stride-2 conv;
        middle block at the lowest resolution;
        up: for each level from the lowest, h = blocks(concat(h, skip), time), then nearest x2 + conv;
        output = conv3x3(silu(groupnorm(h))).
        Keeps x's memory format (channels_last stays channels_last).
        """
        self.check_inputs(x, t)
        time_embedding = self.time_mlp(t)
        h = self.stem(x)
        skips = []
        for level, blocks in enumerate(self.down_levels):
            for block in blocks:
                h = block(h, time_embedding)
            skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
        h = self.middle(h, time_embedding)
        for level in reversed(range(len(self.up_levels))):
            h = torch.cat([h, skips[level]], dim=1)
            for block in self.up_levels[level]:
                h = block(h, time_embedding)
            if level > 0:
                h = self.upsamples[level - 1](h)
        return self.head(h)


def count_parameters(model):
    """Return the number of scalar parameters of model: sum of p.numel() over model.parameters()."""
    return sum(parameter.numel() for parameter in model.parameters())
