"""The machine's own ceilings for `tinygen bench`: memory read bandwidth, matmul peak, and the
bytes one decoded token must read, so that a speed can be put as a fraction of what is possible."""

from __future__ import annotations

import torch

from tinygen.bench.measure import median_time, sync_for

# Datasheet HBM bandwidth, bytes/s, for the GPUs we know (SXM parts; the PCIe H100 is slower).
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12, "4090": 1.0e12}


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s at which this device reads memory: summing a buffer far larger than any cache."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)  # 1 GiB on a GPU, 256 MiB on a CPU
    x = torch.ones(n, device=device)
    return n * 4 / median_time(x.sum, 5, sync_for(device))


def peak_bandwidth(device: torch.device) -> float | None:
    """The datasheet bandwidth of a known GPU; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of a large float32 matmul here: a CPU's practical peak, for MFU where no datasheet applies."""
    a = torch.randn(2048, 2048, device=device)
    return 2 * 2048**3 / median_time(lambda: a @ a, 3, sync_for(device))


def decode_bytes(net, context: int) -> int:
    """Bytes read to decode one token at this context length: every weight but the embedding
    table (a lookup reads one row), and the KV cache written so far."""
    tensors = [*net.named_parameters(), *net.named_buffers()]
    weights = sum(t.numel() * t.element_size() for name, t in tensors
                  if not name.startswith(("transformer.wte", "transformer.wpe", "rope_")))
    if not any(name.startswith("lm_head") for name, _ in tensors):
        weights += net.transformer.wte.weight.numel() * net.transformer.wte.weight.element_size()  # the tied head
    cfg = net.config
    kv = 2 * cfg.n_layer * context * cfg.n_embd * net.dtype.itemsize
    return weights + kv
