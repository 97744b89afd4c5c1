"""The KV cache: every layer's keys and values, preallocated, and what one forward pass reads of them.

A global layer keeps a slot per position (slot s holds position s). A sliding-window layer (Gemma 3)
never reads further back than its window, so it keeps a ring of that many slots, position p in slot
p % ring: a long generation holds no keys those layers cannot read. Which slots a pass writes and
reads comes with the pass (CacheSlots); for the sliding layers it follows from the pass's positions
alone (window_plan), worked out once per pass since every ring has the same length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinygen.core.config import ModelConfig


class KVCache:
    """Keys and values of every layer, preallocated so decoding never allocates.

    ks[layer], vs[layer]: (B, kv_heads, slots, head_dim), slots = max_len for a global layer and
    ring = min(max_len, sliding_window) for a sliding one. Rows of different lengths share a batch
    without left padding: a slot is a position, or a position modulo the ring. One tensor per layer,
    as gpt-fast keeps them, not one shared: into a layer's view of a shared tensor, torch.compile's
    functionalization copies the whole tensor at every in-place write (docs/speed.md).
    """

    def __init__(self, config: ModelConfig, batch_size: int, device, dtype, max_len: int | None = None):
        self.max_len = max_len or config.block_size
        self.sliding_layers = frozenset(config.sliding_layers) if config.sliding_window else frozenset()
        # The layer whose ring gives every ring's length: from a tensor's size, so that a compiled step
        # whose cache is a dynamic length reads it as that dimension, not as a constant.
        self.ring_layer = min(self.sliding_layers, default=None)
        ring = min(self.max_len, config.sliding_window or self.max_len)
        # Sized by the key/value heads: grouped-query attention shrinks the cache by n_head / kv_heads.
        shapes = [(batch_size, config.kv_heads, ring if i in self.sliding_layers else self.max_len, config.head_dim)
                  for i in range(config.n_layer)]
        self.ks = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.vs = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]

    @property
    def batch_size(self) -> int:
        return self.ks[0].size(0)

    @property
    def ring_len(self) -> int:
        """The sliding layers' slots (the model has some)."""
        return self.ks[self.ring_layer].size(2)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [*self.ks, *self.vs]

    def update(self, layer: int, pos: torch.Tensor, kv_len: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, D) at positions pos, (T,) shared by every row or (B, T) per row,
        and return every row's slots [0, kv_len) of this global layer."""
        ck, cv = self.ks[layer], self.vs[layer]
        k, v = _as_stored(ck, k, v)
        _put(ck, cv, pos, k, v)
        # Compiled, kv_len may be a dynamic length: comparing it would add a guard, and a recompile
        # at the last slot; a view of every slot costs a compiled step nothing.
        if not torch.compiler.is_compiling() and kv_len == ck.size(2):
            return ck, cv
        return ck[:, :, :kv_len], cv[:, :, :kv_len]

    def slide(self, layer: int, plan: Window, k: torch.Tensor, v: torch.Tensor):
        """A sliding layer's keys and values (B, H, S, D) for this pass, under plan.mask. A step
        stores its token and reads the ring; a longer pass reads the ring's earlier positions and
        its own, and then keeps its newest tokens, which may overwrite those it read."""
        ck, cv = self.ks[layer], self.vs[layer]
        k, v = _as_stored(ck, k, v)
        if plan.step is not None:
            _put(ck, cv, plan.step, k, v)
            if plan.read == ck.size(2):
                return ck, cv
            return ck[:, :, :plan.read], cv[:, :, :plan.read]
        keys, values = k, v
        if plan.read:
            keys, values = torch.cat((ck[:, :, :plan.read], k), 2), torch.cat((cv[:, :, :plan.read], v), 2)
        if isinstance(plan.take, slice):
            _put(ck, cv, plan.store, k[:, :, plan.take], v[:, :, plan.take])
        else:  # (B, m): each row's own newest tokens
            index = plan.take[:, None, :, None]
            _put(ck, cv, plan.store, k.take_along_dim(index, 2), v.take_along_dim(index, 2))
        return keys, values

    def resumes(self, held: int, n: int) -> bool:
        """Whether a pass may go on at position n of a cache that holds positions [0, held), n <= held
        (a conversation whose prompt shares only its first n tokens with the last one's). A ring that
        has wrapped holds only the newest positions, and still holds the window before n only when n
        is at most one position back from its end."""
        return not self.sliding_layers or n >= held - 1 or held <= self.ring_len

    def copy_from(self, other: KVCache, n: int, row: int | None = None) -> None:
        """Copy the first n slots of every layer from other: all its rows, or (row given) its one
        row into this cache's row. A ring is the window long, or a whole cache shorter than it: two
        that both hold positions [0, n) are the same length or have not wrapped, so they agree slot
        for slot."""
        for mine, theirs in zip(self.tensors(), other.tensors()):
            if row is None:
                mine[:, :, :n] = theirs[:, :, :n]
            else:
                mine[row, :, :n] = theirs[0, :, :n]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (B,), in this order: finished rows cost nothing from then on."""
        self.ks = [t[rows] for t in self.ks]
        self.vs = [t[rows] for t in self.vs]


def _as_stored(ck: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Under autocast the projections that make k and v come out in the autocast dtype (bf16), not
    the cache's: they are stored, and attended to, in the cache's dtype."""
    if k.dtype != ck.dtype:  # asked, not cast: even a no-op cast costs a decode step per layer
        k, v = k.to(ck.dtype), v.to(ck.dtype)
    return k, v


