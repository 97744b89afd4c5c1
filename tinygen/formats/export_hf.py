"""A tinygen model as a Hugging Face folder that transformers loads with no custom code.

"rope" models become LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases, which Llama's
attention_bias would put on o_proj too; Qwen3ForCausalLM with qk-norm; Gemma3ForCausalLM for the
gemma3 family), "gpt2" models GPT2LMHeadModel. Weights keep their dtype; fused matrices are split
back with llama.hf_names, the inverse of loading, and Gemma's norm gains lose the 1 that tinygen keeps
in them. The tokenizer becomes a tokenizer.json that the `tokenizers` library runs as
tiktoken does: tinygen's split regex, then byte-level BPE that looks a whole piece up before merging
(ignore_merges).
"""

from __future__ import annotations

import json
from pathlib import Path

from tinygen.core.config import ModelConfig
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError
from tinygen.formats.bpe_vocab import (
    bos_name,
    jinja_chat_template,
    merges,
    special_name,
    token_text,
)
from tinygen.formats.hf import HF_CONV1D, HF_WEIGHTS
from tinygen.formats.llama import gemma_gains, hf_names

HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "gemma3": "Gemma3ForCausalLM"}


def write_hf(model, tokenizer: Tokenizer, folder: Path) -> str:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json into a new folder; returns the architecture and dtype written."""
    from safetensors.torch import save_file

    if model.config.unportable:
        raise TinygenError(f"transformers has no model with {', '.join(model.config.unportable)}, which this "
                           f"model uses; it runs in tinygen only")
    folder.mkdir()
    config = hf_config(model.config, tokenizer, str(model.dtype).removeprefix("torch."))
    save_file(hf_state(model), str(folder / HF_WEIGHTS), metadata={"format": "pt"})
    files = {
        "config.json": config,
        "generation_config.json": generation_config(tokenizer),
        "tokenizer.json": tokenizer_json(tokenizer),
        "tokenizer_config.json": tokenizer_config(tokenizer, model.config.block_size),
    }
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return f"{config['architectures'][0]}, {config['torch_dtype']}"


def hf_state(model, hf_gains: bool = True) -> dict:
    """The model's weights under Hugging Face's names, contiguous (safetensors stores no views).
    hf_gains: Gemma's norm gains as transformers holds them (w of 1 + w); without it, as tinygen and
    llama.cpp's GGUFs hold them (1 + w)."""
    cfg = model.config
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        del ours["lm_head.weight"]  # transformers ties it back to the embedding
    if cfg.arch == "gpt2":
        # Conv1D stores (in, out), the transpose of nn.Linear; the names are those transformers saves.
        return {k: (v.t() if k.endswith(HF_CONV1D) else v).contiguous() for k, v in ours.items()}
    sizes = {"q_proj": cfg.n_head * cfg.head_dim, "k_proj": cfg.kv_heads * cfg.head_dim,
             "v_proj": cfg.kv_heads * cfg.head_dim, "gate_proj": cfg.mlp_hidden, "up_proj": cfg.mlp_hidden}
    state = {}
    for name, parts in hf_names(cfg).items():
        rows = [sizes[p.split(".")[-2]] for p in parts] if len(parts) > 1 else [ours[name].shape[0]]
        state.update((p, t.contiguous()) for p, t in zip(parts, ours[name].split(rows)))
    if cfg.family == "gemma3" and hf_gains:
        state = {k: v.to(state[k].dtype) for k, v in gemma_gains(state, -1.0).items()}
    return state


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: str) -> dict:
    # transformers 5 reads "dtype", earlier versions "torch_dtype".
    ids = {"bos_token_id": _id(tokenizer, bos_name(tokenizer)), "eos_token_id": tokenizer.eos_id,
           "torch_dtype": dtype, "dtype": dtype}
    if cfg.arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
                "vocab_size": cfg.vocab_size, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new",  # GELU's tanh approximation, as tinygen's gpt2 arch
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
                "tie_word_embeddings": True, **ids}
    kind = cfg.family
    if kind == "gemma3":
        return {**gemma3_config(cfg), **ids}
    config = {
        "architectures": [HF_CLASSES[kind]], "model_type": kind,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        **ids,
    }
    scaling = cfg.rope_scaling and {"rope_type": "llama3", **{k: v for k, v in cfg.rope_scaling.items()
                                                            if k not in ("type", "rope_type")}}
    # transformers 5 reads rope_parameters, earlier versions rope_theta and rope_scaling.
    config.update(rope_theta=cfg.rope_theta, rope_scaling=scaling,
                  rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta})
    if kind == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None)
    elif kind == "qwen3":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                      attention_bias=False)
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


def gemma3_config(cfg: ModelConfig) -> dict:
    """A Gemma3TextConfig's keys, as transformers 5 writes them (rope_parameters per layer type) and as
    earlier versions read them (rope_theta, rope_local_base_freq, rope_scaling)."""
    linear = {"rope_type": "linear", "factor": cfg.rope_scaling["factor"]} if cfg.rope_kind == "linear" else None
    local_theta = cfg.rope_local_theta or cfg.rope_theta
    return {
        "architectures": [HF_CLASSES["gemma3"]], "model_type": "gemma3_text",
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": cfg.attn_scalar or cfg.head_dim,
        "final_logit_softcapping": cfg.logit_softcap, "attn_logit_softcapping": None,
        "sliding_window": cfg.sliding_window or cfg.block_size, "use_bidirectional_attention": False,
        "layer_types": ["sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.n_layer)],
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "rope_parameters": {"full_attention": {"rope_type": "default", **(linear or {}), "rope_theta": cfg.rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "rope_theta": cfg.rope_theta, "rope_local_base_freq": local_theta, "rope_scaling": linear,
    }


def generation_config(tokenizer: Tokenizer) -> dict:
    stops = list(tokenizer.stop_ids)
    return {"bos_token_id": _id(tokenizer, bos_name(tokenizer)),
            "eos_token_id": stops[0] if len(stops) == 1 else stops or None, "pad_token_id": tokenizer.eos_id}


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    vocab = {token_text(raw): i for i, raw in enumerate(tokenizer.ranks) if raw is not None}
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for name, i in sorted(tokenizer.special.items(), key=lambda item: item[1])]
    bos = special_name(tokenizer, tokenizer.bos_id)
    post = None
    if tokenizer.add_bos and bos is not None:  # a model that expects BOS before every text (Llama 3)
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": tokenizer.normalization} if tokenizer.normalization else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges(tokenizer)]},
    }


def tokenizer_config(tokenizer: Tokenizer, block_size: int) -> dict:
    bos, eos = bos_name(tokenizer), special_name(tokenizer, tokenizer.eos_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False, "add_bos_token": tokenizer.add_bos, "add_eos_token": False,
              "bos_token": bos, "eos_token": eos, "pad_token": eos}
    template = jinja_chat_template(tokenizer)
    if template is not None:
        config["chat_template"] = template
    return config


def _id(tokenizer: Tokenizer, name: str | None) -> int | None:
    return None if name is None else tokenizer.special[name]
