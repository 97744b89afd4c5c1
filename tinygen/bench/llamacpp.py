"""llama.cpp on the same GGUF file, for `tinygen bench --compare`: the speed that users of local
models know (ollama runs it), measured here beside tinygen's.

It comes through llama-cpp-python's bindings when they are importable. They are not a dependency:
installing them builds llama.cpp from source, about 15 minutes on 2 cores. Greedy decoding, the
same threads and the same prompt ids as tinygen's side, timed in turn with it (measure.py).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

INSTALL = "pip install llama-cpp-python"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCpp:
    """One GGUF loaded in llama.cpp, with a context long enough for the bench's prompt and tokens."""

    def __init__(self, path: str | Path, threads: int, n_ctx: int):
        import llama_cpp

        self.lib = llama_cpp
        self.version = getattr(llama_cpp, "__version__", "unknown")
        # One batch holds the whole prompt, so a prefill is one llama_decode call, as in llama-bench.
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def prefill(self, prompt: list[int]) -> None:
        self.llm.reset()  # the next eval clears the KV cache from position 0
        self.llm.eval(prompt)

    def logits(self):
        """The logits (n_vocab,) after the last token evaluated, the only one that asked for them: a
        numpy view of llama.cpp's buffer, which the next eval overwrites."""
        import numpy as np

        return np.ctypeslib.as_array(self.lib.llama_get_logits(self.llm.ctx), shape=(self.n_vocab,))

    def _argmax(self) -> int:
        return int(self.logits().argmax())

    def greedy(self, prompt: list[int], n: int, stamps: list[float]) -> list[int]:
        """n greedy tokens after prompt; stamps gets the time each one is known."""
        self.prefill(prompt)
        out = []
        for i in range(n):
            token = self._argmax()
            stamps.append(time.perf_counter())
            out.append(token)
            if i + 1 < n:
                self.llm.eval([token])
        return out
