"""Layers that compute on a file's blocks as stored (core/quantized.py), and the embedding of a
model whose table stays in its file; plan.py decides which layer becomes one.

BlockLinear runs every stored form through the native products (native.py, blockdot.c), where
the machine can build them: 4-bit codes two a byte, or int8 codes, with a float16 scale and low per
block, against activations rounded to int8 per 32 inputs, as llama.cpp computes on a CPU.
Elsewhere the 4-bit codes go to torch's int4 kernel (quantize.Int4Linear), and the 5-, 6- and
8-bit blocks to Int8BlockLinear.

PyTorch's CPU kernels for quantized weights take 4-bit codes in groups of 32 or more inputs
(`_weight_int4pack_mm_for_cpu`) or int8 codes with one scale per row (`_weight_int8pack_mm`); none
takes int8 codes with a scale per block. So Int8BlockLinear splits each code into its two nibbles,
u = code - offset = 16 * hi + lo, and lays them out as one int4 matrix twice as wide: each group
holds a block's low nibbles, then its high nibbles, multiplied by the block's inputs and by 16
times them. One call of the int4 kernel then sums both, with the block's own scale.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from tinygen.core.quantized import (
    INT4,
    INT8,
    Int8Blocks,
    Q4Weight,
    StoredWeight,
    as_int8_blocks,
)
from tinygen.generate import native
from tinygen.generate.quantize import (
    pack_chunks,
    pack_int4,
    padded_rows,
    scales_and_zeros,
)

# Inputs a group of the int4 kernel holds: its smallest group size. A block of 16 (Q6_K) fills a
# group with its two nibbles; a block of 32 fills a group of 64.
KERNEL_GROUPS = (32, 64, 128, 256)


def nibble_layout(x: torch.Tensor, half: int, times: torch.Tensor) -> torch.Tensor:
    """x (rows, in) as the pair layout's activations (rows, 2 * in): each run of `half` inputs,
    then the same run times 16, in one broadcast product by times = (1, 16) (exact in bf16: powers
    of two; a decode step pays for each operation it runs)."""
    rows, n_in = x.shape
    return (x.view(rows, n_in // half, 1, half) * times).view(rows, 2 * n_in)


class UnfitBlocks(ValueError):
    """Weights in a form the native products do not take: they run on torch's kernels instead."""


