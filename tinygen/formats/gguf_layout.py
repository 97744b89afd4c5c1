"""How a llama-family GGUF lays out a model: its metadata keys as a Hugging Face LlamaConfig, and each
tensor's GGUF name as a Hugging Face name with the shape the config gives it. Three architectures:
llama, qwen3 (Llama with an RMSNorm on each query and key head) and gemma3 (a Gemma3TextConfig, by
llama.cpp's rules for what its GGUF leaves out). A metadata switch that would change the math beyond
what tinygen runs is refused by name, never ignored. The reader (gguf_reader.py) and the GGUF
exporter share these tables.

Gemma's RMSNorm gains arrive as llama.cpp's converter stores them, 1 + w where Hugging Face stores
w: the form tinygen keeps too, so llama.state_from_hf maps them without a shift.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from tinygen.errors import TinygenError

if TYPE_CHECKING:
    import torch

# GGUF name -> Hugging Face name, for the tensors outside the blocks.
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",  # Llama 3 rope scaling: becomes config["rope_scaling"], not a weight
}
# Within block i: blk.i.<GGUF> -> model.layers.i.<Hugging Face>. Biases are optional, as in llama.cpp.
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3 only
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
QK_NORMS = ("attn_q_norm.weight", "attn_k_norm.weight")
# Gemma 3's norms around its attention and MLP, and the Hugging Face names of its own (where
# ffn_norm is the MLP's pre-norm, which Llama's post_attention_layernorm is).
GEMMA3_NAMES = {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
POST_NORMS = ("post_attention_norm.weight", "post_ffw_norm.weight")
REQUIRED_LAYER = [k for k in LAYER_NAMES if k.endswith(".weight") and k not in QK_NORMS]
# The architectures read, and what each has beyond Llama's tensors.
ARCHITECTURES = {"llama": (), "qwen3": QK_NORMS, "gemma3": QK_NORMS + POST_NORMS}
# The Hugging Face model_type of each architecture, where it is not the GGUF's own name.
MODEL_TYPES = {"gemma3": "gemma3_text"}
BLOCK = re.compile(r"blk\.(\d+)\.(.+)")

# <arch>.* keys this module reads, or that describe the file without changing the math.
KNOWN_KEYS = {
    "block_count", "context_length", "embedding_length", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base", "rope.dimension_count",
    "rope.scaling.finetuned", "rope.scaling.original_context_length", "tensor_data_layout",
}
# <arch>.* switches that llama.cpp honours: harmless only at these values (MoE, other rope scalings,
# softcapping, scaled attention or logits, sliding windows, non-causal attention).
NEUTRAL = {
    "expert_count": (0,), "expert_used_count": (0,), "expert_shared_count": (0,),
    "rope.scaling.type": ("none", "linear"), "rope.scaling.factor": (0.0, 1.0), "rope.scale_linear": (1.0,),
    "rope.scaling.attn_factor": (1.0,), "attention.causal": (True,), "attention.scale": (0.0,),
    "attention.sliding_window": (0,), "attention.clamp_kqv": (0.0,), "attn_logit_softcapping": (0.0,),
    "final_logit_softcapping": (0.0,), "logit_scale": (1.0,), "embedding_scale": (1.0,),
    "residual_scale": (1.0,), "use_parallel_residual": (False,),
}
# gemma3.* keys that llama.cpp honours and config_from_fields maps to Gemma3TextConfig's.
GEMMA3_KEYS = {"attention.sliding_window", "attention.sliding_window_pattern", "rope.freq_base_swa",
               "final_logit_softcapping", "rope.scaling.type", "rope.scaling.factor"}
# llama.cpp's gemma3 hparams for what the file leaves out: every 6th layer global, a sliding rotary base
# of 10,000, and attention scaled by the head size, but for the 62-layer 27B (by n_embd / n_head).
GEMMA3_PATTERN = 6
GEMMA3_LOCAL_THETA = 10_000.0
GEMMA3_27B_LAYERS = 62
# convert_hf_to_gguf.py writes Llama 3 rope scaling only as the rope_freqs tensor. It reads the
# original context from the top of config.json, where Llama 3.x keeps none, so it always uses 8192.
LLAMA3_ORIGINAL_CONTEXT = 8192


def config_from_fields(fields: dict, where: str) -> dict:
    """LlamaConfig keys from the <arch>.* metadata; refuses switches that plain Llama does not have."""
    arch = fields["general.architecture"]
    meta = {k.removeprefix(arch + "."): v for k, v in fields.items() if k.startswith(arch + ".")}
    for key, value in meta.items():
        if arch == "gemma3" and key in GEMMA3_KEYS:
            continue
        if key in NEUTRAL and value not in NEUTRAL[key]:
            raise TinygenError(f"{where}: {arch}.{key} = {value!r} is not supported; tinygen runs plain Llama "
                               "(no mixture of experts, no rope scaling but Llama 3's, no softcapping)")
        if key not in NEUTRAL and key not in KNOWN_KEYS:
            raise TinygenError(f"{where}: metadata {arch}.{key} = {value!r} is not supported; tinygen does not "
                               "know how it changes the model")

    def need(key: str, kind: type = int, default=None):
        value = meta.get(key, default)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer array that is the same in every layer
        if value is None:
            raise TinygenError(f"{where} has no {arch}.{key}; it is not a complete {arch} GGUF")
        number = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        if not number or value < 0:
            raise TinygenError(f"{where}: {arch}.{key} = {value!r} is not supported (expected one {kind.__name__})")
        return kind(value)

    n_embd, n_head = need("embedding_length"), need("attention.head_count")
    n_kv_head = need("attention.head_count_kv", default=n_head)
    if n_head == 0 or n_kv_head == 0 or n_head % n_kv_head:
        raise TinygenError(f"{where}: {n_head} query heads cannot share {n_kv_head} key/value heads")
    head_dim = need("attention.key_length") if "attention.key_length" in meta else None
    dim = head_dim or n_embd // n_head  # as Hugging Face derives it when head_dim is absent
    if (rotary := need("rope.dimension_count", default=dim)) != dim:
        raise TinygenError(f"{where}: rotary embeddings on {rotary} of each head's {dim} dimensions are not "
                           "supported; tinygen rotates whole heads")
    if need("attention.value_length", default=dim) != dim:
        raise TinygenError(f"{where}: values of a head size apart from the keys' ({dim}) are not supported")
    config = {
        "model_type": MODEL_TYPES.get(arch, arch), "hidden_act": "silu",
        "hidden_size": n_embd,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon", float),
        "rope_theta": need("rope.freq_base", float, 10000.0),  # llama.cpp's default
        "max_position_embeddings": need("context_length"),
        "vocab_size": meta.get("vocab_size"),  # plan_tensors takes it from token_embd when absent
    }
    if head_dim is not None:
        config["head_dim"] = head_dim
    if arch == "gemma3":
        del config["hidden_act"]  # Gemma's is in hidden_activation
        config.update(_gemma3_config(meta, config, where))
    return config


def _gemma3_config(meta: dict, config: dict, where: str) -> dict:
    """Gemma3TextConfig's own keys, as llama.cpp's gemma3 reads the file: no sliding_window (or 0)
    means no sliding layers; the pattern is an int (every n-th layer global) or one bool per layer."""
    n_layer = config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    window = meta.get("attention.sliding_window", 0)
    pattern = meta.get("attention.sliding_window_pattern", GEMMA3_PATTERN)
    if isinstance(pattern, list) and len(pattern) == n_layer and all(isinstance(b, bool) for b in pattern):
        sliding = pattern
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
        sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layer)]
    else:
        raise TinygenError(f"{where}: gemma3.attention.sliding_window_pattern = {pattern!r} is not supported "
                           f"(expected a number or one true/false per layer)")
    if not window:
        sliding = [False] * n_layer
    kind = meta.get("rope.scaling.type", "none")
    factor = meta.get("rope.scaling.factor", 1.0)
    if kind not in ("none", "linear"):
        raise TinygenError(f"{where}: gemma3.rope.scaling.type = {kind!r} is not supported; tinygen knows linear")
    scalar = config["hidden_size"] // config["num_attention_heads"] if n_layer == GEMMA3_27B_LAYERS else head_dim
    return {
        "hidden_activation": "gelu_pytorch_tanh", "head_dim": head_dim, "query_pre_attn_scalar": scalar,
        "sliding_window": window or None, "rope_local_base_freq": float(meta.get("rope.freq_base_swa",
                                                                                 GEMMA3_LOCAL_THETA)),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "final_logit_softcapping": meta.get("final_logit_softcapping") or None,
        "rope_scaling": {"rope_type": "linear", "factor": float(factor)} if kind == "linear" and factor not in (0.0, 1.0)
        else None,
    }


def plan_tensors(gguf_tensors, config: dict, where: str) -> list:
    """(GGUF tensor, Hugging Face name, heads to unpermute by or 0) for each tensor, in file order.
    Completes config (vocab_size, tie_word_embeddings, biases) and checks every shape against it."""
    by_name = {t.name: t for t in gguf_tensors}
    n_layer = config["num_hidden_layers"]
    arch = next((gguf for gguf, hf in MODEL_TYPES.items() if hf == config["model_type"]), config["model_type"])
    extra = ARCHITECTURES[arch]
    optional = {name for names in ARCHITECTURES.values() for name in names}
    layer_names = {**LAYER_NAMES, **GEMMA3_NAMES} if arch == "gemma3" else LAYER_NAMES
    if "token_embd.weight" not in by_name:
        raise TinygenError(f"{where} has no token_embd.weight; it is not a complete {arch} GGUF")
    if config["vocab_size"] is None:
        config["vocab_size"] = hf_shape(by_name["token_embd.weight"])[0]
    config["tie_word_embeddings"] = "output.weight" not in by_name
    config["attention_bias"] = any(BLOCK.fullmatch(n) and ".attn_" in n and n.endswith(".bias") for n in by_name)
    config["mlp_bias"] = any(BLOCK.fullmatch(n) and ".ffn_" in n and n.endswith(".bias") for n in by_name)
    shapes = hf_shapes(config)

    plan = []
    for t in gguf_tensors:
        block = BLOCK.fullmatch(t.name)
        # llama.cpp's qwen3 applies no rope_freqs, so in such a file it would mean nothing.
        if t.name in TOP_NAMES and (t.name != "rope_freqs.weight" or arch == "llama"):
            hf_name, heads = TOP_NAMES[t.name], 0
            expected = shapes[hf_name]
        elif (block and block[2] in layer_names and int(block[1]) < n_layer
              and (block[2] not in optional or block[2] in extra)):
            suffix = layer_names[block[2]]
            hf_name, expected = f"model.layers.{block[1]}.{suffix}", shapes[suffix]
            # convert_hf_to_gguf.py permutes llama's q by the query heads and k by the key/value heads.
            heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(
                block[2].split(".")[0], 0) if arch == "llama" else 0
        else:
            raise TinygenError(f"{where}: tensor {t.name} is not part of a {n_layer}-layer {arch} model; tinygen "
                               "does not know what it does")
        if hf_shape(t) != expected:
            raise TinygenError(f"{where}: tensor {t.name} has shape {hf_shape(t)} but the metadata makes it "
                               f"{expected}; the file is inconsistent")
        plan.append((t, hf_name, heads))
    missing = [n for n in ["token_embd.weight", "output_norm.weight"] if n not in by_name]
    missing += [f"blk.{i}.{s}" for i in range(n_layer) for s in (*REQUIRED_LAYER, *extra)
                if f"blk.{i}.{s}" not in by_name]
    if missing:
        raise TinygenError(f"{where} lacks {len(missing)} tensor(s) of a {n_layer}-layer {arch} model "
                           f"({', '.join(missing[:3])}); the file is incomplete")
    return plan


def hf_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The Hugging Face shape of each weight, by name (per-layer ones by their suffix)."""
    d, ff, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = c.get("head_dim") or d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    return {
        "model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d),
        "rope_freqs": (head_dim // 2,),
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q), "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (d,),
        "mlp.gate_proj.weight": (ff, d), "mlp.up_proj.weight": (ff, d), "mlp.down_proj.weight": (d, ff),
        "mlp.gate_proj.bias": (ff,), "mlp.up_proj.bias": (ff,), "mlp.down_proj.bias": (d,),
        "self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,),
        "pre_feedforward_layernorm.weight": (d,), "post_feedforward_layernorm.weight": (d,),
    }


