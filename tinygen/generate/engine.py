"""Generation on token ids: prefill the prompt once, then decode one token at a time from the KV cache.

The engine knows nothing of text. `generate` is the one streaming primitive: a generator over a
batch of prompts that yields the tokens of each step as they come. Single-prompt streaming and
collect-everything batch generation are thin wrappers around it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from tinygen.core.model import GPT, KVCache
from tinygen.generate.compiled import StaticDecoder
from tinygen.generate.sampling import SamplingParams, sample_next


def window_keep(block_size: int) -> int:
    """Tokens kept when generation fills the context: dropping a quarter at a time means one
    re-prefill per block_size/4 tokens instead of one per token."""
    return max(1, block_size - block_size // 4)


def _prefill(model: GPT, windows: list[list[int]], device, cache: KVCache | None = None) -> tuple[KVCache, torch.Tensor]:
    """Run the prompts (right-padded to one length) through the model in one pass.

    Returns the filled cache (a new one, or the one given) and the logits (B, V) at each row's
    last real token. Padding sits after each row's tokens, so causal attention keeps it out of
    every real position; decoding later overwrites it slot by slot.
    """
    B, T = len(windows), max(len(w) for w in windows)
    idx = torch.zeros(B, T, dtype=torch.long)
    for i, w in enumerate(windows):
        idx[i, : len(w)] = torch.tensor(w, dtype=torch.long)
    idx = idx.to(device)
    cache = cache if cache is not None else KVCache(model.config, B, device, model.dtype)
    cache.kv_len, cache.mask = T, None
    pos = torch.arange(T, device=device).expand(B, T)
    h, _ = model.hidden(idx, pos, cache)
    last = torch.tensor([len(w) - 1 for w in windows], device=device)
    return cache, model.lm_head(h[torch.arange(B, device=device), last])


def _rewindow(model: GPT, cache: KVCache, row: int, tokens: list[int]) -> None:
    """Refill one row's cache from a shorter window of its own tokens; other rows are untouched."""
    fresh, _ = _prefill(model, [tokens], cache.k.device)
    n = len(tokens)
    cache.k[:, row, :, :n] = fresh.k[:, 0, :, :n]
    cache.v[:, row, :, :n] = fresh.v[:, 0, :, :n]


def _decode(model: GPT, cache: KVCache, tokens: torch.Tensor, ctx_len: list[int]) -> torch.Tensor:
    """Feed one token per row (B,) at each row's own position; returns next logits (B, V)."""
    device = tokens.device
    pos = torch.tensor(ctx_len, device=device)[:, None]  # (B, 1)
    cache.kv_len = max(ctx_len) + 1
    if min(ctx_len) == max(ctx_len):
        cache.mask = None  # rows in step (always so at batch 1): every written slot is visible, no mask needed
    else:
        cache.mask = torch.arange(cache.kv_len, device=device)[None, None, None, :] <= pos[:, None, :, None]  # (B,1,1,S)
    h, _ = model.hidden(tokens[:, None], pos, cache)
    return model.lm_head(h[:, -1])


