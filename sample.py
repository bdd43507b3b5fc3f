"""Generate images from a trained checkpoint: a PNG grid, optionally an .npz and a picture of the denoising.

    python sample.py --checkpoint runs/ddpm/checkpoint.pt --n 64 --out samples.png
    python sample.py --checkpoint runs/ddpm/checkpoint.pt --n 1000 --npz samples.npz --sampler ddim --steps 50

The configuration (image size, channels, widths, T, schedule) comes from the checkpoint; the EMA weights are used.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch

import ddpm
from support import checkpoints, files, images, runtime
from support.progress import Progress
from support.arguments import positive_int, seed_problem


def parse_args(argv):
    """Return the parsed command line; invalid values get an argparse error (exit 2) before any work."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train.py")
    parser.add_argument("--n", type=positive_int, default=64, help="number of samples (default 64)")
    parser.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png)")
    parser.add_argument("--npz", help="also save the samples as uint8 (N, H, W, C) under key arr_0 in this .npz")
    parser.add_argument("--frames", type=int, default=0, help="also write OUT-frames.png: K snapshots from x_T to x_0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per sampling batch (default 128)")
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                        help="clip the predicted x0 to [-1, 1] in every step (default: only under the cosine schedule)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                        help="ddpm: the lecture's T-step sampler; ddim: deterministic (eta 0) over --steps steps")
    parser.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM (default 0)")
    args = parser.parse_args(argv)
    if args.frames < 0 or args.frames == 1:
        parser.error(f"--frames must be 0 or at least 2, got {args.frames}")
    if not 0 <= args.eta <= 1:  # also refuses nan
        parser.error(f"--eta must be a number in [0, 1] (0: deterministic, 1: DDPM's noise), got {args.eta}")
    if seed_problem(args.seed):
        parser.error(seed_problem(args.seed))
    if not args.out.lower().endswith(".png"):
        parser.error(f"--out must name a .png file, got {args.out}")
    if args.npz is not None and not args.npz.lower().endswith(".npz"):
        parser.error(f"--npz must name a .npz file, got {args.npz}")
    for path in output_paths(args):
        if os.path.realpath(path) == os.path.realpath(args.checkpoint):
            parser.error(f"{path} is the checkpoint this run reads: write the samples under another name")
    try:
        runtime.resolve_device(args.device)
    except runtime.ConfigError as error:
        parser.error(str(error))
    return args


def frames_path(out):
    """Return the path of the picture of the denoising beside the grid out: OUT-frames.png."""
    return out[:-4] + "-frames.png"


def output_paths(args):
    """Return the files this run writes: the grid, the .npz if asked for, the picture of the denoising if asked for."""
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


def generate(model, schedule, config, args, device, precision, progress=None):
    """Return (samples, frames): args.n images in [-1, 1] (N, C, H, W) on the CPU, drawn in batches.

    Batch b uses a generator seeded with (seed, b), so a given --seed and --batch-size always give the same images.
    frames: for the first batch only, the snapshots of up to 8 samples from x_T to x_0.
    """
    samples, frames = [], []
    for batch_index, start in enumerate(range(0, args.n, args.batch_size)):
        count = min(args.batch_size, args.n - start)
        shape = (count, config["channels"], config["img_size"], config["img_size"])
        generator = runtime.seeded_generator(args.seed, batch_index, device=device)
        num_frames = args.frames if batch_index == 0 else 0
        if progress is not None:
            progress.batch = batch_index
        with runtime.autocast(device, precision):
            if args.sampler == "ddim":
                batch, batch_frames = ddpm.ddim_sample(model, schedule, shape, steps=args.steps, eta=args.eta,
                                                       generator=generator, clip_x0=args.clip, num_frames=num_frames,
                                                       callback=progress)
            else:
                batch, batch_frames = ddpm.sample(model, schedule, shape, generator=generator, clip_x0=args.clip,
                                                  num_frames=num_frames, callback=progress)
        samples.append(batch.float().cpu())
        frames = frames or [frame[:8].float().cpu() for frame in batch_frames]
    return torch.cat(samples), frames


