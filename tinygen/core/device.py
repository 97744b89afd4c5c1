"""Which device and dtype a command runs on: `--device` and `--dtype` resolved against the machine,
and what the machine's CPU can do."""

from __future__ import annotations

import platform

import torch

from tinygen.errors import TinygenError


def resolve_device(name: str = "auto", cpu_only: str | None = None) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU. cpu_only names what the run needs that
    only the CPU has (e.g. "--quantize int8"): `auto` then picks the CPU, and another is refused."""
    if cpu_only is not None:
        if name in ("auto", "cpu"):
            return torch.device("cpu")
        raise TinygenError(f"{cpu_only} runs on the CPU; use --device cpu (or leave --device out)")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TinygenError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TinygenError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise TinygenError(f"--device {name}: this machine has {n} CUDA GPU{'s' if n != 1 else ''} "
                           f"(cuda:0{f'..cuda:{n - 1}' if n > 1 else ''})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TinygenError("--device mps was asked for, but MPS is not available; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise TinygenError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inference_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """`auto`: bf16 on CUDA GPUs that support it, fp32 elsewhere. On CPUs without native bf16
    math, bf16 weights halve the bytes each decoded token reads (faster) but make prompt
    processing several times slower, so fp32 stays the CPU default."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise TinygenError(f"unknown dtype {name!r}; use auto, float32 or bfloat16")
    return DTYPES[name]


def cpu_has_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX on x86). Without those, torch
    emulates bf16 matmuls, far slower than fp32 (docs/speed.md). None where torch cannot tell (not x86)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return None
