"""Train the lecture's DDPM noise predictor on MNIST, CIFAR-10 or your images, on CPU or GPU, alone or under torchrun.

    python train.py --preset quick            # a few minutes on a laptop CPU
    python train.py                           # the lecture's configuration (25 epochs, widths 64,128,256)
    torchrun --nproc_per_node=4 train.py      # data-parallel on 4 GPUs

Per batch (Ho et al., Algorithm 1): t ~ Uniform{0..T-1}, eps ~ N(0, I), x_t = forward_diffusion_sample(x0, t),
loss = MSE(eps, eps_theta(x_t, t)), backward, Adam step, EMA update. After each epoch: a grid of samples from
the EMA weights and DIR/checkpoint.pt, written atomically; Ctrl-C saves and exits; --resume continues exactly.
"""
import argparse
import math
import os
import signal
import sys
import time

import torch

import ddpm
import sample
import unet
from support import arguments, checkpoints, data, distributed, files, images, run_folder, run_state, runtime
from support.progress import Progress

# The lecture's configuration; a preset or an explicit flag overrides any of these.
DEFAULTS = dict(
    dataset="mnist",
    epochs=25,
    batch_size=128,
    lr=1e-3,
    adam_beta2=0.999,
    timesteps=600,
    img_size=32,
    widths=[64, 128, 256],
    blocks_per_level=1,
    time_emb_dim=128,
    schedule="linear",
    warmup_steps=100,
    lr_decay="none",
    min_snr_gamma=0.0,
    grad_clip=1.0,
    ema_decay=0.995,
    seed=0,
    max_images=0,
    grid_samples=16,
)

# quick: residual blocks, one per level, four levels (the 4x4 level, 64 channels, sees the whole digit and costs
# little time) with narrow fine levels (8 and 16 channels at 32x32 and 16x16, where a step spends most of its time);
# 4,750 steps on the 8,000 bundled digits train.py reads, twice the lecture's learning rate decayed to zero over them:
# in ten CPU minutes a small network that takes many steps beat a wider one that takes fewer (see README and
# docs/recipes.md for times and quality, and the recipes it was measured against). Four levels need image sides that
# are multiples of 8 (the lecture's 32 is).
PRESETS = {
    "quick": dict(widths=[8, 16, 64, 64], blocks_per_level=1, epochs=38, batch_size=64, lr=2e-3, lr_decay="cosine"),
}

# Keys that define the model and the data: a resumed run must agree with its checkpoint on these (and on the
# images' channels, checked once the data is read: load_dataset).
FIXED_ON_RESUME = ("dataset", "img_size", "widths", "blocks_per_level", "time_emb_dim", "timesteps",
                   "schedule", "batch_size", "lr", "adam_beta2", "warmup_steps", "lr_decay", "min_snr_gamma", "grad_clip",
                   "ema_decay", "seed", "max_images", "world_size")
DERIVED_KEYS = ("world_size",)  # set by the launch, not by a flag of its own
DATASET_CHANNELS = {"mnist": 1, "cifar10": 3}  # folder:PATH and npz:PATH take theirs from the files
LOG_EVERY = 10  # steps between reading losses back from the device (each read is a host sync)
# Sampling starts from pure noise; above this, sqrt(alphas_cumprod[T-1]) leaves x_T visibly unlike it (warned).
MAX_SIGNAL_AT_X_T = 0.1


# ----------------------------------------------------------------------------- configuration


