"""A faster matrix-vector product for CPU decode steps, swapped into a model for inference.

A decode step multiplies one row by each weight matrix: a matrix-vector product whose speed is
the speed of reading the matrix. The BLAS call for it reads a large matrix at about half the
memory bandwidth the machine has, because it does not share one vector product between cores.
Viewing the rows of W as one block per thread (a free view: the blocks are contiguous) and
multiplying them in one batched call does: on a 2-core CPU it reads GPT-2's weights 1.6x faster.

Training never sees this: `decoding_layers` swaps it in, in place, when a model is loaded to
generate, after `quantize` has swapped in int8 layers where they were asked for.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Below this many weights, one matmul call is as fast as any split (the matrix sits in cache).
SPLIT_MIN_WEIGHTS = 1 << 18
# Above this many rows (prefill, batches) the plain matmul already uses every core well.
SPLIT_MAX_ROWS = 4


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


class SplitLinear(nn.Module):
    """The same weight and bias as the nn.Linear it replaces (shared, so a tied head stays tied)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A decode step is hundreds of small calls, each paying for its views: the blocks view is
        # made once per thread count (and weight), not once per call.
        self._blocks: tuple[int, int, torch.Tensor] | None = None
        # What a compiled step splits by: torch.compile cannot trace get_num_threads, and Inductor's
        # own matrix-vector product reads at the BLAS's speed (SmolLM2 decoded at 15.6 tok/s
        # compiled that way, against 25.6 eager). Set when the layer is swapped in.
        self.compile_threads = torch.get_num_threads()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        threads = self.compile_threads if compiling else torch.get_num_threads()  # it can change after loading
        if threads < 2 or x.numel() // self.in_features > SPLIT_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        if compiling:  # the blocks view is traced into the graph once, so there is nothing to keep
            return split_matmul(x, self.weight, self.bias, threads)
        key = (threads, self.weight.data_ptr())
        if self._blocks is None or self._blocks[:2] != key:
            self._blocks = (*key, weight_blocks(self.weight, threads))
        return split_matmul(x, self.weight, self.bias, threads, self._blocks[2])


def split_linears(model: nn.Module) -> nn.Module:
    """Swap the model's large linear layers for SplitLinear, in place, when it decodes on a CPU."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.device.type == "cpu"
               and child.weight.numel() >= SPLIT_MIN_WEIGHTS]
    for parent, name, child in targets:
        setattr(parent, name, SplitLinear(child))
    return model


def decoding_layers(model: nn.Module, quantize: str | None = None) -> nn.Module:
    """The linear layers a loaded model generates with: int8 ones with --quantize int8, and the
    split matrix-vector product for the large float ones left on a CPU."""
    from tinygen.generate.quantize import quantize as quantize_layers

    return split_linears(quantize_layers(model, quantize))
