"""The machine's ceilings for `tinygen bench`: memory read bandwidth, the FLOP/s that MFU is put
against, and the bytes one decoded token must read, so that a speed can be put as a fraction of
what is possible. A known GPU's figures come from its datasheet (core/hardware.py); elsewhere
they are measured here."""

from __future__ import annotations

import torch

from tinygen.bench.hardware import datasheet
from tinygen.bench.measure import median_time, sync_for
from tinygen.core.device import cpu_has_bf16


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s at which this device reads memory: summing a buffer far larger than any cache."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)  # 1 GiB on a GPU, 256 MiB on a CPU
    x = torch.ones(n, device=device)
    return n * 4 / median_time(x.sum, 5, sync_for(device))


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a large matmul in dtype here: the practical peak, for MFU where no datasheet applies."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    return 2 * 2048**3 / median_time(lambda: a @ a, 3, sync_for(device))


def flops_ceiling(device: torch.device, dtype: torch.dtype, say=lambda message: None) -> tuple[float, str]:
    """The FLOP/s that training's MFU is put against, and where it comes from: for bf16 on a known
    GPU its datasheet, else a matmul measured here in the dtype training computes in (dtype);
    say(message) hears of a measurement."""
    if dtype == torch.bfloat16 and (sheet := datasheet(device)) is not None:
        return sheet.bf16_flops, f"datasheet bf16 ({sheet.name})"
    if dtype == torch.bfloat16 and device.type == "cpu" and cpu_has_bf16() is False:
        # Emulated bf16 is no ceiling (a 2048^3 matmul would take a minute): the CPU's best is fp32.
        say("matmul peak")
        return matmul_peak(device, torch.float32), "measured fp32 matmul (no bf16 instructions)"
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    say("matmul peak")
    return matmul_peak(device, dtype), f"measured {name} matmul"


def decode_context(prompt_tokens: int, new_tokens: int, decoder=None) -> int:
    """The KV cache slots that a decoded token reads, on average over the measured run. A step
    reads the slots written so far: the prompt and, midway, half the new tokens; a StaticDecoder
    (generate/compiled.py) on a GPU reads its whole cache every step, masked (a CUDA graph's shapes
    are fixed)."""
    if decoder is not None and not decoder.on_cpu:
        return decoder.max_len
    return prompt_tokens + new_tokens // 2


def decode_bytes(net, context: int) -> int:
    """Bytes read to decode one token that attends over context cache slots (decode_context):
    every weight but the embedding table (a lookup reads one row), the output head (the table
    again when tied, else its own matrix), and those slots' keys and values (a sliding layer's
    within its window), kv_heads of them per layer (grouped-query attention stores fewer than
    n_head). A matrix that also keeps its int8
    codes (SplitLinear.int8_blocks: only a compiled CPU step keeps them, and only it reads them) is
    counted as those codes and their scales, not as its float32 weight."""
    tensors = [*net.named_parameters(), *net.named_buffers()]
    weights = sum(t.numel() * t.element_size() for name, t in tensors
                  if not name.startswith(("transformer.wte", "transformer.wpe", "rope_")))
    if not any(name.startswith("lm_head") for name, _ in tensors):
        weights += net.transformer.wte.weight.numel() * net.transformer.wte.weight.element_size()  # the tied head
    for m in net.modules():
        if (blocks := getattr(m, "int8_blocks", None)) is not None:
            weights += sum(b.numel() * b.element_size() for b in blocks) - m.weight.numel() * m.weight.element_size()
    cfg = net.config
    # A sliding layer reads at most its window.
    slots = sum(min(context, cfg.sliding_window) if cfg.is_sliding(i) else context for i in range(cfg.n_layer))
    kv = 2 * slots * cfg.kv_heads * cfg.head_dim * net.dtype.itemsize
    return weights + kv


def cache_bytes(config, rows: int, dtype: torch.dtype, slots: int | None = None) -> int:
    """Bytes of a KV cache of rows rows: every layer's keys and values for slots positions (the
    engine's: prompt + new tokens, at most the context), or for the whole context when None (a
    StaticDecoder's)."""
    from tinygen.core.model import KVCache

    cache = KVCache(config, rows, "meta", dtype, slots)
    return cache.nbytes


def free_memory(device: torch.device) -> int | None:
    """Bytes that new tensors can take on device now; None where this cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        return None
