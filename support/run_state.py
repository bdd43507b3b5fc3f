"""What one training process of train.py holds (Run), and the set-up steps that fill it: --out claimed, the data
read and checked, the model, its EMA copy and the optimizer built; Ctrl-C remembered (StopRequest).
"""
import copy
import os
import signal
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel

import ddpm
from support import checkpoints, data, distributed, files, progress, run_folder, runtime


@dataclass
class Run:
    """What one training process holds: its configuration and place in torchrun, data, model, optimizer, position."""
    config: dict
    out: str
    device: torch.device
    precision: str
    rank: int
    world_size: int
    dataset: torch.Tensor = None
    schedule: ddpm.Schedule = None
    model: torch.nn.Module = None
    trained_model: torch.nn.Module = None  # the DistributedDataParallel wrapper under torchrun, else model
    ema_model: torch.nn.Module = None  # None when --ema-decay 0
    claim: run_folder.Claim = None  # rank 0's hold on --out
    optimizer: torch.optim.Optimizer = None
    steps_per_epoch: int = 0
    losses: list = field(default_factory=list)  # one mean loss per step, on the host
    elapsed: list = field(default_factory=list)  # seconds of training at the end of each step, summed over resumes
    pending: list = field(default_factory=list)  # per-step losses still on the device
    pending_times: list = field(default_factory=list)  # the clock at the end of each of those steps
    clock_zero: float = 0.0  # the clock reading at which elapsed would be 0 (set when the loop starts)
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def checkpoint_path(self):
        return os.path.join(self.out, "checkpoint.pt")

    def log(self, message):
        """Print message on rank 0 only."""
        if self.is_main:
            progress.say(message)


class StopRequest:
    """Remembers a Ctrl-C (SIGINT), SIGTERM or hang-up (SIGHUP) so that the loop can save and stop between two steps."""

    def __init__(self):
        self.signal_name = None

    def __call__(self, signum, frame):
        if self.signal_name is not None:  # a second Ctrl-C while saving: stop at once
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name


def install_stop_request(stop):
    """Make stop the handler of SIGINT, SIGTERM and SIGHUP (closing the terminal); return {signal: previous handler}.

    A SIGHUP that is ignored when the run starts (`nohup python train.py ...`) stays ignored: the user asked the run
    to outlive the terminal. SIGHUP does not exist on Windows.
    """
    signals = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    return {sig: signal.signal(sig, stop) for sig in signals}


def claim_output(run, args):
    """Lock and prepare --out on rank 0 (run.claim); every rank stops if rank 0 cannot (only rank 0 says why)."""
    problem = None
    if run.is_main:
        try:
            run.claim = run_folder.prepare_output(args, run.checkpoint_path)
        except (checkpoints.CheckpointError, files.OutputError) as error:
            problem = error
    if distributed.any_rank(problem is not None, run.world_size, run.device):
        raise problem if problem is not None else SystemExit(1)


def load_dataset(run, args):
    """Set run.dataset (on the device) and run.steps_per_epoch; the other ranks read only after rank 0's download."""
    if not run.is_main:
        distributed.barrier(run.world_size)
    run.dataset = data.load_training_images(run.config, args.data_dir, args.download and run.is_main, run.log).to(run.device)
    if run.is_main:
        distributed.barrier(run.world_size)
    channels = run.dataset.shape[1]
    if run.config["channels"] not in (None, channels):  # a resumed folder or .npz whose files have changed
        raise checkpoints.CheckpointError(
            f"{run.config['dataset']} now holds {channels}-channel images, but {run.checkpoint_path} was trained on "
            f"{run.config['channels']}-channel ones: restore the images, or start a new run in another --out")
    run.config["channels"] = channels
    split = data.training_split(run.config, args.data_dir)
    checkpoints.check_resume_data(run.config, split, len(run.dataset), run.checkpoint_path)
    run.config.update(data_split=split, num_images=len(run.dataset))
    run.steps_per_epoch = len(run.dataset) // (run.config["batch_size"] * run.world_size)
    if run.steps_per_epoch == 0:
        raise runtime.ConfigError(
            f"--batch-size {run.config['batch_size']} x {run.world_size} process(es) is more than the "
            f"{len(run.dataset)} images; use a smaller --batch-size or more --max-images")


def build_optimizer(model, config, device):
    """Return train.py's optimizer for model: Adam at config's lr with betas (0.9, adam_beta2), fused kernels on CUDA.

    Adam: m = 0.9 m + 0.1 g; v = adam_beta2 v + (1 - adam_beta2) g^2; each weight moves by
    lr * m_hat / (sqrt(v_hat) + eps), m_hat and v_hat the bias-corrected averages.
    """
    return torch.optim.Adam(model.parameters(), lr=config["lr"], betas=(0.9, config["adam_beta2"]),
                            fused=device.type == "cuda")


def build_model_and_optimizer(run):
    """Set run.schedule, run.model (seeded), run.ema_model (a copy, or None), run.optimizer and run.trained_model."""
    config = run.config
    run.schedule = ddpm.Schedule.create(config["timesteps"], config["schedule"]).to(run.device)
    torch.manual_seed(config["seed"])
    run.model = runtime.place_model(runtime.build_model(config), run.device, run.precision)
    run.optimizer = build_optimizer(run.model, config, run.device)
    run.ema_model = copy.deepcopy(run.model).eval().requires_grad_(False) if config["ema_decay"] > 0 else None
    run.trained_model = run.model
    if run.world_size > 1:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        run.trained_model = DistributedDataParallel(run.model, device_ids=device_ids)
