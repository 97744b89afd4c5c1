"""Weights as a quantized file stores them, for the layers that compute on them as they are: what a
loader hands to the decode plan (generate/plan.py) without dequantizing and requantizing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Q4_BLOCK = 32  # weights per Q4_0/Q4_1 block: a float16 scale (and Q4_1's float16 minimum), then 16 bytes of codes


@dataclass
class Q4Weight:
    """A Q4_0 or Q4_1 weight as stored: weight = q * scale + low over each block of 32 inputs
    (Q4_1 stores the block's minimum as low; Q4_0, symmetric, has low = -8 * scale). The codes
    unpacked, one 0..15 per uint8, so rows can be fused and permuted like any weight's."""

    q: torch.Tensor  # (out, in) uint8, 0..15
    scales: torch.Tensor  # (out, in // 32) float16
    lows: torch.Tensor  # (out, in // 32) float16, or float32 for Q4_0 (-8 * scale, exact)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch  # a loader imports this module before it needs torch (`tinygen info` never does)

        out, n_in = self.q.shape
        # Groups as wide as the scales say: 32 from a file, any width from quantize's Int4Linear.
        blocks = self.q.reshape(out, self.scales.size(1), -1).to(torch.float32)
        w = blocks * self.scales.to(torch.float32)[..., None] + self.lows.to(torch.float32)[..., None]
        return w.reshape(out, n_in).to(dtype or torch.float32)
