"""Attention maps: how much each token looks at each earlier token, in every layer and head.

One forward pass through the model's explicit attention path gives the softmax probabilities
(L, H, T, T) that SDPA never materialises. This module picks views out of them (one head, the
mean of a layer's heads) and finds the query token a user names by word or position. Drawing
them is views.py's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import accumulate

import torch

from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError


@dataclass
class AttentionMap:
    ids: list[int]
    labels: list[str]  # each token's own text (Tokenizer.label)
    weights: torch.Tensor  # (n_layer, n_head, T, T) float32 on the CPU; row q sums to 1 over keys <= q
    dropped: int = 0  # tokens cut from the front of an input longer than the context

    @property
    def n_layer(self) -> int:
        return self.weights.size(0)

    @property
    def n_head(self) -> int:
        return self.weights.size(1)

    def layer_index(self, layer: int | None) -> int:
        """A layer number as the user gives it (negative counts from the end; None is the last)."""
        return _index(-1 if layer is None else layer, self.n_layer, "--layer", "layers")

    def head_index(self, head: int) -> int:
        return _index(head, self.n_head, "--head", "heads")

    def matrix(self, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """The (T, T) map of one head, or the mean of a layer's heads when head is None. A mean
        of probability rows is still a probability row, so it reads the same way."""
        w = self.weights[self.layer_index(layer)]
        return w.mean(0) if head is None else w[self.head_index(head)]

    def to_dict(self, model: str, text: str, query: int, decimals: int | None = 6) -> dict:
        """What --json writes and the HTML explorer embeds. decimals=None keeps the weights as an
        array, which the explorer packs itself: a 512-token map is millions of numbers."""
        return {
            "model": model,
            "text": text,
            "tokens": self.labels,
            "ids": self.ids,
            "dropped_tokens": self.dropped,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "query": query,
            "attention": self.weights.numpy() if decimals is None else torch.round(self.weights, decimals=decimals).tolist(),
        }


def _index(i: int, n: int, flag: str, what: str) -> int:
    if not -n <= i < n:
        raise TinygenError(f"{flag} {i} is out of range: this model has {n} {what} (0..{n - 1}, or -1 for the last)")
    return i % n


@torch.inference_mode()
def attention_map(model, tokenizer: Tokenizer, ids: list[int]) -> AttentionMap:
    """Attention probabilities of every layer and head for ids; an input longer than the context
    keeps its last block_size tokens, as generation does."""
    if not ids:
        raise TinygenError("no tokens to look at: give some text")
    dropped = max(0, len(ids) - model.config.block_size)
    ids = ids[dropped:]
    _, atts = model.attention(torch.tensor([ids], device=model.device))
    weights = torch.stack([a[0] for a in atts]).float().cpu()  # (L, H, T, T)
    return AttentionMap(ids, [tokenizer.label(i) for i in ids], weights, dropped)


@dataclass(frozen=True)
class Query:
    position: int
    note: str | None = None  # what the user should know about the choice


def query_at(amap: AttentionMap, position: int | None) -> Query:
    """The query token at a position (negative counts from the end; None is the last token)."""
    T = len(amap.ids)
    position = -1 if position is None else position
    if not -T <= position < T:
        raise TinygenError(f"--position {position} is out of range: the text has {T} tokens (0..{T - 1})")
    return Query(position % T)


def find_word(amap: AttentionMap, tokenizer: Tokenizer, word: str) -> Query:
    """The query token for a word of the text: its last token, the one whose attention has seen
    all of the word (token_span). Of several matches, takes the last."""
    span = token_span(tokenizer, amap.ids, word, "--token")
    if span is None:
        raise TinygenError(f"{word!r} is not in the text; pick the token with --position instead")
    first, last, found = span
    notes = []
    if last > first:
        parts = ", ".join(repr(amap.labels[i]) for i in range(first, last + 1))
        notes.append(f"{word!r} is {last - first + 1} tokens ({parts}); showing its last token")
    if found > 1:
        notes.append(f"{word!r} appears {found} times; showing the last (pick another with --position)")
    return Query(last, "; ".join(notes) or None)


def token_span(tokenizer: Tokenizer, ids: list[int], word: str, flag: str) -> tuple[int, int, int] | None:
    """The first and last tokens of a word in a text of token ids, and how many times it occurs
    (None: not at all); of several, the last. Prefers whole-word matches, then any match, then one
    ignoring case."""
    target = word.strip().encode()
    if not target:
        raise TinygenError(f"{flag} needs a word")
    pieces = [tokenizer.token_bytes(i) for i in ids]
    starts = [0, *accumulate(len(p) for p in pieces)][:-1]  # each token's first byte in the text
    data = b"".join(pieces)
    esc = re.escape(target)
    for pattern, flags in ((rb"(?<![\w])" + esc + rb"(?![\w])", 0), (esc, 0), (esc, re.IGNORECASE)):
        found = list(re.finditer(pattern, data, flags))
        if found:
            break
    else:
        return None
    match = found[-1]
    first = max(i for i, s in enumerate(starts) if s <= match.start())
    last = max(i for i, s in enumerate(starts) if s < match.end())
    return first, last, len(found)
