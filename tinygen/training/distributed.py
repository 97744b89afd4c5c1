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
    torchrun: bool = False  # started by torchrun, even as its only process
    # Set by the training loop once every rank has agreed to stop (finished, interrupted, or failed
    # together): only then can they all meet at the teardown barrier.
    stopped_together: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set); else a single process.
    Returns it and the device this process trains on: on GPUs, the one its LOCAL_RANK names."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return Dist(torchrun="RANK" in os.environ), device
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), torchrun=True)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return d, device


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def shutdown_distributed(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        # The other ranks leave the loop while rank 0 still saves; tearing down the group under it
        # can abort a rank inside gloo (seen in CI), so ranks that stopped together leave together.
        # After an error on one rank the others are not coming: waiting for them would hang.
        if d.stopped_together:
            dist.barrier()
        dist.destroy_process_group()
