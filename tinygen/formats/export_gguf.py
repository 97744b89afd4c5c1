"""A tinygen "rope" model as a llama GGUF (a qwen3 one with qk-norm, a gemma3 one for the gemma3
family), for llama.cpp and ollama, written with gguf.GGUFWriter.

The file is what llama.cpp's convert_hf_to_gguf.py makes of the same model in Hugging Face form:
the standard llama.* (or qwen3.*, gemma3.*) keys, llama.cpp's tensor names, for llama the rows of q
and k permuted for its rotary layout (gguf_reader.py undoes it on reading; qwen3 and gemma3 rotate
Hugging Face's halves as they are, so nothing is permuted), norms in F32 whatever the type (Gemma's
as 1 + w, as tinygen holds them), Llama 3's rope scaling as a rope_freqs tensor, and the tokenizer
as a byte-level BPE ("gpt2") with a pre-tokenizer name llama.cpp knows for the split pattern.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tinygen.core.tokenizer import GPT4_PATTERN, Tokenizer
from tinygen.errors import TinygenError
from tinygen.formats.bpe_vocab import bos_name, jinja_chat_template, merges, token_text
from tinygen.formats.gguf_layout import (
    GEMMA3_27B_LAYERS,
    GEMMA3_NAMES,
    GEMMA3_PATTERN,
    LAYER_NAMES,
    TOP_NAMES,
    llama3_divisors,
)

Q8_0_BLOCK = 32  # a Q8_0 row is whole blocks of 32 weights

# Hugging Face name -> GGUF name: gguf_layout.py's reading tables, turned round.
TOP = {hf: name for name, hf in TOP_NAMES.items() if hf != "rope_freqs"}
LAYER = {hf: name for name, hf in LAYER_NAMES.items()}
GEMMA3_LAYER = {**LAYER, **{hf: name for name, hf in GEMMA3_NAMES.items()}}


def write_gguf(model, tokenizer: Tokenizer, path: Path, kind: str = "f16", name: str = "tinygen") -> str:
    """Write the model to `path` with its 2-D weights in `kind` (f32, f16 or q8_0); returns a description."""
    import gguf

    cfg = model.config
    if cfg.arch != "rope":
        raise TinygenError("GGUF export is for rope (Llama-architecture) models; this is a gpt2-arch model, "
                           "export it with --format hf")
    if cfg.qkv_bias:
        raise TinygenError("GGUF export of a model with q/k/v biases (Qwen2's) is not supported; "
                           "export it with --format hf")
    if cfg.unportable or _gemma3_unportable(cfg):
        raise TinygenError(f"llama.cpp has no architecture with {', '.join(cfg.unportable or _gemma3_unportable(cfg))}, "
                           f"which this model uses; it runs in tinygen only")
    arch = cfg.family  # llama, qwen3 for qk-norm, or gemma3: qwen2 (q/k/v biases) was refused above
    pre = gguf_pre(tokenizer)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "gemma3":
        _add_gemma3(w, cfg)
    w.add_file_type(file_type)
    if kind == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tokenizer, pre, cfg.vocab_size)

    fallback = 0
    for hf_name, tensor in _tensors(model):
        data = tensor.float().numpy()
        if data.ndim == 1:  # norms (and rope_freqs): llama.cpp wants them in F32
            w.add_tensor(hf_name, data)
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % Q8_0_BLOCK == 0:
            w.add_tensor(hf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        elif qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(hf_name, data)
        else:  # f16, or a q8_0 row that is not whole blocks: F16, as convert_hf_to_gguf.py falls back
            fallback += qtype == gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(hf_name, data.astype("float16"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return f"{arch}, {kind}" + (f" ({fallback} tensors in f16: rows not whole 32-weight blocks)" if fallback else "") + \
        f", tokenizer pre {pre!r}"


def _gemma3_unportable(cfg) -> list[str]:
    """What llama.cpp's gemma3 cannot hold beyond what transformers' can: an attention scale apart
    from its rule (the head size's, or n_embd / n_head's for 62 layers), which its GGUF has no key for."""
    rule = cfg.n_embd // cfg.n_head if cfg.n_layer == GEMMA3_27B_LAYERS else cfg.head_dim
    if cfg.family != "gemma3" or (cfg.attn_scalar or cfg.head_dim) == rule:
        return []
    return [f"an attention scalar of {cfg.attn_scalar:g} (its gemma3 scales by {rule} ** -0.5)"]


def _add_gemma3(w, cfg) -> None:
    """gemma3.* keys beyond llama's, as convert_hf_to_gguf.py's Gemma3Model writes them; the sliding
    pattern too when it is not llama.cpp's default (every 6th layer global)."""
    arch = "gemma3"
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_float32(f"{arch}.rope.freq_base_swa", float(cfg.rope_local_theta or cfg.rope_theta))
    if cfg.sliding_window:
        w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
        sliding = [cfg.is_sliding(i) for i in range(cfg.n_layer)]
        if sliding != [i % GEMMA3_PATTERN < GEMMA3_PATTERN - 1 for i in range(cfg.n_layer)]:
            w.add_array(f"{arch}.attention.sliding_window_pattern", sliding)
    if cfg.logit_softcap is not None:
        w.add_float32(f"{arch}.final_logit_softcapping", float(cfg.logit_softcap))
    if cfg.rope_kind == "linear":
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", float(cfg.rope_scaling["factor"]))


