"""Llama-family models in Hugging Face form, as tinygen's own: a config.json becomes a ModelConfig,
and a Llama state dict becomes tinygen's weights.

Hugging Face folders and GGUF files (gguf_reader.py) both arrive in this form. The `rope` family is
the Llama architecture (rotary positions, RMSNorm, SwiGLU, no biases), so the mapping is a renaming
plus two fusions: q, k and v become one c_attn matmul, gate and up one c_fc matmul. Qwen2 adds
biases to q, k and v (qkv_bias); Qwen3 an RMSNorm on each query and key head (qk_norm). A config switch
that would change the math and that tinygen does not implement is refused by name, never ignored.
Free of torch at import: `tinygen info` reads configs without it.
"""

from __future__ import annotations

from tinygen.core.config import MAX_BLOCK_SIZE, ModelConfig
from tinygen.errors import TinygenError

# model_type values whose weights map the same way. Qwen2 adds biases to q, k and v, Qwen3 qk-norm.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def config_from_hf(hf: dict, where: str) -> tuple[ModelConfig, list[str]]:
    """The ModelConfig of a Hugging Face Llama-family config.json, and notes on what was adapted.
    `where` names the file in errors."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise TinygenError(f"{where}: model_type {kind!r} is not supported; tinygen runs gpt2 and the Llama family "
                           f"({', '.join(SUPPORTED)})")

    def need(key: str):
        if key not in hf:
            raise TinygenError(f"{where} has no {key!r}; it is not a complete {kind} config")
        return hf[key]

    def refuse(what: str) -> TinygenError:
        return TinygenError(f"{where}: {what} is not supported")

    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act {hf['hidden_act']!r} (the Llama family uses silu)")
    if hf.get("mlp_bias"):
        raise refuse("mlp_bias")
    if hf.get("attention_bias") and kind != "qwen2":
        raise refuse("attention_bias (biases on every attention projection)")
    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    if hf.get("head_dim") not in (None, n_embd // max(n_head, 1)):
        raise refuse(f"head_dim {hf['head_dim']} apart from hidden_size / num_attention_heads")
    # transformers 5 writes the rotary base and scaling as one rope_parameters object; earlier
    # versions wrote rope_theta and rope_scaling.
    rope = hf.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        raise TinygenError(f"{where}: rope_parameters must be an object")
    theta = (rope or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf["rope_scaling"] if hf.get("rope_scaling") is not None else rope
    notes = []
    block = need("max_position_embeddings")
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", kind == "mistral") and window < block:
        # Within its window, sliding-window attention is plain causal attention.
        notes.append(f"context limited to the {window:,}-token attention window")
        block = window
    if isinstance(block, int) and block > MAX_BLOCK_SIZE:
        notes.append(f"context limited to {MAX_BLOCK_SIZE:,} of the model's {block:,} tokens")
        block = MAX_BLOCK_SIZE
    fields = {
        "n_layer": need("num_hidden_layers"), "n_head": n_head, "n_embd": n_embd, "block_size": block,
        "vocab_size": need("vocab_size"), "arch": "rope", "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": theta, "n_kv_head": hf.get("num_key_value_heads") or n_head,
        "mlp_hidden_size": need("intermediate_size"), "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "qkv_bias": kind == "qwen2", "qk_norm": kind == "qwen3", "rope_scaling": _rope_scaling(scaling, where),
    }
    if fields["n_kv_head"] == n_head:
        fields["n_kv_head"] = None
    try:
        return ModelConfig(**fields), notes
    except (TinygenError, TypeError) as e:
        raise TinygenError(f"{where}: {e}") from None


def _rope_scaling(scaling, where: str) -> dict | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TinygenError(f"{where}: rope_scaling must be an object")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("default", None) and set(scaling) <= {"rope_type", "type", "rope_theta"}:
        return None
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if kind != "llama3":
        raise TinygenError(f"{where}: rope scaling {kind!r} is not supported; tinygen knows llama3's")
    return {"rope_type": "llama3", **{k: scaling[k] for k in keep if k in scaling}}


def hf_names(config: ModelConfig) -> dict[str, list[str]]:
    """For each tinygen weight, the Hugging Face weights it is made of (in the order they stack)."""
    names = {"transformer.wte.weight": ["model.embed_tokens.weight"], "transformer.ln_f.weight": ["model.norm.weight"]}
    if not config.tie_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        attn = [f"{theirs}self_attn.{p}_proj" for p in "qkv"]
        names[ours + "attn.c_attn.weight"] = [f"{n}.weight" for n in attn]
        if config.qkv_bias:
            names[ours + "attn.c_attn.bias"] = [f"{n}.bias" for n in attn]
        names[ours + "attn.c_proj.weight"] = [theirs + "self_attn.o_proj.weight"]
        if config.qk_norm:
            names[ours + "attn.q_norm.weight"] = [theirs + "self_attn.q_norm.weight"]
            names[ours + "attn.k_norm.weight"] = [theirs + "self_attn.k_norm.weight"]
        names[ours + "mlp.c_fc.weight"] = [theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"]
        names[ours + "mlp.c_proj.weight"] = [theirs + "mlp.down_proj.weight"]
        names[ours + "ln_1.weight"] = [theirs + "input_layernorm.weight"]
        names[ours + "ln_2.weight"] = [theirs + "post_attention_layernorm.weight"]
    return names


def state_from_hf(state: dict, config: ModelConfig, where: str) -> dict:
    """tinygen's weights from a Hugging Face Llama state dict. Extra or missing tensors are errors;
    the rotary tables some exporters store are derived from the config, so they are dropped."""
    import torch

    names = hf_names(config)
    wanted = {n for parts in names.values() for n in parts}
    if config.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # some tied models store it anyway
    extra = sorted(k for k in state if k not in wanted and not k.endswith("rotary_emb.inv_freq"))
    missing = sorted(wanted - set(state))
    if extra or missing:
        raise TinygenError(f"{where}: weights do not match the config (missing: {', '.join(missing[:3]) or 'none'}; "
                           f"unexpected: {', '.join(extra[:3]) or 'none'})")
    return {ours: state[parts[0]] if len(parts) == 1 else torch.cat([state[p] for p in parts])
            for ours, parts in names.items()}
