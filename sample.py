"""Generate images from a trained checkpoint: a PNG grid, optionally an .npz and a picture of the denoising.

    python sample.py --checkpoint runs/ddpm/checkpoint.pt --n 64 --out samples.png
    python sample.py --checkpoint runs/ddpm/checkpoint.pt --n 1000 --npz samples.npz --sampler fast
    python sample.py --checkpoint runs/ddpm/checkpoint.pt --export weights.pt     # the EMA weights alone

The configuration (image size, channels, widths, T, schedule) comes from the checkpoint; the EMA weights are used.
From Python (a notebook): model, schedule, config = sample.load(path); samples = sample.draw(model, schedule,
config, n=16, sampler="fast"); sample.grid(samples, path="samples.png"). The command line is a layer over these.
"""
import argparse
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np
import torch

import ddpm
from support import arguments, checkpoints, files, images, runtime
from support.arguments import positive_int, seed_problem
from support.progress import Progress, say

SAMPLERS = ("ddpm", "fast", "ddim")
DEFAULT_STEPS = 50  # of 'fast' and 'ddim' (at most T)
DEFAULT_ETA = {"fast": 1.0, "ddim": 0.0}
DEFAULT_ORDER = {"fast": 2, "ddim": 1}  # 2: DPM-Solver++(2M), ddpm.ddim_sample