def gguf_pre(tokenizer: Tokenizer) -> str:
    """The llama.cpp pre-tokenizer name that splits text as the tokenizer's pattern does.

    llama.cpp knows split rules by name only. GPT-4's pattern (tinygen's) has no name of its own:
    "dbrx" names GPT-4's tokenizer but merges without a whole-piece lookup, which tiktoken does
    first; "llama-bpe" (Llama 3) looks pieces up as tiktoken does, and its pattern differs from
    GPT-4's only in spelling (`\\s*[\\r\\n]+` for `\\s*[\\r\\n]`, plain for possessive quantifiers), which
    matches the same text. tinygen's GGUF reader knows it too."""
    from tinygen.formats.tokenizer_import import GGUF_PRE

    if tokenizer.pattern == GPT4_PATTERN and tokenizer.normalization is None:
        return "llama-bpe"
    for pre, (pattern, normalization, _) in GGUF_PRE.items():
        if pattern == tokenizer.pattern and normalization == tokenizer.normalization:
            return pre
    raise TinygenError(f"the tokenizer's split pattern ({tokenizer.name}) has no pre-tokenizer name that llama.cpp "
                       "and tinygen both know, so a GGUF could not split text the same way; export with --format hf")


def _add_tokenizer(w, tokenizer: Tokenizer, pre: str, vocab_size: int) -> None:
    from gguf import TokenType

    special = {i: name for name, i in tokenizer.special.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        raw = tokenizer.ranks[i] if i < len(tokenizer.ranks) else None
        if raw is not None:
            tokens.append(token_text(raw))
            types.append(TokenType.NORMAL)
        elif i in special:
            tokens.append(special[i])
            types.append(TokenType.CONTROL)
        else:  # embedding rows past the tokenizer: named as convert_hf_to_gguf.py names them
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges(tokenizer)])
    bos = bos_name(tokenizer)
    if bos is not None:
        w.add_bos_token_id(tokenizer.special[bos])
    if tokenizer.eos_id is not None:
        w.add_eos_token_id(tokenizer.eos_id)
    # Explicit, because llama.cpp's default for "llama-bpe" is to add BOS, and tinygen's models were
    # never trained on one before a plain prompt.
    w.add_add_bos_token(tokenizer.add_bos)
    w.add_add_eos_token(False)
    template = jinja_chat_template(tokenizer)
    if template is not None:
        w.add_chat_template(template)
    # The end of a chat turn (<|end|>): llama.cpp stops there too, as tinygen does.
    end_of_turn = next((i for i in tokenizer.stop_ids if i != tokenizer.eos_id), None)
    if end_of_turn is not None:
        w.add_eot_token_id(end_of_turn)


def _tensors(model):
    """(GGUF name, tensor) for every weight, q and k permuted for llama.cpp's llama rotary layout."""
    from tinygen.formats.export_hf import hf_state

    cfg = model.config
    heads = {"attn_q": cfg.n_head, "attn_k": cfg.kv_heads} if cfg.family == "llama" else {}
    layer_names = GEMMA3_LAYER if cfg.family == "gemma3" else LAYER
    for hf_name, tensor in hf_state(model, hf_gains=False).items():
        if hf_name in TOP:
            yield TOP[hf_name], tensor
            continue
        _, _, layer, rest = hf_name.split(".", 3)
        name = layer_names[rest]
        kind = name.split(".")[0]
        if kind in heads:
            tensor = _permute(tensor, heads[kind])
        yield f"blk.{layer}.{name}", tensor
    if cfg.rope_kind == "llama3":
        yield "rope_freqs.weight", _rope_freqs(cfg)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: within each head, the two rotary halves are
    interleaved (rows i and i + head_dim/2 become neighbours), as llama.cpp's rotary kernel pairs them."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_freqs(cfg) -> torch.Tensor:
    """Llama 3's rotary scaling as llama.cpp holds it: one divisor per frequency (convert_hf_to_gguf.py's
    rope_freqs), from the model's own original context."""
    inv_freq = cfg.rope_theta ** -(torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    return llama3_divisors(2 * math.pi / inv_freq, cfg.rope_scaling).float()