PREVIEW_STEPS = 50


def preview_grid(model, schedule, config, device, precision, steps=PREVIEW_STEPS):
    """Return a uint8 grid of config['grid_samples'] samples: train.py's picture of the model after each epoch.

    Deterministic DDIM over 50 steps from the same seeded x_T every epoch: twelve times cheaper than the 600-step
    sampler, and the same noise maps to each epoch's digits, so the grids show how the model changes. x0 is
    clipped where the schedule asks for it (runtime.clip_x0_by_default).
    """
    shape = (config["grid_samples"], config["channels"], config["img_size"], config["img_size"])
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(config["seed"])).to(device)
    model.eval()
    with runtime.autocast(device, precision):
        samples, _ = ddpm.ddim_sample(model, schedule, shape, steps=min(steps, schedule.timesteps),
                                      x_T=x_T.contiguous(memory_format=runtime.memory_format(precision)),
                                      clip_x0=runtime.clip_x0_by_default(config["schedule"]))
    return images.make_grid(images.to_uint8(samples.float().cpu()), nrow=math.ceil(math.sqrt(shape[0])))


def frames_grid(frames):
    """Return a uint8 grid with one row per sample and one column per snapshot, x_T at the left, x_0 at the right."""
    stacked = torch.stack(frames, dim=1)  # (samples, K, C, H, W)
    return images.make_grid(images.to_uint8(stacked.flatten(0, 1)), nrow=len(frames))


def save_npz(path, samples_uint8):
    """Write samples as uint8 (N, H, W, C) under key 'arr_0' (the layout evaluation tools read), atomically."""
    files.write_atomically(path, lambda stream: np.savez(stream, arr_0=samples_uint8))


def run(args):
    """Sample as the arguments ask and write the outputs; return the exit code."""
    check_outputs(args)
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision(args.precision, device)
    checkpoint = checkpoints.load_checkpoint(args.checkpoint)
    config = checkpoint["config"]
    if args.sampler == "ddim" and args.steps > config["timesteps"]:
        raise runtime.ConfigError(f"--steps {args.steps} is more than the checkpoint's {config['timesteps']} timesteps")
    if args.clip is None:
        args.clip = runtime.clip_x0_by_default(config["schedule"])
    elif runtime.clip_x0_by_default(config["schedule"]) and not args.clip:
        print("warning: this checkpoint uses the cosine schedule, whose last beta is clipped at 0.999: its first reverse "
              "step multiplies the noise estimate's error by 1/sqrt(alpha) = 32 (more under DDIM); drop --no-clip",
              file=sys.stderr)
    model = checkpoints.model_from_checkpoint(checkpoint, device, precision)
    schedule = ddpm.Schedule.create(config["timesteps"], config["schedule"]).to(device)
    steps = args.steps if args.sampler == "ddim" else config["timesteps"]
    progress = SamplingProgress(math.ceil(args.n / args.batch_size), args.batch_size, steps)
    start = time.perf_counter()
    samples, frames = generate(model, schedule, config, args, device, precision, progress)
    elapsed = time.perf_counter() - start
    samples_uint8 = images.to_uint8(samples)
    for path in (args.out, args.npz):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    images.write_png(args.out, images.make_grid(samples_uint8, nrow=math.ceil(math.sqrt(args.n))))
    written = [args.out]
    if args.npz:
        save_npz(args.npz, samples_uint8)
        written.append(args.npz)
    if frames:
        images.write_png(frames_path(args.out), frames_grid(frames))
        written.append(frames_path(args.out))
    print(f"{args.n} samples ({args.sampler}, {steps} steps, {precision} on {device}) in {elapsed:.1f} s "
          f"({args.n / elapsed:.1f} images/s): wrote {', '.join(written)}")
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
