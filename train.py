"""Train the lecture's DDPM noise predictor on MNIST (or CIFAR-10), on CPU or GPU, in one process or under torchrun.

    python train.py --preset quick            # a few minutes on a laptop CPU
    python train.py                           # the lecture's configuration (25 epochs, widths 64,128,256)
    torchrun --nproc_per_node=4 train.py      # data-parallel on 4 GPUs

Per batch (Ho et al., Algorithm 1): t ~ Uniform{0..T-1}, eps ~ N(0, I), x_t = forward_diffusion_sample(x0, t),
loss = MSE(eps, eps_theta(x_t, t)), backward, Adam step, EMA update. After each epoch: a grid of samples from
the EMA weights and DIR/checkpoint.pt, written atomically; Ctrl-C saves and exits; --resume continues exactly.
"""
import argparse
import copy
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
import ddpm
import images
import runtime
import unet

# The lecture's configuration; a preset or an explicit flag overrides any of these.
DEFAULTS = dict(
    dataset="mnist",
    epochs=25,
    batch_size=128,
    lr=1e-3,
    timesteps=600,
    img_size=32,
    widths=[64, 128, 256],
    blocks_per_level=1,
    time_emb_dim=128,
    schedule="linear",
    warmup_steps=100,
    grad_clip=1.0,
    ema_decay=0.995,
    seed=0,
    max_images=0,
    grid_samples=16,
)

# quick: residual blocks at half the lecture's widths, two per level, trained for the steps a 2-core CPU
# manages in about eight minutes on the bundled 10,000 digits (measured: see README).
PRESETS = {
    "quick": dict(widths=[32, 64, 128], blocks_per_level=2, epochs=10, batch_size=64),
}

# Keys that define the model and the data: a resumed run must agree with its checkpoint on these.
FIXED_ON_RESUME = ("dataset", "img_size", "channels", "widths", "blocks_per_level", "time_emb_dim", "timesteps",
                   "schedule", "batch_size", "lr", "warmup_steps", "grad_clip", "ema_decay", "seed", "max_images",
                   "world_size")
DERIVED_KEYS = ("channels", "world_size")  # set by the dataset and the launch, not by a flag of their own
DATASET_CHANNELS = {"mnist": 1, "cifar10": 3}
LOG_EVERY = 10  # steps between reading losses back from the device (each read is a host sync)


# ----------------------------------------------------------------------------- configuration


def parse_widths(text):
    """Return the U-Net widths from '64,128,256' as a list of positive ints (an argparse type)."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers like 64,128,256, got {text!r}") from None
    if not widths or min(widths) <= 0:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def build_parser():
    """Return the argument parser; flags left out take the preset's value, else the lecture's default."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    unset = argparse.SUPPRESS
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration; explicit flags override it")
    parser.add_argument("--dataset", choices=sorted(DATASET_CHANNELS), default=unset, help="default mnist")
    parser.add_argument("--epochs", type=int, default=unset, help="default 25 (the lecture)")
    parser.add_argument("--batch-size", type=int, default=unset, help="per process; default 128 (the lecture)")
    parser.add_argument("--lr", type=float, default=unset, help="Adam learning rate; default 0.001 (the lecture)")
    parser.add_argument("--timesteps", type=int, default=unset, help="T; default 600 (the lecture)")
    parser.add_argument("--img-size", type=int, default=unset, help="default 32 (the lecture; MNIST is zero-padded 28 -> 32)")
    parser.add_argument("--widths", type=parse_widths, default=unset, help="U-Net channel widths; default 64,128,256")
    parser.add_argument("--blocks-per-level", type=int, default=unset, help="residual blocks per U-Net level; default 1")
    parser.add_argument("--schedule", choices=sorted(ddpm.BETA_SCHEDULES), default=unset, help="beta schedule; default linear")
    parser.add_argument("--warmup-steps", type=int, default=unset, help="linear learning-rate warm-up; default 100")
    parser.add_argument("--grad-clip", type=float, default=unset, help="max gradient norm, 0 = off; default 1.0")
    parser.add_argument("--ema-decay", type=float, default=unset, help="EMA of the weights, 0 = off; default 0.995")
    parser.add_argument("--seed", type=int, default=unset, help="default 0")
    parser.add_argument("--max-images", type=int, default=unset, help="train on the first N images only; 0 = all")
    parser.add_argument("--grid-samples", type=int, default=unset, help="samples in each epoch's grid, 0 = none; default 16")
    parser.add_argument("--out", default="runs/ddpm", help="folder for checkpoint.pt, loss.csv and grids")
    parser.add_argument("--data-dir", default="data", help="where the MNIST/CIFAR-10 files are")
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
    config["channels"] = DATASET_CHANNELS[config["dataset"]]
    problem = config_problem(config)
    if problem:
        parser.error(problem)
    if args.resume and args.force:
        parser.error("--resume and --force contradict each other: choose one")
    try:
        runtime.resolve_device(args.device)
    except runtime.ConfigError as error:
        parser.error(str(error))
    args.explicit = explicit
    return config, args