def build_parser():
    """Return the argument parser; flags left out take the preset's value, else the lecture's default."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    unset = argparse.SUPPRESS
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration; explicit flags override it")
    parser.add_argument("--dataset", type=arguments.dataset_type(sorted(DATASET_CHANNELS)), default=unset,
                        help="mnist (default), cifar10, folder:PATH (your PNG files) or npz:PATH (uint8 under arr_0)")
    parser.add_argument("--epochs", type=int, default=unset, help="default 25 (the lecture)")
    parser.add_argument("--batch-size", type=int, default=unset, help="per process; default 128 (the lecture)")
    parser.add_argument("--lr", type=float, default=unset, help="Adam learning rate; default 0.001 (the lecture)")
    parser.add_argument("--adam-beta2", type=float, default=unset, metavar="B2",
                        help="Adam's second-moment decay; default 0.999 (torch's and the lecture's Adam)")
    parser.add_argument("--timesteps", type=int, default=unset, help="T; default 600 (the lecture)")
    parser.add_argument("--img-size", type=int, default=unset, help="default 32 (the lecture; MNIST is zero-padded 28 -> 32)")
    parser.add_argument("--widths", type=arguments.parse_widths, default=unset, help="U-Net channel widths; default 64,128,256")
    parser.add_argument("--blocks-per-level", type=int, default=unset, help="residual blocks per U-Net level; default 1")
    parser.add_argument("--schedule", choices=sorted(ddpm.BETA_SCHEDULES), default=unset, help="beta schedule; default linear")
    parser.add_argument("--warmup-steps", type=int, default=unset, help="linear learning-rate warm-up; default 100")
    parser.add_argument("--lr-decay", choices=arguments.LR_DECAYS, default=unset,
                        help="after the warm-up: none (constant, the lecture) or cosine (to zero at the last step); "
                             "default none")
    parser.add_argument("--min-snr-gamma", type=float, default=unset, metavar="G",
                        help="weight each image's loss by min(SNR_t, G) / SNR_t (Min-SNR, beyond the lecture); "
                             "0 = off, the lecture's L_simple; default 0")
    parser.add_argument("--grad-clip", type=float, default=unset, help="max gradient norm, 0 = off; default 1.0")
    parser.add_argument("--ema-decay", type=float, default=unset, help="EMA of the weights, 0 = off; default 0.995")
    parser.add_argument("--seed", type=int, default=unset, help="default 0")
    parser.add_argument("--max-images", type=int, default=unset, help="train on the first N images only; 0 = all")
    parser.add_argument("--grid-samples", type=int, default=unset, help="samples in each epoch's grid, 0 = none; default 16")
    parser.add_argument("--out", default="runs/ddpm", help="folder for config.json, checkpoint.pt, loss.csv and grids")
    parser.add_argument("--data-dir", default="data",
                        help="where the MNIST/CIFAR-10 files are (also a torchvision root holding MNIST/raw)")
    parser.add_argument("--download", action="store_true", help="fetch the 60,000-digit MNIST training split (or CIFAR-10)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast where the hardware runs it natively, else fp32")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--force", action="store_true", help="start afresh even if --out holds a checkpoint (overwrites it)")
    return parser


def parse_config(argv):
    """Return (config, args): the lecture's defaults, overridden by the preset, overridden by explicit flags.

    Invalid values get an argparse error (exit 2) before any work starts.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {key: value for key, value in vars(args).items() if key in DEFAULTS}
    config = {**DEFAULTS, **PRESETS.get(args.preset, {}), **explicit}
    config["channels"] = DATASET_CHANNELS.get(config["dataset"])  # None until a folder's or an .npz's files are read
    problem = arguments.config_problem(config)
    if problem:
        parser.error(problem)
    if args.resume and args.force:
        parser.error("--resume and --force contradict each other: choose one")
    arguments.check_device(parser, args.device)
    preset = PRESETS.get(args.preset, {})
    args.explicit = {**preset, **explicit}  # what this run asks for, which --resume checks against the checkpoint
    args.origins = {key: f"--preset {args.preset}" for key in preset if key not in explicit}
    return config, args


# ----------------------------------------------------------------------------- data


def epoch_permutation(num_images, seed, epoch):
    """Return the image order of an epoch: a permutation drawn from a generator seeded by (seed, epoch)."""
    return torch.randperm(num_images, generator=runtime.seeded_generator(seed, epoch))


