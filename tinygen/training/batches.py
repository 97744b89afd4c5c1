"""Which windows of the training tokens each optimizer step reads, and getting them to the device.

Every process draws the same offsets from one seeded generator and takes its own slice of each
micro-batch, so N processes see exactly the rows one process would see with the same global
batch. A chat fine-tune starts every window at a conversation and masks the targets it does not
learn (ChatSupervision).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ChatSupervision:
    """Chat fine-tuning: which targets count, and where conversations start."""

    train_mask: np.ndarray  # parallel to the training tokens: 1 where the loss counts (the assistant's tokens)
    val_mask: np.ndarray
    starts: np.ndarray  # offsets of the training conversations; every window begins at one


def get_batch(data: np.ndarray, rows: torch.Tensor, block: int, device,
              mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (B, T) for windows starting at the given offsets; targets
    where mask is 0 become -1, which the loss ignores."""
    x = torch.from_numpy(np.stack([data[i : i + block] for i in rows.tolist()]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + block] for i in rows.tolist()]).astype(np.int64))
    if mask is not None:
        keep = np.stack([mask[i + 1 : i + 1 + block] for i in rows.tolist()])
        y[torch.from_numpy(keep == 0)] = -1
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


Batch = tuple[torch.Tensor, torch.Tensor]


class Batches:
    """The training batches of one process, a step ahead: the next step's offsets and its first
    micro-batch are drawn while the step before still runs.

    rng has then moved past them, so a save writes `at_boundary()`, rng's state where the next
    step draws: a resumed run draws the same batches whether or not one was fetched ahead."""

    def __init__(self, data: np.ndarray, rng: torch.Generator, shape: tuple[int, int, int], block: int,
                 rank: int, device: torch.device, chat: ChatSupervision | None = None):
        self.data, self.rng, self.shape, self.block = data, rng, shape, block  # shape: (accum, world, batch)
        self.rank, self.device, self.chat = rank, device, chat
        self.ahead: tuple[torch.Tensor, Batch] | None = None
        self.boundary = rng.get_state()

    def draw(self) -> torch.Tensor:
        """One step's window offsets (accum, world, batch), the same on every process."""
        if self.chat is None:
            return torch.randint(0, len(self.data) - self.block - 1, self.shape, generator=self.rng)
        # Whole conversations from their start, so a reply always sees what it answers.
        picks = torch.randint(0, len(self.chat.starts), self.shape, generator=self.rng)
        return torch.from_numpy(self.chat.starts)[picks].clamp(max=len(self.data) - self.block - 1)

    def fetch(self, offsets: torch.Tensor, micro: int) -> Batch:
        """This process's slice of one micro-batch, on the device."""
        mask = self.chat.train_mask if self.chat else None
        return get_batch(self.data, offsets[micro, self.rank], self.block, self.device, mask)

    def next_step(self) -> tuple[torch.Tensor, Batch]:
        """This step's offsets and its first micro-batch: fetched ahead, or now on a run's first step."""
        if self.ahead is None:
            offsets = self.draw()
            return offsets, self.fetch(offsets, 0)
        return self.ahead

    def fetch_ahead(self) -> None:
        """Draw the next step's offsets and fetch its first micro-batch, remembering where rng stood."""
        self.boundary = self.rng.get_state()
        offsets = self.draw()
        self.ahead = offsets, self.fetch(offsets, 0)

    def at_boundary(self) -> torch.Generator:
        """A generator in the state the next step draws from: what a save must hold."""
        rng = torch.Generator()
        rng.set_state(self.boundary)
        return rng
