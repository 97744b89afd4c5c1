"""A decode step at fixed shapes, for torch.compile and CUDA graphs.

At batch 1 on a GPU a small model's decode step is a few hundred tiny kernels, and launching
them from Python costs more than running them. Replaying the step as one CUDA graph removes
that, but a graph has fixed shapes and fixed memory addresses. So this step reads the whole
preallocated cache every time, with a mask built from the position on the device (rather than
a cache view that grows by one slot per token), and keeps its cache at one address for the
life of the decoder. The engine prefills into that same cache and calls the step where it
would call its own. Compiled with mode="reduce-overhead", torch.compile captures the graph;
Inductor's on-disk cache (under $XDG_CACHE_HOME/tinygen) makes the compile a one-time cost.

On a CPU there is no graph to replay, only the fusion of the step's small operations, and a
model with a long context (SmolLM2: 8,192 tokens) would attend over all of its cache every
token. There, a context above SIZED_ABOVE tokens gets a cache sized to the request and grown by
doubling (reserve), with its length a dynamic dimension of the compiled step, so that growing it
compiles nothing new.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from tinygen.core.model import GPT, CacheSlots, KVCache


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tinygen" / "torchinductor"


# A CPU model with a longer context gets a request-sized cache (see the module's docstring); at or
# below it the whole context is a small cache, and a static length compiles the faster step.
SIZED_ABOVE = 1024
FIRST_SLOTS = 256  # a sized cache's first length, doubled as requests need


class StaticDecoder:
    """Decode steps for one row, from a cache of its own at a fixed address."""

    def __init__(self, model: GPT, compile: bool = True):
        self.model = model
        block = model.config.block_size
        self.sized = model.device.type == "cpu" and block > SIZED_ABOVE
        self.compile = compile
        self.compile_seconds: float | None = None
        self._allocate(FIRST_SLOTS if self.sized else block)
        self._step = self._eager
        if compile and model.device.type == "cpu":
            from tinygen.generate.fastlinear import SplitLinear

            for m in model.modules():
                if isinstance(m, SplitLinear):
                    m.keep_int8_blocks()
        if compile:
            # Inductor reads this once, when it first compiles; a user's own setting wins.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            self._step = torch.compile(self._eager, mode=mode, fullgraph=True, dynamic=None if self.sized else False)

    def _allocate(self, max_len: int) -> None:
        self.max_len = max_len
        self.cache = KVCache(self.model.config, 1, self.model.device, self.model.dtype, max_len)
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
        prefill fills it, and a chat's engine.Context copies over the slots it reuses."""
        if need > self.max_len and self.sized:
            self._allocate(min(self.model.config.block_size, max(need, 2 * self.max_len)))

    def _eager(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        mask = (self.slots <= pos[:, None])[:, None, None, :]  # (1, 1, 1, max_len): slots up to pos
        # The cache's own length, not the int max_len, which a compile would specialize on.
        h, _ = self.model.hidden(tokens[:, None], CacheSlots(self.cache, pos, self.slots.size(0), mask))
        return self.model.head(h[:, -1])

    def __call__(self, cache: KVCache, tokens: torch.Tensor, cached: list[int]) -> torch.Tensor:
        """The engine's decode step: tokens (1,) at position cached[0] -> logits (1, V)."""
        if cache is not self.cache:
            raise ValueError("a StaticDecoder decodes only from its own cache")
        pos = torch.tensor(cached, device=tokens.device)
        # A CUDA graph's output lives in memory that its next replay overwrites.
        return self._step(tokens, pos).clone()

    def warm_up(self) -> float:
        """Compile (or load from the cache) and capture now rather than inside the first reply;
        returns the seconds it took. The cache slots it writes are overwritten by any prefill."""
        start = time.perf_counter()
        token = torch.zeros(1, dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            for _ in range(3):  # CUDA graph trees record on a later call than the first
                self(self.cache, token, [0])
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds
