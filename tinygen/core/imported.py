"""Models made elsewhere, in tinygen's terms: Hugging Face folders (GPT-2, and the Llama family
through llama.py) and llama GGUF files (through gguf_file.py). For each: what its header says
(a ModelInfo), its tokenizer, and its weights under tinygen's names. checkpoint.py dispatches here;
nothing in this module imports torch, gguf or jinja2 until a model is actually loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from tinygen.core import llama  # plain Python, no torch: cheap to import here
from tinygen.core.checkpoint import (
    HF_CONV1D,
    HF_WEIGHTS,
    ModelInfo,
    _build,
    _config,
    _one_line,
    _read_header,
    load_tokenizer,
)
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError

HF_SHARDS = "model.safetensors.index.json"


def _read_json(path: Path, what: str):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as e:
        raise TinygenError(f"{path} is not valid JSON: {_one_line(e)}") from e
    if not isinstance(data, dict):
        raise TinygenError(f"{path} is not a JSON object, so not {what}")
    return data


def read_hf_info(path: Path) -> ModelInfo:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise TinygenError(f"{path} is a folder without config.json: not a tinygen file or a Hugging Face model folder")
    hf = _read_json(cfg_path, "a Hugging Face config")
    if hf.get("model_type") in llama.SUPPORTED:
        return _read_llama_info(path, hf)
    if not (path / HF_WEIGHTS).exists():
        raise TinygenError(f"{path} has no {HF_WEIGHTS}; tinygen loads safetensors weights only (never pickle)")
    if hf.get("model_type") != "gpt2":
        raise TinygenError(f"{path} holds a {hf.get('model_type')!r} model; tinygen loads gpt2 and the Llama family "
                           f"({', '.join(llama.SUPPORTED)})")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise TinygenError(f"{path}: activation {hf['activation_function']!r} is not supported (GPT-2 uses gelu_new)")
    try:
        fields = {"n_layer": hf["n_layer"], "n_head": hf["n_head"], "n_embd": hf["n_embd"],
                  "block_size": hf.get("n_positions", hf.get("n_ctx", 1024)), "vocab_size": hf["vocab_size"],
                  "arch": "gpt2", "norm_eps": hf.get("layer_norm_epsilon", 1e-5)}
    except KeyError as e:
        raise TinygenError(f"{cfg_path} has no {e.args[0]!r}; it is not a complete GPT-2 config") from None
    config = _config(fields, cfg_path)
    _, tensors = _read_header(path / HF_WEIGHTS)
    weights = {k: v for k, v in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    return ModelInfo(
        path=path,
        kind="gpt2",
        config=config,
        tokenizer_data=None,
        provenance={"source": "Hugging Face GPT-2 folder"},
        file_size=sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        tensors=weights,
    )


def is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def read_gguf_info(path: Path) -> ModelInfo:
    """A GGUF's header: its config, tokenizer fields and each tensor's storage type."""
    from tinygen.core.gguf_file import read_gguf_header

    header = read_gguf_header(path)
    return gguf_info(path, header.config, header.fields, header.tensors)


def gguf_tokenizer(info: ModelInfo) -> Tokenizer:
    from tinygen.core.tokenizer_import import tokenizer_from_gguf

    try:
        return tokenizer_from_gguf(info.tokenizer_data)
    except TinygenError as e:
        raise TinygenError(f"{info.path}: {e}") from None


def gguf_info(path: Path, hf: dict, fields: dict, tensors: dict) -> ModelInfo:
    config, notes = llama.config_from_hf(hf, path.name)
    name = fields.get("general.name")
    return ModelInfo(
        path=path,
        kind="gguf",
        config=config,
        tokenizer_data={k: v for k, v in fields.items() if k.startswith("tokenizer.")},
        provenance={"source": "GGUF file", **({"name": name} if isinstance(name, str) else {})},
        file_size=path.stat().st_size,
        tensors=tensors,
        notes=tuple(notes),
    )


def _read_llama_info(path: Path, hf: dict) -> ModelInfo:
    config, notes = llama.config_from_hf(hf, str(path / "config.json"))
    if (path / HF_WEIGHTS).exists():
        shards = (path / HF_WEIGHTS,)
    elif (path / HF_SHARDS).exists():
        index = _read_json(path / HF_SHARDS, "a safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise TinygenError(f"{path / HF_SHARDS} has no weight_map of tensor names to files")
        shards = tuple(path / f for f in sorted(set(weight_map.values())))
        if lost := next((f for f in shards if f.parent != path or not f.is_file()), None):
            raise TinygenError(f"{path / HF_SHARDS} names {lost.name}, which is not a file in {path}")
    else:
        raise TinygenError(f"{path} has no {HF_WEIGHTS} (or {HF_SHARDS}); tinygen loads safetensors weights only "
                           f"(never pickle)")
    tensors = {}
    for shard in shards:
        tensors.update(_read_header(shard)[1])
    return ModelInfo(
        path=path,
        kind="llama",
        config=config,
        tokenizer_data=None,
        provenance={"source": f"Hugging Face {hf['model_type']} folder"},
        file_size=sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        tensors={k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")},
        shards=shards if len(shards) > 1 else (),
        notes=tuple(notes),
    )


def hf_tokenizer(path: Path) -> Tokenizer:
    """A Hugging Face folder's tokenizer.json, with tokenizer_config.json's special tokens and chat
    template."""
    if not (path / "tokenizer.json").exists():
        raise TinygenError(f"{path} has no tokenizer.json; tinygen reads fast (byte-level BPE) tokenizers only")
    from tinygen.core.tokenizer_import import tokenizer_from_hf

    config_path = path / "tokenizer_config.json"
    config = _read_json(config_path, "a tokenizer config") if config_path.exists() else None
    jinja = path / "chat_template.jinja"  # where newer transformers save the template
    if jinja.exists() and not (config or {}).get("chat_template"):
        config = {**(config or {}), "chat_template": jinja.read_text(encoding="utf-8")}
    try:
        return tokenizer_from_hf(_read_json(path / "tokenizer.json", "a tokenizer"), config)
    except TinygenError as e:
        raise TinygenError(f"{path}: {e}") from None


def load_gguf(path: Path, device, dtype, keep_q4: bool = False):
    """A GGUF, dequantized (gguf_file.py) into a float model: one read of the file serves the
    config, the tokenizer and the weights. With keep_q4 the model also holds the file's Q4_0/Q4_1
    matrices as stored, by module name (model.file_q4), for quantize's int4 path to take as they are."""
    import torch

    from tinygen.core.gguf_file import Q4Weight, read_gguf

    gguf = read_gguf(path, dtype=dtype or torch.float32, keep_q4=keep_q4)
    shapes = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in gguf.tensors.items()}
    info = gguf_info(path, gguf.config, gguf.fields, shapes)
    info.notes = (*info.notes, gguf.report.summary())
    tokenizer = load_tokenizer(info=info)
    state = llama.state_from_hf(gguf.tensors, info.config, path.name)
    net = _build(info, tokenizer, {k: v.to(device) for k, v in state.items()}, device, dtype)
    if keep_q4:
        stored = {}
        for ours, parts in llama.hf_names(info.config).items():
            if ours.endswith(".weight") and all(p in gguf.q4 for p in parts):  # q, k and v fuse as rows
                w = [gguf.q4[p] for p in parts]
                stored[ours.removesuffix(".weight")] = Q4Weight(*(torch.cat(x) for x in zip(
                    *((p.q, p.scales, p.lows.float()) for p in w))))
        if info.config.tie_embeddings and "transformer.wte" in stored:
            stored["lm_head"] = stored.pop("transformer.wte")  # the tied head is the embedding, read as a matrix
        net.file_q4 = stored
    return net, tokenizer, info


def from_hf_gpt2(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        name = key.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers and the tied head
        if name.endswith(HF_CONV1D):
            value = value.t().contiguous()
        out["transformer." + name] = value
    return out