def config_problem(config):
    """Return a one-line description of the first invalid value in config, or None."""
    positive = ("epochs", "batch_size", "lr", "img_size", "blocks_per_level", "time_emb_dim")
    for key in positive:
        if not config[key] > 0:
            return f"--{key.replace('_', '-')} must be positive, got {config[key]}"
    if not (config["lr"] < 1e3 and math.isfinite(config["lr"])):
        return f"--lr must be a finite learning rate, got {config['lr']}"
    if config["timesteps"] < 2:
        return f"--timesteps must be at least 2, got {config['timesteps']}"
    if config["time_emb_dim"] % 2:
        return f"the time embedding size must be even, got {config['time_emb_dim']}"
    if not 0 <= config["ema_decay"] < 1:
        return f"--ema-decay must be in [0, 1), got {config['ema_decay']}"
    for key in ("warmup_steps", "max_images", "grid_samples", "grad_clip"):
        if config[key] < 0:
            return f"--{key.replace('_', '-')} must not be negative, got {config[key]}"
    factor = 2 ** (len(config["widths"]) - 1)
    if config["img_size"] % factor:
        return (f"--img-size {config['img_size']} is not divisible by {factor} = 2**(levels-1) for widths "
                f"{','.join(map(str, config['widths']))}; use a multiple of {factor}")
    if min(config["widths"]) < 2:
        return "every width must be at least 2 (GroupNorm needs two channels per group)"
    try:
        unet.group_norm_groups(tuple(config["widths"]), groups=8)
    except ValueError as error:
        return f"--widths: {error}"
    return None


# ----------------------------------------------------------------------------- data


def load_training_images(config, data_dir, download, log):
    """Return the training images as one float32 tensor (N, C, img_size, img_size) in [-1, 1]."""
    if config["dataset"] == "cifar10":
        if download:
            data.download_cifar10(data_dir)
        pixels, _ = data.load_cifar10(data_dir)
        split = "CIFAR-10 training set"
    else:
        if download:
            try:
                data.download_mnist(data_dir)
            except data.DataError as error:
                log(f"warning: {error}")
        pixels, _ = data.load_mnist(data_dir)
        split = f"MNIST {data.mnist_files(data_dir)[2]} split"
    if config["max_images"]:
        pixels = pixels[: config["max_images"]]
    log(f"data: {len(pixels)} images from the {split} in {data_dir}/")
    return data.to_model_tensor(pixels, config["img_size"])


def epoch_permutation(num_images, seed, epoch):
    """Return the image order of an epoch: a permutation drawn from a generator seeded by (seed, epoch)."""
    return torch.randperm(num_images, generator=runtime.seeded_generator(seed, epoch))


def step_generator(seed, rank, step, device):
    """Return the generator that draws step `step`'s timesteps and noise on rank `rank`.

    Seeded from (seed, rank, step) alone, so a resumed run draws exactly what an uninterrupted one would.
    """
    return runtime.seeded_generator(seed, rank, step, device=device)


# ----------------------------------------------------------------------------- the training step


def learning_rate(config, step):
    """Return the learning rate at a step: linear warm-up to lr over warmup_steps, then constant (the lecture's lr)."""
    if config["warmup_steps"] == 0:
        return config["lr"]
    return config["lr"] * min(1.0, (step + 1) / config["warmup_steps"])


def ema_decay_at(config, step):
    """Return the EMA decay at a step, warmed up: min(ema_decay, (1 + step) / (10 + step)).

    A plain 0.995 EMA of a short run would still be mostly the random initialisation; the warm-up lets the
    average follow the weights early and settle to ema_decay later.
    """
    return min(config["ema_decay"], (1 + step) / (10 + step))


