"""A conversation's KV cache, kept from one call of the engine's `generate` to the next.

A call whose prompt starts with ids the cache already holds prefills only the rest, as llama.cpp's
prompt-cache reuse and ollama's context reuse do: a chat turn then costs its new message, not the
whole history. This module decides what can be reused and keeps the cache big enough; the engine
runs the model over what is left.
"""

from __future__ import annotations

from tinygen.core.model import GPT, KVCache


class Context:
    """One conversation's KV cache, with the ids whose keys and values it holds (slot i holds
    ids[i]). Whatever changes the prompt (history trimmed to fit, /undo, /reset, another system
    prompt) only shortens the prefix that matches, so the cache never answers for ids it does not
    hold."""

    def __init__(self):
        self.cache: KVCache | None = None
        self.ids: list[int] = []
        self.reused = 0  # prompt tokens the last call found in the cache

    def reuse(self, model: GPT, window: list[int], need: int, fixed: KVCache | None = None) -> tuple[KVCache, int]:
        """The cache to run window in (need slots at least), and how many of window's first tokens
        it holds already: the rest is what to prefill. fixed: a StaticDecoder's cache, which must
        keep its address, so the reused slots are copied into it."""
        n = 0
        for a, b in zip(self.ids, window[:-1]):  # the last token is always run: its logits are the answer
            if a != b:
                break
            n += 1
        if self.cache is not None and not self.cache.resumes(len(self.ids), n):
            n = 0  # a sliding layer's ring has dropped keys that the window before n needs
        if fixed is not None:
            if self.cache is not fixed:  # the decoder's first call, or its cache grew (StaticDecoder.reserve)
                if n:
                    fixed.copy_from(self.cache, n)
                self.cache = fixed
        elif self.cache is None or self.cache.max_len < need:
            # Grown by doubling from 512 slots, so a long chat reallocates a few times, not once a
            # turn, and a model with a long context does not zero all of it for a short chat.
            size = min(model.config.block_size, max(need, 2 * self.cache.max_len if self.cache else 512))
            grown = KVCache(model.config, 1, model.device, model.dtype, size)
            if n:
                grown.copy_from(self.cache, n)
            self.cache = grown
        self.ids, self.reused = [], n  # until this call ends normally, the cache holds no known ids
        return self.cache, n
