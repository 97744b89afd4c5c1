"""Rotary position embeddings: each layer kind's frequencies from the config, the angles of the
positions one forward pass runs at, and the rotation of query and key heads by them.

The angles are computed from the positions at each pass (a few small operations once per pass, not
per layer) rather than looked up in tables of the whole context: a model with a long context, wide
heads and two rotary bases (Gemma 3) would hold tables weighing a large part of its quantized file.
The product of position and frequency is rounded to float32, as transformers' own rotary embedding
rounds it.
"""

from __future__ import annotations

import math

import torch

from tinygen.core.config import ModelConfig


def rotary_frequencies(config: ModelConfig, device=None) -> torch.Tensor:
    """The inverse frequencies (K, head_dim) of each rotary kind the model has: row 0 for its global
    layers (rope_theta, with its rope_scaling), row 1 for its sliding layers when they have a base of
    their own. Each frequency appears twice, once for each half of a head that it rotates together."""
    half = config.head_dim // 2
    rows = []
    for theta in (config.rope_theta, *([config.rope_local_theta] if config.rope_local_theta is not None else [])):
        inv_freq = 1.0 / (theta ** (torch.arange(half, dtype=torch.float32, device=device) / half))
        if not rows and config.rope_kind == "llama3":
            inv_freq = llama3_scaled(inv_freq, config.rope_scaling)
        elif not rows and config.rope_kind == "linear":
            inv_freq = inv_freq / config.rope_scaling["factor"]
        rows.append(torch.cat((inv_freq, inv_freq)))
    return torch.stack(rows)


def frequency_bits(config: ModelConfig, device=None) -> torch.Tensor:
    """rotary_frequencies as their float32 bit patterns (int32), the form GPT keeps them in: an
    integer buffer moves with the model's device but keeps its bits through model.to(bfloat16), where
    float frequencies would be rounded to 8 bits and every late position's angle with them."""
    return rotary_frequencies(config, device).view(torch.int32)


def rotary_sign(config: ModelConfig, device=None) -> torch.Tensor:
    """(head_dim,): -1 on the first half of a head, +1 on the second (see apply_rotary)."""
    sign = torch.ones(config.head_dim, device=device)
    sign[: config.head_dim // 2] = -1
    return sign


def rotary_angles(bits: torch.Tensor, sign: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> list[tuple]:
    """For each rotary kind (a row of frequency_bits), (cos, signed sin) at positions pos: each
    (T, D) for pos (T,), or (B, 1, T, D) for pos (B, T), in dtype. One set of operations covers every
    kind: a decode step is bound by how many small operations it runs."""
    angles = pos[..., None, None] * bits.view(torch.float32)  # (T, K, D) or (B, T, K, D), in float32
    cos, sin = angles.cos(), angles.sin() * sign
    if dtype != torch.float32:  # asked, not cast: even a no-op cast is an operation
        cos, sin = cos.to(dtype), sin.to(dtype)
    if pos.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return [(cos[..., k, :], sin[..., k, :]) for k in range(bits.size(0))]


def llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3's long-context rotary frequencies: wavelengths longer than the original context
    divided by factor, short ones kept, and a smooth blend between (as transformers'
    _compute_llama3_parameters)."""
    factor, low, high, old_len = (s[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    middle = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(middle, blended, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) = (x[..., i], x[..., i + D/2]) of each head by position-dependent
    angles: (x1 cos - x2 sin, x2 cos + x1 sin). x (B, H, T, D); cos, sin (T, D) or (B, 1, T, D),
    sin signed as rotary_angles makes it. Rolling x by half a head and the signed sin take four
    operations where chunk, negate and concatenate took seven, felt by a decode step in every layer."""
    return (x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin).type_as(x)
