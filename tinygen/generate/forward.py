"""The model's passes over a KV cache, on token ids: prefill prompts into a fresh cache, extend one
row's cache with more tokens, and decode one token per row. The engine (engine.py) decides which
rows run and what they feed; these only run the model.
"""

from __future__ import annotations

import torch

from tinygen.core.model import GPT, CacheSlots, KVCache
from tinygen.errors import TinygenError


def prefill(model: GPT, windows: list[list[int]], into: KVCache | None = None,
            max_len: int | None = None) -> tuple[KVCache, torch.Tensor]:
    """Run the prompts (right-padded to one length) through the model in one pass, into a new cache
    of max_len slots (the whole context when None) or the one given (a StaticDecoder's, which must
    keep its address).

    Returns the cache and the logits (B, V) at each row's last real token. Padding sits after each
    row's tokens, so causal attention keeps it out of every real position; decoding later
    overwrites it slot by slot. Identical prompts (--num-samples) are run once and their cache
    rows copied.
    """
    device = model.device
    unique = list(dict.fromkeys(map(tuple, windows)))
    where = {w: i for i, w in enumerate(unique)}
    T = max(len(w) for w in unique)
    idx = torch.zeros(len(unique), T, dtype=torch.long)
    for i, w in enumerate(unique):
        idx[i, : len(w)] = torch.tensor(w, dtype=torch.long)
    if into is not None and into.batch_size != len(unique):
        raise ValueError("a cache to prefill into needs one row per distinct prompt")
    cache = into if into is not None else KVCache(model.config, len(unique), device, model.dtype, max_len)
    lengths = torch.tensor([len(w) for w in unique], device=device)  # a sliding layer's ring keeps each row's newest
    h, _ = model.hidden(idx.to(device), CacheSlots(cache, torch.arange(T, device=device), T, lengths=lengths))
    last = lengths - 1
    logits = model.head(h[torch.arange(len(unique), device=device), last])
    check_finite(logits)
    if len(unique) < len(windows):
        rows = torch.tensor([where[tuple(w)] for w in windows], device=device)
        cache.select(rows)
        logits = logits[rows]
    return cache, logits


def extend(model: GPT, cache: KVCache, tokens: list[int], start: int) -> torch.Tensor:
    """Prefill tokens into one row's cache after the start slots it already holds; returns the
    logits (1, V) after the last. Each new token sees every cached slot and the new ones up to
    itself: a causal mask aligned to the bottom right, which SDPA's is_causal (top left) is not."""
    device = model.device
    T = len(tokens)
    S = start + T
    mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(start)[None, None]
    slots = CacheSlots(cache, torch.arange(start, S, device=device), S, mask)
    h, _ = model.hidden(torch.tensor([tokens], device=device), slots)
    logits = model.head(h[:, -1])
    check_finite(logits)
    return logits


def check_finite(logits: torch.Tensor) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise TinygenError("the model's output is not finite (NaN or infinity): its weights are broken, or too large "
                           "for this dtype")


def decode(model: GPT, cache: KVCache, tokens: torch.Tensor, cached: list[int]) -> torch.Tensor:
    """Feed one token per row (B,), each at its own position (its row's cached count); returns the
    next logits (B, V)."""
    device = tokens.device
    kv_len = max(cached) + 1
    if min(cached) == max(cached):  # rows in step (always so at batch 1): every slot read is visible
        slots = CacheSlots(cache, torch.tensor(cached[:1], device=device), kv_len)
    else:
        pos = torch.tensor(cached, device=device)[:, None]  # (B, 1)
        mask = torch.arange(kv_len, device=device)[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, 1, S)
        slots = CacheSlots(cache, pos, kv_len, mask)
    h, _ = model.hidden(tokens[:, None], slots)
    return model.head(h[:, -1])