def step_generator(seed, rank, step, device):
    """Return the generator that draws step `step`'s timesteps and noise on rank `rank`.

    Seeded from (seed, rank, step) alone, so a resumed run draws exactly what an uninterrupted one would.
    """
    return runtime.seeded_generator(seed, rank, step, device=device)


# ----------------------------------------------------------------------------- the training step (Algorithm 1)


def learning_rate(step, lr, warmup_steps, decay="none", total_steps=0):
    """Return the learning rate at a step: linear warm-up to lr over warmup_steps, then constant (decay "none",
    the lecture's lr) or a half cosine down to zero at step total_steps (decay "cosine", beyond the lecture).

    lr_step = lr * min(1, (step + 1) / warmup_steps)                                  (warm-up; 1 if warmup_steps = 0)
              * 0.5 * (1 + cos(pi * min(1, max(0, step - warmup_steps) / (total_steps - warmup_steps))))  (cosine)
    """
    warm = 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)
    if decay == "none":
        return lr * warm
    progress = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * warm * 0.5 * (1.0 + math.cos(math.pi * progress))


def run_learning_rate(run, step):
    """Return learning_rate at step for run's configuration, over its epochs * steps_per_epoch steps."""
    config = run.config
    return learning_rate(step, config["lr"], config["warmup_steps"], config["lr_decay"],
                         config["epochs"] * run.steps_per_epoch)


def ema_decay_at(step, ema_decay):
    """Return the EMA decay at a step, warmed up: min(ema_decay, (1 + step) / (10 + step)).

    A plain 0.995 EMA of a short run would still be mostly the random initialisation; the warm-up lets the
    average follow the weights early and settle to ema_decay later.
    """
    return min(ema_decay, (1 + step) / (10 + step))


