"""Scale-out under PyTorch's own launcher: ``torchrun ... --no-python fnconvert transform ...``.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables. fnconvert then joins the process group
(NCCL on CUDA, gloo on CPU) with a timeout, so a rank that dies cannot leave the others waiting forever; torchrun
itself stops the remaining ranks when one exits with an error. Each rank reads its own shard of the data; the
statistics are all-reduced in float64; only rank 0 logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from .errors import FnconvertError

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: np.ndarray, *, equal: bool = False) -> np.ndarray:
        """This rank's share of ``indices`` (strided, like DistributedSampler without shuffling).

        ``equal`` trims every shard to the same length, so DDP ranks run the same number of steps and no rank
        waits in a collective that the others never reach.
        """
        if not self.active:
            return indices
        part = indices[self.rank :: self.world_size]
        if equal:
            part = part[: len(indices) // self.world_size]
        return part

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def init_from_env(device: str) -> tuple[DistContext, str]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns (context, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise FnconvertError(f"rank {rank}: LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible); "
                                 "use --nproc_per_node ≤ the GPU count, or --device cpu")
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    timeout = timedelta(seconds=float(os.environ.get("FNCONVERT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, timeout=timeout)
        except Exception as e:
            raise FnconvertError(f"rank {rank}: could not join the {backend} process group ({e}); "
                                 "check MASTER_ADDR/MASTER_PORT or the torchrun --rdzv options")
    return DistContext(rank, world, local, backend), device


def shutdown(ctx: DistContext) -> None:
    if ctx.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum_(t):
    """In-place sum over ranks when a process group is active; a no-op otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
