"""Llama-family models in Hugging Face form, as tinygen's own: a config.json becomes a ModelConfig,
and a Llama state dict becomes tinygen's weights.

Hugging Face folders and GGUF files (gguf_reader.py) both arrive in this form. The `rope` family is
the Llama architecture (rotary positions, RMSNorm, SwiGLU, no biases), so the mapping is a renaming
plus two fusions: q, k and v become one c_attn matmul, gate and up one c_fc matmul. Qwen2 adds
biases to q, k and v (qkv_bias); Qwen3 an RMSNorm on each query and key head (qk_norm); Gemma 3
(gemma3_text) the switches of its own (config.py's GEMMA_SWITCHES). Gemma's RMSNorm scales by 1 + w:
tinygen, like llama.cpp's GGUFs, keeps 1 + w as the gain, which a Hugging Face folder's w becomes
on reading (gemma_gains). A config switch that would change the math and that tinygen does not
implement is refused by name, never ignored. Free of torch at import: `tinygen info` reads configs
without it.
"""

from __future__ import annotations

from tinygen.core.config import MAX_BLOCK_SIZE, ModelConfig
from tinygen.errors import TinygenError

# model_type values whose weights map the same way. Qwen2 adds biases to q, k and v, Qwen3 qk-norm,
# Gemma 3 its own switches; "gemma3" is Gemma 3 with a vision tower, of which only the text model is read.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")
# Transformers' defaults for what a config.json may leave out: Llama, Mistral and Qwen untie the output
# head, Gemma 3 ties it; and Gemma3TextConfig's values for its own keys.
TIED_BY_DEFAULT = {"gemma3_text": True, "gemma3": True}
GEMMA3_DEFAULTS = {"head_dim": 256, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
                   "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window": 4096,
                   "sliding_window_pattern": 6, "hidden_activation": "gelu_pytorch_tanh"}
# Where a multimodal Gemma 3 keeps its text model: transformers 5's prefix, then earlier versions'.
MULTIMODAL_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                       "language_model.lm_head.": "lm_head."}
# transformers' names for GELU's tanh form, which Gemma's GeGLU uses
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def config_from_hf(hf: dict, where: str) -> tuple[ModelConfig, list[str]]:
    """The ModelConfig of a Hugging Face Llama-family config.json, and notes on what was adapted.
    `where` names the file in errors."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise TinygenError(f"{where}: model_type {kind!r} is not supported; tinygen runs gpt2, the Llama family "
                           f"and Gemma 3 ({', '.join(SUPPORTED)})")
    if kind in ("gemma3", "gemma3_text"):
        hf, kind = _gemma3_text(hf, where), "gemma3_text"

    def need(key: str):
        if key not in hf:
            raise TinygenError(f"{where} has no {key!r}; it is not a complete {kind} config")
        return hf[key]

    def refuse(what: str) -> TinygenError:
        return TinygenError(f"{where}: {what} is not supported")

    if kind != "gemma3_text" and hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act {hf['hidden_act']!r} (the Llama family uses silu)")
    if hf.get("mlp_bias"):
        raise refuse("mlp_bias")
    if hf.get("attention_bias") and kind != "qwen2":
        raise refuse("attention_bias (biases on every attention projection)")
    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    if kind != "gemma3_text" and hf.get("head_dim") not in (None, n_embd // max(n_head, 1)):
        raise refuse(f"head_dim {hf['head_dim']} apart from hidden_size / num_attention_heads")
    # transformers 5 writes the rotary base and scaling as one rope_parameters object (Gemma 3: one
    # per layer type); earlier versions wrote rope_theta and rope_scaling.
    rope = hf.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        raise TinygenError(f"{where}: rope_parameters must be an object")
    local_rope = None
    if rope is not None and isinstance(rope.get("full_attention"), dict):
        rope, local_rope = rope["full_attention"], rope.get("sliding_attention")
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
        "mlp_hidden_size": need("intermediate_size"),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", TIED_BY_DEFAULT.get(kind, False))),
        "qkv_bias": kind == "qwen2", "qk_norm": kind == "qwen3", "rope_scaling": _rope_scaling(scaling, where),
    }
    if kind == "gemma3_text":
        fields.update(_gemma3_fields(hf, local_rope, where, notes))
    if fields["n_kv_head"] == n_head:
        fields["n_kv_head"] = None
    try:
        return ModelConfig(**fields), notes
    except (TinygenError, TypeError) as e:
        raise TinygenError(f"{where}: {e}") from None


def _gemma3_text(hf: dict, where: str) -> dict:
    """A gemma3_text config with Gemma3TextConfig's defaults for what it leaves out; of a multimodal
    gemma3 config, the text model's, which sits inside it."""
    if hf.get("model_type") == "gemma3":
        text = hf.get("text_config")
        if not isinstance(text, dict):
            raise TinygenError(f"{where}: a gemma3 config without a text_config object is not a Gemma 3 model")
        hf = {"tie_word_embeddings": hf.get("tie_word_embeddings", True), **text, "model_type": "gemma3_text"}
    return {**GEMMA3_DEFAULTS, **hf}