@torch.inference_mode()
def generate(
    model: GPT,
    prompts: list[list[int]],
    params: SamplingParams,
    max_new_tokens: int,
    *,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    done: Callable[[int], bool] | None = None,
    batch_size: int | None = None,
    finished: Callable[[int], None] | None = None,
    decoder: StaticDecoder | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], None] | None = None,
) -> Iterator[list[tuple[int, int]]]:
    """Yield, per step, the (row, token) pairs of the rows still generating.

    A row ends when it samples a stop id (which is not yielded), after max_new_tokens tokens,
    or when done(row) turns true after a yield (how callers apply stop strings, which are text);
    finished(row) is then called. Prompts longer than the context keep their last block_size
    tokens. With batch_size, at most that many rows run at once, and a row that ends hands its
    slot to the next waiting prompt at once (continuous batching), so a long completion never
    holds a batch of short ones hostage. A decoder (compiled.StaticDecoder) takes over the
    decode steps of a single row. observe(logits, seen, chosen) sees every step's logits (B, V),
    the repetition-penalty mask (B, V) or None, and the ids sampled from them (B,), stop ids
    included: what `sample --explain` shows.
    """
    if max_new_tokens <= 0 or not prompts:
        return
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.device
    max_len = model.config.block_size
    stop_ids = frozenset(stop_ids)
    history = [list(p) for p in prompts]
    width = min(batch_size or len(prompts), len(prompts))
    waiting = iter(range(width, len(prompts)))
    rows = list(range(width))  # batch slot -> original row
    windows = [history[r][-max_len:] for r in rows]
    ctx_len = [len(w) for w in windows]
    made = [0] * width  # tokens generated by each slot's row
    if decoder is not None and width != 1:
        raise ValueError("a StaticDecoder decodes one row at a time")
    step = decoder or (lambda cache, tokens, ctx_len: _decode(model, cache, tokens, ctx_len))
    cache, logits = _prefill(model, windows, device, decoder.cache if decoder else None)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(width, model.config.vocab_size, dtype=torch.bool, device=device)
        for i, w in enumerate(windows):
            seen[i, torch.tensor(w, device=device)] = True

    while True:
        next_ids = sample_next(logits, params, generator, seen)
        if observe is not None:
            observe(logits, seen, next_ids)
        if seen is not None:
            seen[torch.arange(len(rows), device=device), next_ids] = True
        next_list = next_ids.tolist()
        out = [(rows[i], t) for i, t in enumerate(next_list) if t not in stop_ids]
        if out:
            yield out
        keep, fresh = [], []  # slots going on; slots refilled with a new prompt
        for i, t in enumerate(next_list):
            made[i] += 1
            if t in stop_ids or made[i] >= max_new_tokens or (done and done(rows[i])):
                if finished:
                    finished(rows[i])
                row = next(waiting, None)
                if row is None:
                    continue
                rows[i], made[i] = row, 0
                fresh.append(i)
            keep.append(i)
        if not keep:
            return
        for i in fresh:
            # Prefill all but the prompt's last token into the slot; that token is decoded with
            # everyone else's below, which gives the new row its first logits.
            window = history[rows[i]][-max_len:]
            if len(window) > 1:
                _rewindow(model, cache, i, window[:-1])
            ctx_len[i] = len(window) - 1
            next_list[i] = window[-1]
            if seen is not None:
                seen[i] = False
                seen[i, torch.tensor(window, device=device)] = True
        if fresh:
            next_ids = torch.tensor(next_list, device=device)
        if len(keep) < len(rows):  # drop finished rows so they cost nothing from here on
            sel = torch.tensor(keep, device=device)
            cache.k, cache.v = cache.k[:, sel], cache.v[:, sel]
            next_ids = next_ids[sel]
            seen = seen[sel] if seen is not None else None
            rows, ctx_len, made, next_list = ([x[i] for i in keep] for x in (rows, ctx_len, made, next_list))
        for i, r in enumerate(rows):
            if made[i] == 0:
                continue  # a new row: its last prompt token is fed below
            history[r].append(next_list[i])
            if ctx_len[i] >= max_len:
                # This row's context is full: slide its window. The cache is rebuilt from the kept
                # tokens before the newest one, which is then decoded with everyone else's, so a
                # row's output never depends on the other rows in the batch.
                window = history[r][-window_keep(max_len) - 1 : -1]
                _rewindow(model, cache, i, window)
                ctx_len[i] = len(window)
        logits = step(cache, next_ids, ctx_len)
        ctx_len = [n + 1 for n in ctx_len]


def stream(model: GPT, prompt: list[int], params: SamplingParams, max_new_tokens: int, **kw) -> Iterator[int]:
    """Tokens of one prompt, one at a time."""
    for step in generate(model, [prompt], params, max_new_tokens, **kw):
        yield step[0][1]


def generate_batch(model: GPT, prompts: list[list[int]], params: SamplingParams, max_new_tokens: int, **kw) -> list[list[int]]:
    """All completions at once: the generated ids of each prompt, in prompt order."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate(model, prompts, params, max_new_tokens, **kw):
        for row, token in step:
            out[row].append(token)
    return out


@torch.inference_mode()
def naive_generate(model: GPT, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by full recompute, no cache: the reference the fast path is tested against."""
    device = model.device
    ids = list(prompt)
    for _ in range(max_new_tokens):
        idx = torch.tensor([ids[-model.config.block_size :]], device=device)
        ids.append(int(model(idx)[0, -1].argmax()))
    return ids[len(prompt) :]


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A seeded generator on the sampling device, so a seed reproduces output exactly there."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


