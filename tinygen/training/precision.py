"""The dtype training computes in, from `--dtype` and the machine."""

from __future__ import annotations

import torch

from tinygen.core.device import DTYPES, cpu_has_bf16
from tinygen.errors import TinygenError


def training_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The dtype training computes in. Weights, gradients, optimizer moments and the checkpoint stay
    float32 whatever this is; bf16 runs the forward and backward under autocast. `auto`: bf16 on
    CUDA GPUs that support it and on CPUs with bf16 instructions (faster there, with the same
    losses; docs/speed.md), float32 elsewhere, where bf16 is emulated and many times slower."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise TinygenError(f"unknown dtype {name!r}; use auto, float32 or bfloat16")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TinygenError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; "
                           f"train with --dtype float32")
    return dtype
