"""Int8 weight-only quantisation, for decoding on a CPU.

Decoding one token reads every weight once, so on a CPU its speed is set by the bytes of the
weights. Storing each matrix as int8 with one float scale per output row (symmetric, absmax)
reads a quarter of the bytes of float32. Activations stay in floating point: PyTorch's
`_weight_int8pack_mm` kernel multiplies bf16 activations by the int8 rows and applies the
scales, so nothing is dequantised into a full float matrix. The embedding table stays float
(a lookup reads one row); the output head, tied to it, gets its own int8 copy.

The cost in accuracy is measured, not assumed: `tinygen eval --quantize int8` scores held-out
text through the same modules.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tinygen.errors import TinygenError

MODES = ("int8",)


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


def quantize(model: nn.Module, mode: str | None) -> nn.Module:
    """Replace the model's linear layers, in place, by quantised ones; None leaves it as it is."""
    if mode is None:
        return model
    if mode not in MODES:
        raise TinygenError(f"unknown quantisation {mode!r}; choose from {', '.join(MODES)}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise TinygenError(f"--quantize {mode} is for CPUs; on a GPU, bf16 weights (the default there) are faster")
    if next(model.parameters()).dtype != torch.float32:
        raise TinygenError(f"--quantize {mode} starts from float32 weights; drop --dtype")
    # The kernel reads rows in runs of 8: with another width it crashes (a segfault in torch
    # 2.13), so such a layer, which only odd test shapes have, stays in float.
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear) and child.in_features % 8 == 0]
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child))
    return model.eval()
