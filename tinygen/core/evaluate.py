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

# Logits are made and scored this many bytes at a time, never for a whole batch: a model with an
# 8,192-token context and a 49,152-token vocabulary would otherwise hold gigabytes of them.
HEAD_CHUNK_BYTES = 64 * 2**20
# The default batch holds at most this many tokens (8 windows of 1,024), so that a long context
# scores one window at a time rather than eight.
BATCH_TOKENS = 8192


def document_start(tokenizer) -> int | None:
    """The token each document follows, which the model predicts its first token from: BOS for a
    model that expects one before every text (Llama 3, Gemma; llama.cpp's perplexity puts it
    first too), else end-of-text (tinygen's own, and the pretraining separator of GPT-2, Qwen and
    SmolLM2, whose EOS may be an end of turn), else EOS. None when the tokenizer has none of them."""
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        return tokenizer.bos_id
    return tokenizer.eot_id if tokenizer.eot_id is not None else tokenizer.eos_id


def score_tokens(model, tokens: np.ndarray | list[int], *, stride: int | None = None, batch_size: int | None = None,
                 context: int | None = None, max_tokens: int | None = None, n_bytes: int = 0,
                 mask: np.ndarray | None = None, progress: Progress | None = None) -> Score:
    """Score a token stream. stride defaults to half the context; stride == block_size gives
    plain non-overlapping windows (cheaper, what training uses mid-run). With a mask (parallel
    to tokens), only tokens where it is nonzero are scored: a chat model's replies."""
    tokens = np.asarray(tokens[: max_tokens + 1] if max_tokens else tokens, dtype=np.int64)
    losses = token_losses(model, tokens, stride=stride, batch_size=batch_size, context=context, progress=progress)
    if mask is not None:
        keep = np.asarray(mask[1 : len(tokens)]) != 0
        return Score(float(losses[keep].sum()), int(keep.sum()), n_bytes)
    return Score(float(losses.sum()), len(losses), n_bytes)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score a stream of n tokens: (start, end, first) covers tokens[start:end]
    (at most context + 1 of them) and scores the targets from index `first` on, the ones the
    previous window did not reach. Each window after the first starts stride tokens later."""
    out, scored_until, start = [], 1, 0
    while scored_until < n:
        end = min(start + context + 1, n)
        out.append((start, end, scored_until))
        scored_until = end
        start = min(start + stride, max(0, n - context - 1))
        if end == n:
            break
    return out


@torch.no_grad()
def token_losses(model, tokens: np.ndarray | list[int], *, stride: int | None = None, batch_size: int | None = None,
                 context: int | None = None, progress: Progress | None = None) -> np.ndarray:
    """Each token's negative log-likelihood in nats: entry i is for tokens[i + 1], predicted from
    the tokens before it (as many as the context holds: the model's, or a shorter one given).
    batch_size windows run at once (default: as many as fit BATCH_TOKENS, at most 8)."""
    context = context or model.config.block_size
    stride = stride or max(1, context // 2)
    batch_size = batch_size or max(1, min(8, BATCH_TOKENS // context))
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    losses = np.zeros(max(n - 1, 0), dtype=np.float64)
    if n < 2:
        return losses
    spans = windows(n, context, stride)
    was_training = model.training
    model.eval()
    for i in range(0, len(spans), batch_size):
        group = spans[i : i + batch_size]
        width = max(e - s for s, e, _ in group) - 1
        x = torch.zeros(len(group), width, dtype=torch.long)
        for row, (s, e, _) in enumerate(group):
            x[row, : e - s - 1] = torch.from_numpy(tokens[s : e - 1])
        # Only the positions whose targets this window scores go through the head: the flat index
        # (row * width + position) of each, and the place of its loss in the stream.
        pick = np.concatenate([row * width + np.arange(first - s - 1, e - s - 1) for row, (s, e, first) in enumerate(group)])
        where = np.concatenate([np.arange(first - 1, e - 1) for s, e, first in group])
        h, _ = model.hidden(x.to(model.device))  # (B, T, C)
        targets = torch.from_numpy(tokens[where + 1]).to(model.device)
        losses[where] = head_nll(model, h.flatten(0, 1)[torch.from_numpy(pick).to(model.device)], targets)
        if progress is not None:
            progress(group[-1][1] - 1, n - 1)
    model.train(was_training)
    return losses


def head_nll(model, h: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """The negative log-likelihood (N,) of targets (N,) under the logits of hidden states h (N, C),
    made HEAD_CHUNK_BYTES of float32 logits at a time."""
    rows = max(1, HEAD_CHUNK_BYTES // (4 * model.config.vocab_size))
    out = torch.empty(len(targets), dtype=torch.float32, device=h.device)
    for a in range(0, len(targets), rows):
        logits = model.head(h[a : a + rows]).float()  # (rows, V)
        out[a : a + rows] = F.cross_entropy(logits, targets[a : a + rows], reduction="none")
    return out.cpu().double().numpy()