class BlockLinear(nn.Module):
    """y = x Wᵀ + b with W in blocks as a file stores it (Q4Weight or Int8Blocks), through
    native.block_matmul_at. Scales and lows are float16 (a file's own are float16 or, in the
    K-quants, a float16 times a 6- or 8-bit integer: within float16's rounding of the product), held
    as their int16 bits, which a cast of the model's floating-point tensors leaves alone."""

    def __init__(self, w: StoredWeight | Iterable[StoredWeight], form: str, bias: torch.Tensor | None = None,
                 narrow: bool = True):
        """w: the weights, or runs of their rows; form: their form (core/quantized.INT4 or INT8).
        narrow: int8 codes that span 32 values (Q5_0, Q5_1, Q5_K) are kept as 5-bit codes, the
        file's own size, rather than a byte each."""
        super().__init__()
        native.register_op()
        self.kind, self.narrow = native.KIND[form], narrow
        runs = [w] if isinstance(w, (Q4Weight, Int8Blocks)) else w
        parts = [self._pack(run, first=i == 0) for i, run in enumerate(runs)]
        codes, scales, lows = (None if p[0] is None else torch.cat(p) for p in zip(*parts))
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("lows", lows)
        self.out_features = scales.size(0)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._apply(lambda t: t)

    def _apply(self, fn, recurse=True):
        """After any move of the buffers, the addresses that forward hands to the native product."""
        super()._apply(fn, recurse)
        self.matrix = native.pointers(self.kind, self.codes, self.scales, self.lows, self.block)
        return self

    def _pack(self, w: StoredWeight, first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A run of rows in the native form: the first run decides between 5-bit and 8-bit codes."""
        self.in_features = n_in = (w.q if isinstance(w, Q4Weight) else w.codes).size(1)
        if self.kind == native.KIND[INT4]:
            self.block = n_in // w.scales.size(1)
            if self.block != 32:
                raise UnfitBlocks(f"4-bit groups of {self.block} inputs; the native product takes 32")
            q = w.q.view(w.q.size(0), -1, 32)
            return _nibbles(q).view(q.size(0), -1), _half(w.scales), _half(w.lows)
        w = as_int8_blocks(w)
        if w.block > 32:
            w = as_int8_blocks(w, 32)
        self.block = w.block
        offset = _five_bit_offset(w) if self.narrow else None
        if first and self.kind == native.KIND[INT8] and offset is not None:
            self.kind = native.FIVE_BITS
        if self.kind == native.FIVE_BITS:
            if offset is None:
                raise UnfitBlocks("a later run of rows spans more than 5 bits")
            return _five_bit_codes(w.codes, offset), _half(w.scales), _half(offset * w.scales +
                                                                             (0 if w.lows is None else w.lows))
        return w.codes, _half(w.scales), None if w.lows is None else _half(w.lows)

    def extra_repr(self) -> str:
        form = {native.KIND[INT4]: "4-bit codes", native.FIVE_BITS: "5-bit codes"}.get(
            self.kind, f"int8 codes in blocks of {self.block}")
        return f"in_features={self.in_features}, out_features={self.out_features}, {form}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32 or not flat.is_contiguous():
            flat = flat.float().contiguous()
        if torch.compiler.is_compiling():
            y = torch.ops.tinygen.block_matmul(flat, self.kind, self.codes, self.scales, self.lows, self.block)
        else:
            y = native.block_matmul_at(flat, self.matrix)
        y = y.view(*x.shape[:-1], self.out_features)
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


class NativeRMSNorm(nn.Module):
    """nn.RMSNorm's forward for float32 CPU activations through native.rms_norm; the same weight."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.normalized_shape = norm.normalized_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous() or torch.compiler.is_compiling():
            return torch.nn.functional.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return native.rms_norm(x, self.weight, self.eps)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes (..., 32) as ggml packs a block: byte j holds code j low and code j + 16 high."""
    return q[..., :16] | (q[..., 16:] << 4)


def _five_bit_offset(w: Int8Blocks) -> int | None:
    """The offset that makes w's codes 0..31 (Q5_0's are -16..15, Q5_1's and Q5_K's 0..31), where
    blocks of 32 allow it."""
    if w.block != 32:
        return None
    low, high = int(w.codes.min()), int(w.codes.max())
    return -16 if low >= -16 and high <= 15 else 0 if low >= 0 and high <= 31 else None


def _five_bit_codes(codes: torch.Tensor, offset: int) -> torch.Tensor:
    """Codes (rows, in) as blockdot.c's q5 form: per block of 32, the low nibbles as q4 packs them,
    then the fifth bits, bit j of 4 little-endian bytes for input j. u = code - offset."""
    u = (codes.to(torch.int16) - offset).to(torch.uint8).view(codes.size(0), -1, 32)
    nibbles = _nibbles(u & 15)
    bits = ((u >> 4).view(*u.shape[:2], 4, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return torch.cat((nibbles, bits), dim=-1).view(codes.size(0), -1)


def _half(t: torch.Tensor) -> torch.Tensor:
    """t as float16, in its int16 bits."""
    half = t.to(torch.float16)
    if not torch.isfinite(half).all():
        raise UnfitBlocks("a block scale beyond float16's range")
    return half.contiguous().view(torch.int16)


class Int8BlockLinear(nn.Module):
    """y = x Wᵀ + b with W as int8 codes and a scale (and a low) per block of inputs.

    Stored as the int4 kernel's packed codes, twice as wide as W (a byte a weight), and its bf16
    scales and zero points. The kernel computes each group's (u - 8) * scale + zero for the low
    nibbles against x and for the high ones against 16 x; one zero serves both halves, so it must
    carry the block's constant (offset * scale + low) over the 17 parts of x it meets. Each block's
    offset is chosen to make that constant about -136 scales, which the kernel's -8 per code
    cancels: the zero is then near 0, and rounding it to bf16 costs nothing."""

    def __init__(self, w: Int8Blocks | Iterable[Int8Blocks], bias: torch.Tensor | None = None,
                 rows: int | None = None):
        """w: the weights, or runs of their rows (rows of them in all), as quantize.pack_chunks takes them."""
        super().__init__()
        chunks = [w] if isinstance(w, Int8Blocks) else w
        packed, table = pack_chunks(chunks, w.codes.size(0) if isinstance(w, Int8Blocks) else rows, self._pack)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", table)
        self.register_buffer("times", torch.tensor([1.0, 16.0], dtype=torch.bfloat16).view(2, 1))
        self.out_features = w.codes.size(0) if isinstance(w, Int8Blocks) else rows
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _pack(self, w: Int8Blocks) -> tuple[torch.Tensor, torch.Tensor]:
        w = as_int8_blocks(w)  # a 4-bit part fused with wider ones comes as Int8Blocks already
        if not self.fits(w):
            w = as_int8_blocks(w, 16)
        self.in_features, self.block = w.codes.size(1), w.block
        self.group = 2 * w.block
        scales = padded_rows(w.scales)
        blocks = padded_rows(w.codes).view(scales.size(0), -1, self.block)
        lows = torch.zeros_like(scales) if w.lows is None else padded_rows(w.lows)
        offsets = self._offsets(blocks, scales, None if w.lows is None else lows)
        packed = pack_int4(blocks, lambda rows, at: self._nibbles(rows, offsets[at]))
        return packed, scales_and_zeros(scales, ((offsets + 136) * scales + lows) / 17)

    @staticmethod
    def _offsets(blocks: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor | None) -> torch.Tensor:
        """Each block's offset: near -136 - low / scale, within what keeps u = code - offset in
        0..255 for each of its codes. Symmetric codes of at most 119 (all but some Q8_0 blocks)
        take -136 as they are."""
        if lows is None:
            ideal = torch.full_like(scales, -136.0)
            if int(blocks.max()) <= 119:
                return ideal
        else:
            ideal = -136 - torch.round(lows / torch.where(scales == 0, 1, scales))
        return torch.minimum(torch.maximum(ideal, blocks.amax(-1) - 255.0), blocks.amin(-1).float())

    @staticmethod
    def _nibbles(blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows of codes (rows, n_blocks, block) as the kernel's int32 codes: each block's low
        nibbles, then its high ones."""
        u = blocks.to(torch.int32) - offsets.to(torch.int32)[..., None]
        out = u.new_empty(*blocks.shape[:2], 2, blocks.size(2))
        torch.bitwise_and(u, 15, out=out[:, :, 0])
        torch.bitwise_right_shift(u, 4, out=out[:, :, 1])
        return out.view(blocks.size(0), -1)

    @staticmethod
    def fits(w: Int8Blocks) -> bool:
        return 2 * w.block in KERNEL_GROUPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = nibble_layout(x.reshape(-1, self.in_features).to(torch.bfloat16), self.block, self.times)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_zeros).to(x.dtype)
        if y.size(-1) != self.out_features:
            y = y[:, :self.out_features]
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


