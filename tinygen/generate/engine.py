"""Generation on token ids: prefill the prompt once, then decode one token at a time from the KV cache.

The engine knows nothing of text. `generate` is the one streaming primitive: a generator over a
batch of prompts that yields the tokens of each step as they come. Single-prompt streaming and
collect-everything batch generation are thin wrappers around it.

Each prompt becomes a Row, which holds everything about it: its tokens, its sampling settings, its
own random generator, its limit and where it stands. A Batch holds the rows decoding together and
the tensors that follow them (the KV cache, the repetition masks, the sampling settings), and
changes them in one place when rows join or leave. What a row generates depends only on its own
prompt, settings and seed: never on its neighbours, its slot, the batch size or who finished first.
A Context (context.py) keeps one conversation's cache from a call to the next.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tinygen.core.model import GPT, KVCache
from tinygen.generate import constrain
from tinygen.generate.compiled import StaticDecoder
from tinygen.generate.context import Context
from tinygen.generate.forward import check_finite, decode, extend, prefill
from tinygen.generate.sampling import RowSettings, SamplingParams, sample_next


def window_keep(block_size: int) -> int:
    """Tokens kept before the newest one when a row's context is full. Dropping a quarter at a
    time means one re-prefill per block_size/4 tokens instead of one per token; at least one
    token goes, so the newest always has a position to sit at."""
    return block_size - max(1, block_size // 4)


def window_of(tokens: list[int], keep: int, size: int) -> list[int]:
    """What a row's cache holds of its tokens: all of them when they fit in size, else their first
    `keep` (BOS, a system prompt: llama.cpp's n_keep) and then the newest. keep < size."""
    if len(tokens) <= size:
        return list(tokens)
    return tokens[:keep] + tokens[len(tokens) - (size - keep) :]


@dataclass
class Row:
    """One prompt's generation."""

    index: int  # the prompt's place in the caller's list: what is yielded and reported
    tokens: list[int]  # prompt, then what was generated: the text a sliding window is cut from
    params: SamplingParams
    max_new_tokens: int
    generator: torch.Generator | None  # its own random stream (None: the batch's, or torch's global one)
    seed: int | None = None  # seeds its own stream when it is admitted, if it has no generator
    seeded: bool = False  # it gets a stream of its own (from seed, or afresh when seed is None)
    made: int = 0  # tokens generated so far
    cached: int = 0  # tokens of this row in the cache, which is also the position of its next token
    keep: int = 0  # leading tokens that stay in the cache when the context slides (at most half of it)
    make_matcher: Callable[[], constrain.Matcher] | None = None  # when it has a constraint
    matcher: constrain.Matcher | None = None  # what its constraint allows next, while it generates


class Batch:
    """The rows decoding together, slot by slot, and the tensors that follow them."""

    def __init__(self, model: GPT, rows: list[Row], track_seen: bool, shared_generator: torch.Generator | None,
                 stop_ids: frozenset[int], cache: KVCache | None = None, cache_len: int | None = None,
                 context: Context | None = None):
        self.model = model
        self.device = model.device
        self.rows = rows
        self.stop_ids = stop_ids
        self.stuck: list[bool] | None = None  # the rows a constraint lets go no further (constrain.masked)
        self.shared_generator = shared_generator  # one stream for every row, when the caller gave one
        windows = [self.window(r) for r in rows]
        if context is not None:  # one row, whose window may start with tokens the cache holds already
            self.cache, held = context.reuse(model, windows[0], cache_len, cache)
            if held:
                self.logits = extend(model, self.cache, windows[0][held:], held)
            else:
                _, self.logits = prefill(model, windows, into=self.cache)
        else:
            self.cache, self.logits = prefill(model, windows, cache, cache_len)
        for row, w in zip(rows, windows):
            row.cached = len(w)
        self.seen = None  # (B, V) tokens each row has seen, kept when some row has a repetition penalty
        if track_seen:
            self.seen = torch.zeros(len(rows), model.config.vocab_size, dtype=torch.bool, device=self.device)
            for slot, w in enumerate(windows):
                self.see(slot, w)
        self.settings_changed()
        for row in rows:
            self.start(row)

    def start(self, row: Row) -> None:
        """A row's own random stream exists only while it generates: 10,000 queued requests hold
        10,000 seeds, not 10,000 generator states."""
        if row.seeded and row.generator is None:
            row.generator = make_generator(row.seed, self.device)
        if row.make_matcher is not None and row.matcher is None:
            row.matcher = row.make_matcher()

    def window(self, row: Row) -> list[int]:
        return window_of(row.tokens, row.keep, self.model.config.block_size)

    def sample(self) -> torch.Tensor:
        """Each row's next token; a constraint's mask goes on the logits first, before any filter."""
        matchers = [r.matcher for r in self.rows]
        self.stuck = None
        if any(m is not None for m in matchers):
            self.logits, self.stuck = constrain.masked(self.logits, matchers, self.stop_ids)
        generators = [r.generator for r in self.rows]
        if self.shared_generator is not None or all(g is None for g in generators):
            generators = self.shared_generator  # one stream (or torch's global one) for the whole batch
        try:
            return sample_next(self.logits, self.settings, generators, self.seen)
        except RuntimeError:  # torch.multinomial refuses a distribution with NaN in it
            check_finite(self.logits)
            raise

    def mark_seen(self, chosen: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen[torch.arange(len(self.rows), device=self.device), chosen] = True

    def admit(self, slot: int, row: Row) -> int:
        """Put a new row in a finished row's slot. All but its last prompt token go into the cache
        now; that token is returned, to be decoded with everyone else's, which gives the row its
        first logits."""
        window = self.window(row)
        self.rows[slot] = row
        self.start(row)
        self.refill(slot, window[:-1])
        if self.seen is not None:
            self.seen[slot] = False
            self.see(slot, window)
        return window[-1]

    def see(self, slot: int, tokens: list[int]) -> None:
        self.seen[slot, torch.tensor(tokens, device=self.device)] = True

    def refill(self, slot: int, tokens: list[int]) -> None:
        """Fill one slot's cache from these tokens (from position 0); other slots are untouched."""
        if tokens:
            fresh, _ = prefill(self.model, [tokens], max_len=len(tokens))
            n = len(tokens)
            self.cache.copy_from(fresh, n, row=slot)
        self.rows[slot].cached = len(tokens)

    def slide(self, slot: int) -> None:
        """The row's context is full: rebuild its cache from its kept first tokens and the newest ones
        before the one about to be decoded. That token is then decoded with everyone else's, so a
        row's output never depends on the other rows in the batch."""
        row = self.rows[slot]
        self.refill(slot, window_of(row.tokens[:-1], row.keep, window_keep(self.model.config.block_size)))

    def keep(self, slots: list[int]) -> None:
        """Drop every slot not listed; the rest close up in the order given."""
        self.rows = [self.rows[i] for i in slots]
        index = torch.tensor(slots, device=self.device)
        self.cache.select(index)
        if self.seen is not None:
            self.seen = self.seen[index]

    def settings_changed(self) -> None:
        self.settings = RowSettings.of([r.params for r in self.rows], self.device)


@torch.inference_mode()
def generate(
    model: GPT,
    prompts: list[list[int]],
    params: SamplingParams | Sequence[SamplingParams],
    max_new_tokens: int | Sequence[int],
    *,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    seeds: Sequence[int | None] | None = None,
    done: Callable[[int], bool] | None = None,
    batch_size: int | None = None,
    finished: Callable[[int], None] | None = None,
    decoder: StaticDecoder | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], None] | None = None,
    context: Context | None = None,
    keep: int | Sequence[int] = 0,
    constraints: Sequence[Callable[[], constrain.Matcher] | None] | None = None,
) -> Iterator[list[tuple[int, int]]]:
    """Yield, per step, the (row, token) pairs of the rows still generating.

    params, max_new_tokens and generator may be one for all prompts or one per prompt. With one
    generator per prompt, or seeds (one per prompt; None seeds afresh), each row draws from its
    own stream; one shared generator is one stream for the whole batch (then a row's draws depend
    on the others).

    A row ends when it samples a stop id (which is not yielded), after its max_new_tokens tokens,
    or when done(row) turns true after a yield (how callers apply stop strings, which are text);
    finished(row) is then called. A row whose tokens outgrow the context keeps its first `keep`
    (one for all prompts or one per prompt; at most half the context) and the newest: a prompt
    longer than the context is cut so, and a full context slides so. With batch_size, at most
    that many rows run at once, and a row that ends hands its slot to the next waiting prompt at
    once (continuous batching), so a long completion never holds a batch of short ones hostage.
    A decoder (compiled.StaticDecoder) takes over the decode steps of a single row.
    observe(logits, seen, chosen) sees every step's logits (B, V), the
    repetition-penalty mask (B, V) or None, and the ids sampled from them (B,), stop ids
    included: what `sample --explain` shows. A context (one prompt only) keeps the KV cache for
    the next call, which then prefills only what its prompt does not share with this one's
    tokens; a call that ends early (an exception, or the caller closing it) leaves it empty.
    constraints (one per prompt, None for none) make each constrained row's matcher when it
    starts: its logits are masked to what the matcher allows, and the row also ends when the
    matcher is stopped or allows nothing (constrain.py).
    """
    if context is not None and len(prompts) != 1:
        raise ValueError("a Context follows one conversation: one prompt at a time")
    shared = generator if isinstance(generator, torch.Generator) else None
    waiting = _queue(prompts, params, max_new_tokens, None if shared else generator, seeds, finished)
    for row in waiting:
        row.keep = min(keep if isinstance(keep, int) else keep[row.index], model.config.block_size // 2)
        row.make_matcher = constraints[row.index] if constraints else None
    if not waiting:
        return
    width = min(batch_size or len(waiting), len(waiting))
    if decoder is not None and width != 1:
        raise ValueError("a StaticDecoder decodes one row at a time")
    track_seen = any(r.params.repetition_penalty != 1.0 for r in waiting)
    cache_len = _cache_len(model, waiting)
    if decoder is not None:
        decoder.reserve(cache_len)
    # Rows leave `waiting` as they start; a finished row is dropped from memory with its tokens.
    stop_ids = frozenset(stop_ids)
    batch = Batch(model, [waiting.popleft() for _ in range(width)], track_seen, shared, stop_ids,
                  decoder.cache if decoder is not None else None, cache_len, context)
    step = decoder or (lambda cache, tokens, cached: decode(model, cache, tokens, cached))
    first = batch.rows[0]
    yield from _decode(model, batch, waiting, step, stop_ids, done, finished, observe)
    if context is not None:
        # The cache's slots hold the row's kept first tokens and its newest (a slide rebuilds them
        # so): now that the row has ended normally, those are the ids a next call can reuse.
        context.ids = window_of(first.tokens, first.keep, first.cached)


def _decode(model: GPT, batch: Batch, waiting: deque, step, stop_ids: frozenset[int], done, finished,
            observe) -> Iterator[list[tuple[int, int]]]:
    """generate's loop: sample a token for every row, yield them, feed them back, until no row is left."""
    while True:
        chosen = batch.sample()
        if observe is not None:
            observe(batch.logits, batch.seen, chosen)
        batch.mark_seen(chosen)
        chosen_list = chosen.tolist()
        ends = [t in stop_ids or bool(batch.stuck and batch.stuck[slot]) for slot, t in enumerate(chosen_list)]
        out = [(row.index, t) for row, t, end in zip(batch.rows, chosen_list, ends) if not end]
        if out:
            yield out
        # Each slot goes on with its row, is handed to a waiting prompt, or closes.
        feed, going_on, joined_or_left = [], [], False
        for slot, (row, t) in enumerate(zip(batch.rows, chosen_list)):
            row.made += 1
            if row.matcher is not None and not ends[slot]:
                row.matcher.advance(t)
            if (ends[slot] or row.made >= row.max_new_tokens or (done and done(row.index))
                    or (row.matcher is not None and row.matcher.stopped)):
                if finished:
                    finished(row.index)
                joined_or_left = True
                if not waiting:
                    continue
                t = batch.admit(slot, waiting.popleft())
            else:
                row.tokens.append(t)
                if row.cached >= model.config.block_size:
                    batch.slide(slot)
            feed.append(t)
            going_on.append(slot)
        if not going_on:
            return
        if len(going_on) < len(batch.rows):
            batch.keep(going_on)
        if joined_or_left:
            batch.settings_changed()
        cached = [r.cached for r in batch.rows]
        batch.logits = step(batch.cache, torch.tensor(feed, device=batch.device), cached)
        for row in batch.rows:
            row.cached += 1


def _queue(prompts: list[list[int]], params, max_new_tokens, generators, seeds, finished) -> deque[Row]:
    """The rows waiting to start, in prompt order; a row with nothing to generate is finished at once."""
    waiting = deque(_rows(prompts, params, max_new_tokens, generators, seeds))
    for row in [r for r in waiting if r.max_new_tokens <= 0]:
        waiting.remove(row)
        if finished:
            finished(row.index)
    return waiting


def _cache_len(model: GPT, rows: Iterable[Row]) -> int:
    """The slots of the batch's cache: what the longest request can reach, not the whole context.
    A model with an 8,192-token context would otherwise zero hundreds of MB a row before a short
    reply. A row that reaches the context's end still slides, since then the cache is the context."""
    return min(model.config.block_size, max(len(r.tokens) + r.max_new_tokens for r in rows))


def _rows(prompts: list[list[int]], params, max_new_tokens, generators, seeds) -> list[Row]:
    """A Row per prompt, from settings given once for all or once per prompt."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    n = len(prompts)
    per_params = [params] * n if isinstance(params, SamplingParams) else list(params)
    per_limit = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    per_gen = [None] * n if generators is None else list(generators)
    return [Row(i, list(p), per_params[i], per_limit[i], per_gen[i], seed=None if seeds is None else seeds[i],
                seeded=seeds is not None) for i, p in enumerate(prompts)]


def stream(model: GPT, prompt: list[int], params: SamplingParams, max_new_tokens: int, **kw) -> Iterator[int]:
    """Tokens of one prompt, one at a time."""
    for step in generate(model, [prompt], params, max_new_tokens, **kw):
        yield step[0][1]


def generate_batch(model: GPT, prompts: list[list[int]], params, max_new_tokens, **kw) -> list[list[int]]:
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


def make_generator(seed: int | None, device) -> torch.Generator:
    """A generator on the sampling device: seeded, so a seed reproduces output exactly there, or
    seeded afresh from the OS when there is no seed."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
