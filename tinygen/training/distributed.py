"""Multi-process training under torchrun: joining and leaving the process group.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them training is one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set); else a single process.
    Returns it and the device this process trains on: on GPUs, the one its LOCAL_RANK names."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return Dist(), device
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return d, device


def shutdown_distributed(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        # The other ranks finish the loop while rank 0 still evaluates and saves; tearing down the
        # group under it can abort a rank inside gloo (seen in CI), so everyone leaves together.
        dist.barrier()
        dist.destroy_process_group()
