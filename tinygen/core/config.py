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
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # ~1M: trains on a laptop CPU
    "mini": dict(n_layer=6, n_head=6, n_embd=192, block_size=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=512),  # ~15M
    "medium": dict(n_layer=8, n_head=8, n_embd=512, block_size=1024),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # GPT-2 124M
}


# The Llama family's config fields and the defaults that mean "as before they existed".
LLAMA_SWITCHES = {"n_kv_head": None, "mlp_hidden_size": None, "tie_embeddings": True, "qkv_bias": False,
                  "rope_scaling": None}
# Switches from the speedrun literature (modded-nanogpt, nanochat), for tinygen's own rope models;
# at these defaults a model is what it was before they existed. Of them only qk-norm has an outside
# form (Qwen3, in transformers and llama.cpp); exports and transformers comparisons refuse a model
# that uses another (ModelConfig.unportable).
SPEEDRUN_SWITCHES = {"qk_norm": False, "mlp": None, "logit_softcap": None, "value_embeds": 0}
# Gemma 3's: with post_norms on, the model is of the gemma3 family (with qk-norm, a GeGLU MLP and the
# embedding scale, which that family always has). At these defaults a model is what it was before.
GEMMA_SWITCHES = {"head_size": None, "post_norms": False, "embed_scale": False, "attn_scalar": None,
                  "sliding_window": None, "sliding_layers": (), "rope_local_theta": None}