def train_step(model, optimizer, x0, t, noise, schedule, config, step, device, precision):
    """Return the loss of one step of Algorithm 1, after the gradient step: loss = MSE(eps, eps_theta(x_t, t))."""
    with runtime.autocast(device, precision):
        loss = ddpm.get_loss(model, x0, schedule, t=t, noise=noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """Move every EMA weight toward the model: ema = decay * ema + (1 - decay) * weight."""
    ema_params = list(ema_model.parameters())
    torch._foreach_lerp_(ema_params, list(model.parameters()), 1.0 - decay)


# ----------------------------------------------------------------------------- checkpoints and RNG states


def rng_states():
    """Return the global RNG states of python, numpy and torch (CPU and CUDA) as checkpoint-safe values."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": position,
                  "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states):
    """Set the global RNG states of python, numpy and torch from rng_states()' values."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def make_checkpoint(config, model, ema_model, optimizer, epoch, step_in_epoch, step, losses):
    """Return the checkpoint dict: weights, EMA, optimizer, position (epoch, step), loss log, RNG states, config."""
    return {
        "format": runtime.CHECKPOINT_FORMAT,
        "version": runtime.CHECKPOINT_VERSION,
        "config": config,
        "model": model.state_dict(),
        "ema": ema_model.state_dict() if ema_model is not None else None,
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "step": step,
        "losses": list(losses),
        "rng": rng_states(),
    }


def check_resume_config(checkpoint_config, config, explicit, path):
    """Return the configuration to resume with: the checkpoint's, with epochs taken from the request if given.

    A flag that asks for another model, data or optimisation than the checkpoint's is an error.
    """
    for key in FIXED_ON_RESUME:
        requested = config[key] if key in DERIVED_KEYS else explicit.get(key, checkpoint_config[key])
        if requested != checkpoint_config[key]:
            raise runtime.CheckpointError(
                f"{path} was trained with {key}={checkpoint_config[key]}, but this run asks for {key}={requested}: "
                "resume with the run's own settings and number of processes, or start a new run in another --out"
            )
    return {**checkpoint_config, "epochs": explicit.get("epochs", checkpoint_config["epochs"])}


# ----------------------------------------------------------------------------- distributed


def distributed_context():
    """Return (rank, world_size, local_rank) from torchrun's environment, or (0, 1, 0) for a plain process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(world_size, device):
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) when there is more than one process."""
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def all_ranks_agree(flag, world_size, device):
    """Return True if flag is True on any rank (a max all-reduce); the flag itself in a single process."""
    if world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(values, world_size):
    """Return the losses averaged over ranks (an all-reduce); the values themselves in a single process."""
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / world_size
    return values


# ----------------------------------------------------------------------------- progress and outputs


class Progress:
    """A progress line that updates in place on a terminal and prints once per epoch elsewhere."""

    def __init__(self, enabled, total_steps, batch_images, start_step):
        self.enabled, self.total_steps, self.batch_images = enabled, total_steps, batch_images
        self.interactive = enabled and sys.stdout.isatty()
        self.start, self.start_step = time.perf_counter(), start_step

    def update(self, epoch, epochs, step, loss, final=False):
        """Show epoch, step, loss, images/s and time left; on a non-terminal only when final (end of epoch)."""
        if not self.enabled or not (self.interactive or final):
            return
        elapsed = time.perf_counter() - self.start
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        left = (self.total_steps - step) / rate if rate > 0 else float("nan")
        line = (f"epoch {epoch + 1}/{epochs}  step {step}/{self.total_steps}  loss {loss:.4f}  "
                f"{rate * self.batch_images:.0f} img/s  {format_duration(left)} left")
        print(("\r" + line.ljust(90)) if self.interactive else line, end="" if self.interactive and not final else "\n",
              flush=True)


def format_duration(seconds):
    """Return seconds as 'M:SS' (or '?' when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def write_loss_log(path, losses, steps_per_epoch):
    """Write loss.csv: one row per step, 'step,epoch,loss', the loss as Python's exact repr (atomic)."""
    rows = ["step,epoch,loss"] + [f"{step},{step // steps_per_epoch},{loss!r}" for step, loss in enumerate(losses)]
    runtime.write_atomically(path, lambda stream: stream.write(("\n".join(rows) + "\n").encode()))


GRID_DDIM_STEPS = 50


def sample_grid(ema_model, schedule, config, device, precision, path):
    """Write a PNG grid of config['grid_samples'] samples from the EMA weights after an epoch.

    The grid uses deterministic DDIM over 50 steps from the same seeded x_T every epoch: twelve times cheaper than
    the 600-step sampler (sample.py's default), and the same noise maps to each epoch's digits, so the grids show
    how the model changes. sample.py gives the lecture's DDPM samples. Under the cosine schedule x0 is clipped:
    its last beta is 0.999, and DDIM's first step would otherwise divide by sqrt(alphas_cumprod[-1]) ~ 1e-4.
    """
    shape = (config["grid_samples"], config["channels"], config["img_size"], config["img_size"])
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(config["seed"])).to(device)
    ema_model.eval()
    with runtime.autocast(device, precision):
        samples, _ = ddpm.ddim_sample(ema_model, schedule, shape, steps=min(GRID_DDIM_STEPS, schedule.timesteps),
                                      x_T=x_T.contiguous(memory_format=runtime.memory_format(precision)),
                                      clip_x0=config["schedule"] == "cosine")
    grid = images.make_grid(images.to_uint8(samples.float().cpu()), nrow=math.ceil(math.sqrt(shape[0])))
    images.write_png(path, grid)