def train_step(model, optimizer, x0, t, noise, schedule, lr, grad_clip, device, precision, min_snr_gamma=0.0):
    """Return the loss of one step of Algorithm 1: loss = MSE(eps, eps_theta(x_t, t)), then one Adam step at lr.

    Sets every parameter group's learning rate to lr, clips the gradient norm to grad_clip (0 = off), steps.
    min_snr_gamma > 0 weights each image's error by min(SNR_t, gamma) / SNR_t (ddpm.min_snr_weights); 0 keeps
    the lecture's L_simple.
    """
    weights = ddpm.min_snr_weights(schedule, t, min_snr_gamma) if min_snr_gamma else None
    with runtime.autocast(device, precision):
        loss = ddpm.get_loss(model, x0, schedule, t=t, noise=noise, weights=weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """Move every EMA weight toward the model (in place): ema = decay * ema + (1 - decay) * weight."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1.0 - decay)


# ----------------------------------------------------------------------------- the run


def restore(run, checkpoint):
    """Load the checkpoint's weights, EMA, optimizer, position and loss log into run; rewrite loss.csv from it.

    loss.csv is renamed into place after the checkpoint, so a kill between the two can leave it short.
    """
    run.model.load_state_dict(checkpoint["model"])
    checkpoints.load_optimizer_state(run.optimizer, checkpoint, run.checkpoint_path)
    if run.ema_model is not None:
        run.ema_model.load_state_dict(checkpoint["ema"])
    run.losses, run.epoch = list(checkpoint["losses"]), checkpoint["epoch"]
    run.elapsed = list(checkpoint.get("elapsed", [math.nan] * len(run.losses)))  # older checkpoints lack it
    run.step_in_epoch, run.step = checkpoint["step_in_epoch"], checkpoint["step"]
    if run.is_main:  # a kill between the checkpoint's rename and loss.csv's can have left the log short
        write_losses(run)
    run.log(f"resumed from {run.checkpoint_path} at epoch {run.epoch + 1}, step {run.step}")


def set_up(config, args):
    """Return the Run: torchrun's place, --out claimed, the configuration (the checkpoint's on --resume), data, model.

    If anything after the claim fails, --out is released again.
    """
    rank, world_size, local_rank = distributed.distributed_context()
    device = runtime.resolve_device(args.device, local_rank)
    distributed.init_distributed(world_size, device)
    run = run_state.Run({**config, "world_size": world_size}, args.out, device, "fp32", rank, world_size)
    run_state.claim_output(run, args)
    try:
        set_up_claimed(run, args)
    except BaseException:
        run_folder.release_output(run.claim)
        raise
    return run


def check_decay_keeps_its_epochs(checkpoint_config, config, path):
    """Raise CheckpointError if a run whose learning rate decays over its epochs is resumed with other epochs."""
    if config["lr_decay"] != "none" and config["epochs"] != checkpoint_config["epochs"]:
        raise checkpoints.CheckpointError(
            f"{path} decays its learning rate to zero over {checkpoint_config['epochs']} epochs, so it resumes only with "
            f"--epochs {checkpoint_config['epochs']}; for more epochs start a new run in another --out")


def set_up_claimed(run, args):
    """Set run's configuration (the checkpoint's on --resume), data, model and position; clear --out on --force."""
    checkpoint = None
    if args.resume:
        checkpoint = checkpoints.load_checkpoint(run.checkpoint_path)
        run.config = checkpoints.check_resume_config(checkpoint["config"], run.config, args.explicit,
                                                     run.checkpoint_path, FIXED_ON_RESUME, DERIVED_KEYS, args.origins)
        check_decay_keeps_its_epochs(checkpoint["config"], run.config, run.checkpoint_path)
    run.precision = runtime.resolve_precision(args.precision, run.device)
    run_state.load_dataset(run, args)
    if run.is_main:
        run_folder.write_config(os.path.join(run.out, "config.json"), run.config)
    run_state.build_model_and_optimizer(run)
    if checkpoint is not None:
        restore(run, checkpoint)
    if args.force and run.is_main:
        run_folder.remove_previous_outputs(run.out)
    parameters = unet.count_parameters(run.model)
    world_size, device = run.world_size, run.device
    batch = f"{run.config['batch_size']} x {world_size}" if world_size > 1 else f"{run.config['batch_size']}"
    run.log(f"model: SimpleUnet widths {run.config['widths']} x {run.config['blocks_per_level']} block(s), "
            f"{parameters / 1e6:.2f}M parameters | device {device} | precision {run.precision} | {world_size} "
            f"process(es) | batch {batch} | {run.steps_per_epoch} steps/epoch, {run.config['epochs']} epochs")


def train_one_step(run, order):
    """Take step run.step of Algorithm 1 on this rank's next batch of the epoch's order; update the EMA."""
    config, size = run.config, run.config["batch_size"]
    batch = order[run.step_in_epoch * size:(run.step_in_epoch + 1) * size]
    layout = runtime.memory_format(run.precision)
    x0 = run.dataset[batch].contiguous(memory_format=layout)
    generator = step_generator(config["seed"], run.rank, run.step, run.device)
    t = ddpm.sample_t(len(batch), run.schedule.timesteps, run.device, generator)
    noise = torch.randn(x0.shape, generator=generator, device=run.device).contiguous(memory_format=layout)
    lr = run_learning_rate(run, run.step)
    run.pending.append(train_step(run.trained_model, run.optimizer, x0, t, noise, run.schedule, lr,
                                  config["grad_clip"], run.device, run.precision, config["min_snr_gamma"]))
    run.pending_times.append(time.perf_counter())
    if run.ema_model is not None:
        update_ema(run.ema_model, run.model, ema_decay_at(run.step, config["ema_decay"]))
    run.step += 1
    run.step_in_epoch += 1


def flush_losses(run):
    """Move pending losses to run.losses (averaged over ranks) and their times to run.elapsed; return the first
    non-finite step, or None."""
    if not run.pending:
        return None
    values = distributed.mean_over_ranks(torch.stack(run.pending).float(), run.world_size).cpu().tolist()
    first_step, times = run.step - len(run.pending), list(run.pending_times)
    run.pending.clear()
    run.pending_times.clear()
    for offset, (value, moment) in enumerate(zip(values, times)):
        if not math.isfinite(value):
            return first_step + offset
        run.losses.append(value)
        run.elapsed.append(moment - run.clock_zero)
    return None


def write_losses(run):
    """Write loss.csv from run's losses and times, with each step's learning rate (atomic)."""
    rates = [run_learning_rate(run, step) for step in range(len(run.losses))]
    run_folder.write_loss_log(os.path.join(run.out, "loss.csv"), run.losses, run.steps_per_epoch, rates, run.elapsed)


def on_rank_0(run, write):
    """Call write() on rank 0 alone; then every rank learns whether it failed, so that none waits for rank 0 forever.

    Rank 0 raises its own error: a failed write is one line from main, anything else (running out of GPU memory
    while sampling the grid, a bug) its traceback. The other ranks raise distributed.RankFailed, which main turns
    into exit code 1 without a line of their own. In a single process this is write() itself.
    """
    error = None
    if run.is_main:
        try:
            write()
        except Exception as caught:  # any failure: the other ranks must not wait in the next collective
            error = caught
    if distributed.any_rank(error is not None, run.world_size, run.device):
        raise error if error is not None else distributed.RankFailed("rank 0 failed while writing its outputs")


def save(run):
    """Write the checkpoint at run's position and loss.csv (rank 0 only; both atomic; every rank learns if it failed)."""
    on_rank_0(run, lambda: write_checkpoint(run))


