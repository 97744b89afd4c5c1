"""Choosing the next token: pure functions from logits to a distribution to an id.

The order is fixed and matches what users know from other tools: repetition penalty, then
temperature, then top-k, then top-p, then min-p. Temperature 0 means greedy (argmax).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tinygen.errors import TinygenError


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

    def to_dict(self) -> dict:
        return asdict(self)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens marked in seen (B, V): positive logits shrink, negative grow."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution (B, V) that sampling draws from; one-hot at the argmax when greedy."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if params.greedy:
        if seen is not None:
            logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
        return logits.argmax(-1)
    probs = logits_to_probs(logits, params, seen)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
