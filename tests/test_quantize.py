"""Int8 weight-only quantisation: the numbers it keeps, where it applies, and its CLI."""

import json
import subprocess
import sys

import pytest
import torch

from tinygen.core.config import ModelConfig
from tinygen.errors import TinygenError
from tinygen.generate.quantize import Int8Linear, quantize

from conftest import STORY_LINES, make_model


def test_int8_linear_stores_a_quarter_and_stays_close():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (96, 256)
    # Each row's largest weight maps to ±127, so rows keep their own range.
    assert q.weight.abs().amax(dim=1).eq(127).all()
    x = torch.randn(3, 5, 256)
    exact, approx = linear(x), q(x)
    assert approx.shape == exact.shape and approx.dtype == torch.float32
    assert (approx - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("arch", ["rope", "gpt2"])
def test_quantised_model_keeps_its_predictions(arch):
    model = make_model(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=300, arch=arch), scale=3.0)
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = model(idx)
        quantize(model, "int8")
        approx = model(idx)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears and isinstance(model.lm_head, Int8Linear)
    assert model.transformer.wte.weight.dtype == torch.float32  # the lookup table stays float
    agree = (exact.argmax(-1) == approx.argmax(-1)).float().mean().item()
    assert agree > 0.95, agree
    assert (approx - exact).norm() / exact.norm() < 0.05


def test_quantize_refuses_what_it_cannot_do():
    model = make_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    with pytest.raises(TinygenError, match="unknown quantisation"):
        quantize(model, "int4")
    with pytest.raises(TinygenError, match="float32"):
        quantize(model.to(torch.bfloat16), "int8")
    assert quantize(model, None) is model


def test_cli_sample_and_eval_with_int8(model_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(STORY_LINES))
    run = lambda *a: subprocess.run([sys.executable, "-m", "tinygen", *a], capture_output=True, text=True, timeout=120)
    r = run("sample", "Once upon", "-m", str(model_path), "-n", "12", "-t", "0", "--quantize", "int8")
    assert r.returncode == 0 and r.stdout, r.stderr
    scores = {}
    for q in ([], ["--quantize", "int8"]):
        r = run("eval", str(text), "-m", str(model_path), "--json", *q)
        assert r.returncode == 0, r.stderr
        scores[bool(q)] = json.loads(r.stdout)
    assert scores[True]["quantize"] == "int8"
    assert scores[True]["loss"] == pytest.approx(scores[False]["loss"], rel=0.02)
    bad = run("eval", str(text), "-m", str(model_path), "--quantize", "int8", "--record")
    assert bad.returncode == 1 and "--record" in bad.stderr and "Traceback" not in bad.stderr