OMITTED = {**LLAMA_SWITCHES, **SPEEDRUN_SWITCHES, **GEMMA_SWITCHES}
MLPS = ("swiglu", "relu2", "geglu")  # the rope arch's MLPs; gpt2's is GELU, always


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block; head size is n_embd // n_head unless head_size says
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
    # "high_freq_factor", "original_max_position_embeddings"}, or linear: {"rope_type": "linear",
    # "factor"}, positions divided by factor; None: plain rotary angles.
    rope_scaling: dict | None = None
    # The speedrun switches (SPEEDRUN_SWITCHES).
    qk_norm: bool = False  # RMSNorm over each query and key head before rotary: bounds attention logits
    # "relu2": relu(x W1)^2 W2, two matrices; "geglu": SwiGLU with tanh-GELU for SiLU (Gemma); None: the
    # arch's own (SwiGLU, or GELU)
    mlp: str | None = None
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap): no logit grows past cap
    # Token embeddings added to the values: value_embeds tables, used by the first value_embeds
    # blocks and, mirrored, by the last ones (modded-nanogpt's U shape); 0 is none.
    value_embeds: int = 0
    # Gemma 3's switches (GEMMA_SWITCHES).
    head_size: int | None = None  # each head's width, where it is not n_embd // n_head (Gemma 3 270M: 256 of 640 / 4)
    post_norms: bool = False  # an RMSNorm on the attention's and the MLP's outputs too, before the residual adds them
    embed_scale: bool = False  # token embeddings times sqrt(n_embd), the factor rounded to the model's dtype
    attn_scalar: float | None = None  # queries scaled by attn_scalar ** -0.5; None: by head size ** -0.5
    # Layers whose queries see only the last sliding_window positions (themselves included), with their
    # own rotary base rope_local_theta (None: rope_theta) and no rope_scaling, which is the global layers'.
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    rope_local_theta: float | None = None

    def __post_init__(self) -> None:
        # Checked field by field because configs come from files (checkpoint headers, config.json),
        # where a wrong type must be a clear error rather than a TypeError deep inside torch.
        if not isinstance(self.arch, str) or self.arch not in ARCHES:
            raise TinygenError(f"unknown arch {_show(self.arch)}; expected one of {', '.join(ARCHES)}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_kv_head", "mlp_hidden_size",
                     "head_size", "sliding_window"):
            value = getattr(self, name)
            if value is None and name in ("n_kv_head", "mlp_hidden_size", "head_size", "sliding_window"):
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
        if self.n_embd % self.n_head and self.head_size is None:
            raise TinygenError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_size is not None and self.head_size * self.n_head == self.n_embd:
            object.__setattr__(self, "head_size", None)  # the default's own value: one spelling, as for mlp
        if self.arch == "rope" and self.head_dim % 2:
            raise TinygenError(f"rotary positions need an even head size, got {self.head_dim}")
        for name in ("tie_embeddings", "qkv_bias", "qk_norm", "post_norms", "embed_scale"):
            if not isinstance(getattr(self, name), bool):
                raise TinygenError(f"{name} must be true or false, got {_show(getattr(self, name))}")
        if self.n_head % self.kv_heads:
            raise TinygenError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})")
        if self.arch == "gpt2" and (self.kv_heads != self.n_head or self.qkv_bias or not self.tie_embeddings
                                    or self.rope_scaling is not None or self.mlp_hidden_size not in (None, 4 * self.n_embd)):
            raise TinygenError("the gpt2 arch has none of the Llama switches (n_kv_head, mlp_hidden_size, an untied "
                               "head, qkv_bias, rope_scaling)")
        _check_rope_scaling(self.rope_scaling)
        if self.mlp is not None and self.mlp not in MLPS:
            raise TinygenError(f"unknown mlp {_show(self.mlp)}; expected one of {', '.join(MLPS)}")
        if self.mlp == "swiglu" and self.arch == "rope":
            object.__setattr__(self, "mlp", None)  # the rope arch's own: one spelling, so configs compare equal
        for name in ("logit_softcap", "attn_scalar", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value)
                                      or value <= 0):
                raise TinygenError(f"{name} must be a positive number or null, got {_show(value)}")
        self._check_sliding()
        if (not isinstance(self.value_embeds, Integral) or isinstance(self.value_embeds, bool)
                or not 0 <= self.value_embeds <= self.n_layer):
            raise TinygenError(f"value_embeds must be a whole number from 0 to n_layer ({self.n_layer}), "
                               f"got {_show(self.value_embeds)}")
        if self.arch == "gpt2" and (self.switches or self.mlp is not None or self.gemma_switches):
            used = self.switches or self.gemma_switches or [f"mlp {self.mlp}"]
            raise TinygenError(f"the gpt2 arch has none of the rope arch's switches ({', '.join(used)})")

    def _check_sliding(self) -> None:
        layers = self.sliding_layers
        if isinstance(layers, list):  # as JSON gives it: one spelling, so configs compare equal
            layers = tuple(layers)
            object.__setattr__(self, "sliding_layers", layers)
        if (not isinstance(layers, tuple) or any(not isinstance(i, Integral) or isinstance(i, bool) for i in layers)
                or list(layers) != sorted(set(layers)) or any(not 0 <= i < self.n_layer for i in layers)):
            raise TinygenError(f"sliding_layers must be distinct block numbers from 0 to n_layer - 1 in order, "
                               f"got {_show(layers)}")
        if self.sliding_window is not None and not layers:
            raise TinygenError("sliding_window is set but no sliding_layers use it")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    def is_sliding(self, layer: int) -> bool:
        """Whether block `layer` attends within the sliding window (with the local rotary base)."""
        return layer in self.sliding_layers

    @property
    def kv_heads(self) -> int:
        """Key/value heads: fewer than n_head under grouped-query attention, each serving a group."""
        return self.n_kv_head or self.n_head

    @property
    def switches(self) -> list[str]:
        """The speedrun switches this model uses, by name."""
        return [name for name, on in (("qk-norm", self.qk_norm), ("relu² MLP", self.mlp == "relu2"),
                                      ("logit soft-cap", self.logit_softcap is not None),
                                      ("value embeddings", self.value_embeds > 0)) if on]

    @property
    def gemma_switches(self) -> list[str]:
        """The Gemma 3 switches this model uses, by name."""
        return [name for name, on in (
            ("head size apart from n_embd / n_head", self.head_size not in (None, self.n_embd // self.n_head)),
            ("post-norms", self.post_norms), ("embedding scale", self.embed_scale), ("GeGLU MLP", self.mlp == "geglu"),
            ("attention scalar", self.attn_scalar is not None),
            ("sliding-window layers", bool(self.sliding_layers)), ("linear rope scaling", self.rope_kind == "linear"),
            ("local rope base", self.rope_local_theta is not None)) if on]

    @property
    def rope_kind(self) -> str | None:
        return None if self.rope_scaling is None else self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))

    @property
    def family(self) -> str:
        """The outside architecture with this model's math: gpt2, llama, qwen2 (biases on q, k and v
        alone), qwen3 (qk-norm) or gemma3 (post-norms). Exports write it; only `unportable` says whether
        it fits."""
        if self.arch == "gpt2":
            return "gpt2"
        if self.post_norms:
            return "gemma3"
        return "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama"

    @property
    def unportable(self) -> list[str]:
        """What this model uses that its family (and so transformers and llama.cpp) cannot hold."""
        if self.family == "gemma3":
            # Gemma 3 always has qk-norm, GeGLU and the embedding scale, and no biases.
            lacks = [name for name, off in (("qk-norm", not self.qk_norm), ("GeGLU MLP", self.mlp != "geglu"),
                                            ("embedding scale", not self.embed_scale)) if off]
            used = [name for name in self.switches if name not in ("qk-norm", "logit soft-cap")]
            used += ["q/k/v biases"] * self.qkv_bias + ["Llama 3 rope scaling"] * (self.rope_kind == "llama3")
            return used + [f"no {name}" for name in lacks]
        used = [name for name in self.switches if name != "qk-norm"] + self.gemma_switches
        if self.qk_norm and self.qkv_bias:  # Qwen3's attention_bias would put one on o_proj too
            used.insert(0, "qk-norm with q/k/v biases")
        if self.qk_norm and self.rope_scaling is not None:
            used.insert(0, "qk-norm with Llama 3 rope scaling")
        return used

    def value_table(self, layer: int) -> int | None:
        """Which value-embedding table block `layer` adds to its values, if any."""
        if layer < self.value_embeds:
            return layer
        if layer >= self.n_layer - self.value_embeds:
            return self.n_layer - 1 - layer
        return None

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_hidden_size is not None:
            return self.mlp_hidden_size
        if self.arch == "gpt2" or self.mlp == "relu2":  # two matrices of 4x: a SwiGLU's parameters
            return 4 * self.n_embd
        # SwiGLU has three matrices, so 8/3 * n_embd keeps the parameter count of a 4x GELU MLP;
        # rounding to 32 keeps matmuls aligned.
        return 32 * -(-(8 * self.n_embd // 3) // 32)

    def to_json(self) -> str:
        # The Llama and speedrun switches are left out at their defaults, so a tinygen model's header
        # reads as it did before they existed (and older tinygens still load it).
        d = {k: v for k, v in asdict(self).items() if not (k in OMITTED and v == OMITTED[k])}
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
    if kind == "linear":  # positions divided by factor (Gemma 3's global layers)
        factor = scaling.get("factor")
        if set(scaling) - {"rope_type", "type", "factor"} or not isinstance(factor, Real) or isinstance(factor, bool) \
                or not math.isfinite(factor) or factor <= 0:
            raise TinygenError(f"linear rope scaling needs exactly one positive factor, got {_show(scaling)}")
        return
    if kind != "llama3":
        raise TinygenError(f"rope scaling of type {_show(kind)} is not supported; tinygen knows llama3's and linear")
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
