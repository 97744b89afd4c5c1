"""How well a model predicts text: each token's loss, and their mean, perplexity and bits per byte.

Text longer than the context is scored in sliding windows: each window overlaps the previous
one, and only its new tokens are scored, so every token (after the first) is predicted from as
much context as the model allows. Training computes its validation numbers with this same code,
and `tokenize --probs` shows the per-token losses it sums. A caller that wants to show progress
passes a callback; nothing here prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Score:
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text those tokens came from (0 if unknown)

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.bytes if self.bytes else None

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes}

    def provenance(self, data: str, val_split: str | None = None) -> dict:
        """What `eval --record` stores in a checkpoint: val_* for the split its training held out
        (val_split says how it was chosen), eval_* for any other text."""
        label = "val" if val_split is not None else "eval"
        return {f"{label}_loss": self.loss, f"{label}_bpb": self.bits_per_byte,
                f"{label}_data": data + (f" (val split {val_split})" if val_split is not None else "")}


Progress = Callable[[int, int], None]  # (tokens scored so far, tokens to score)


def score_tokens(model, tokens: np.ndarray | list[int], *, stride: int | None = None, batch_size: int = 8,
                 max_tokens: int | None = None, n_bytes: int = 0, mask: np.ndarray | None = None,
                 progress: Progress | None = None) -> Score:
    """Score a token stream. stride defaults to half the context; stride == block_size gives
    plain non-overlapping windows (cheaper, what training uses mid-run). With a mask (parallel
    to tokens), only tokens where it is nonzero are scored: a chat model's replies."""
    tokens = np.asarray(tokens[: max_tokens + 1] if max_tokens else tokens, dtype=np.int64)
    losses = token_losses(model, tokens, stride=stride, batch_size=batch_size, progress=progress)
    if mask is not None:
        keep = np.asarray(mask[1 : len(tokens)]) != 0
        return Score(float(losses[keep].sum()), int(keep.sum()), n_bytes)
    return Score(float(losses.sum()), len(losses), n_bytes)


@torch.no_grad()
def token_losses(model, tokens: np.ndarray | list[int], *, stride: int | None = None, batch_size: int = 8,
                 progress: Progress | None = None) -> np.ndarray:
    """Each token's negative log-likelihood in nats: entry i is for tokens[i + 1], predicted from
    the tokens before it (as many as the context holds)."""
    block = model.config.block_size
    stride = stride or max(1, block // 2)
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    losses = np.zeros(max(n - 1, 0), dtype=np.float64)
    if n < 2:
        return losses
    device = model.device
    # Window w covers tokens [start, start + block]; it scores targets from `first` on, the ones
    # the previous window did not reach.
    windows, scored_until, start = [], 1, 0
    while scored_until < n:
        end = min(start + block + 1, n)
        windows.append((start, end, scored_until))
        scored_until = end
        start = min(start + stride, max(0, n - block - 1))
        if end == n:
            break
    was_training = model.training
    model.eval()
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        width = max(e - s for s, e, _ in group) - 1
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full((len(group), width), -1, dtype=torch.long)
        for row, (s, e, _) in enumerate(group):
            seg = torch.from_numpy(tokens[s:e])
            x[row, : e - s - 1] = seg[:-1]
            y[row, : e - s - 1] = seg[1:]
        logits = model(x.to(device))
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-1, reduction="none")
        nll = nll.view(len(group), width).cpu().double().numpy()
        for row, (s, e, first) in enumerate(group):
            losses[first - 1 : e - 1] = nll[row, first - s - 1 : e - s - 1]  # only what earlier windows did not score
        if progress is not None:
            progress(group[-1][1] - 1, n - 1)
    model.train(was_training)
    return losses
