"""Next-token probabilities, as `sample --explain` and `tokenize --probs` show them.

For a generation step: the model's own distribution (softmax of its logits) beside the one the
sampler drew from after temperature, top-k, top-p, min-p and the repetition penalty, computed
by the sampler's own function, so what is shown is what was sampled from. For a given text: the
probability the model gave each of its tokens (surprisal).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from tinygen.core.evaluate import token_losses
from tinygen.generate.sampling import SamplingParams, logits_to_probs
from tinygen.generate.textgen import Completion, Request, TextGenerator


@dataclass(frozen=True)
class Candidate:
    token: int
    p_model: float  # softmax of the raw logits
    p_sampled: float  # after the sampling flags; 0 when they cut the token


@dataclass(frozen=True)
class NextToken:
    index: int  # 0 for the first generated token
    chosen: int
    p_model: float
    p_sampled: float
    kept: int  # tokens the flags leave a chance (probability > 0)
    entropy_bits: float  # of the model's distribution: how unsure it is
    candidates: tuple[Candidate, ...]  # the k likeliest before or after the flags, and the chosen token

    def to_dict(self, label) -> dict:
        d = asdict(self)
        d["text"] = label(self.chosen)
        for c in d["candidates"]:
            c["text"] = label(c["token"])
        return d


def explain_step(index: int, logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                 chosen: int, k: int) -> NextToken:
    """One step from its logits (V,), the repetition-penalty mask (V,) or None, and the chosen id."""
    model = logits.float().softmax(-1)
    sampled = logits_to_probs(logits[None], params, None if seen is None else seen[None])[0]
    # Rank by the larger of the two: the repetition penalty can lift a token that the model alone ranks low.
    top = torch.maximum(model, sampled).topk(min(k, logits.numel())).indices.tolist()
    if chosen not in top:
        top.append(chosen)
    logp = model.clamp_min(1e-30).log2()
    return NextToken(
        index=index, chosen=chosen, p_model=float(model[chosen]), p_sampled=float(sampled[chosen]),
        kept=int((sampled > 0).sum()), entropy_bits=float(-(model * logp).sum()),
        candidates=tuple(Candidate(t, float(model[t]), float(sampled[t])) for t in top),
    )


def explain(textgen: TextGenerator, request: Request, k: int, result: Completion | None = None) -> Iterator[NextToken]:
    """One completion as explained steps: each generated token (and the stop token, if one ends
    it) with the k likeliest candidates before and after the sampling flags. It watches the
    engine's own logits through its observe hook, so explaining never changes what is drawn."""
    steps: list[NextToken] = []

    def observe(logits, seen, chosen):
        steps.append(explain_step(len(steps), logits[0], request.params, None if seen is None else seen[0],
                                  int(chosen[0]), k))

    done = 0
    for _ in textgen.stream(request, result, observe=observe):
        # A piece can lag its token (a character split over two tokens), so hand out every step so far.
        yield from steps[done:]
        done = len(steps)
    yield from steps[done:]


@dataclass(frozen=True)
class Surprisal:
    ids: list[int]  # the text's tokens
    probs: np.ndarray  # p(token | everything before it), one per token; NaN where nothing precedes it
    context: str  # what the first token was predicted from

    @property
    def losses(self) -> np.ndarray:
        return -np.log(self.probs)

    @property
    def scored(self) -> int:
        return int((~np.isnan(self.probs)).sum())

    @property
    def mean_loss(self) -> float:
        return float(np.nanmean(self.losses)) if self.scored else float("nan")

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.mean_loss))


def surprisal(model, ids: list[int], start_id: int | None) -> Surprisal:
    """How likely the model found each token of a text. With start_id (end-of-text), the first token
    is predicted as the start of a document, as in training; without one it cannot be scored."""
    stream = ([start_id] if start_id is not None else []) + list(ids)
    probs = np.exp(-token_losses(model, stream))
    if start_id is None:
        probs = np.concatenate(([np.nan], probs))
    return Surprisal(list(ids), probs, "the start of a document" if start_id is not None else "nothing")
