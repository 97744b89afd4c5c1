"""GGUF model files (llama.cpp's and ollama's) in tinygen's terms: what the header says (a
ModelInfo), the tokenizer from its metadata, and a float model from its tensors (gguf_reader.py),
with the matrices it stores as 4-bit blocks offered to the decode plan as stored. core/checkpoint.py
hands a GGUF here through the ModelFormat this module registers (FORMAT).
"""

from __future__ import annotations

import functools
from pathlib import Path

from tinygen.core.checkpoint import ModelFormat, ModelInfo, build_model, load_tokenizer
from tinygen.core.quantized import Q4Weight
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError
from tinygen.formats import llama


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
    from tinygen.formats.gguf_reader import read_gguf_header

    header = read_gguf_header(path)
    return gguf_info(path, header.config, header.fields, header.tensors)


def gguf_tokenizer(info: ModelInfo) -> Tokenizer:
    from tinygen.formats.tokenizer_import import tokenizer_from_gguf

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


def load_gguf(path: Path, device, dtype):
    """A GGUF, dequantized into a float model: one read of the file serves the config, the tokenizer
    and the weights. info.stored_q4 names the model's matrices that the file holds as Q4_0/Q4_1
    blocks, each read as stored when the decode plan asks for it."""
    import torch

    from tinygen.formats.gguf_reader import read_gguf

    gguf = read_gguf(path, dtype=dtype or torch.float32)
    shapes = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in gguf.tensors.items()}
    info = gguf_info(path, gguf.config, gguf.fields, shapes)
    info.notes = (*info.notes, gguf.report.summary())
    tokenizer = load_tokenizer(info=info)
    state = llama.state_from_hf(gguf.tensors, info.config, path.name)
    net = build_model(info, {k: v.to(device) for k, v in state.items()}, device, dtype)
    stored = {}
    for ours, parts in llama.hf_names(info.config).items():
        if ours.endswith(".weight") and all(p in gguf.q4 for p in parts):
            stored[ours.removesuffix(".weight")] = functools.partial(_fused_q4, [gguf.q4[p] for p in parts])
    if info.config.tie_embeddings and "transformer.wte" in stored:
        stored["lm_head"] = stored.pop("transformer.wte")  # the tied head is the embedding, read as a matrix
    info.stored_q4 = stored
    return net, tokenizer, info


def _fused_q4(parts) -> Q4Weight:
    """One of our matrices from the file's stored pieces: q, k and v fuse as rows."""
    import torch

    if len(parts) == 1:
        return parts[0]()
    pieces = [read() for read in parts]
    return Q4Weight(*(torch.cat(x) for x in zip(*((p.q, p.scales, p.lows.float()) for p in pieces))))


FORMAT = ModelFormat(kinds=("gguf",), claims=lambda path: path.is_file() and is_gguf(path),
                     read_info=read_gguf_info, load_tokenizer=gguf_tokenizer, load=load_gguf)