def _gemma3_fields(hf: dict, local_rope, where: str, notes: list[str]) -> dict:
    """The ModelConfig fields of Gemma 3's own switches, from a gemma3_text config with its defaults."""
    def refuse(what: str) -> TinygenError:
        return TinygenError(f"{where}: {what} is not supported")

    if hf["hidden_activation"] not in TANH_GELUS:
        raise refuse(f"hidden_activation {hf['hidden_activation']!r} (Gemma 3 uses gelu_pytorch_tanh)")
    if hf.get("use_bidirectional_attention"):
        raise refuse("use_bidirectional_attention (tinygen's attention is causal)")
    if local_rope is not None and _rope_scaling(local_rope, where) is not None:
        raise refuse("rope scaling on the sliding-window layers")
    n_layer = hf.get("num_hidden_layers")
    kinds = hf.get("layer_types")
    if kinds is None:  # older configs give the pattern: every sliding_window_pattern-th layer is global
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
            raise TinygenError(f"{where}: sliding_window_pattern must be a positive whole number, got {pattern!r}")
        kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer or 0)]
    if not isinstance(kinds, list) or len(kinds) != n_layer or set(kinds) - {"sliding_attention", "full_attention"}:
        raise TinygenError(f"{where}: layer_types must name sliding_attention or full_attention for each of the "
                           f"{n_layer} layers")
    sliding = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
    local_theta = (local_rope or {}).get("rope_theta", hf["rope_local_base_freq"])
    if hf.get("attn_logit_softcapping") is not None:  # a Gemma 2 key that Gemma3TextConfig kept
        notes.append("attn_logit_softcapping is not applied, as transformers' and llama.cpp's Gemma 3 do not "
                     "apply it")
    return {
        "head_size": hf["head_dim"], "post_norms": True, "embed_scale": True, "qk_norm": True, "mlp": "geglu",
        "attn_scalar": hf["query_pre_attn_scalar"] if hf["query_pre_attn_scalar"] != hf["head_dim"] else None,
        "logit_softcap": hf.get("final_logit_softcapping"),
        "sliding_window": hf["sliding_window"] if sliding else None, "sliding_layers": sliding,
        "rope_local_theta": local_theta if sliding else None,
    }


def _rope_scaling(scaling, where: str) -> dict | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TinygenError(f"{where}: rope_scaling must be an object")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("default", None) and set(scaling) <= {"rope_type", "type", "rope_theta"}:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": scaling.get("factor")}
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if kind != "llama3":
        raise TinygenError(f"{where}: rope scaling {kind!r} is not supported; tinygen knows llama3's and linear")
    return {"rope_type": "llama3", **{k: scaling[k] for k in keep if k in scaling}}


def text_weights(weights: dict) -> dict:
    """weights (by Hugging Face name) as the text model names them: a Gemma 3 folder with a vision
    tower (model_type "gemma3") keeps its text model under another prefix, and the tower's own
    weights are left behind. Any other folder's weights come back as they are."""
    prefixes = tuple(MULTIMODAL_PREFIXES)
    if not any(name.startswith(prefixes) for name in weights):
        return weights
    text = {}
    for name, value in weights.items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is not None:
            text[MULTIMODAL_PREFIXES[prefix] + name.removeprefix(prefix)] = value
        elif name == "lm_head.weight":
            text[name] = value
    return text


def gemma_gains(state: dict, shift: float) -> dict:
    """A Gemma state dict (Hugging Face names) with `shift` added to every RMSNorm gain, in float32:
    +1 turns Hugging Face's w into the 1 + w that tinygen multiplies by, -1 turns it back."""
    return {k: v.float() + shift if k.endswith("norm.weight") else v for k, v in state.items()}


def hf_names(config: ModelConfig) -> dict[str, list[str]]:
    """For each tinygen weight, the Hugging Face weights it is made of (in the order they stack).
    Gemma's post_attention_layernorm is the attention's post-norm, where Llama's is the MLP's pre-norm."""
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
        if config.post_norms:
            names[ours + "ln_2.weight"] = [theirs + "pre_feedforward_layernorm.weight"]
            names[ours + "attn_post_norm.weight"] = [theirs + "post_attention_layernorm.weight"]
            names[ours + "mlp_post_norm.weight"] = [theirs + "post_feedforward_layernorm.weight"]
        else:
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
