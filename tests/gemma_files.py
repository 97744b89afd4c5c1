"""Gemma 3 models the tests build for themselves: small random Gemma3ForCausalLM models of transformers'
own class, saved as Hugging Face folders, and the same weights written as GGUFs in llama.cpp's gemma3
layout (its tensor names, its metadata keys, norm gains stored as 1 + w, as convert_hf_to_gguf.py's
Gemma3Model writes them).

The tokenizer is the GPT-2-style one of modelfiles (the trained tokenizer's tokens and <|endoftext|>):
a Gemma tokenizer is SentencePiece, which the architecture does not depend on. gguf and transformers
are imported inside the functions that use them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from modelfiles import gguf_tokenizer_fields, write_gpt2_files

# A small Gemma 3: 6 layers, of which llama.cpp's rule (and transformers' default pattern of 6) makes
# layer 5 global and the others sliding; heads of 16 where 48 / 4 would be 12; grouped-query attention.
SMALL = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=96, sliding_window=5,
             rms_norm_eps=1e-6, query_pre_attn_scalar=16, initializer_range=0.1,
             rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100_000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}})

# Hugging Face name (within a layer) -> llama.cpp's gemma3 tensor name.
LAYER_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}


def gemma3_model(vocab_size: int, seed: int = 0, **overrides):
    """A random Gemma3ForCausalLM (float32, eval mode) of SMALL's shape with `overrides`. Its norm
    gains are random too (Hugging Face's w, applied as 1 + w), or one mapped wrongly would go unseen."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(**{**SMALL, "vocab_size": vocab_size, **overrides})
    model = transformers.Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model.eval()


def write_hf_folder(folder: Path, model, ranks: list[bytes]) -> Path:
    """The model as save_pretrained writes it, with a GPT-2-style tokenizer.json."""
    import transformers

    files = write_gpt2_files(folder.parent / f"{folder.name}-tokenizer", ranks)
    model.save_pretrained(folder, safe_serialization=True)
    transformers.GPT2TokenizerFast.from_pretrained(str(files)).save_pretrained(folder)
    return folder


def write_gemma3_gguf(path: Path, model, ranks: list[bytes], kind: str = "F32", meta: dict | None = None) -> Path:
    """The model as a gemma3 GGUF: the keys Gemma3Model.set_gguf_parameters writes, llama.cpp's tensor
    names, norms + 1 in F32 and the matrices in `kind` (F32 or F16). A sliding pattern other than
    llama.cpp's default (every 6th layer global) goes in attention.sliding_window_pattern, one bool per
    layer. `meta` adds or overrides gemma3.* keys (None leaves one out)."""
    import gguf

    c = model.config
    full, local = c.rope_parameters["full_attention"], c.rope_parameters["sliding_attention"]
    sliding = [t == "sliding_attention" for t in c.layer_types]
    keys = {
        "context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
        "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim, "rope.freq_base": float(full["rope_theta"]),
        "rope.freq_base_swa": float(local["rope_theta"]), "attention.sliding_window": c.sliding_window,
    }
    if c.final_logit_softcapping:
        keys["final_logit_softcapping"] = float(c.final_logit_softcapping)
    if full["rope_type"] == "linear":
        keys.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(full["factor"])})
    if sliding != [i % 6 < 5 for i in range(c.num_hidden_layers)]:
        keys["attention.sliding_window_pattern"] = sliding
    keys.update(meta or {})
    w = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in {**{f"gemma3.{k}": v for k, v in keys.items()},
                       **gguf_tokenizer_fields(ranks, ["<|endoftext|>"])}.items():
        if value is None:
            continue
        add = {str: w.add_string, bool: w.add_bool, float: w.add_float32, int: w.add_uint32, list: w.add_array}
        add[type(value)](key, value)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if name.endswith("norm.weight"):
            data = data + 1  # Gemma3RMSNorm scales by 1 + w: the converter stores the sum
        elif kind == "F16":
            data = data.astype(np.float16)
        w.add_tensor(gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_name(hf: str) -> str:
    if hf in TOP_TO_GGUF:
        return TOP_TO_GGUF[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{LAYER_TO_GGUF[rest.removesuffix('.weight')]}.weight"
