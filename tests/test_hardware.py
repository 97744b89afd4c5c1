"""GPU datasheet figures by exact product name, and the ceilings bench puts its speeds against.

No GPU is needed: the driver's name is monkeypatched, so each product's lookup runs on a CPU.
"""

import pytest
import torch

from tinygen.bench.ceilings import decode_bytes, decode_context, flops_ceiling
from tinygen.core.config import ModelConfig
from tinygen.bench.hardware import datasheet, peak_bf16_flops

from conftest import make_model

CUDA = torch.device("cuda")


@pytest.fixture
def sheet_for(monkeypatch):
    """From then on every CUDA device reports this name, without a driver; returns its datasheet."""
    def look_up(name):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return datasheet(CUDA)
    return look_up


@pytest.mark.parametrize("name,flops,bandwidth", [
    ("NVIDIA H100 80GB HBM3", 989.5e12, 3.35e12),
    ("NVIDIA H100 PCIe", 756.5e12, 2.0e12),
    ("NVIDIA H100 NVL", 835.5e12, 3.9e12),
    ("NVIDIA H200", 989.5e12, 4.8e12),
    ("NVIDIA H200 NVL", 835.5e12, 4.8e12),
    ("NVIDIA A100-SXM4-40GB", 312e12, 1.555e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12),
    ("NVIDIA A100-PCIE-40GB", 312e12, 1.555e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 1.935e12),
    ("NVIDIA A10", 125e12, 600e9),
    ("NVIDIA L4", 121e12, 300e9),
    ("NVIDIA L40", 181.05e12, 864e9),
    ("NVIDIA L40S", 362.05e12, 864e9),
    ("NVIDIA GeForce RTX 4090", 165.2e12, 1008e9),
])
def test_each_product_gets_its_own_figures(sheet_for, name, flops, bandwidth):
    sheet = sheet_for(name)
    assert (sheet.name, sheet.bf16_flops, sheet.bandwidth) == (name, flops, bandwidth)
    assert peak_bf16_flops("cuda:0") == flops


def test_names_that_contain_another_do_not_borrow_its_figures(sheet_for):
    """Substring matching gave the L40 and L40S the L4's figures (MFU 1.5-3x too high) and every
    H100 the SXM part's."""
    l4 = sheet_for("NVIDIA L4")
    for name in ("NVIDIA L40", "NVIDIA L40S"):
        sheet = sheet_for(name)
        assert sheet.bf16_flops > l4.bf16_flops and sheet.bandwidth > l4.bandwidth
    sxm = sheet_for("NVIDIA H100 80GB HBM3")
    for name in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL"):
        sheet = sheet_for(name)
        assert sheet.bf16_flops < sxm.bf16_flops and sheet.bandwidth != sxm.bandwidth


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 3060", "NVIDIA L4 Ultra", "NVIDIA H100",
                                  "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "H200", ""])
def test_an_unknown_or_partial_name_has_no_datasheet(sheet_for, name):
    assert sheet_for(name) is None and peak_bf16_flops(CUDA) is None


def test_surrounding_whitespace_is_ignored(sheet_for):
    assert sheet_for(" NVIDIA H200\n").name == "NVIDIA H200"


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu", torch.device("mps")])
def test_other_devices_never_ask_cuda(monkeypatch, device):
    """A CPU or Mac run must not initialise CUDA just to learn that it has no datasheet."""
    def refuse(device=None):
        raise AssertionError("asked CUDA for a device name")
    monkeypatch.setattr(torch.cuda, "get_device_name", refuse)
    monkeypatch.setattr(torch.cuda, "_lazy_init", refuse)
    assert datasheet(device) is None and peak_bf16_flops(device) is None


def test_a_known_gpu_is_not_measured(sheet_for, monkeypatch):
    from tinygen.bench import ceilings

    monkeypatch.setattr(ceilings, "matmul_peak", lambda *a, **k: pytest.fail("measured a known GPU"))
    sheet_for("NVIDIA H100 PCIe")
    said = []
    assert flops_ceiling(CUDA, torch.bfloat16, said.append) == (756.5e12, "datasheet bf16 (NVIDIA H100 PCIe)")
    assert said == []


def test_without_a_datasheet_the_peak_is_measured_in_the_dtype_training_computes_in(sheet_for, monkeypatch):
    from tinygen.bench import ceilings

    measured = []
    monkeypatch.setattr(ceilings, "matmul_peak", lambda device, dtype: measured.append(dtype) or 1e12)
    sheet_for("NVIDIA GeForce RTX 3060")
    assert flops_ceiling(CUDA, torch.bfloat16) == (1e12, "measured bf16 matmul")
    sheet_for("NVIDIA H100 PCIe")
    assert flops_ceiling(CUDA, torch.float32) == (1e12, "measured fp32 matmul")  # the datasheet figure is bf16's
    cpu = torch.device("cpu")
    monkeypatch.setattr(ceilings, "cpu_has_bf16", lambda: True)
    assert flops_ceiling(cpu, torch.float32) == (1e12, "measured fp32 matmul")
    assert flops_ceiling(cpu, torch.bfloat16) == (1e12, "measured bf16 matmul")
    assert measured == [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]


def test_the_compiled_roofline_counts_the_slots_the_static_step_reads(monkeypatch):
    """A step on a CPU reads the slots written so far, compiled or not; a StaticDecoder on a GPU
    reads its whole cache each step (a CUDA graph's shapes are fixed). Spy on the cache to check
    that the roofline counts what the step really reads."""
    from types import SimpleNamespace

    from tinygen.core.model import KVCache
    from tinygen.generate.compiled import StaticDecoder

    net = make_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=64)).eval()
    decoder = StaticDecoder(net, compile=False)  # the same step, uncompiled: no compiler needed
    read = []
    update = KVCache.update
    monkeypatch.setattr(KVCache, "update", lambda self, layer, pos, kv_len, k, v:
                        read.append(kv_len) or update(self, layer, pos, kv_len, k, v))
    with torch.inference_mode():
        decoder(decoder.cache, torch.zeros(1, dtype=torch.long), [10])
    assert read == [11, 11]  # every layer reads the 11 slots filled, of the cache's 48
    assert decode_context(10, 8, decoder) == decode_context(10, 8) == 14  # the prompt, and half the new tokens
    on_gpu = SimpleNamespace(on_cpu=False, max_len=48)
    assert decode_context(10, 8, on_gpu) == 48
    kv_slot = 2 * 2 * 32 * 4  # k and v, 2 layers, n_embd floats of 4 bytes
    assert decode_bytes(net, 48) - decode_bytes(net, 14) == (48 - 14) * kv_slot


def test_a_cpu_without_bf16_instructions_is_put_against_its_fp32_peak(monkeypatch):
    """Emulated bf16 is no ceiling: measuring it would take a minute and give an MFU above 100%."""
    from tinygen.bench import ceilings

    measured = []
    monkeypatch.setattr(ceilings, "matmul_peak", lambda device, dtype: measured.append(dtype) or 1e11)
    monkeypatch.setattr(ceilings, "cpu_has_bf16", lambda: False)
    assert flops_ceiling(torch.device("cpu"), torch.bfloat16) == (1e11, "measured fp32 matmul (no bf16 instructions)")
    assert measured == [torch.float32]