# ----------------------------------------------------------------------------- the run


class StopRequest:
    """Remembers a Ctrl-C (SIGINT) or SIGTERM so that the loop can save and stop between two steps."""

    def __init__(self):
        self.signal_name = None

    def __call__(self, signum, frame):
        if self.signal_name is not None:  # a second Ctrl-C while saving: stop at once
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name


def prepare_output(args, checkpoint_path):
    """Create --out; refuse to start afresh over an existing checkpoint unless --force, or to resume without one."""
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.out):  # left behind by a run killed while it wrote a checkpoint or the loss log
        if name.startswith(".") and name.endswith(".tmp"):
            os.unlink(os.path.join(args.out, name))
    exists = os.path.exists(checkpoint_path)
    if args.resume and not exists:
        raise runtime.CheckpointError(f"--resume: no checkpoint at {checkpoint_path}; start without --resume")
    if exists and not args.resume and not args.force:
        raise runtime.CheckpointError(
            f"{args.out} already holds a checkpoint: add --resume to continue that run, --force to overwrite it, "
            "or choose another --out")


def train(config, args):
    """Run (or resume) a training run as configured; return the process exit code."""
    rank, world_size, local_rank = distributed_context()
    device = runtime.resolve_device(args.device, local_rank)
    init_distributed(world_size, device)
    is_main = rank == 0

    def log(message):
        if is_main:
            print(message, flush=True)

    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    problem = None
    if is_main:
        try:
            prepare_output(args, checkpoint_path)
        except runtime.CheckpointError as error:
            problem = error
    if all_ranks_agree(problem is not None, world_size, device):  # every rank stops, only rank 0 says why
        if problem is not None:
            raise problem
        return 1
    config = {**config, "world_size": world_size}
    checkpoint = None
    if args.resume:
        checkpoint = runtime.load_checkpoint(checkpoint_path)
        config = check_resume_config(checkpoint["config"], config, args.explicit, checkpoint_path)
    precision = runtime.resolve_precision(args.precision, device)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    np.random.seed(config["seed"])

    # The other ranks read the data only after rank 0's --download has finished: else they could read the bundled
    # test split (or half-written files) while rank 0 trains on the downloaded training split.
    if world_size > 1 and not is_main:
        dist.barrier()
    dataset = load_training_images(config, args.data_dir, args.download and is_main, log).to(device)
    if world_size > 1 and is_main:
        dist.barrier()
    steps_per_epoch = len(dataset) // (config["batch_size"] * world_size)
    if steps_per_epoch == 0:
        raise runtime.ConfigError(
            f"--batch-size {config['batch_size']} x {world_size} process(es) is more than the {len(dataset)} images; "
            "use a smaller --batch-size or more --max-images")
    schedule = ddpm.Schedule.create(config["timesteps"], config["schedule"]).to(device)
    model = runtime.build_model(config).to(device=device, memory_format=runtime.memory_format(precision))
    fused = device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], fused=fused)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False) if config["ema_decay"] > 0 else None
    losses, epoch, step_in_epoch, step = [], 0, 0, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if ema_model is not None:
            ema_model.load_state_dict(checkpoint["ema"])
        losses, epoch, step_in_epoch, step = (checkpoint["losses"], checkpoint["epoch"], checkpoint["step_in_epoch"],
                                              checkpoint["step"])
        restore_rng_states(checkpoint["rng"])
        log(f"resumed from {checkpoint_path} at epoch {epoch + 1}, step {step}")
        del checkpoint
    parameters = sum(p.numel() for p in model.parameters())
    batch = f"{config['batch_size']} x {world_size}" if world_size > 1 else f"{config['batch_size']}"
    log(f"model: SimpleUnet widths {config['widths']} x {config['blocks_per_level']} block(s), {parameters / 1e6:.2f}M "
        f"parameters | device {device} | precision {precision} | {world_size} process(es) | batch {batch} | "
        f"{steps_per_epoch} steps/epoch, {config['epochs']} epochs")
    if epoch >= config["epochs"]:
        log(f"{checkpoint_path} has already trained {epoch} epochs; pass --epochs N with N > {epoch} to train further")
        return 0
    trained_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else model

    def save(epoch_to_save, step_in_epoch_to_save):
        if is_main:
            runtime.save_checkpoint(checkpoint_path, make_checkpoint(
                config, model, ema_model, optimizer, epoch_to_save, step_in_epoch_to_save, step, losses))
            write_loss_log(os.path.join(args.out, "loss.csv"), losses, steps_per_epoch)

    def interrupted(epoch_number):
        """Say where the run stopped (its checkpoint is saved) and return the exit code of a Ctrl-C."""
        log(f"\ninterrupted at step {step} (epoch {epoch_number}): checkpoint saved to {checkpoint_path}; "
            "continue with the same command plus --resume")
        return 130

    stop = StopRequest()
    previous_handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    progress = Progress(is_main, config["epochs"] * steps_per_epoch, config["batch_size"] * world_size, step)
    pending = []  # per-step losses still on the device

    def flush_losses():
        """Bring pending losses to the host, average over ranks; return the first non-finite step or None."""
        if not pending:
            return None
        values = mean_over_ranks(torch.stack(pending).float(), world_size).cpu().tolist()
        first_step = step - len(pending)
        pending.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                return first_step + offset
            losses.append(value)
        return None

    try:
        while epoch < config["epochs"]:
            order = epoch_permutation(len(dataset), config["seed"], epoch)[rank::world_size].to(device)
            model.train()
            while step_in_epoch < steps_per_epoch:
                batch = order[step_in_epoch * config["batch_size"]:(step_in_epoch + 1) * config["batch_size"]]
                x0 = dataset[batch].contiguous(memory_format=runtime.memory_format(precision))
                generator = step_generator(config["seed"], rank, step, device)
                t = ddpm.sample_t(len(batch), config["timesteps"], device, generator)
                noise = torch.randn(x0.shape, generator=generator, device=device).contiguous(
                    memory_format=runtime.memory_format(precision))
                pending.append(train_step(trained_model, optimizer, x0, t, noise, schedule, config, step, device,
                                          precision))
                if ema_model is not None:
                    update_ema(ema_model, model, ema_decay_at(config, step))
                step += 1
                step_in_epoch += 1
                if len(pending) >= LOG_EVERY or step_in_epoch == steps_per_epoch:
                    bad_step = flush_losses()
                    if bad_step is not None:
                        log(f"\nerror: the loss became non-finite at step {bad_step} (epoch {epoch + 1}); training stopped. "
                            f"The last good checkpoint stays in {checkpoint_path}; try a lower --lr")
                        return 1
                    if losses:
                        progress.update(epoch, config["epochs"], step, losses[-1])
                # At an epoch's last step the stop waits for the epoch's own grid and checkpoint (below).
                if step_in_epoch < steps_per_epoch and all_ranks_agree(stop.signal_name is not None, world_size, device):
                    if flush_losses() is not None:
                        log(f"\nerror: the loss became non-finite before step {step}; not saving. "
                            f"The last good checkpoint stays in {checkpoint_path}")
                        return 1
                    save(epoch, step_in_epoch)
                    return interrupted(epoch + 1)
            progress.update(epoch, config["epochs"], step, losses[-1], final=True)
            epoch, step_in_epoch = epoch + 1, 0
            if is_main and config["grid_samples"]:
                sample_grid(ema_model if ema_model is not None else model, schedule, config, device, precision,
                            os.path.join(args.out, f"samples_epoch_{epoch:03d}.png"))
            save(epoch, 0)
            if epoch < config["epochs"] and all_ranks_agree(stop.signal_name is not None, world_size, device):
                return interrupted(epoch)
        log(f"done: {config['epochs']} epochs, {step} steps; checkpoint in {checkpoint_path}")
        return 0
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if world_size > 1:
            dist.destroy_process_group()


def main(argv=None):
    """Parse arguments, train, and turn expected failures into one line on stderr and a non-zero exit code."""
    config, args = parse_config(argv)
    try:
        return train(config, args)
    except (data.DataError, runtime.CheckpointError, runtime.ConfigError) as error:
        if distributed_context()[0] == 0:  # under torchrun every rank meets the same error: say it once
            print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nerror: interrupted; stopped without saving (the last checkpoint, if any, is unchanged)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
