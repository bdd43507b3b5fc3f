"""torchrun's data parallelism, as train.py uses it: the process's place, the process group, agreeing across ranks.

In a plain process (no torchrun) every helper here is a no-op that returns its input.
"""
import os

import torch
import torch.distributed as dist


class RankFailed(Exception):
    """Another rank (rank 0, which writes the outputs) failed and has said why; this rank stops with it."""


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


def finish_distributed(world_size):
    """Leave torchrun's process group, when this process joined one."""
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world_size):
    """Wait until every rank reaches this line (a no-op in a single process)."""
    if world_size > 1:
        dist.barrier()


def any_rank(flag, world_size, device):
    """Return True if flag is True on any rank (a max all-reduce); the flag itself in a single process."""
    if world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(values, world_size):
    """Return the values averaged over ranks (an all-reduce); the values themselves in a single process."""
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / world_size
    return values
