"""What a loaded model becomes before it decodes, decided in one place (prepare).

A model loaded as stored (a quantized GGUF on a CPU, by default) holds its quantized matrices on the
meta device: each becomes the layer that runs the file's own numbers (ModelInfo.stored, read here
and nowhere else): the native block products (blockquant.BlockLinear) where this machine built them,
else torch's int4 kernel (quantize.Int4Linear, blockquant.Int8BlockLinear); its RMSNorms become
native ones too, and then each block a NativeBlock, whose decode step is one native call; an
embedding left in the file reads its rows from there.
For float weights, from the model's device and dtype, --quantize and --compile, each linear layer
becomes int4 or int8 codes (quantize.py), a split or fused product for CPU decode steps
(fastlinear.py), or stays as it is; --compile adds a compiled batch-1 step (compiled.py). The
caller's model is left as it was: the prepared one shares its parameters and holds layers of its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tinygen.core.memory import return_freed_memory
from tinygen.core.model import GPT
from tinygen.core.quantized import (
    INT4,
    Q4_BLOCK,
    StoredMatrix,
)
from tinygen.errors import TinygenError
from tinygen.generate import native
from tinygen.generate.blockquant import (
    BlockLinear,
    Int8BlockLinear,
    NativeRMSNorm,
    RowsEmbedding,
    UnfitBlocks,
)
from tinygen.generate.compiled import StaticDecoder
from tinygen.generate.fastlinear import SmallLinear, SplitLinear
from tinygen.generate.nativeblock import NativeBlock
from tinygen.generate.quantize import INT4_GROUPS, MODES, Int4Linear, Int8Linear

# Below this many weights, one matmul call is as fast as any split (the matrix sits in cache).
SPLIT_MIN_WEIGHTS = 1 << 18
# Rows of a stored matrix decoded at a time (where the file allows): a large head's decoded codes
# never exist whole beside its packed ones. A multiple of quantize.PACK_ROWS.
STORED_CHUNK_ROWS = 8192


@dataclass
class Prepared:
    model: GPT  # the caller's parameters, in layers of its own
    decoder: StaticDecoder | None  # the compiled batch-1 decode step with --compile, not yet warmed up


def cpu_only(quantize: str | None) -> str | None:
    """The part of a plan that runs on the CPU only (a flag, for the message), or None."""
    return f"--quantize {quantize}" if quantize else None


def prepare(model: GPT, quantize: str | None = None, compile: bool = False,
            stored: dict[str, StoredMatrix] | None = None,
            embedding_rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Prepared:
    """The model's decoding form. stored: the loader's matrices as the file stores them, by module
    name (ModelInfo.stored): a layer loaded as stored runs them, and int4 in the file's own groups of
    32 takes a float model's 4-bit ones as they are. embedding_rows: ModelInfo.embedding_rows, for an
    embedding loaded as stored."""
    device, dtype = _placement(model)
    as_stored = any(p.is_meta for p in model.parameters())
    if as_stored and device.type != "cpu":
        raise TinygenError("a model loaded as stored runs on the CPU; load it with a float --dtype for a GPU")
    if quantize is not None:
        if quantize not in MODES:
            raise TinygenError(f"unknown quantisation {quantize!r}; choose from {', '.join(MODES)}")
        if device.type != "cpu":
            raise TinygenError(f"--quantize {quantize} is for CPUs; on a GPU, bf16 weights (the default there) are "
                               "faster")
        if dtype != torch.float32:
            raise TinygenError(f"--quantize {quantize} starts from float32 weights; drop --dtype")
    group = INT4_GROUPS.get(quantize)
    stored = stored or {}
    # int4 in a file's own groups takes the file's 4-bit blocks, and leaves its wider ones in float.
    from_file = group == Q4_BLOCK and any(m.form == INT4 for m in stored.values())
    prepared = _own_layers(model)
    fuse = compile and device.type == "cpu"
    linears = [(f"{prefix}.{name}".lstrip("."), parent, name, child) for prefix, parent in prepared.named_modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for path, parent, name, linear in linears:
        if linear.weight.is_meta:
            layer = _stored_layer(_matrix(stored, path), linear.bias)
        else:
            own = stored.get(path) if from_file else None
            layer = _decoding_layer(linear, quantize, group, own if own and own.form == INT4 else None, from_file,
                                    fuse)
        if layer is not linear:
            setattr(parent, name, layer)
    wte = prepared.transformer.wte
    if wte.weight.is_meta:
        if embedding_rows is None:
            raise TinygenError("the model's embedding was left in its file, but no reader of its rows came with it")
        prepared.transformer.wte = RowsEmbedding(embedding_rows, wte.num_embeddings, wte.embedding_dim, dtype)
    if as_stored:
        if native.library() is not None:
            _native_norms(prepared)
            _native_blocks(prepared)
        return_freed_memory()
    prepared.eval()
    return Prepared(prepared, StaticDecoder(prepared) if compile else None)


def _native_norms(model: nn.Module) -> None:
    """Each float32 RMSNorm as NativeRMSNorm: a decode step runs sixty of them, where torch's CPU
    norm is several operations each."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.RMSNorm and child.weight is not None and child.weight.dtype == torch.float32:
                setattr(parent, name, NativeRMSNorm(child))


