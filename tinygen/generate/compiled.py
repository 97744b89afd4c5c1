"""A decode step at fixed shapes, for torch.compile and CUDA graphs.

At batch 1 on a GPU a small model's decode step is a few hundred tiny kernels, and launching
them from Python costs more than running them. Replaying the step as one CUDA graph removes
that, but a graph has fixed shapes and fixed memory addresses. So this step reads the whole
preallocated cache every time, with a mask built from the position on the device (rather than
a cache view that grows by one slot per token), and keeps its cache at one address for the
life of the decoder. The engine prefills into that same cache and calls the step where it
would call its own. Compiled with mode="reduce-overhead", torch.compile captures the graph;
Inductor's on-disk cache (under $XDG_CACHE_HOME/tinygen) makes the compile a one-time cost.
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


class StaticDecoder:
    """Decode steps for one row, from a cache of its own at a fixed address."""

    def __init__(self, model: GPT, compile: bool = True):
        self.model = model
        self.max_len = model.config.block_size
        self.cache = KVCache(model.config, 1, model.device, model.dtype)
        self.slots = torch.arange(self.max_len, device=model.device)
        self.compile_seconds: float | None = None
        self._step = self._eager
        if compile:
            # Inductor reads this once, when it first compiles; a user's own setting wins.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
            for t in (self.cache.k, self.cache.v):
                torch._dynamo.mark_static_address(t)  # graph replays write the cache in place
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            self._step = torch.compile(self._eager, mode=mode, fullgraph=True, dynamic=False)

    def _eager(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        mask = (self.slots <= pos[:, None])[:, None, None, :]  # (1, 1, 1, max_len): slots up to pos
        h, _ = self.model.hidden(tokens[:, None], CacheSlots(self.cache, pos, self.max_len, mask))
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
