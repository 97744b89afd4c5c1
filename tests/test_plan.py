"""The decode plan (generate/plan.py): one function decides every layer a model decodes with, and
the caller's model is never changed by it."""

import pytest
import torch

from tinygen.core.config import ModelConfig
from tinygen.generate import plan
from tinygen.generate.fastlinear import SmallLinear, SplitLinear
from tinygen.generate.quantize import Int4Linear, Int8Linear

from conftest import make_model


@pytest.fixture
def net(monkeypatch):
    # The attention and MLP matrices of this shape are "large" (split); the rest stay small.
    monkeypatch.setattr(plan, "SPLIT_MIN_WEIGHTS", 64 * 192)
    return make_model(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=96), scale=3.0).eval()


def kinds(model) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, SplitLinear, SmallLinear, Int8Linear, Int4Linear))}


def test_prepare_swaps_layers_in_a_copy_that_shares_the_parameters(net):
    before = kinds(net)
    assert set(before.values()) == {"Linear"}
    prepared = plan.prepare(net)
    assert prepared.decoder is None
    assert kinds(net) == before  # the caller's model is as it was
    got = kinds(prepared.model)
    assert got["transformer.h.0.attn.c_attn"] == "SplitLinear" and got["transformer.h.0.mlp.c_fc"] == "SplitLinear"
    assert got["transformer.h.0.attn.c_proj"] == "Linear"  # small: a plain product
    assert prepared.model.transformer.h[0].attn.c_attn.weight is net.transformer.h[0].attn.c_attn.weight
    assert prepared.model.lm_head.weight is prepared.model.transformer.wte.weight  # a tied head stays tied
    idx = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(prepared.model(idx), net(idx))


def test_compile_fuses_the_small_layers_and_builds_a_decoder(net):
    prepared = plan.prepare(net, compile=True)
    got = kinds(prepared.model)
    assert got["transformer.h.0.attn.c_proj"] == "SmallLinear"
    assert prepared.decoder is not None and prepared.decoder.model is prepared.model
    assert set(kinds(net).values()) == {"Linear"}


def test_a_second_plan_of_the_same_model_quantizes_every_layer(net):
    """A compiled decoder once rewrote the caller's model, so a later quantize skipped the layers it
    had swapped; each plan now starts from the caller's untouched model."""
    plan.prepare(net, compile=True)
    int8 = plan.prepare(net, "int8")
    assert set(kinds(int8.model).values()) == {"Int8Linear"}
    int4 = plan.prepare(net, "int4", compile=True)
    assert set(kinds(int4.model).values()) == {"Int4Linear"}


def test_cpu_only_names_the_flag():
    assert plan.cpu_only("int4") == "--quantize int4" and plan.cpu_only(None) is None