def parse_args(argv):
    """Return the parsed command line; invalid values get an argparse error (exit 2) before any work."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint.pt written by train.py (or weights written by --export)")
    parser.add_argument("--n", type=positive_int, default=64, help="number of samples (default 64)")
    parser.add_argument("--out", help="PNG grid to write (default samples.png)")
    parser.add_argument("--npz", help="also save the samples as uint8 (N, H, W, C) under key arr_0 in this .npz")
    parser.add_argument("--frames", type=int, default=0, help="also write OUT-frames.png: K snapshots from x_T to x_0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per sampling batch (default 128)")
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                        help="clip the predicted x0 to [-1, 1] in every step (default: only under the cosine schedule)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                        help="ddpm: the lecture's T-step sampler; fast: the DDPM posterior's noise (eta 1) over "
                             "--steps steps with a second-order update, close to ddpm's quality at a twelfth of the "
                             "time; ddim: deterministic DDIM (eta 0, first order)")
    parser.add_argument("--steps", type=positive_int, help="steps of fast and ddim (default 50, at most T)")
    parser.add_argument("--eta", type=float, help="noise of fast and ddim: 0 deterministic, 1 like DDPM "
                                                  "(default 1 for fast, 0 for ddim)")
    parser.add_argument("--order", type=int, choices=(1, 2),
                        help="update of fast and ddim: 1 the DDIM update, 2 DPM-Solver++(2M), which reuses the "
                             "previous step's x0 prediction at no extra cost (default 2 for fast, 1 for ddim)")
    parser.add_argument("--export", metavar="FILE",
                        help="write the EMA weights alone to FILE (float32, about 4x smaller than the checkpoint, "
                             "loadable with torch.load(FILE, weights_only=True)) and sample nothing")
    args = parser.parse_args(argv)
    if args.frames < 0 or args.frames == 1:
        parser.error(f"--frames must be 0 or at least 2, got {args.frames}")
    if args.eta is not None and not 0 <= args.eta <= 1:  # also refuses nan
        parser.error(f"--eta must be a number in [0, 1] (0: deterministic, 1: DDPM's noise), got {args.eta}")
    if seed_problem(args.seed):
        parser.error(seed_problem(args.seed))
    if args.export and (args.out or args.npz or args.frames):
        parser.error("--export writes the weights only: drop --out, --npz and --frames (or export in another call)")
    args.out = args.out or "samples.png"
    if not args.out.lower().endswith(".png"):
        parser.error(f"--out must name a .png file, got {args.out}")
    if args.npz is not None and not args.npz.lower().endswith(".npz"):
        parser.error(f"--npz must name a .npz file, got {args.npz}")
    for path in output_paths(args):
        if os.path.realpath(path) == os.path.realpath(args.checkpoint):
            parser.error(f"{path} is the checkpoint this run reads: write the samples under another name")
    arguments.check_device(parser, args.device)
    return args


def frames_path(out):
    """Return the path of the picture of the denoising beside the grid out: OUT-frames.png."""
    return out[:-4] + "-frames.png"


def output_paths(args):
    """Return the files this run writes: the exported weights, or the grid, the .npz and the frames if asked for."""
    if args.export:
        return [args.export]
    return [args.out] + ([args.npz] if args.npz else []) + ([frames_path(args.out)] if args.frames else [])


def check_outputs(args):
    """Raise files.OutputError, naming the path and why, when an output of this run cannot be written (before any work)."""
    for path in output_paths(args):
        problem = files.creation_problem(path)
        if problem:
            raise files.OutputError(f"cannot write {path}: {problem}; choose another path")


class SamplingProgress(Progress):
    """The progress line of a sampling run (on stderr): 'sampling: step s/S of batch b/B', images/s, time left."""

    def __init__(self, batches, batch_size, steps):
        super().__init__(batches * steps, unit="images/s", scale=batch_size / steps, stream=sys.stderr)
        self.batches, self.steps, self.batch = batches, steps, 0

    def __call__(self, step, total):
        self.update(self.batch * total + step, f"sampling: step {step}/{total} of batch {self.batch + 1}/{self.batches}",
                    final=step == total and self.batch + 1 == self.batches)


# ----------------------------------------------------------------------------- the Python API (also the command line's)


class Loaded(NamedTuple):
    """What load returns: the sampling model (eval mode, on its device), its noise schedule, its configuration."""
    model: torch.nn.Module
    schedule: ddpm.Schedule
    config: dict


def load(path, device="auto", precision="auto"):
    """Return (model, schedule, config) from a train.py checkpoint or a sample.py --export file, in one call.

    model: the EMA weights (else the raw ones) in eval mode on device ('auto': CUDA, else MPS, else CPU), in the
    memory layout of the precision; schedule: its noise schedule on that device; config: channels, img_size,
    timesteps, schedule, widths, ... Raises CheckpointError or ConfigError (both one line) for a bad file or device.
    """
    device = runtime.resolve_device(device)
    config, weights = checkpoints.load_sampling_weights(path)
    model = checkpoints.model_from_weights(config, weights, device, runtime.resolve_precision(precision, device), path)
    return Loaded(model, ddpm.Schedule.create(config["timesteps"], config["schedule"]).to(device), config)


def draw(model, schedule, config, n=64, *, sampler="ddpm", steps=None, eta=None, order=None, seed=0, batch_size=128,
         clip=None, precision="auto", progress=True):
    """Return n images drawn from the model: float32 (n, C, H, W) in [-1, 1], on the CPU.

    sampler: 'ddpm' (the lecture's T steps), 'fast' (eta 1, order 2 over `steps` steps, default 50) or 'ddim'
    (eta 0, order 1: deterministic DDIM); eta and order (1 DDIM, 2 DPM-Solver++(2M)) override a sampler's own.
    clip: clip the predicted x0 to [-1, 1] (default: only under the cosine schedule).
    The same seed and batch_size always give the same images. progress: a progress line on stderr.
    """
    samples, _ = generate(model, schedule, config, n, sampler=sampler, steps=steps, eta=eta, order=order, seed=seed,
                          batch_size=batch_size, clip=clip, precision=precision, progress=progress)
    return samples


def grid(samples, nrow=None, path=None):
    """Return the uint8 (H, W, C) grid of samples (float (N, C, H, W) in [-1, 1]), nrow a row (default ceil(sqrt(N))).

    With path, the grid is also written there as a PNG (atomically, folders created).
    """
    pixels = images.make_grid(images.to_uint8(samples), nrow=nrow or math.ceil(math.sqrt(len(samples))))
    if path is not None:
        make_parent_folder(path)
        images.write_png(path, pixels)
    return pixels


def export(checkpoint_path, path):
    """Return path after writing there the checkpoint's EMA weights alone (checkpoints.exported_weights), atomically.

    float32, contiguous, with the model's configuration and a format tag: about 4x smaller than the checkpoint
    (no optimizer state, no raw weights), and read with torch.load(path, weights_only=True).
    """
    weights = checkpoints.exported_weights(checkpoints.load_checkpoint(checkpoint_path))
    make_parent_folder(path)
    return files.write_atomically(path, lambda stream: torch.save(weights, stream))


def sampler_settings(sampler, steps, eta, order, timesteps):
    """Return (steps, eta, order) a sampler runs with: 'ddpm' all T steps (no eta, no order), 'fast'/'ddim' `steps`
    (default min(50, T)) with eta (default 1 for 'fast', 0 for 'ddim') and order (default 2 for 'fast', 1 for
    'ddim'). ConfigError with one line for an invalid request.
    """
    if sampler not in SAMPLERS:
        raise runtime.ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler == "ddpm":
        if steps is not None or eta is not None or order is not None:
            raise runtime.ConfigError("the ddpm sampler takes all T steps, no eta and no order: drop steps, eta and "
                                      "order, or use the fast or ddim sampler")
        return timesteps, None, None
    steps = min(DEFAULT_STEPS, timesteps) if steps is None else steps
    if not arguments.is_int(steps) or not 1 <= steps <= timesteps:
        raise runtime.ConfigError(f"steps must be between 1 and the model's {timesteps} timesteps, got {steps!r}")
    eta = DEFAULT_ETA[sampler] if eta is None else eta
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < math.inf:
        raise runtime.ConfigError(f"eta must be a number >= 0 (0: deterministic, 1: as noisy as DDPM), got {eta!r}")
    order = DEFAULT_ORDER[sampler] if order is None else order
    if isinstance(order, bool) or order not in (1, 2):
        raise runtime.ConfigError(f"order must be 1 (the DDIM update) or 2 (DPM-Solver++(2M)), got {order!r}")
    return steps, float(eta), order


def check_counts(n, batch_size, frames):
    """Raise ConfigError with one line unless n and batch_size are positive integers and frames is 0 or at least 2."""
    for name, value in (("n", n), ("batch_size", batch_size)):
        if not arguments.is_int(value) or value < 1:
            raise runtime.ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not arguments.is_int(frames) or frames < 0 or frames == 1:
        raise runtime.ConfigError(f"frames must be 0 or at least 2, got {frames!r}")


def make_parent_folder(path):
    """Create the folder path is to be written into, if it names one that does not exist yet."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)


def generate(model, schedule, config, n, *, sampler="ddpm", steps=None, eta=None, order=None, seed=0, batch_size=128,
             clip=None, frames=0, precision="auto", progress=False):
    """Return (samples, frames): n images in [-1, 1] (N, C, H, W) on the CPU, drawn in batches (see draw).

    Batch b uses a generator seeded with (seed, b), so a seed and batch_size always give the same images.
    frames: for the first batch only, that many snapshots of up to 8 samples from x_T to x_0 (none for 0).
    """
    steps, eta, order = sampler_settings(sampler, steps, eta, order, config["timesteps"])
    check_counts(n, batch_size, frames)
    device = next(model.parameters()).device
    precision = runtime.resolve_precision(precision, device)
    clip = runtime.clip_x0_by_default(config["schedule"]) if clip is None else clip
    tracker = SamplingProgress(math.ceil(n / batch_size), batch_size, steps) if progress else None
    samples, snapshots = [], []
    for batch_index, start in enumerate(range(0, n, batch_size)):
        shape = (min(batch_size, n - start), config["channels"], config["img_size"], config["img_size"])
        generator = runtime.seeded_generator(seed, batch_index, device=device)
        num_frames = frames if batch_index == 0 else 0
        if tracker is not None:
            tracker.batch = batch_index
        with runtime.autocast(device, precision):
            if sampler == "ddpm":
                batch, batch_frames = ddpm.sample(model, schedule, shape, generator=generator, clip_x0=clip,
                                                  num_frames=num_frames, callback=tracker)
            else:
                batch, batch_frames = ddpm.ddim_sample(model, schedule, shape, steps=steps, eta=eta, order=order,
                                                       generator=generator, clip_x0=clip, num_frames=num_frames,
                                                       callback=tracker)
        samples.append(batch.float().cpu())
        snapshots = snapshots or [frame[:8].float().cpu() for frame in batch_frames]
    return torch.cat(samples), snapshots


PREVIEW_STEPS = 50
PREVIEW_ETA = 1.0
PREVIEW_ORDER = 2


def preview_grid(model, schedule, config, device, precision, steps=PREVIEW_STEPS):
    """Return a uint8 grid of config['grid_samples'] samples: train.py's picture of the model after each epoch.

    The fast route: the DDPM posterior's noise (eta = 1) over 50 strided timesteps with the second-order update
    (DPM-Solver++(2M)), twelve times cheaper than the 600-step sampler and close to it in quality, where
    deterministic DDIM (eta = 0) is grainier on a short-trained model (docs/sampling.md). x_T and every step's
    noise come from generators seeded by the run's seed, so each epoch's grid starts from the same noise and the
    grids show how the model changes.
    x0 is clipped where the schedule asks for it (runtime.clip_x0_by_default).
    """
    shape = (config["grid_samples"], config["channels"], config["img_size"], config["img_size"])
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(config["seed"])).to(device)
    step_noise = runtime.seeded_generator(config["seed"], 1, device=device)
    model.eval()
    with runtime.autocast(device, precision):
        samples, _ = ddpm.ddim_sample(model, schedule, shape, steps=min(steps, schedule.timesteps), eta=PREVIEW_ETA,
                                      order=PREVIEW_ORDER, generator=step_noise,
                                      x_T=x_T.contiguous(memory_format=runtime.memory_format(precision)),
                                      clip_x0=runtime.clip_x0_by_default(config["schedule"]))
    return grid(samples.float().cpu())


