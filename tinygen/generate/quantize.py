"""Weight-only quantisation, int8 and int4, for decoding on a CPU, where a token's speed is set by the
bytes of weights it reads; plan.py decides which layer becomes which.

int8: one float scale per output row (symmetric absmax), through `_weight_int8pack_mm`, which takes
bf16 activations and applies the scales, so no full float matrix is made. int4: 4-bit codes in groups
of 32 inputs (or 64, 128, 256) with a scale and a zero point, through `_weight_int4pack_mm_for_cpu`:
llama.cpp's Q4_1 layout (and Q4_0, with the minimum at -8 scales), so a GGUF's 4-bit matrices go in as
stored (core/quantized.Q4Weight). The embedding stays float (a lookup reads one row); a tied output
head gets its own int8 copy. `tinygen eval --quantize int8` scores the accuracy cost through these modules.
"""

from __future__ import annotations

import torch
import torch.nn as nn

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


def prefill_dtype() -> torch.dtype:
    """What an int4 layer's prefill multiplies in: bf16, the precision its decode steps already have,
    where the CPU has native bf16 math (faster than float32 there: docs/speed.md); else float32, as
    emulated bf16 is many times slower."""
    from tinygen.core.device import cpu_has_bf16

    return torch.bfloat16 if cpu_has_bf16() else torch.float32


# At most this many rows (decode steps, small batches) go through the int4 kernel; more (a prefill)
# multiply the dequantized matrix, which is faster than the kernel at many rows.
INT4_MAX_ROWS = 8


class Int4Linear(nn.Module):
    """y = x Wᵀ + b with W as 4-bit codes q, and w = q * scale + low over each group of inputs.

    Decode steps read the codes (an eighth of float32's bytes) with bf16 activations and scales: with
    float32 ones the kernel falls back to a far slower generic path, as the int8 kernel does. Prefills
    multiply the same weights dequantized once into prefill_dtype(), kept outside the module's
    buffers since no decoded token reads them."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group = self.in_features // scales.size(1)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        # The kernel computes (q - 8) * scale + zero, codes centred on 8, so zero = low + 8 * scale.
        scales, lows = scales.float(), lows.float()
        self.register_buffer("scales_zeros", torch.stack((scales, lows + 8 * scales), dim=-1).transpose(0, 1)
                             .contiguous().to(torch.bfloat16))
        self.dense = Q4Weight(q, scales, lows).dequantize().to(prefill_dtype())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int) -> Int4Linear:
        """Asymmetric min-max codes per group: a group's smallest and largest weights are exact."""
        w = linear.weight.detach().float()
        groups = w.reshape(w.size(0), -1, group)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).reshape(w.shape)
        return cls(q.to(torch.uint8), scales, low, linear.bias)

    @staticmethod
    def fits(out_features: int, in_features: int, group: int) -> bool:
        return out_features % 16 == 0 and in_features % group == 0  # the packing kernel's rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.size(0) > INT4_MAX_ROWS:
            y = (flat.to(self.dense.dtype) @ self.dense.t()).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.packed, self.group,
                                                            self.scales_zeros).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