def _native_blocks(model: GPT) -> None:
    """Each block that layerstep.c computes as a NativeBlock: a decode step's layer in one call."""
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        if NativeBlock.fits(block, model.config):
            blocks[i] = NativeBlock(block, model.config)


def _placement(model: GPT) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's float weights: its final norm's, never left as stored."""
    gain = model.transformer.ln_f.weight
    return gain.device, gain.dtype


def _matrix(stored: dict[str, StoredMatrix], path: str) -> StoredMatrix:
    if path not in stored:
        raise TinygenError(f"{path} was left in its file, but no reader of it came with the model")
    return stored[path]


def _stored_layer(matrix: StoredMatrix, bias: torch.Tensor | None) -> nn.Module:
    """The layer that runs a stored matrix: the native block products where this machine built them,
    else torch's int4 kernel for 4-bit codes and the int8 blocks for wider ones."""
    if native.library() is not None:
        for narrow in (True, False):  # 5-bit codes where every run of rows allows them
            try:
                return BlockLinear(matrix.chunks(STORED_CHUNK_ROWS), matrix.form, bias, narrow)
            except UnfitBlocks:
                pass
    layer = Int4Linear if matrix.form == INT4 else Int8BlockLinear
    return layer(matrix.chunks(STORED_CHUNK_ROWS), bias, matrix.rows)


def _decoding_layer(linear: nn.Linear, quantize: str | None, group: int | None, own: StoredMatrix | None,
                    from_file: bool, fuse: bool) -> nn.Module:
    if group and Int4Linear.fits(linear.in_features, group):
        if own is not None:
            return Int4Linear(own.read(), linear.bias)
        if not from_file:
            return Int4Linear.from_linear(linear, group)
        # Otherwise the file kept this matrix at 8 bits or more (SmolLM2's Q8_0 head): float32 holds
        # those values exactly, and requantized to int4 its greedy text drifted from the file's.
    elif quantize and linear.in_features % 8 == 0:
        # The int8 kernel reads rows in runs of 8 and crashes on another width, so such a layer (only
        # odd test shapes have one) stays in float.
        return Int8Linear(linear)
    if linear.weight.device.type != "cpu":
        return linear
    if linear.weight.numel() >= SPLIT_MIN_WEIGHTS:
        split = SplitLinear(linear)
        if fuse:
            split.keep_int8_blocks()
        return split
    return SmallLinear(linear) if fuse else linear


def _own_layers(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer: layers swapped in the copy
    leave the original as it was."""
    memo = {} if memo is None else memo
    if id(module) not in memo:
        twin = memo[id(module)] = copy.copy(module)
        twin._parameters = dict(module._parameters)
        twin._buffers = dict(module._buffers)
        twin._modules = {name: None if m is None else _own_layers(m, memo) for name, m in module._modules.items()}
    return memo[id(module)]
