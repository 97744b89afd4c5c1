"""Weight-only quantisation, int8 and int4, for decoding on a CPU, where a token's speed is set by the
bytes of weights it reads; plan.py decides which layer becomes which.

int8: one float scale per output row (symmetric absmax), through `_weight_int8pack_mm`, which takes
bf16 activations and applies the scales, so no full float matrix is made. int4: 4-bit codes in groups
of 32 inputs (or 64, 128, 256) with a scale and a zero point, through `_weight_int4pack_mm_for_cpu`:
llama.cpp's Q4_1 layout (and Q4_0's and Q4_K's), so a GGUF's 4-bit matrices go in as stored
(core/quantized.Q4Weight). The embedding stays float (a lookup reads one row); a tied output head gets
its own int8 copy. `tinygen eval --quantize int8` scores the accuracy cost through these modules.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tinygen.core.quantized import Q4Weight

# --quantize's values: int4 alone has groups of 32 inputs, a GGUF Q4 block.
INT4_GROUPS = {"int4": 32, "int4-g64": 64, "int4-g128": 128, "int4-g256": 256}
MODES = ("int8", *INT4_GROUPS)


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 rows and a scale per row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        # The kernel wants the scales in the activations' dtype.
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 activations take a slow generic path in the kernel; bf16 ones the vectorised one.
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


# Rows packed at a time: the packing op takes int32 codes, four bytes a weight, which for a large
# head would be gigabytes at once. A multiple of every CPU build's row block (32 or 64 rows).
PACK_ROWS = 1024


# The packing kernel takes rows in multiples of 16: a matrix of another height (a vocabulary of
# 50257) is packed with zero rows added, whose outputs are cut off.
ROW_MULTIPLE = 16


def padded_rows(t: torch.Tensor) -> torch.Tensor:
    """t with zero rows added up to a multiple of ROW_MULTIPLE."""
    extra = -t.size(0) % ROW_MULTIPLE
    return torch.cat((t, t.new_zeros(extra, *t.shape[1:]))) if extra else t


def pack_int4(q: torch.Tensor, codes=None) -> torch.Tensor:
    """Codes 0..15 (out, in) in the int4 kernel's packed layout (half a byte a weight). codes(rows,
    at) makes a slice `at` of rows of q into such codes, where q holds something else (int8 blocks)."""
    packed = None
    for start in range(0, q.size(0), PACK_ROWS):
        at = slice(start, start + PACK_ROWS)
        rows = q[at].to(torch.int32) if codes is None else codes(q[at], at)
        chunk = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows, 1)
        if packed is None:
            packed = chunk.new_empty(q.size(0), *chunk.shape[1:])
        packed[at] = chunk
    return packed


def pack_chunks(chunks: Iterable, rows: int, pack) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix's kernel form (packed codes, and the (groups, out, 2) scale and zero table) built a
    run of rows at a time, so that no more of it than a run is ever decoded at once. pack(chunk)
    gives a run's packed codes and table over its rows padded to ROW_MULTIPLE; every run but the
    last holds a multiple of PACK_ROWS rows, so the runs' packings join as the whole one would be."""
    packed = table = None
    start = 0
    for chunk in chunks:
        codes, scales = pack(chunk)
        if packed is None:
            height = rows + -rows % ROW_MULTIPLE
            packed = codes.new_empty(height, *codes.shape[1:])
            table = scales.new_empty(scales.size(0), height, 2)
        packed[start:start + codes.size(0)] = codes
        table[:, start:start + codes.size(0)] = scales
        start += codes.size(0)
    return packed, table


def min_max_codes(weight: torch.Tensor, group: int) -> Q4Weight:
    """Asymmetric min-max codes per group: a group's smallest and largest weights are exact."""
    w = weight.detach().float()
    groups = w.reshape(w.size(0), -1, group)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).reshape(w.shape)
    return Q4Weight(q.to(torch.uint8), scales, low)


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The int4 kernel's (groups, out, 2) table from per-row (out, groups) scales and zero points."""
    return torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


class Int4Linear(nn.Module):
    """y = x Wᵀ + b with W as 4-bit codes q, and w = q * scale + low over each group of inputs.

    Every product reads the codes (an eighth of float32's bytes), decode steps and prefills alike,
    so no float copy of the matrix is kept; activations and scales go in as bf16, as with float32
    ones the kernel falls back to a far slower generic path (the int8 kernel too)."""

    def __init__(self, w: Q4Weight | Iterable[Q4Weight], bias: torch.Tensor | None = None, rows: int | None = None):
        """w: the weights, or runs of their rows (rows of them in all) for pack_chunks."""
        super().__init__()
        chunks = [w] if isinstance(w, Q4Weight) else w
        packed, table = pack_chunks(chunks, w.q.size(0) if isinstance(w, Q4Weight) else rows, self._pack)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", table)
        self.out_features = w.q.size(0) if isinstance(w, Q4Weight) else rows
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _pack(self, w: Q4Weight) -> tuple[torch.Tensor, torch.Tensor]:
        self.in_features = w.q.size(1)
        self.group = self.in_features // w.scales.size(1)
        # The kernel computes (q - 8) * scale + zero, codes centred on 8, so zero = low + 8 * scale.
        scales, lows = padded_rows(w.scales.float()), padded_rows(w.lows.float())
        return pack_int4(padded_rows(w.q)), scales_and_zeros(scales, lows + 8 * scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int) -> Int4Linear:
        return cls(min_max_codes(linear.weight, group), linear.bias)

    @staticmethod
    def fits(in_features: int, group: int) -> bool:
        return in_features % group == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_zeros).to(x.dtype)
        if y.size(-1) != self.out_features:
            y = y[:, :self.out_features]
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
