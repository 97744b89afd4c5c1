"""Hugging Face transformers models holding a tinygen model's exact weights.

Used by the tests and by `tinygen bench --compare` as an independent reference implementation:
"gpt2" maps onto GPT2LMHeadModel, "rope" onto LlamaForCausalLM (rotate-half rotary, RMSNorm,
SwiGLU, no biases, tied head: the same math). transformers is a dev dependency; nothing else
in tinygen imports this module.
"""

from __future__ import annotations

import torch

from tinygen.core.model import GPT
from tinygen.errors import TinygenError


def to_transformers(model: GPT):
    try:
        import transformers
    except ImportError:
        raise TinygenError("this needs transformers: pip install 'tinygen[dev]'") from None
    cfg = model.config
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
        hf_cfg = transformers.LlamaConfig(
            hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, max_position_embeddings=cfg.block_size,
            vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
            tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu",
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        hf = transformers.LlamaForCausalLM(hf_cfg)
        state = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"]}
        for i in range(cfg.n_layer):
            p, q = f"transformer.h.{i}.", f"model.layers.{i}."
            wq, wk, wv = sd[p + "attn.c_attn.weight"].chunk(3, dim=0)
            gate, up = sd[p + "mlp.c_fc.weight"].chunk(2, dim=0)
            state.update({
                q + "self_attn.q_proj.weight": wq, q + "self_attn.k_proj.weight": wk, q + "self_attn.v_proj.weight": wv,
                q + "self_attn.o_proj.weight": sd[p + "attn.c_proj.weight"],
                q + "mlp.gate_proj.weight": gate, q + "mlp.up_proj.weight": up,
                q + "mlp.down_proj.weight": sd[p + "mlp.c_proj.weight"],
                q + "input_layernorm.weight": sd[p + "ln_1.weight"],
                q + "post_attention_layernorm.weight": sd[p + "ln_2.weight"],
            })
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("lm_head.weight", ".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"reference mapping is incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    return hf.to(dtype=model.dtype, device=model.device).eval()


@torch.inference_mode()
def hf_greedy(hf, prompt: list[int], max_new_tokens: int, streamer=None) -> list[int]:
    """transformers' generate(), greedy, forced to produce exactly max_new_tokens tokens."""
    idx = torch.tensor([prompt], device=hf.device)
    out = hf.generate(
        idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=0, eos_token_id=None, streamer=streamer,
    )
    return out[0, len(prompt):].tolist()
