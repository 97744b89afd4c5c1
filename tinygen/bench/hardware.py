"""What a GPU can do, from its datasheet: dense bf16 tensor-core FLOP/s and memory bandwidth,
looked up by the exact product name the CUDA driver reports. Training's MFU (which `tinygen train`
puts against peak_bf16_flops) and bench's roofline put their speeds against these figures; where
none applies, they measure a ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Datasheet:
    name: str  # exactly as torch.cuda.get_device_name() returns it
    bf16_flops: float  # dense: without 2:4 structured sparsity, which no training step uses
    bandwidth: float  # bytes/s of device memory


# From NVIDIA's datasheets (H100, H200, A100, L4, L40, L40S, A10) and the Ada Lovelace
# architecture whitepaper (RTX 4090). Most datasheets quote bf16 with sparsity: the dense
# figure is half that (H100 SXM 1,979 -> 989.5 TFLOP/s). The 4090's is with fp32 accumulation,
# which is what PyTorch's bf16 matmuls do; GeForce parts run at half the rate of fp16 accumulation.
# Keys are exact names because the names nest: "NVIDIA L4" is a prefix of "NVIDIA L40S" (3x the
# FLOP/s), and "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are slower parts than the SXM
# "NVIDIA H100 80GB HBM3". A MIG slice reports a longer name and gets no figures, rightly: it
# has only part of the chip.
_SHEETS = [
    Datasheet("NVIDIA H100 80GB HBM3", 989.5e12, 3.35e12),  # SXM5
    Datasheet("NVIDIA H100 PCIe", 756.5e12, 2.0e12),
    Datasheet("NVIDIA H100 NVL", 835.5e12, 3.9e12),  # the 94 GB card (per GPU, not per NVLink pair)
    Datasheet("NVIDIA H200", 989.5e12, 4.8e12),  # SXM
    Datasheet("NVIDIA H200 NVL", 835.5e12, 4.8e12),
    Datasheet("NVIDIA A100-SXM4-40GB", 312e12, 1.555e12),
    Datasheet("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12),
    Datasheet("NVIDIA A100-PCIE-40GB", 312e12, 1.555e12),
    Datasheet("NVIDIA A100 80GB PCIe", 312e12, 1.935e12),
    Datasheet("NVIDIA A10", 125e12, 600e9),
    Datasheet("NVIDIA L4", 121e12, 300e9),
    Datasheet("NVIDIA L40", 181.05e12, 864e9),
    Datasheet("NVIDIA L40S", 362.05e12, 864e9),
    Datasheet("NVIDIA GeForce RTX 4090", 165.2e12, 1008e9),
]
DATASHEETS = {sheet.name: sheet for sheet in _SHEETS}


def datasheet(device: torch.device | str) -> Datasheet | None:
    """The datasheet of a CUDA device by its exact name; None on a CPU, MPS or an unknown GPU.
    Only a CUDA device is asked its name, so no other device initialises CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return DATASHEETS.get(torch.cuda.get_device_name(device).strip())


def peak_bf16_flops(device: torch.device | str) -> float | None:
    """Dense bf16 FLOP/s from the datasheet, the denominator of training's MFU; None where unknown."""
    sheet = datasheet(device)
    return sheet.bf16_flops if sheet is not None else None
