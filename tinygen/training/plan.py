"""The plan: what `tinygen train DATA` trains when it is not told, from the size of the text and the
budget. It picks the vocabulary, the model's size, its context, dropout, weight decay, learning
rate and how many passes over the text to make. Every part the user types stays as typed.

The rule, and the sweeps that test it, are in docs/training.md ("The plan"):
- a vocabulary of about one entry per VOCAB_BYTES bytes of training text, so that a very small
  text does not ask its BPE for more merges than it holds; every text swept, 100 kB included,
  did better at 4096 than at 1024;
- the largest preset for which the budget buys at least TOKENS_PER_PARAM training tokens per
  parameter of its blocks, counting at most USEFUL_PASSES passes over the text: repeats teach less
  than new text, so a small text cannot feed a large model however long it trains;
- dropout as the text is repeated: none up to a few passes, more the more often each token is seen;
- without --time, --tokens or --max-steps, the budget is DEFAULT_BUDGET_S of this machine's time,
  at most MAX_PASSES passes, and the run stops earlier when validation stops improving.
Weight decay and the learning rate stay the default recipe's, which its own sweeps chose.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from tinygen.core.config import PRESETS, ModelConfig
from tinygen.core.model import GPT
from tinygen.errors import TinygenError

CANDIDATES = ("tiny", "mini", "small", "medium", "gpt2")
VOCAB_BYTES = 25
VOCAB_RANGE = (512, 4096)
TOKENS_PER_PARAM = 20  # Chinchilla's compute-optimal ratio (Hoffmann et al., 2022)
USEFUL_PASSES = 4
MAX_PASSES = 30
DEFAULT_BUDGET_S = 30 * 60
DROPOUT_BY_PASSES = ((8.0, 0.0), (16.0, 0.1), (math.inf, 0.2))  # at most this many passes -> this dropout
WEIGHT_DECAY = 0.1
# A step of a small model runs at about this share of the probe's matmul rate (docs/training.md).
STEP_SHARE = 0.5
# A text shorter than this many of the preset's windows trains on shorter ones.
SEQUENCES_AT_LEAST = 4
SMALLEST_BLOCK = 8


@dataclass(frozen=True)
class Budget:
    """What bounds the run, as typed: --time (seconds), --tokens, --max-steps (steps of
    step_tokens, or of step_sequences windows); none of them: the default budget."""

    seconds: float | None = None
    tokens: int | None = None
    steps: int | None = None
    step_sequences: int | None = None
    step_tokens: int | None = None

    def given(self) -> bool:
        return bool(self.seconds or self.tokens or self.steps)

    def tokens_at(self, block: int, speed: float) -> float:
        """The training tokens this budget allows a model of this context and speed (tokens/s)."""
        limits = [self.seconds * speed] if self.seconds else []
        limits += [self.tokens] if self.tokens else []
        limits += [self.steps * (self.step_tokens or self.step_sequences * block)] if self.steps else []
        return min(limits) if limits else DEFAULT_BUDGET_S * speed


@dataclass(frozen=True)
class Plan:
    train_tokens: int
    preset: str
    params: int
    vocab_size: int
    block_size: int
    dropout: float
    weight_decay: float
    lr: float | None  # None: the optimizer's default
    passes: float  # over the training tokens: what the budget buys, or the cap without one
    seconds: float  # the estimated training time, evaluations aside
    device: str  # "CPU" or "GPU", for the estimate's line
    typed: tuple[str, ...] = ()  # the parts the user set
    open_ended: bool = False  # no budget given: passes is a cap, and patience may stop the run sooner

    @property
    def max_tokens(self) -> int:
        return max(1, round(self.passes * self.train_tokens))

    def line(self) -> str:
        """One line for the user, e.g. `1.2M tokens → mini (3.4M params), dropout 0.1, ~8 passes, ~25 min on this CPU`."""
        length = (f"up to {_passes(self.passes)} (~{_duration(self.seconds)} on this {self.device}) until validation "
                  f"stops improving" if self.open_ended else
                  f"~{_passes(self.passes)}, ~{_duration(self.seconds)} on this {self.device}")
        return (f"{_count(self.train_tokens)} tokens → {self.preset} ({_count(self.params)} params, vocabulary "
                f"{self.vocab_size}, context {self.block_size}), dropout {self.dropout:g}, weight decay "
                f"{self.weight_decay:g}, {length}")

    def to_dict(self) -> dict:
        return {**asdict(self), "typed": list(self.typed)}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(**{**d, "typed": tuple(d["typed"])})


def vocab_for(train_bytes: int) -> int:
    """The vocabulary for this much training text: a power of two near train_bytes / VOCAB_BYTES."""
    lo, hi = VOCAB_RANGE
    want = max(train_bytes / VOCAB_BYTES, 1)
    return int(min(hi, max(lo, 2 ** round(math.log2(want)))))


def fitting_block(train_tokens: int) -> int:
    """The longest power-of-two context of which the training tokens hold SEQUENCES_AT_LEAST windows."""
    block = 1 << max(0, (train_tokens // SEQUENCES_AT_LEAST - 1).bit_length() - 1)
    if block < SMALLEST_BLOCK:
        raise TinygenError(f"the training text is {train_tokens} tokens, too little to learn from; give it more text "
                           f"(or a smaller --val-fraction)")
    return block


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token (PaLM appendix B): 6N plus attention's 12 * L * C * T."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.n_embd * c.block_size


def block_params(model: GPT) -> int:
    """Parameters of the blocks: the model less its embeddings, which a token count does not size."""
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("transformer.h."))


def step_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Training FLOP/s to expect here: a matmul's rate in the training dtype, best of a few, times
    the share of it that a small model's step keeps (STEP_SHARE)."""
    m, n = 2048, 128
    a, b = torch.randn(m, n, device=device), torch.randn(n, 4 * n, device=device)
    best = math.inf
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(10):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t)
    return 2 * m * n * 4 * n / max(best, 1e-9) * STEP_SHARE


