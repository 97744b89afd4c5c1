"""Model files the tests build for themselves, so that a fresh clone covers every loader without
../shared: tokenizer files in GPT-2's byte spelling (vocab.json + merges.txt, a GGUF's tokenizer
metadata) made from a tokenizer trained in-process, random Llama-family models of transformers' own
classes, and small llama-family GGUFs written with gguf's own writer, in any tensor type gguf can
dequantize.

gguf and transformers are imported inside the functions that use them, so that conftest can import
this module cheaply.
"""

from __future__ import annotations

import json
from functools import cache
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from tinygen.core.tokenizer import EOT, unicode_to_byte

# -- tokenizers in GPT-2's byte spelling -----------------------------------------------------------


@cache
def _spelling() -> list[str]:
    return [ch for ch, _ in sorted(unicode_to_byte().items(), key=lambda item: item[1])]


def spell(token: bytes) -> str:
    """A token as vocab.json, merges.txt, tokenizer.json and GGUF token lists write it."""
    spelling = _spelling()
    return "".join(spelling[b] for b in token)


def bpe_merges(ranks: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The merge that makes each multi-byte token, in rank order: the token's own bytes merged by the
    ranks below it until two parts are left (how a tiktoken vocabulary becomes a merges.txt)."""
    rank = {token: i for i, token in enumerate(ranks)}
    merges = []
    for i, token in enumerate(ranks):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best, j = min((rank.get(a + b, len(ranks)), j) for j, (a, b) in enumerate(pairwise(parts)))
            assert best < i, f"token {i} ({token!r}) is not made by merging tokens of lower rank"
            parts[j:j + 2] = [parts[j] + parts[j + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def with_byte_pairs(ranks: list[bytes], n: int) -> list[bytes]:
    """`ranks` padded to n tokens with two-byte ones, pairs of ASCII bytes first: a vocabulary as
    large as a real one (GPT-2 has 50,256 tokens besides <|endoftext|>), in which any two
    neighbouring characters of plain text merge unless the split pattern keeps them apart."""
    have = set(ranks)
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)]
    pairs.sort(key=lambda p: max(p) >= 128)  # stable: ASCII pairs first, each group in byte order
    return ranks + [p for p in pairs if p not in have][:n - len(ranks)]


def write_gpt2_files(folder: Path, ranks: list[bytes]) -> Path:
    """vocab.json + merges.txt, as GPT-2's are written: the ranks' tokens, then <|endoftext|>."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {spell(token): i for i, token in enumerate(ranks)} | {EOT: len(ranks)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "".join(f"{spell(a)} {spell(b)}\n" for a, b in bpe_merges(ranks))
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    return folder


def gguf_tokenizer_fields(ranks: list[bytes], special: list[str], pre: str = "gpt-2", **more) -> dict:
    """A GGUF's tokenizer metadata, as llama.cpp's converter writes a byte-level BPE: the ranks'
    tokens, then the special tokens (control tokens, type 3); the first special token is BOS and EOS.
    `more` adds tokenizer.* keys by their last part (chat_template=...); there is no chat template
    unless it is given."""
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [spell(token) for token in ranks] + list(special),
        "tokenizer.ggml.token_type": [1] * len(ranks) + [3] * len(special),
        "tokenizer.ggml.merges": [f"{spell(a)} {spell(b)}" for a, b in bpe_merges(ranks)],
        "tokenizer.ggml.bos_token_id": len(ranks), "tokenizer.ggml.eos_token_id": len(ranks),
        "tokenizer.chat_template": None,
        **{f"tokenizer.{key}": value for key, value in more.items()},
    }


# -- Hugging Face models -----------------------------------------------------------------------------

TRANSFORMERS_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
                        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def transformers_llama(kind: str, config: dict, seed: int = 0):
    """A random Llama-family model (a model_type of TRANSFORMERS_CLASSES) of transformers' own class,
    in eval mode."""
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in TRANSFORMERS_CLASSES[kind])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config))
    with torch.no_grad():  # random biases and norms too, or one mapped wrongly would go unseen
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5, 0.2)
    return model.eval()


# -- GGUF files, as llama.cpp's convert_hf_to_gguf.py writes them ----------------------------------

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}


def tiny_llama(n_layer=2, d=64, n_head=4, n_kv=2, ff=128, vocab=96, tied=True, bias=False, qk_norm=False, seed=0):
    """A Hugging Face Llama config and random state dict, small enough to write in milliseconds.
    qk_norm adds Qwen3's RMSNorm weights on each query and key head."""
    g = torch.Generator().manual_seed(seed)
    hd = d // n_head
    config = {"hidden_size": d, "intermediate_size": ff, "num_hidden_layers": n_layer,
              "num_attention_heads": n_head, "num_key_value_heads": n_kv, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 256, "vocab_size": vocab,
              "tie_word_embeddings": tied}
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (n_head * hd, d), p + "self_attn.k_proj.weight": (n_kv * hd, d),
                       p + "self_attn.v_proj.weight": (n_kv * hd, d), p + "self_attn.o_proj.weight": (d, n_head * hd),
                       p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                       p + "mlp.down_proj.weight": (d, ff)})
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (n_head * hd,), p + "self_attn.k_proj.bias": (n_kv * hd,),
                           p + "self_attn.v_proj.bias": (n_kv * hd,)})
        if qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    state = {k: torch.randn(s, generator=g) * (0.02 if len(s) == 2 else 1.0) for k, s in shapes.items()}
    return config, state


