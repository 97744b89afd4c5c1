"""A faster matrix-vector product for CPU decode steps, swapped in by plan.py (training never sees it).

A decode step's speed is that of reading each weight matrix once, and the BLAS call for one row does
not share that read between cores. Viewing W's rows as one block per thread (a free view: the blocks
are contiguous) and multiplying them in one batched call does (measured in docs/speed.md).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

# Above this many rows (prefill, batches) the plain matmul already uses every core well.
SPLIT_MAX_ROWS = 4
INT8_BLOCK = 32  # a GGUF Q8_0 block: 32 int8 codes and one float16 scale


def weight_blocks(weight: torch.Tensor, threads: int) -> torch.Tensor:
    """W's rows that divide evenly by threads, as one (K, rows) block per thread: a free view."""
    N, K = weight.shape
    n = N - N % threads  # a vocabulary of 50257 leaves a few rows for a plain matmul
    return weight[:n].view(threads, n // threads, K).transpose(1, 2)


def split_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threads: int,
                 blocks: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ + b for a few rows of x, with W's rows split into one contiguous block per thread
    (blocks: weight_blocks(weight, threads), when the caller keeps it)."""
    N, K = weight.shape
    rows = x.numel() // K
    if blocks is None:
        blocks = weight_blocks(weight, threads)
    n = blocks.size(0) * blocks.size(2)
    flat = x.reshape(rows, K)
    y = torch.bmm(flat.expand(threads, rows, K), blocks)  # (threads, rows, n / threads)
    y = y.view(1, n) if rows == 1 else y.transpose(0, 1).reshape(rows, n)
    if n < N:
        y = torch.cat((y, flat @ weight[n:].t()), dim=-1)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], N)


@functools.cache
def register_realized() -> None:
    """torch.ops.tinygen.realized(x): x, as a buffer of its own in a compiled graph, since Inductor
    cannot fuse through a custom op. Without it Inductor fused the final RMSNorm (and the residual
    add before it) into the int8 head's reduction, recomputing them for each of the head's outputs.
    Registered when a compiled step first needs it, not at import, where every `tinygen sample` would pay for it."""

    @torch.library.custom_op("tinygen::realized", mutates_args=())
    def realized(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @realized.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)


def exact_int8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """int8 codes (N, K) and a float32 scale per block of 32 inputs (N, K / 32) whose products are
    exactly weight, or None. A GGUF's Q8_0 matrices loaded into float32 are such (codes times a
    float16 scale, the largest code of a block at ±127, as ggml makes them), so they come back
    exactly: the block's largest magnitude is 127 times its scale, and float division returns an
    exact quotient when it is representable. Other float matrices almost never are."""
    N, K = weight.shape
    if K % INT8_BLOCK or weight.dtype != torch.float32:
        return None
    # The first row alone, then the whole: an ordinary float matrix fails on its first row, without
    # the whole matrix's temporaries, which a large head would cost every compiled start.
    for rows in (weight[:1], weight):
        w = rows.detach().reshape(rows.size(0), K // INT8_BLOCK, INT8_BLOCK)
        scales = w.abs().amax(dim=-1) / 127
        codes = torch.round(w / torch.where(scales > 0, scales, 1)[..., None])
        if codes.abs().amax() > 127 or not torch.equal(codes * scales[..., None], w):
            return None
    return codes.to(torch.int8).view(N, K), scales


class SplitLinear(nn.Module):
    """The same weight and bias as the nn.Linear it replaces (shared, so a tied head stays tied)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A decode step is hundreds of small calls, each paying for its views: the blocks view is
        # made once per thread count (and weight), not once per call.
        self._blocks: tuple[int, int, torch.Tensor] | None = None
        # What a compiled step splits by (set when the layer is swapped in): torch.compile cannot
        # trace get_num_threads, and Inductor's own matrix-vector product reads no faster than the BLAS's.
        self.compile_threads = torch.get_num_threads()
        self.int8_blocks: tuple[torch.Tensor, torch.Tensor] | None = None

    def keep_int8_blocks(self) -> bool:
        """For compiled decode steps: keep the weight's int8 codes too, where they give it back
        exactly (exact_int8_blocks), so that a compiled step reads a quarter of the bytes with the
        same numbers. Eager steps, prefills and batches still multiply the float32 weight: only a
        compiled step fuses the codes' conversion into the product instead of writing it out."""
        self.int8_blocks = exact_int8_blocks(self.weight)
        if self.int8_blocks is not None:
            register_realized()
        return self.int8_blocks is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        threads = self.compile_threads if compiling else torch.get_num_threads()  # it can change after loading
        rows = x.numel() // self.in_features
        if compiling and self.int8_blocks is not None and rows <= SPLIT_MAX_ROWS:
            codes, scales = self.int8_blocks
            blocks = self.in_features // INT8_BLOCK
            # One reduction per output over its codes, each scaled by its block's scale: Inductor
            # fuses the int8 loads, the conversion and the products into one pass over the codes.
            terms = (codes.view(self.out_features, blocks, INT8_BLOCK).to(x.dtype) * scales[..., None]
                     * torch.ops.tinygen.realized(x).reshape(rows, 1, blocks, INT8_BLOCK))
            y = terms.sum(dim=(-2, -1)).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if threads < 2 or rows > SPLIT_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        if compiling:  # the blocks view is traced into the graph once, so there is nothing to keep
            return split_matmul(x, self.weight, self.bias, threads)
        key = (threads, self.weight.data_ptr())
        if self._blocks is None or self._blocks[:2] != key:
            self._blocks = (*key, weight_blocks(self.weight, threads))
        return split_matmul(x, self.weight, self.bias, threads, self._blocks[2])


class SmallLinear(nn.Module):
    """A small CPU layer (below plan.SPLIT_MIN_WEIGHTS: its matrix stays in cache) for compiled decode
    steps, sharing the nn.Linear's weight and bias. Compiled, a few rows multiply it as one reduction
    that Inductor fuses with its neighbours, where a BLAS call would spend more on threading and
    dispatch than on the product. Eager steps and prefills use the plain F.linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if not torch.compiler.is_compiling() or rows > SPLIT_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = (x.reshape(rows, 1, self.in_features) * self.weight).sum(-1).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
