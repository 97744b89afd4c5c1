"""Choosing the next token: pure functions from logits to a distribution to an id.

The order is fixed and matches what users know from other tools: repetition penalty, then
temperature, then top-k, then top-p, then min-p. Temperature 0 means greedy (argmax).

A batch may mix settings: each row of logits has its own, carried as tensors (RowSettings), so
requests with different flags decode together. A row's distribution depends only on its own
logits and settings, never on its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tinygen.errors import TinygenError

_FLOAT_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; drop tokens below min_p * p(most likely token)
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in the context

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise TinygenError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise TinygenError(f"top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise TinygenError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise TinygenError(f"min-p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise TinygenError(f"repetition penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class RowSettings:
    """The SamplingParams of each row of a batch, as (B,) tensors on the logits' device, and which
    filters any row uses (known on the host, so a GPU never syncs to find out)."""

    temperature: torch.Tensor
    top_k: torch.Tensor  # int64; 0 = off
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    greedy: tuple[bool, ...]  # per row
    uses: frozenset[str]  # the filters some row turns on: "top_k", "top_p", "min_p"

    @classmethod
    def of(cls, params: Sequence[SamplingParams], device=None) -> "RowSettings":
        def column(name: str, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

        uses = {name for name, off in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0))
                if any(getattr(p, name) != off and not p.greedy for p in params)}
        return cls(column("temperature"), column("top_k", torch.long), column("top_p"), column("min_p"),
                   column("repetition_penalty"), tuple(p.greedy for p in params), frozenset(uses))


def _rows(params: SamplingParams | RowSettings, logits: torch.Tensor) -> RowSettings:
    if isinstance(params, RowSettings):
        return params
    return RowSettings.of([params] * logits.size(0), logits.device)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor | float) -> torch.Tensor:
    """CTRL-style penalty on tokens marked in seen (B, V): positive logits shrink, negative grow.
    penalty is one number or one per row (B,)."""
    if not torch.is_tensor(penalty):
        if penalty == 1.0:
            return logits
        penalty = torch.tensor(penalty, device=logits.device)
    penalty = penalty.reshape(-1, 1) if penalty.dim() else penalty
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams | RowSettings,
                    seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution (B, V) that sampling draws from; one-hot at the argmax for greedy rows."""
    rows = _rows(params, logits)
    logits = logits.float()
    if seen is not None:
        # A penalty below 1 can push a huge logit past float32's range: keep it the largest finite one.
        logits = apply_repetition_penalty(logits, seen, rows.repetition_penalty).clamp(-_FLOAT_MAX, _FLOAT_MAX)
    greedy = rows.temperature == 0
    # Shifting by the row's maximum changes no probability, and keeps huge logits over a small
    # temperature finite: the top token lands on 0, everything else at or below it.
    shifted = logits - logits.amax(-1, keepdim=True)
    logits = shifted / torch.where(greedy, 1.0, rows.temperature)[:, None]
    V = logits.size(-1)
    if "top_k" in rows.uses:
        k_on = (rows.top_k > 0) & (rows.top_k < V)
        k = int(rows.top_k.clamp(max=V).max())
        top = torch.topk(logits, k, dim=-1).values  # (B, k), descending
        kth = top.gather(-1, (rows.top_k.clamp(1, k) - 1)[:, None])
        logits = logits.masked_fill(k_on[:, None] & (logits < kth), float("-inf"))
    probs = logits.softmax(dim=-1)
    if "top_p" in rows.uses:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already
        # does. A row with top_p 1 keeps everything, even where rounding takes the mass past 1.
        drop_sorted = ((sorted_probs.cumsum(-1) - sorted_probs) >= rows.top_p[:, None]) & (rows.top_p < 1)[:, None]
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    if "min_p" in rows.uses:
        probs = probs.masked_fill(probs < rows.min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    if any(rows.greedy):
        onehot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


Generators = torch.Generator | Sequence[torch.Generator | None] | None


def sample_next(logits: torch.Tensor, params: SamplingParams | RowSettings, generator: Generators = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V).

    generator is one torch.Generator for the whole batch, or one per row: then each row draws
    from its own stream, so what it draws depends on nothing but its own seed and distribution.
    """
    rows = _rows(params, logits)
    if all(rows.greedy):
        if seen is not None:
            logits = apply_repetition_penalty(logits.float(), seen, rows.repetition_penalty)
        return logits.argmax(-1)
    probs = logits_to_probs(logits, rows, seen)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # One draw per row; a greedy row's one-hot distribution gives its argmax without touching a stream.
    return torch.cat([probs[i : i + 1].argmax(-1) if rows.greedy[i] else
                      torch.multinomial(probs[i : i + 1], 1, generator=g).squeeze(-1)
                      for i, g in enumerate(generator)])
