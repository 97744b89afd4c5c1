"""A decode step at fixed shapes, for torch.compile and CUDA graphs; the engine prefills into its cache.

On a GPU a batch-1 step is hundreds of tiny kernels that cost more to launch from Python than to run,
so the step replays as one CUDA graph (mode="reduce-overhead"): it reads the whole preallocated cache
under a mask built on the device, and the cache keeps one address for the decoder's life. On a CPU,
where compiling only fuses small operations, the step reads just the slots its token may see (a dynamic
length: no mask, no recompile as it grows), and a long context's cache is sized to the request and
doubled as needed (reserve). Inductor's on-disk cache (under $XDG_CACHE_HOME/tinygen) makes compiling a
one-time cost.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from tinygen.core.model import GPT, CacheSlots, KVCache


def tinygen_cache() -> Path:
    """$XDG_CACHE_HOME/tinygen: what tinygen builds once per machine (compiled steps, native.py's
    library), safe to delete."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tinygen"


def cache_dir() -> Path:
    return tinygen_cache() / "torchinductor"


# A CPU model with a longer context gets a request-sized cache (see the module's docstring); at or
# below it the whole context is a small cache, and a static length compiles the faster step.
SIZED_ABOVE = 1024
FIRST_SLOTS = 256  # a sized cache's first length, doubled as requests need


def _compiled(step, device: torch.device, sized: bool):
    """torch.compile(step) for this device. A CPU step pays each token for the work around its kernels
    (a GPU's graph replay skips it), so there Dynamo guards by each module's dict tag rather than tensor
    by tensor, and Inductor's wrapper drops its size asserts, which Dynamo's guards already make.
    Inductor's C++ wrapper is not used: too little gain for its slow first compile (docs/speed.md)."""
    if device.type == "cuda":
        return torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    compiled = torch.compile(step, options={"size_asserts": False}, fullgraph=True,
                             dynamic=None if sized else False)

    config = torch._dynamo.config

    def call(*args):
        # Dynamo builds a frame's guards when it compiles it, which happens inside this call; set
        # and restored by hand, as config.patch costs several times as much on every token.
        before = config.use_recursive_dict_tags_for_guards
        config.use_recursive_dict_tags_for_guards = True
        try:
            return compiled(*args)
        finally:
            config.use_recursive_dict_tags_for_guards = before

    return call


class StaticDecoder:
    """Decode steps for one row, from a cache of its own at a fixed address. The model is one that
    plan.prepare made: on a CPU its layers are those a compiled step multiplies fastest."""

    def __init__(self, model: GPT, compile: bool = True):
        self.model = model
        block = model.config.block_size
        # Asked once: every step branches on it, and model.device is three module lookups.
        self.on_cpu = model.device.type == "cpu"
        self.sized = self.on_cpu and block > SIZED_ABOVE
        self.compile = compile
        self.compile_seconds: float | None = None
        self._allocate(FIRST_SLOTS if self.sized else block)
        self._step = self._eager
        if compile:
            # Inductor reads this once, when it first compiles; a user's own setting wins.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
            self._step = _compiled(self._eager, model.device, self.sized)

    def _allocate(self, max_len: int) -> None:
        self.max_len = max_len
        # On a CPU, a slot more than any step sees (never written or read): a step's view of all of
        # a cache's slots would be a contiguous tensor, which a compiled step guards on and compiles
        # apart: a recompile stall at the context's last position.
        spare = 1 if self.on_cpu else 0
        self.cache = KVCache(self.model.config, 1, self.model.device, self.model.dtype, max_len + spare)
        self.slots = torch.arange(max_len, device=self.model.device)
        if not self.compile:
            return
        if self.sized:
            for t, dim in [*((t, 2) for t in self.cache.tensors()), (self.slots, 0)]:
                torch._dynamo.mark_dynamic(t, dim)
        else:
            for t in self.cache.tensors():
                torch._dynamo.mark_static_address(t)  # graph replays write the cache in place

    def reserve(self, need: int) -> None:
        """Make the cache hold need slots (at most the context). Only a request-sized cache ever
        grows; the others hold the whole context from the start. A grown cache starts empty: a
        prefill fills it, and a chat's context.Context copies over the slots it reuses."""
        if need > self.max_len and self.sized:
            self._allocate(min(self.model.config.block_size, max(need, 2 * self.max_len)))

    def _eager(self, tokens: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        if seen is None:
            mask = (self.slots <= pos[:, None])[:, None, None, :]  # (1, 1, 1, max_len): slots up to pos
            # The cache's own length, not the int max_len, which a compile would specialize on.
            slots = CacheSlots(self.cache, pos, self.slots.size(0), mask)
        else:
            # The first seen.size(0) slots, all visible: attention reads only the filled slots, not a
            # masked whole cache, which a chat's doubled cache would make mostly empty.
            slots = CacheSlots(self.cache, pos, seen.size(0))
        h, _ = self.model.hidden(tokens[:, None], slots)
        return self.model.head(h[:, -1])

    def __call__(self, cache: KVCache, tokens: torch.Tensor, cached: list[int]) -> torch.Tensor:
        """The engine's decode step: tokens (1,) at position cached[0] -> logits (1, V)."""
        if cache is not self.cache:
            raise ValueError("a StaticDecoder decodes only from its own cache")
        pos = torch.tensor(cached, device=tokens.device)
        if self.on_cpu:
            # Slots 0..pos, as a tensor whose length the compiled step takes as a dynamic dimension.
            seen = self.slots[:cached[0] + 1]
            if cached[0] == 0:  # (a batch's one-token prompt) torch compiles length 1 apart: run it eagerly
                return self._eager(tokens, pos, seen)
            torch._dynamo.maybe_mark_dynamic(seen, 0)
            return self._step(tokens, pos, seen)
        # A CUDA graph's output lives in memory that its next replay overwrites.
        return self._step(tokens, pos).clone()

    def warm_up(self) -> float:
        """Compile (or load from the cache) and capture now rather than inside the first reply;
        returns the seconds it took. The cache slots it writes are overwritten by any prefill."""
        start = time.perf_counter()
        token = torch.zeros(1, dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            # CUDA graph trees record on a later call than the first. Position 2: a CPU step at
            # position 0 runs eagerly (see __call__).
            for _ in range(3):
                self(self.cache, token, [2])
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds
