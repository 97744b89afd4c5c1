"""Multi-process training under torchrun: joining and leaving the process group.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them training is one process.

Two groups carry the ranks' traffic. The default group (NCCL on GPUs) carries only what every
rank does in lockstep: DDP's gradients and the step's loss. The control group (gloo, on the CPU)
carries every wait for rank 0 working alone: training the tokenizer and tokenizing the data,
evaluating, sampling and saving, and the per-step agreement on stopping. NCCL aborts a collective
after its timeout, ten minutes by default, and rank 0's work alone can take longer than that on a
large corpus, so those waits must not sit in an NCCL collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

# The gradient all-reduce: the ranks meet there every micro-batch, so only a step that is slow
# on one rank alone (compiling the model on the first step) needs slack beyond NCCL's default.
STEP_TIMEOUT = timedelta(minutes=30)
# Waiting for rank 0 alone. A rank 0 that dies takes the job down with it (torchrun stops the
# others), so this only bounds a rank 0 that hangs: generous, for a tokenizer trained on a large
# corpus or a long final evaluation.
WAIT_TIMEOUT = timedelta(hours=24)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    torchrun: bool = False  # started by torchrun, even as its only process
    # Set by the training loop once every rank has agreed to stop (finished, interrupted, or failed
    # together): only then can they all meet at the teardown barrier.
    stopped_together: bool = False
    control: object = None  # the gloo group for waits on rank 0 (None: the default group, or one process)

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set); else a single process.
    Returns it and the device this process trains on: on GPUs, the one its LOCAL_RANK names."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return Dist(torchrun="RANK" in os.environ), device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # device_id binds this rank's communicator to its GPU now, rather than NCCL guessing it at
        # the first collective (and warning that a wrong guess can hang).
        dist.init_process_group("nccl", timeout=STEP_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=STEP_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, torchrun=True, control=control), device


def barrier(d: Dist) -> None:
    """Wait here until every rank arrives: the others wait for rank 0's work on the control group."""
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier(group=d.control)


def all_gather(d: Dist, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's value of this CPU tensor (same shape and dtype on all), in rank order."""
    if d.world == 1:
        return [tensor]
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(d.world)]
    dist.all_gather(parts, tensor, group=d.control)
    return parts


def all_reduce_max(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise largest of every rank's value of this CPU tensor."""
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=d.control)
    return tensor


def shutdown_distributed(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        # The other ranks leave the loop while rank 0 still saves; tearing down the group under it
        # can abort a rank inside gloo (seen in CI), so ranks that stopped together leave together.
        # After an error on one rank the others are not coming: waiting for them would hang.
        if d.stopped_together:
            dist.barrier(group=d.control)
        dist.destroy_process_group()