def write_checkpoint(run):
    """Write the checkpoint at run's position, then loss.csv, each atomically (the caller runs this on rank 0)."""
    checkpoints.save_checkpoint(run.checkpoint_path, checkpoints.make_checkpoint(
        run.config, run.model, run.ema_model, run.optimizer, run.epoch, run.step_in_epoch, run.step, run.losses,
        run.elapsed))
    write_losses(run)


def diverged(run, bad_step):
    """Say where the loss became non-finite (no checkpoint is written) and what --out holds; return exit code 1."""
    kept = (f"The last good checkpoint stays in {run.checkpoint_path}" if os.path.exists(run.checkpoint_path)
            else f"No checkpoint was written: {run.out} holds none")
    run.log(f"\nerror: the loss became non-finite at step {bad_step} (epoch {run.epoch + 1}); training stopped. "
            f"{kept}; try a lower --lr")
    return 1


def interrupted(run):
    """Say where the run stopped (its checkpoint is saved) and return the exit code of a Ctrl-C (130)."""
    run.log(f"\ninterrupted at step {run.step} (epoch {run.epoch + (run.step_in_epoch > 0)}): checkpoint saved to "
            f"{run.checkpoint_path}; continue with the same command plus --resume")
    return 130


def train_epoch(run, stop, progress):
    """Train the rest of epoch run.epoch; return None when it is done, else the exit code (divergence, Ctrl-C)."""
    order = epoch_permutation(len(run.dataset), run.config["seed"], run.epoch)[run.rank::run.world_size].to(run.device)
    run.model.train()
    while run.step_in_epoch < run.steps_per_epoch:
        train_one_step(run, order)
        last_step = run.step_in_epoch == run.steps_per_epoch
        if len(run.pending) >= LOG_EVERY or last_step:
            bad_step = flush_losses(run)
            if bad_step is not None:
                return diverged(run, bad_step)
            if run.losses:
                progress.update(run.step, epoch_text(run), final=last_step)
        # At an epoch's last step the stop waits for the epoch's own grid and checkpoint (end_of_epoch).
        if not last_step and distributed.any_rank(stop.signal_name is not None, run.world_size, run.device):
            bad_step = flush_losses(run)
            if bad_step is not None:
                return diverged(run, bad_step)
            save(run)
            return interrupted(run)
    return None


