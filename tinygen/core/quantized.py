"""Weights as a quantized file stores them, for the layers that compute on them as they are: what a
loader hands to the decode plan (generate/plan.py) without dequantizing and requantizing.

Two forms hold the common GGUF types exactly. Q4Weight: 4-bit codes with a scale and a low per
group of 32 inputs (Q4_0, Q4_1, Q4_K). Int8Blocks: int8 codes with a
scale, and for some types a low, per block of 16 or 32 inputs (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0).
Scales are float32: a K-quant's scale is a product (d times a 6-bit sub-scale) that float16 cannot
hold. Both keep one code per byte, unpacked, so that rows fuse and permute like any weight's; the
layers that run them pack them their own way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import torch

Q4_BLOCK = 32  # inputs per group of a 4-bit type (Q4_K's sub-blocks too)


@dataclass
class Q4Weight:
    """weight = q * scale + low over each group of inputs: 32 from a file (Q4_1 stores the low, Q4_0
    has low = -8 * scale, Q4_K low = -dmin * m), any width from quantize.Int4Linear.from_linear."""

    q: torch.Tensor  # (out, in) uint8, 0..15
    scales: torch.Tensor  # (out, groups) float16 or float32
    lows: torch.Tensor  # (out, groups) float16 or float32

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch  # a loader imports this module before it needs torch (`tinygen info` never does)

        out, n_in = self.q.shape
        blocks = self.q.reshape(out, self.scales.size(1), -1).to(torch.float32)
        w = blocks * self.scales.to(torch.float32)[..., None] + self.lows.to(torch.float32)[..., None]
        return w.reshape(out, n_in).to(dtype or torch.float32)


@dataclass
class Int8Blocks:
    """weight = code * scale (+ low) over each block of 16 or 32 inputs, codes in int8: every 5-, 6-
    and 8-bit GGUF type exactly (Q5_0's codes are q - 16, Q6_K's q - 32, Q5_1's and Q5_K's 0..31
    with a low)."""

    codes: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out, in // block) float32
    lows: torch.Tensor | None = None  # (out, in // block) float32; None: symmetric

    @property
    def block(self) -> int:
        return self.codes.size(1) // self.scales.size(1)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch

        out, n_in = self.codes.shape
        w = self.codes.view(out, self.scales.size(1), -1).to(torch.float32) * self.scales[..., None]
        if self.lows is not None:
            w = w + self.lows[..., None]
        return w.view(out, n_in).to(dtype or torch.float32)


StoredWeight = Q4Weight | Int8Blocks
# The forms, by the kernel each runs in: for the decode plan and for `tinygen info`.
INT4, INT8 = "int4", "int8"


@dataclass(frozen=True)
class StoredMatrix:
    """A matrix that a file holds in a form that runs as stored: the form, known from the file's
    header, and how to read it (from the file, when called), whole or, where the file allows, a
    run of rows at a time."""

    form: str  # INT4 or INT8
    read: Callable[[], StoredWeight]
    rows: int
    read_rows: Callable[[int, int], StoredWeight] | None = None  # (start, stop) -> those rows

    def chunks(self, size: int) -> Iterator[StoredWeight]:
        """The matrix in runs of `size` rows (the last shorter), or whole where it cannot be read so:
        a large matrix (an output head) need never be decoded all at once."""
        if self.read_rows is None or self.rows <= size:
            yield self.read()
            return
        for start in range(0, self.rows, size):
            yield self.read_rows(start, min(start + size, self.rows))


def map_rows(w: StoredWeight, fn: Callable[[torch.Tensor], torch.Tensor]) -> StoredWeight:
    """w with fn applied to each of its per-row tensors (codes, scales, lows): a row permutation
    (GGUF's q and k rotary layout) or a selection moves a row's codes and its scales together."""
    return replace(w, **{f.name: None if (t := getattr(w, f.name)) is None else fn(t) for f in fields(w)})


def as_int8_blocks(w: StoredWeight, block: int | None = None) -> Int8Blocks:
    """w as int8 codes in blocks of `block` inputs (its own when None; a divisor of its own: the
    scales repeat), the same weights exactly."""
    import torch

    if isinstance(w, Q4Weight):
        w = Int8Blocks(w.q.to(torch.int8), w.scales.float(), w.lows.float())
    if block is None or block == w.block:
        return w
    if w.block % block:
        raise ValueError(f"blocks of {w.block} cannot split into blocks of {block}")
    n = w.block // block
    return map_rows(Int8Blocks(w.codes, w.scales, w.lows),
                    lambda t: t if t.dtype == torch.int8 else t.repeat_interleave(n, dim=1))


def form(w: StoredWeight) -> str:
    return INT4 if isinstance(w, Q4Weight) else INT8


def fused_form(forms: list[str]) -> str:
    """The form a matrix fused from parts of these forms takes (q, k and v by rows): int4 when every
    part is, else int8, which holds every part exactly."""
    return INT4 if all(f == INT4 for f in forms) else INT8


def fuse_rows(parts: list[StoredWeight]) -> StoredWeight:
    """One matrix from parts stacked by rows, in the widest common form (fused_form), in the
    smallest of the parts' blocks."""
    import torch

    if len(parts) == 1:
        return parts[0]
    if fused_form([form(p) for p in parts]) == INT4:
        return Q4Weight(*(torch.cat(x) for x in zip(*((p.q, p.scales.float(), p.lows.float()) for p in parts))))
    block = min(as_int8_blocks(p).block for p in parts)
    blocks = [as_int8_blocks(p, block) for p in parts]
    lows = None
    if any(b.lows is not None for b in blocks):
        lows = torch.cat([b.lows if b.lows is not None else torch.zeros_like(b.scales) for b in blocks])
    return Int8Blocks(torch.cat([b.codes for b in blocks]), torch.cat([b.scales for b in blocks]), lows)