def convert_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' LlamaTensorProcessor._reverse_permute_weights, an implementation apart from ours."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    _, _, i, *rest = hf.split(".")
    module, suffix = ".".join(rest[:-1]), rest[-1]
    return f"blk.{i}.{LAYER_HF_TO_GGUF[module]}.{suffix}"


def stored(hf: str, w: torch.Tensor, config: dict, arch: str = "llama") -> np.ndarray:
    """The float32 array convert_hf_to_gguf.py would store for a Hugging Face weight: llama's q and k
    rows permuted for its rotary layout (qwen3's are stored as they are)."""
    w = w.numpy()
    if arch == "llama" and ".q_proj." in hf:
        return convert_permute(w, config["num_attention_heads"])
    if arch == "llama" and ".k_proj." in hf:
        return convert_permute(w, config["num_key_value_heads"])
    return w


@cache
def _block_pool(qtype) -> np.ndarray:
    """256 blocks of qtype from random bytes that dequantize to finite values of at most 1 in size:
    random scale bits alone would give NaNs and numbers in the thousands."""
    import gguf

    _, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    pool = np.empty((0, size), np.uint8)
    while len(pool) < 256:
        raw = rng.integers(0, 256, (8192, size), dtype=np.uint8)
        with np.errstate(all="ignore"):
            biggest = np.abs(gguf.quants.dequantize(raw, qtype)).max(axis=1)
        pool = np.concatenate([pool, raw[(biggest <= 1) & (biggest >= 1e-3)]])  # NaN passes neither
    return pool


def random_blocks(qtype, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A (rows, cols) matrix in a type gguf cannot quantize (k-quants, i-quants): blocks drawn at
    random from _block_pool."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    pool = _block_pool(qtype)
    rows, cols = shape
    picks = np.random.default_rng(seed).integers(0, len(pool), rows * cols // block)
    return pool[picks].reshape(rows, cols // block * size)


def encode(data: np.ndarray, qtype, seed: int = 0) -> np.ndarray:
    """A float32 matrix as a GGUF stores it in qtype: quantized by gguf where gguf can; otherwise
    random_blocks, which stand in for it (the file then holds other weights than `data`)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    try:
        return gguf.quants.quantize(data, qtype)
    except NotImplementedError:
        return random_blocks(qtype, data.shape, seed)


def write_gguf(path: Path, config: dict, state: dict, qtype=None, arch="llama", meta=None, drop=(), extra=None,
               quiet_ids=(), types=None):
    """A llama (or qwen3) GGUF of `state`: matrices in `qtype` (default F32, see encode), vectors in
    F32, as llama.cpp writes them; `types` gives some kinds of matrix a type of their own, by their
    GGUF name's last part ({"attn_v": Q8_0, "ffn_down": Q6_K, "token_embd": ...}), as a Q4_K_M file mixes them. `meta` adds or overrides metadata keys (None leaves one out);
    `extra` adds tensors, as arrays or (bytes array, GGUF type). The output head's rows for
    `quiet_ids` (the embedding's, when tied) are stored as zeros, so that greedy decoding never
    picks those tokens: their logit is 0, far below the top one."""
    import gguf

    keys = {
        "block_count": config["num_hidden_layers"], "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"], "feed_forward_length": config["intermediate_size"],
        "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config["num_key_value_heads"],
        "attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        "rope.freq_base": float(config["rope_theta"]), "vocab_size": config["vocab_size"],
        "rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
    }
    keys = {
        **{f"{arch}.{key}": value for key, value in keys.items()},
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(config["vocab_size"])],
        "tokenizer.ggml.merges": ["t 1", "t 2"], "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.chat_template": "{{ messages }}",
        **(meta or {}),
    }
    head = "model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"
    w = gguf.GGUFWriter(path, arch)
    for key, value in keys.items():
        if value is None:
            continue
        add = {str: w.add_string, bool: w.add_bool, float: w.add_float32, int: w.add_uint32, list: w.add_array}
        add[type(value)](key, value)
    for i, (hf, tensor) in enumerate(state.items()):
        name = gguf_name(hf)
        if name in drop:
            continue
        data = stored(hf, tensor, config, arch)
        qt = (types or {}).get(name.split(".")[-2], qtype)
        qt = qt if qt is not None and data.ndim == 2 else gguf.GGMLQuantizationType.F32
        data = encode(data, qt, seed=i)
        if hf == head and quiet_ids:
            data = data.copy()
            data[list(quiet_ids)] = 0  # zero bytes dequantize to zero in every type
        w.add_tensor(name, data, raw_dtype=None if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
                     else qt)
    for name, data in (extra or {}).items():
        data, raw_dtype = data if isinstance(data, tuple) else (data, None)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
