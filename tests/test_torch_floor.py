"""The torch APIs tinygen calls that older torch releases lack, in one place, each with the first
release that has it. pyproject.toml's `torch>=` must be the newest of the unguarded ones, and the
installed torch must have every one, so that a run of the suite on the floor release proves the
floor (the whole suite passed on torch 2.9.0; 2.8.0 lacks the Dynamo flag, 2.7.1 also gloo's AVG).

Guarded ones (tinygen checks for them and falls back) are listed too, for the record, but do not
set the floor. A new use of a recent API belongs in this list."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


def _dynamo_flag():
    torch._dynamo.config.use_recursive_dict_tags_for_guards  # noqa: B018  (AttributeError before 2.9)


def _int4_cpu():
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (16, 32), dtype=torch.int32), 1)
    sz = torch.rand(1, 16, 2).to(torch.bfloat16)
    torch.ops.aten._weight_int4pack_mm_for_cpu(torch.randn(1, 32).to(torch.bfloat16), packed, 32, sz)


def _int8():
    torch.ops.aten._weight_int8pack_mm(torch.randn(1, 32).to(torch.bfloat16),
                                       torch.ones(16, 32, dtype=torch.int8), torch.ones(16).to(torch.bfloat16))


def _custom_op():
    def ident(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    op = torch.library.custom_op("floorcheck::ident", mutates_args=())(ident)
    op.register_fake(lambda x: torch.empty_like(x))


def _fused_adamw_cpu():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    torch.optim.AdamW([p], fused=True).step()


def _gqa():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    F.scaled_dot_product_attention(q, k, k, enable_gqa=True)


# (first release, where tinygen uses it, probe, guarded by tinygen?)
NEEDED = [
    ("2.9", "generate/compiled.py: torch._dynamo.config.use_recursive_dict_tags_for_guards", _dynamo_flag, False),
    ("2.8", "training/loop.py: all_reduce(op=ReduceOp.AVG) on gloo (see test_distributed)", None, False),
    ("2.6", "generate/quantize.py: aten._convert_weight_to_int4pack_for_cpu, _weight_int4pack_mm_for_cpu",
     _int4_cpu, False),
    ("2.4", "core/model.py: nn.RMSNorm, F.rms_norm", lambda: torch.nn.RMSNorm(4)(torch.ones(1, 4)), False),
    ("2.4", "generate/fastlinear.py: torch.library.custom_op + register_fake", _custom_op, False),
    ("2.4", "training/optim.py: AdamW(fused=True) on a CPU", _fused_adamw_cpu, False),
    ("2.3", "generate/quantize.py: aten._weight_int8pack_mm", _int8, False),
    ("2.3", "torch.compiler.is_compiling", lambda: torch.compiler.is_compiling(), False),
    ("2.9", "training/optim.py: torch.optim.Muon (else AdamW)", lambda: torch.optim.Muon, True),
    ("2.5", "core/model.py: SDPA enable_gqa (else repeat_interleave)", _gqa, True),
    ("2.5", "core/device.py: torch.cpu._is_avx512_bf16_supported (else None)",
     lambda: torch.cpu._is_avx512_bf16_supported(), True),
]


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"[0-9.]+", text).group(0).strip(".").split("."))


def torch_floor() -> tuple[int, ...]:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    return version(re.search(r'^\s*"torch>=([0-9.]+)"', text, re.M).group(1))


def test_the_floor_is_the_newest_unguarded_need():
    assert torch_floor() == max(version(since) for since, _, _, guarded in NEEDED if not guarded)


def test_the_readme_states_the_floor():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"torch {'.'.join(map(str, torch_floor()))} or newer" in readme


@pytest.mark.parametrize("since, where, probe, guarded", [n for n in NEEDED if n[2] is not None],
                         ids=[n[1].split(": ")[-1][:60] for n in NEEDED if n[2] is not None])
def test_this_torch_has_it(since, where, probe, guarded):
    if guarded and version(torch.__version__) < version(since):
        pytest.skip(f"guarded in tinygen; this torch {torch.__version__} predates {since}")
    probe()