# The row readers of live RowsEmbeddings, by number: a compiled step reaches its reader through a
# custom op (file_rows), whose arguments can only be tensors and plain values.
_READERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_NUMBERS = itertools.count()


@functools.cache
def register_file_rows() -> None:
    """torch.ops.tinygen.file_rows(ids, reader, width): reader's rows for ids, float32 (ids, width),
    as one opaque call in a compiled graph (Dynamo cannot trace the reader's numpy). Registered when
    a RowsEmbedding is first made, not at import."""

    @torch.library.custom_op("tinygen::file_rows", mutates_args=())
    def file_rows(ids: torch.Tensor, reader: int, width: int) -> torch.Tensor:
        return _READERS[reader](ids)

    @file_rows.register_fake
    def _(ids: torch.Tensor, reader: int, width: int) -> torch.Tensor:
        return ids.new_empty(ids.numel(), width, dtype=torch.float32)


class RowsEmbedding(nn.Module):
    """An embedding whose table stays where the loader keeps it (a GGUF's blocks, in the file's
    memory map): a lookup reads and dequantizes just the rows of its tokens. `rows(ids)` gives
    them as float32 (ids, n_embd)."""

    def __init__(self, rows, num_embeddings: int, embedding_dim: int, dtype: torch.dtype):
        super().__init__()
        self.rows = rows
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype = dtype
        register_file_rows()
        self.reader = next(_NUMBERS)
        _READERS[self.reader] = rows

    @property
    def weight(self) -> torch.Tensor:
        """The whole table, dequantized: for readers of all of it (inspect's embedding views); a
        forward pass never reads it."""
        return self.rows(torch.arange(self.num_embeddings)).to(self.dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        if torch.compiler.is_compiling():  # a compiled decode step: its token ids came from the model
            rows = torch.ops.tinygen.file_rows(flat, self.reader, self.embedding_dim)
        else:
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
                raise IndexError("index out of range in self")  # nn.Embedding's words
            rows = self.rows(flat)
        return rows.to(self.dtype).view(*idx.shape, self.embedding_dim)
