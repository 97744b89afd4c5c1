"""The model config: the single source of model shape.

Kept free of torch so that `tinygen info` and `tinygen tokenize` can read a checkpoint's
config from the safetensors header without paying for a torch import.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real

from tinygen.errors import TinygenError

ARCHES = ("rope", "gpt2")
# Longer than any context tinygen trains or loads (GPT-2's is 1,024). The bound matters because
# block_size sizes buffers that no weight in a checkpoint pins down (rotary tables, KV caches): a
# corrupt header must not be able to ask for gigabytes.
MAX_BLOCK_SIZE = 1 << 16

# Named model shapes (`train --preset`, `bench --shape`), smallest first. n_head always divides
# n_embd into 64- or 32-wide heads.
PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # ~1M: minutes on a laptop CPU
    "mini": dict(n_layer=6, n_head=6, n_embd=192, block_size=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=512),  # ~15M
    "medium": dict(n_layer=8, n_head=8, n_embd=512, block_size=1024),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # GPT-2 124M
}


# The Llama family's config fields and the defaults that mean "as before they existed".
LLAMA_SWITCHES = {"n_kv_head": None, "mlp_hidden_size": None, "tie_embeddings": True, "qkv_bias": False,
                  "rope_scaling": None}


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block; head size is n_embd // n_head
    n_embd: int = 384  # residual stream width
    block_size: int = 512  # context length: positions the model was trained to see
    vocab_size: int = 8192  # rows of the (tied) token embedding; equals the tokenizer's n_vocab
    # "rope": the default for new models. Rotary positions, RMSNorm, SwiGLU MLP, no biases. At small
    # scale rotary positions generalise better than learned ones (no position table to learn from few
    # tokens) and SwiGLU gives lower loss per parameter than GELU; RMSNorm and no biases are as good
    # and cheaper. "gpt2": learned positions, LayerNorm, GELU (tanh), biases: loads GPT-2 weights as is.
    arch: str = "rope"
    norm_eps: float = 1e-5  # GPT-2 uses 1e-5 in LayerNorm; same value is fine for RMSNorm
    rope_theta: float = 10000.0  # rotary base; only used when arch == "rope"
    dropout: float = 0.0  # for training on small data; inference never uses it
    # The Llama family's switches. Their defaults are what every model before them was, so older
    # checkpoints (whose configs lack these keys) load unchanged.
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: one per query head
    mlp_hidden_size: int | None = None  # the MLP's inner width; None: the arch's own rule (mlp_hidden)
    tie_embeddings: bool = True  # the output head is the token embedding
    qkv_bias: bool = False  # biases on q, k and v alone (Qwen2); gpt2 has biases everywhere anyway
    # Llama 3's rotary scaling: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}; None: plain rotary angles.
    rope_scaling: dict | None = None

    def __post_init__(self) -> None:
        # Checked field by field because configs come from files (checkpoint headers, config.json),
        # where a wrong type must be a clear error rather than a TypeError deep inside torch.
        if not isinstance(self.arch, str) or self.arch not in ARCHES:
            raise TinygenError(f"unknown arch {_show(self.arch)}; expected one of {', '.join(ARCHES)}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_kv_head", "mlp_hidden_size"):
            value = getattr(self, name)
            if value is None and name in ("n_kv_head", "mlp_hidden_size"):
                continue
            if not isinstance(value, Integral) or isinstance(value, bool):
                raise TinygenError(f"{name} must be a whole number, got {_show(value)}")
            if value < 1:
                raise TinygenError(f"{name} must be at least 1, got {value}")
        for name in ("norm_eps", "rope_theta", "dropout"):
            value = getattr(self, name)
            if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
                raise TinygenError(f"{name} must be a finite number, got {_show(value)}")
        if self.block_size > MAX_BLOCK_SIZE:
            raise TinygenError(f"block_size must be at most {MAX_BLOCK_SIZE:,}, got {self.block_size:,}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise TinygenError(f"norm_eps and rope_theta must be positive, got {self.norm_eps} and {self.rope_theta}")
        if not 0 <= self.dropout < 1:
            raise TinygenError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_embd % self.n_head:
            raise TinygenError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.arch == "rope" and self.head_dim % 2:
            raise TinygenError(f"rotary positions need an even head size, got {self.head_dim}")
        for name in ("tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TinygenError(f"{name} must be true or false, got {_show(getattr(self, name))}")
        if self.n_head % self.kv_heads:
            raise TinygenError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})")
        if self.arch == "gpt2" and (self.kv_heads != self.n_head or self.qkv_bias or not self.tie_embeddings
                                    or self.rope_scaling is not None or self.mlp_hidden_size not in (None, 4 * self.n_embd)):
            raise TinygenError("the gpt2 arch has none of the Llama switches (n_kv_head, mlp_hidden_size, an untied "
                               "head, qkv_bias, rope_scaling)")
        _check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: fewer than n_head under grouped-query attention, each serving a group."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_hidden_size is not None:
            return self.mlp_hidden_size
        if self.arch == "gpt2":
            return 4 * self.n_embd
        # SwiGLU has three matrices, so 8/3 * n_embd keeps the parameter count of a 4x GELU MLP;
        # rounding to 32 keeps matmuls aligned.
        return 32 * -(-(8 * self.n_embd // 3) // 32)

    def to_json(self) -> str:
        # The Llama switches are left out at their defaults, so a tinygen model's header reads as it
        # did before they existed (and older tinygens still load it).
        d = {k: v for k, v in asdict(self).items() if not (k in LLAMA_SWITCHES and v == LLAMA_SWITCHES[k])}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise TinygenError(f"model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise TinygenError(f"model config has unknown fields: {', '.join(sorted(unknown))}")
        return cls(**d)


LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_rope_scaling(scaling) -> None:
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise TinygenError(f"rope_scaling must be an object or null, got {_show(scaling)}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise TinygenError(f"rope scaling of type {_show(kind)} is not supported; tinygen knows llama3's")
    unknown = set(scaling) - {"rope_type", "type", *LLAMA3_SCALING}
    missing = [k for k in LLAMA3_SCALING if k not in scaling]
    if unknown or missing:
        raise TinygenError(f"llama3 rope scaling needs exactly {', '.join(LLAMA3_SCALING)}; "
                           f"{'unknown: ' + ', '.join(sorted(unknown)) if unknown else 'missing: ' + ', '.join(missing)}")
    for k in LLAMA3_SCALING:
        v = scaling[k]
        if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise TinygenError(f"rope_scaling {k} must be a positive number, got {_show(v)}")
    if scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        raise TinygenError("rope_scaling low_freq_factor must be below high_freq_factor")


def _show(value) -> str:
    """A value from a file, short enough for a one-line error."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
