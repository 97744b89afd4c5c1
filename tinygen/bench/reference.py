"""Hugging Face transformers models holding a tinygen model's exact weights.

Used by the tests and by `tinygen bench --compare` as an independent reference implementation:
"gpt2" maps onto GPT2LMHeadModel, "rope" onto LlamaForCausalLM (rotate-half rotary, RMSNorm,
SwiGLU: the same math), with the Llama family's switches carried over: grouped-query attention,
the MLP width, an untied head, the rotary base and Llama 3's rotary scaling. Biases on q, k and v
alone are Qwen2's (Llama's attention_bias also puts one on o_proj), so that config maps onto
Qwen2ForCausalLM, and qk-norm onto Qwen3ForCausalLM. transformers is a dev dependency; nothing else in tinygen imports this module.
"""

from __future__ import annotations

import inspect

import torch

from tinygen.core.config import ModelConfig
from tinygen.core.model import GPT
from tinygen.errors import TinygenError

# The rope families this reference maps, by the name of transformers' classes for each.
FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def to_transformers(model: GPT):
    try:
        import transformers
    except ImportError:
        raise TinygenError("this needs transformers: pip install 'tinygen[dev]'") from None
    cfg = model.config
    if cfg.unportable:
        raise TinygenError(f"transformers has no model with {', '.join(cfg.unportable)}, which this model uses; "
                           f"bench it without --compare")
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    if cfg.arch == "gpt2":
        hf_cfg = transformers.GPT2Config(
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.block_size,
            vocab_size=cfg.vocab_size, layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
        )
        hf = transformers.GPT2LMHeadModel(hf_cfg)
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        state = {k: (v.t() if k.endswith(conv1d) else v) for k, v in sd.items() if k != "lm_head.weight"}
    else:
        from tinygen.formats.llama import hf_names

        hf = _llama_like(transformers, cfg)
        # Each fused tinygen matrix splits back into the reference's own, at the reference's sizes
        # (q, k and v differ under grouped-query attention).
        rows = {k: v.shape[0] for k, v in hf.state_dict().items()}
        state = {}
        for ours, theirs in hf_names(cfg).items():
            state.update(zip(theirs, sd[ours].split([rows[n] for n in theirs])))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.endswith((".attn.bias", ".attn.masked_bias"))
                                          or (k == "lm_head.weight" and cfg.tie_embeddings))]
    if missing or unexpected:
        raise RuntimeError(f"reference mapping is incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf.to(dtype=model.dtype, device=model.device).eval()


def _llama_like(transformers, cfg: ModelConfig):
    """An empty LlamaForCausalLM (Qwen2ForCausalLM for q/k/v biases, Qwen3ForCausalLM for qk-norm) of cfg's shape."""
    name = FAMILIES[cfg.family]
    config_class = getattr(transformers, f"{name}Config")
    fields = dict(
        hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.block_size,
        vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu", bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if name == "Qwen2":
        fields.update(use_sliding_window=False)
    elif name == "Qwen3":
        fields.update(use_sliding_window=False, attention_bias=False, head_dim=cfg.head_dim)
    else:
        fields.update(attention_bias=False, mlp_bias=False, head_dim=cfg.head_dim)
    scaling = {k: v for k, v in (cfg.rope_scaling or {}).items() if k not in ("type", "rope_type")}
    rope_type = "llama3" if cfg.rope_scaling else "default"
    if "rope_parameters" in inspect.signature(config_class).parameters:  # transformers 5
        fields["rope_parameters"] = {"rope_type": rope_type, "rope_theta": cfg.rope_theta, **scaling}
    else:
        fields.update(rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling and {"rope_type": rope_type, **scaling})
    return getattr(transformers, f"{name}ForCausalLM")(config_class(**fields))


@torch.inference_mode()
def hf_greedy(hf, prompt: list[int], max_new_tokens: int, streamer=None) -> list[int]:
    """transformers' generate(), greedy, forced to produce exactly max_new_tokens tokens."""
    idx = torch.tensor([prompt], device=hf.device)
    out = hf.generate(
        idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=0, eos_token_id=None, streamer=streamer,
    )
    return out[0, len(prompt):].tolist()