def hf_shape(t) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first


def llama3_scaling(rope_freqs: torch.Tensor, config: dict, where: str) -> dict | None:
    """Hugging Face's llama3 rope_scaling that gives llama.cpp's per-frequency divisors, or None when
    they are all 1. llama.cpp stores only the divisors: they fix factor, and the smooth band between
    fixes low_freq_factor and high_freq_factor given the original context (8192, as the converter
    assumes). The result is checked by recomputing the divisors, so a file it does not fit is refused."""
    import torch  # here, not at the top: reading a header without rope_freqs needs no torch

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    divisors = rope_freqs.double()
    if torch.all(divisors == 1):
        return None
    inv_freq = config["rope_theta"] ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(divisors.max())
    low, high, context = 1.0, 4.0, LLAMA3_ORIGINAL_CONTEXT  # Llama 3's values, when the band is too narrow
    refused = TinygenError(f"{where}: rope_freqs.weight is not Llama 3 rope scaling; tinygen knows no other "
                           "per-frequency scaling")
    band = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if int(band.sum()) >= 2:
        # Within the band 1/divisor = (1 - s)/factor + s with s = (context/wavelen - low) / (high - low):
        # s is a line in context/wavelen, whose slope and intercept give high and low.
        s = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
        x = context / wavelen[band]
        slope = float(((x - x.mean()) * (s - s.mean())).sum() / ((x - x.mean()) ** 2).sum())
        if not slope > 0:
            raise refused
        low = round(float(x.mean() - s.mean() / slope), 4)
        high = round(low + 1 / slope, 4)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": context}
    if not torch.allclose(llama3_divisors(wavelen, scaling), divisors, rtol=1e-4, atol=0):
        raise refused
    return scaling


def llama3_divisors(wavelen: torch.Tensor, s: dict) -> torch.Tensor:
    """convert_hf_to_gguf.py's rope_freqs for these llama3 parameters."""
    import torch

    context, low, high, factor = (s["original_max_position_embeddings"], s["low_freq_factor"],
                                  s["high_freq_factor"], s["factor"])
    smooth = (context / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < context / high, 1.0, torch.where(wavelen > context / low, factor, mid))

