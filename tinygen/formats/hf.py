"""Hugging Face model folders (GPT-2, and the Llama family and Gemma 3 through llama.py) in tinygen's terms:
what the folder's header says (a ModelInfo), its tokenizer, and its weights under tinygen's names.
core/checkpoint.py hands a folder here through the ModelFormat this module registers (FORMAT);
nothing here imports torch until a model is actually loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from tinygen.core.checkpoint import (
    ModelFormat,
    ModelInfo,
    build_model,
    config_from_fields,
    load_tokenizer,
    load_weights,
    read_safetensors_header,
)
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError, one_line
from tinygen.formats import llama  # plain Python, no torch: cheap to import here
from tinygen.formats.chat_templates import known_template

HF_WEIGHTS = "model.safetensors"
HF_SHARDS = "model.safetensors.index.json"
# GPT-2 stores these as Conv1D, whose weight is (in, out): the transpose of nn.Linear's.
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _read_json(path: Path, what: str):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as e:
        raise TinygenError(f"{path} is not valid JSON: {one_line(e)}") from e
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
        raise TinygenError(f"{path} holds a {hf.get('model_type')!r} model; tinygen loads gpt2, the Llama family "
                           f"and Gemma 3 ({', '.join(llama.SUPPORTED)})")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise TinygenError(f"{path}: activation {hf['activation_function']!r} is not supported (GPT-2 uses gelu_new)")
    try:
        fields = {"n_layer": hf["n_layer"], "n_head": hf["n_head"], "n_embd": hf["n_embd"],
                  "block_size": hf.get("n_positions", hf.get("n_ctx", 1024)), "vocab_size": hf["vocab_size"],
                  "arch": "gpt2", "norm_eps": hf.get("layer_norm_epsilon", 1e-5)}
    except KeyError as e:
        raise TinygenError(f"{cfg_path} has no {e.args[0]!r}; it is not a complete GPT-2 config") from None
    config = config_from_fields(fields, cfg_path)
    _, tensors = read_safetensors_header(path / HF_WEIGHTS)
    weights = {k: v for k, v in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    return ModelInfo(
        path=path,
        kind="gpt2",
        config=config,
        tokenizer_data=None,
        provenance={"source": "Hugging Face GPT-2 folder"},
        file_size=sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        tensors=weights,
        weight_files=(path / HF_WEIGHTS,),
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
        tensors.update(read_safetensors_header(shard)[1])
    return ModelInfo(
        path=path,
        kind="llama",
        config=config,
        tokenizer_data=None,
        provenance={"source": f"Hugging Face {hf['model_type']} folder"},
        file_size=sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        tensors={k: v for k, v in llama.text_weights(tensors).items() if not k.endswith("rotary_emb.inv_freq")},
        weight_files=shards,
        notes=tuple(notes),
    )


def load_hf_tokenizer(info: ModelInfo) -> Tokenizer:
    """A folder's tokenizer: tokenizer.json where there is one (a Llama-family folder, or what `tinygen
    export --format hf` writes for a gpt2 model, whose own split pattern vocab.json + merges.txt could
    not carry), else GPT-2's vocab.json + merges.txt."""
    if info.kind == "gpt2" and not (info.path / "tokenizer.json").exists():
        vocab, merges = info.path / "vocab.json", info.path / "merges.txt"
        if not (vocab.exists() and merges.exists()):
            raise TinygenError(f"{info.path} has no vocab.json + merges.txt, so its tokenizer is unknown")
        return Tokenizer.from_gpt2_files(vocab, merges)
    tokenizer = hf_tokenizer(info.path)
    # A tuned Gemma 3 folder without a template still chats in its own, as a GGUF of it does (gguf_model.py).
    if tokenizer.jinja_template is None and \
            (known := known_template(info.config.family, tokenizer.special, (info.path.resolve().name,))):
        tokenizer.jinja_template = known.source
        info.notes = tuple(dict.fromkeys((*info.notes, known.note)))
    return tokenizer


def load_hf(path: Path, device, dtype):
    """(model, tokenizer, info) from a Hugging Face folder, as core's load_model gives them."""
    info = read_hf_info(path)
    tokenizer = load_tokenizer(info=info)
    state = load_weights(info, device)
    if info.kind == "gpt2":
        return build_model(info, from_hf_gpt2(state), device, dtype), tokenizer, info
    state = llama.text_weights(state)
    if info.config.family == "gemma3":
        state = llama.gemma_gains(state, 1.0)
    state = llama.state_from_hf(state, info.config, str(info.path))
    return build_model(info, state, device, dtype), tokenizer, info


def hf_tokenizer(path: Path) -> Tokenizer:
    """A Hugging Face folder's tokenizer.json (or, without one, a SentencePiece tokenizer.model), with
    tokenizer_config.json's special tokens and chat template."""
    from tinygen.formats.spm_import import spm_from_model_proto
    from tinygen.formats.tokenizer_import import tokenizer_from_hf

    proto = path / "tokenizer.model"
    if not (path / "tokenizer.json").exists() and not proto.exists():
        raise TinygenError(f"{path} has neither tokenizer.json nor tokenizer.model, so its tokenizer is unknown")
    config_path = path / "tokenizer_config.json"
    config = _read_json(config_path, "a tokenizer config") if config_path.exists() else None
    jinja = path / "chat_template.jinja"  # where newer transformers save the template
    if jinja.exists() and not (config or {}).get("chat_template"):
        config = {**(config or {}), "chat_template": jinja.read_text(encoding="utf-8")}
    try:
        if not (path / "tokenizer.json").exists():
            return spm_from_model_proto(proto.read_bytes(), config, where=str(proto))
        return tokenizer_from_hf(_read_json(path / "tokenizer.json", "a tokenizer"), config)
    except TinygenError as e:
        raise TinygenError(f"{path}: {e}") from None


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


FORMAT = ModelFormat(kinds=("gpt2", "llama"), claims=Path.is_dir, read_info=read_hf_info,
                     load_tokenizer=load_hf_tokenizer, load=load_hf)