def epoch_text(run):
    """Return 'epoch e/E  step s/S  loss L' for the progress line."""
    total = run.config["epochs"] * run.steps_per_epoch
    return f"epoch {run.epoch + 1}/{run.config['epochs']}  step {run.step}/{total}  loss {run.losses[-1]:.4f}"


def end_of_epoch(run):
    """Count the epoch as done; rank 0 writes its grid of samples and the checkpoint (one agreement for both)."""
    run.epoch, run.step_in_epoch = run.epoch + 1, 0

    def write():
        if run.config["grid_samples"]:
            write_grid(run)
        write_checkpoint(run)
    on_rank_0(run, write)


def write_grid(run):
    """Write the epoch's preview grid: the fast route's samples of the EMA model (of the raw one without an EMA)."""
    model = run.ema_model if run.ema_model is not None else run.model
    grid = sample.preview_grid(model, run.schedule, run.config, run.device, run.precision)
    images.write_png(run_folder.grid_path(run.out, run.epoch), grid)


def warn_if_x_T_keeps_signal(run):
    """Print a warning when x_T keeps signal, sqrt(alphas_cumprod[T-1]) > 0.1, while sampling starts from pure noise.

    The linear schedule's endpoints are fixed (1e-4 to 0.02), so a small T leaves much of x0 in x_T: 0.78 at T = 50.
    """
    signal_left = float(run.schedule.sqrt_alphas_cumprod[-1])
    if signal_left > MAX_SIGNAL_AT_X_T:
        run.log(f"warning: T = {run.config['timesteps']} ({run.config['schedule']} schedule) leaves "
                f"sqrt(alphas_cumprod[T-1]) = {signal_left:.2f} of the image in x_T, but sampling starts from pure "
                "noise, so samples will be off; use more --timesteps (600: 0.048) or --schedule cosine")


def train(config, args):
    """Run (or resume) a training run as configured (Algorithm 1 for every batch); return the exit code."""
    run = set_up(config, args)
    if run.epoch >= run.config["epochs"]:
        run.log(f"{run.checkpoint_path} has already trained {run.epoch} epochs; pass --epochs N with N > {run.epoch} "
                "to train further")
        run_folder.release_output(run.claim)
        return 0
    warn_if_x_T_keeps_signal(run)
    stop = run_state.StopRequest()
    previous_handlers = run_state.install_stop_request(stop)
    progress = Progress(run.config["epochs"] * run.steps_per_epoch, start=run.step, enabled=run.is_main,
                        scale=run.config["batch_size"] * run.world_size)
    known = [seconds for seconds in run.elapsed if math.isfinite(seconds)]
    run.clock_zero = time.perf_counter() - (known[-1] if known else 0.0)  # elapsed goes on from the checkpoint's
    try:
        while run.epoch < run.config["epochs"]:
            code = train_epoch(run, stop, progress)
            if code is not None:
                return code
            end_of_epoch(run)
            if run.epoch < run.config["epochs"] and distributed.any_rank(stop.signal_name is not None,
                                                                         run.world_size, run.device):
                return interrupted(run)
        run.log(f"done: {run.config['epochs']} epochs, {run.step} steps; checkpoint in {run.checkpoint_path}")
        return 0
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        distributed.finish_distributed(run.world_size)
        run_folder.release_output(run.claim)


def main(argv=None):
    """Parse arguments, train, and turn expected failures into one line on stderr and a non-zero exit code."""
    config, args = parse_config(argv)
    try:
        return train(config, args)
    except (data.DataError, checkpoints.CheckpointError, runtime.ConfigError, files.OutputError, OSError,
            distributed.RankFailed) as error:
        if distributed.distributed_context()[0] == 0:  # under torchrun every rank meets the same error: say it once
            print(f"error: {files.error_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nerror: interrupted; stopped without saving (the last checkpoint, if any, is unchanged)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
