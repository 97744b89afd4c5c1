"""GGUF model files (llama.cpp's and ollama's) in tinygen's terms: what the header says (a
ModelInfo), the tokenizer from its metadata, and a model from its tensors (gguf_reader.py): in
float, or with the matrices in a type that runs as stored (gguf_blocks.py) left as the file stores
them, for the decode plan (ModelInfo.stored). core/checkpoint.py hands a GGUF here through the
ModelFormat this module registers (FORMAT).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from tinygen.core.checkpoint import ModelFormat, ModelInfo, build_model, load_tokenizer
from tinygen.core.quantized import (
    INT4,
    INT8,
    StoredMatrix,
    StoredWeight,
    fuse_rows,
    fused_form,
)
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError
from tinygen.formats import llama
from tinygen.formats.chat_templates import known_template


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
    tokenizer_data = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    # A tuned Gemma 3 GGUF without a template still chats in its own (llama.cpp would fall back on ChatML).
    tokens = tokenizer_data.get("tokenizer.ggml.tokens")
    names = (fields.get("general.finetune"), name, path.name)
    if not tokenizer_data.get("tokenizer.chat_template") and isinstance(tokens, list) and \
            (known := known_template(config.family, tokens, names)):
        tokenizer_data["tokenizer.chat_template"] = known.source
        notes = [*notes, known.note]
    return ModelInfo(
        path=path,
        kind="gguf",
        config=config,
        tokenizer_data=tokenizer_data,
        provenance={"source": "GGUF file", **({"name": name} if isinstance(name, str) else {})},
        file_size=path.stat().st_size,
        tensors=tensors,
        notes=tuple(notes),
    )


def load_gguf(path: Path, device, dtype, as_stored: bool = False):
    """A GGUF as a model: one read of the file serves the config, the tokenizer and the weights.
    info.stored names the model's matrices that the file holds in a type that runs as stored (q, k
    and v fused when all three do), each read when the decode plan asks for it. as_stored leaves
    those matrices out of the float model (on the meta device)."""
    import torch

    from tinygen.formats.gguf_reader import read_gguf

    dtype = dtype or torch.float32
    gguf = read_gguf(path, dtype=dtype, as_stored=as_stored)
    shapes = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in gguf.tensors.items()}
    info = gguf_info(path, gguf.config, gguf.fields, shapes)
    tokenizer = load_tokenizer(info=info)
    # The vocabulary's arrays live on in the tokenizer: a loaded model does not also keep them as the
    # file's strings, a Python object each.
    info = replace(info, tokenizer_data={k: v for k, v in info.tokenizer_data.items() if not isinstance(v, list)})
    stored = {}
    for ours, parts in llama.hf_names(info.config).items():
        if ours.endswith(".weight") and all(p in gguf.stored for p in parts):
            pieces = [gguf.stored[p] for p in parts]
            stored[ours.removesuffix(".weight")] = pieces[0] if len(pieces) == 1 else StoredMatrix(
                fused_form([p.form for p in pieces]), functools.partial(_fused, [p.read for p in pieces]),
                sum(p.rows for p in pieces))
        else:  # fused with a part that runs dequantized: the whole matrix is float
            for p in parts:
                if gguf.tensors[p].is_meta:
                    gguf.tensors[p] = gguf.stored[p].read().dequantize(dtype)
                    gguf.report.kept -= 1
    if info.config.tie_embeddings and "transformer.wte" in stored:
        stored["lm_head"] = stored["transformer.wte"]  # the tied head reads the embedding's own numbers
    # The matrices left in the file go through the renaming and fusing as columnless stand-ins, since
    # torch.cat on the meta device imports Dynamo (a second and 60 MB), then take their meta shape.
    state = llama.state_from_hf({k: torch.empty(v.size(0), 0) if v.is_meta else v for k, v in gguf.tensors.items()},
                                info.config, path.name)
    for ours, parts in llama.hf_names(info.config).items():
        if all(gguf.tensors[p].is_meta for p in parts):
            state[ours] = torch.empty(state[ours].size(0), gguf.tensors[parts[0]].size(1), dtype=dtype, device="meta")
    net = build_model(info, state, device, dtype)
    info.notes = (*info.notes, gguf.report.summary())
    info.stored = stored
    info.embedding_rows = gguf.embedding_rows if as_stored else None
    return net, tokenizer, info


def load_gguf_stored(path: Path, device, dtype):
    return load_gguf(path, device, dtype, as_stored=True)


def _fused(parts) -> StoredWeight:
    """One of our matrices from the file's stored pieces: q, k and v fuse as rows, gate and up too."""
    return fuse_rows([read() for read in parts])


# How each form runs, as `tinygen info` says it.
RUNS = {INT4: "as stored (4-bit blocks)", INT8: "as stored (int8 blocks)"}
FLOATS = {"F32": "float32", "F16": "converted to float32", "BF16": "converted to float32"}


def how_types_run(info: ModelInfo) -> dict[str, list[str]]:
    """For `tinygen info`: how each tensor type of a GGUF runs by default on a CPU, as load_gguf and
    the decode plan take it (a fused matrix runs in its parts' widest common form), from the header."""
    from tinygen.formats.gguf_blocks import stored_form

    runs: dict[str, dict[str, None]] = {}
    for ours, parts in llama.hf_names(info.config).items():
        found = [info.tensors[p] for p in parts if p in info.tensors]
        if not found:
            continue
        forms = [stored_form(kind) for _, kind in found]
        matrix = all(len(shape) == 2 for shape, _ in found) and all(forms)
        for _, kind in found:
            how = RUNS[fused_form(forms)] if matrix else FLOATS.get(kind, "dequantized to float32")
            if ours == "transformer.wte.weight":
                how = "embedding rows read from the file" if matrix else f"embedding {how}"
                if info.config.tie_embeddings and matrix:
                    how += f", output head {RUNS[fused_form(forms)]}"
            runs.setdefault(kind, {})[how] = None
    return {kind: list(hows) for kind, hows in runs.items()}


FORMAT = ModelFormat(kinds=("gguf",), claims=lambda path: path.is_file() and is_gguf(path),
                     read_info=read_gguf_info, load_tokenizer=gguf_tokenizer, load=load_gguf,
                     load_stored=load_gguf_stored)