def frames_grid(frames):
    """Return a uint8 grid with one row per sample and one column per snapshot, x_T at the left, x_0 at the right."""
    stacked = torch.stack(frames, dim=1)  # (samples, K, C, H, W)
    return images.make_grid(images.to_uint8(stacked.flatten(0, 1)), nrow=len(frames))


def save_npz(path, samples_uint8):
    """Write samples as uint8 (N, H, W, C) under key 'arr_0' (the layout evaluation tools read), atomically."""
    files.write_atomically(path, lambda stream: np.savez(stream, arr_0=samples_uint8))


def run(args):
    """Sample (or export) as the arguments ask and write the outputs; return the exit code."""
    check_outputs(args)
    if args.export:
        return run_export(args)
    model, schedule, config = load(args.checkpoint, args.device, args.precision)
    if args.clip is False and runtime.clip_x0_by_default(config["schedule"]):
        print("warning: this checkpoint uses the cosine schedule, whose last beta is clipped at 0.999: its first reverse "
              "step multiplies the noise estimate's error by 1/sqrt(alpha) = 32 (more under DDIM); drop --no-clip",
              file=sys.stderr)
    start = time.perf_counter()
    samples, frames = generate(model, schedule, config, args.n, sampler=args.sampler, steps=args.steps, eta=args.eta,
                               order=args.order, seed=args.seed, batch_size=args.batch_size, clip=args.clip,
                               frames=args.frames, precision=args.precision, progress=True)
    elapsed = time.perf_counter() - start
    grid(samples, path=args.out)
    written = [args.out]
    if args.npz:
        make_parent_folder(args.npz)
        save_npz(args.npz, images.to_uint8(samples))
        written.append(args.npz)
    if frames:
        images.write_png(frames_path(args.out), frames_grid(frames))
        written.append(frames_path(args.out))
    device = next(model.parameters()).device
    steps, _, _ = sampler_settings(args.sampler, args.steps, args.eta, args.order, config["timesteps"])
    say(f"{args.n} samples ({args.sampler}, {steps} steps, {runtime.resolve_precision(args.precision, device)} on "
        f"{device}) in {elapsed:.1f} s ({args.n / elapsed:.1f} images/s): wrote {', '.join(written)}")
    return 0


def run_export(args):
    """Write the checkpoint's EMA weights alone to args.export (export), say so, and return the exit code."""
    export(args.checkpoint, args.export)
    sizes = [os.path.getsize(path) / 1e6 for path in (args.export, args.checkpoint)]
    say(f"wrote {args.export} ({sizes[0]:.1f} MB; the checkpoint is {sizes[1]:.1f} MB): the EMA weights in float32 "
        "with the model's configuration; read it with torch.load(FILE, weights_only=True) (see the README)")
    return 0


def main(argv=None):
    """Parse arguments, sample, and turn expected failures into one line on stderr and a non-zero exit code."""
    args = parse_args(argv)
    try:
        return run(args)
    except (checkpoints.CheckpointError, runtime.ConfigError, files.OutputError, OSError) as error:
        print(f"error: {files.error_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nerror: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
