"""What a loaded model becomes before it decodes, decided in one place (prepare).

From the model's device and dtype, --quantize and --compile, each linear layer becomes int4 or
int8 codes (quantize.py), a split or fused product for CPU decode steps (fastlinear.py), or stays
as it is; --compile adds a compiled batch-1 step (compiled.py). A GGUF's 4-bit matrices run as the
file stores them (ModelInfo.stored_q4, read here and nowhere else). The caller's model is left as
it was: the prepared one shares its parameters and holds layers of its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from tinygen.core.model import GPT
from tinygen.core.quantized import Q4_BLOCK, Q4Weight
from tinygen.errors import TinygenError
from tinygen.generate.compiled import StaticDecoder
from tinygen.generate.fastlinear import SmallLinear, SplitLinear
from tinygen.generate.quantize import INT4_GROUPS, MODES, Int4Linear, Int8Linear

# Below this many weights, one matmul call is as fast as any split (the matrix sits in cache).
SPLIT_MIN_WEIGHTS = 1 << 18


@dataclass
class Prepared:
    model: GPT  # the caller's parameters, in layers of its own
    decoder: StaticDecoder | None  # the compiled batch-1 decode step with --compile, not yet warmed up


def cpu_only(quantize: str | None) -> str | None:
    """The part of a plan that runs on the CPU only (a flag, for the message), or None."""
    return f"--quantize {quantize}" if quantize else None


def prepare(model: GPT, quantize: str | None = None, compile: bool = False,
            stored_q4: dict[str, Callable[[], Q4Weight]] | None = None) -> Prepared:
    """The model's decoding form. stored_q4: the loader's 4-bit matrices as the file stores them, by
    module name (ModelInfo.stored_q4); int4 in the file's own groups of 32 takes them as they are."""
    if quantize is not None:
        if quantize not in MODES:
            raise TinygenError(f"unknown quantisation {quantize!r}; choose from {', '.join(MODES)}")
        if model.device.type != "cpu":
            raise TinygenError(f"--quantize {quantize} is for CPUs; on a GPU, bf16 weights (the default there) are "
                               "faster")
        if model.dtype != torch.float32:
            raise TinygenError(f"--quantize {quantize} starts from float32 weights; drop --dtype")
    group = INT4_GROUPS.get(quantize)
    # A file's own blocks only in its own groups; else every matrix is quantised from its float values.
    stored = stored_q4 if stored_q4 and group == Q4_BLOCK else None
    prepared = _own_layers(model)
    fuse = compile and prepared.device.type == "cpu"
    linears = [(f"{prefix}.{name}".lstrip("."), parent, name, child) for prefix, parent in prepared.named_modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for path, parent, name, linear in linears:
        layer = _decoding_layer(path, linear, quantize, group, stored, fuse)
        if layer is not linear:
            setattr(parent, name, layer)
    prepared.eval()
    return Prepared(prepared, StaticDecoder(prepared) if compile else None)


def _decoding_layer(path: str, linear: nn.Linear, quantize: str | None, group: int | None,
                    stored: dict | None, fuse: bool) -> nn.Module:
    if group and Int4Linear.fits(linear.out_features, linear.in_features, group):
        if stored is None:
            return Int4Linear.from_linear(linear, group)
        if path in stored:
            w = stored[path]()
            return Int4Linear(w.q, w.scales, w.lows, linear.bias)
        # Otherwise the file kept this matrix at 8 bits or more (SmolLM2's Q8_0 head): float32 holds
        # those values exactly, and requantized to int8 rows its greedy text drifted from the file's.
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