def _put(ck: torch.Tensor, cv: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k, v (B, H, T, D) into slots (T,), shared by every row, or (B, T), per row."""
    if slots.dim() == 1:  # rows in step (prefill, and batch 1): one in-place copy, no index tensors
        ck.index_copy_(2, slots, k)
        cv.index_copy_(2, slots, v)
    else:
        rows = torch.arange(k.size(0), device=k.device)[:, None]
        # Advanced indexing on dims 0 and 2 puts the index dims first: (B, T, H, D).
        ck[rows, :, slots] = k.transpose(1, 2)
        cv[rows, :, slots] = v.transpose(1, 2)


@dataclass(frozen=True)
class CacheSlots:
    """How one forward pass meets the KV cache."""

    cache: KVCache
    pos: torch.Tensor  # the new tokens' positions, which are also the slots they write: (T,) or (B, T)
    kv_len: int  # slots [0, kv_len) are read; a pass of T tokens without a mask is at positions [kv_len - T, kv_len)
    # (B, 1, T, kv_len) bool, True = may attend. None: plain causal attention, which is right for a
    # prefill from position 0 (kv_len == T) and for one query that may see every slot it reads.
    mask: torch.Tensor | None = None
    # (B,) how many of each row's tokens are real in a right-padded pass: a ring keeps each row's
    # newest real ones, never the padding after them. None: all T.
    lengths: torch.Tensor | None = None


@dataclass(frozen=True)
class Window:
    """What the sliding layers do in one pass (window_plan)."""

    mask: torch.Tensor | None  # over the keys they attend to, True = may; None: plain causal attention
    read: int = 0  # ring slots read: the ring after a step's write, or its slots before a longer pass's own keys
    step: torch.Tensor | None = None  # a one-token pass: the slots it writes, (1,) or (B, 1)
    take: slice | torch.Tensor | None = None  # a longer pass: the tokens the ring keeps, as a slice or (B, m)
    store: torch.Tensor | None = None  # ... and their slots, (m,) or (B, m)


def window_plan(window: int, pos: torch.Tensor, slots: CacheSlots | None) -> Window:
    """The sliding layers' reads and writes for a pass at positions pos. Queries see keys fewer than
    `window` positions back, which follows from the positions alone, whatever the pass's own mask."""
    T = pos.size(-1)
    if slots is None:  # positions 0..T-1, keys the same
        return Window(_band(pos, pos, window) if T > window else None)
    ring = slots.cache.ring_len
    if T == 1:
        return _step(pos, slots, ring)
    if pos.dim() != 1:
        raise ValueError("a pass of several tokens over sliding layers takes one position range for every row")
    start = slots.kv_len - T
    read = min(start, ring)
    # Before this pass the ring holds positions up to start - 1, each in its slot modulo the ring.
    earlier = start - 1 - (start - 1 - torch.arange(read, device=pos.device)) % ring
    mask = _band(pos, torch.cat((earlier, pos)), window) if read or T > window else None
    m = min(T, ring)
    if slots.lengths is None:
        return Window(mask, read, take=slice(T - m, T), store=pos[T - m:] % ring)
    # A short row's newest real tokens, not the padding after them (clamped: its first token again).
    take = (slots.lengths[:, None] - m + torch.arange(m, device=pos.device)).clamp(min=0)
    return Window(mask, read, take=take, store=(take + start) % ring)


def _step(pos: torch.Tensor, slots: CacheSlots, ring: int) -> Window:
    """A one-token pass: it writes its slot, then reads the ring, whose slot s holds position
    p - ((p - s) mod ring), inside the window whenever it is not negative: the slots up to p,
    which once the ring has wrapped are all of them."""
    if torch.compiler.is_compiling():  # one graph at every position: the whole ring, masked
        read = ring
    else:
        read = min(slots.kv_len, ring)
        if pos.dim() == 1 and slots.mask is None:  # rows in step at kv_len - 1: every slot read is visible
            return Window(None, read, step=pos % ring)
    p = pos[..., None]  # (1, 1) or (B, 1, 1)
    s = torch.arange(read, device=pos.device)
    mask = s <= p
    return Window(mask if pos.dim() == 1 else mask[:, None], read, step=pos % ring)


def _band(queries: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """(T, S): whether each query position sees each key position, fewer than window back."""
    back = queries[:, None] - keys[None, :]
    return (back >= 0) & (back < window)