def make_plan(train_tokens: int, vocab_size: int, budget: Budget, rate: float, base: ModelConfig,
              typed: dict, device: str = "CPU") -> Plan:
    """The plan for train_tokens tokens (of a vocab_size vocabulary) within budget, at rate FLOP/s.

    base is the model's config without its preset's shape (arch and switches); typed holds the
    parts the user gave: "preset" or shape fields (a dict of ModelConfig fields), "dropout",
    "weight_decay", "lr", "block_size". A typed part is kept, and the others are chosen around it."""
    shape = typed.get("shape")
    candidates = [shape] if shape else [PRESETS[p] | {"name": p} for p in CANDIDATES]
    chosen = None  # the smallest candidate, unless a larger one is fed enough tokens (candidates grow)
    for cand in candidates:
        fields = {k: v for k, v in cand.items() if k != "name"}
        block = typed.get("block_size") or fields["block_size"]
        if "block_size" not in typed and train_tokens < SEQUENCES_AT_LEAST * (block + 1):
            block = fitting_block(train_tokens)
        with torch.device("meta"):
            model = GPT(replace(base, **{**fields, "block_size": block}, vocab_size=vocab_size))
        speed = rate / flops_per_token(model)  # tokens per second
        tokens = budget.tokens_at(block, speed)
        if not budget.given():
            tokens = min(tokens, MAX_PASSES * train_tokens)
        useful = min(tokens, USEFUL_PASSES * train_tokens)
        if chosen is None or useful >= TOKENS_PER_PARAM * block_params(model):
            chosen = (cand.get("name", "custom"), model.num_params(), block, tokens, speed)
    name, params, block, tokens, speed = chosen
    passes = tokens / train_tokens
    dropout = typed["dropout"] if "dropout" in typed else next(d for most, d in DROPOUT_BY_PASSES if passes <= most)
    return Plan(train_tokens=train_tokens, preset=typed.get("preset", name), params=params, vocab_size=vocab_size,
                block_size=block, dropout=dropout, weight_decay=typed.get("weight_decay", WEIGHT_DECAY),
                lr=typed.get("lr"), passes=passes, seconds=tokens / speed, device=device,
                typed=tuple(sorted(k for k in typed if k != "shape")), open_ended=not budget.given())


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _passes(passes: float) -> str:
    return f"{passes:.2g} pass" if passes < 1.05 else f"{passes:.2g} passes" if passes < 10 else f"{passes:.0f} passes"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
