"""Int8 and int4 weight-only quantisation: the numbers they keep, where they apply, a GGUF's 4-bit
weights taken as stored, and the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import STORY_LINES, make_model

from tinygen.core.config import ModelConfig
from tinygen.core.quantized import Q4Weight
from tinygen.errors import TinygenError
from tinygen.generate.plan import prepare
from tinygen.generate.quantize import Int4Linear, Int8Linear, min_max_codes


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
        int8 = prepare(model, "int8").model
        approx = int8(idx)
        assert torch.equal(model(idx), exact)  # the caller's model is left as it was
    linears = [m for m in int8.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears and isinstance(int8.lm_head, Int8Linear) and isinstance(model.lm_head, torch.nn.Linear)
    assert int8.transformer.wte.weight is model.transformer.wte.weight  # the lookup table stays float, shared
    agree = (exact.argmax(-1) == approx.argmax(-1)).float().mean().item()
    assert agree > 0.95, agree
    assert (approx - exact).norm() / exact.norm() < 0.05


def test_quantize_refuses_what_it_cannot_do():
    model = make_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    with pytest.raises(TinygenError, match="unknown quantisation"):
        prepare(model, "int3")
    with pytest.raises(TinygenError, match="float32"):
        prepare(model.to(torch.bfloat16), "int8")


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


@pytest.mark.parametrize("group", [32, 128])
def test_int4_matmul_is_the_dequantized_matmul(group):
    """The kernel computes with exactly the weights the codes, scales and lows stand for: the same
    product as float32 arithmetic on the dequantized matrix, to float tolerance."""
    torch.manual_seed(0)
    out, n_in = 48, 256
    q = torch.randint(0, 16, (out, n_in), dtype=torch.uint8)
    scales, lows = torch.rand(out, n_in // group) / 10, torch.randn(out, n_in // group) / 10
    layer = Int4Linear(Q4Weight(q, scales, lows), bias=torch.randn(out))
    w = q.float() * scales.repeat_interleave(group, 1) + lows.repeat_interleave(group, 1)
    assert layer.packed.numel() == out * n_in // 2  # two codes a byte: an eighth of float32
    assert dict(layer.named_buffers()).keys() == {"packed", "scales_zeros"}  # what a decode step reads
    x = torch.randn(64, n_in)
    # Decode steps and prefills alike read the codes, with bf16 activations: to bf16's precision.
    for rows in (1, 7, 64):
        y, want = layer(x[:rows]), x[:rows] @ w.t() + layer.bias
        assert (y - want).norm() / want.norm() < 1e-2


def test_int4_from_float_keeps_each_groups_ends_and_the_predictions():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    back = min_max_codes(linear.weight, 32).dequantize()
    groups, orig = back.reshape(96, 8, 32), linear.weight.detach().reshape(96, 8, 32)
    # Min-max codes: each group's smallest and largest weights come back (as float math allows).
    torch.testing.assert_close(groups.amin(-1), orig.amin(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(groups.amax(-1), orig.amax(-1), rtol=0, atol=1e-5)
    assert ((groups - orig).abs() <= (orig.amax(-1) - orig.amin(-1))[..., None] / 30 + 1e-5).all()  # half a step

    model = make_model(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=320), scale=3.0)
    idx = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = model(idx)
        int4 = prepare(model, "int4").model
        approx = int4(idx)
    assert isinstance(int4.lm_head, Int4Linear) and isinstance(int4.transformer.h[0].mlp.c_fc, Int4Linear)
    agree = (exact.argmax(-1) == approx.argmax(-1)).float().mean().item()
    assert agree > 0.8, agree
    assert (approx - exact).norm() / exact.norm() < 0.2


def tiny_gguf(path, qtype, **write):
    """A small llama GGUF with its matrices in qtype and a byte-level tokenizer that load_model
    accepts (GPT-2's printable spelling of each byte, and a few merges); returns (path, state)."""
    pytest.importorskip("gguf")
    from test_gguf_file import tiny_llama, write_gguf

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spelling = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in
                                                 enumerate(b for b in range(256) if b not in printable)}
    merges = [f"{a} {b}" for a, b in zip("abcdefghijklmnop", "qrstuvwxyzabcdef")]
    vocab = [spelling[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
    tokens = {"tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": vocab, "tokenizer.ggml.merges": merges,
              "tokenizer.ggml.token_type": [1] * len(vocab)}
    config, state = tiny_llama(vocab=len(vocab))
    return write_gguf(path, config, state, qtype=qtype, meta=tokens, **write), state


def test_a_gguf_s_4_bit_weights_go_in_as_stored(tmp_path):
    """Under --quantize int4 a Q4_1 or Q4_0 GGUF's matrices are the file's own numbers: the int4
    model's logits are the dequantized float model's. A file's 8-bit matrices stay in float32,
    and another group size quantises from the float values instead."""
    gguf = pytest.importorskip("gguf")
    from tinygen.core.checkpoint import load_model

    Q = gguf.GGMLQuantizationType
    for qtype in (Q.Q4_1, Q.Q4_0):
        path, state = tiny_gguf(tmp_path / f"{qtype.name}.gguf", qtype)
        exact = load_model(path)[0]
        idx = torch.randint(0, exact.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        net, _, info = load_model(path)
        int4 = prepare(net, "int4", stored=info.stored).model
        layers = [int4.lm_head, int4.transformer.h[0].attn.c_attn, int4.transformer.h[1].mlp.c_proj]
        assert all(isinstance(m, Int4Linear) and m.group == 32 for m in layers)  # the tied head too
        with torch.no_grad():
            # 24 rows: a prefill; one row: a decode step. Both in bf16 activations.
            torch.testing.assert_close(int4(idx), exact(idx), rtol=5e-2, atol=5e-2)
            torch.testing.assert_close(int4(idx[:1, :1]), exact(idx[:1, :1]), rtol=5e-2, atol=5e-2)
        g64 = prepare(net, "int4-g64", stored=info.stored).model
        assert g64.transformer.h[0].mlp.c_fc.group == 64
    # SmolLM2's mix: 4-bit blocks, and the embedding (the tied head) in Q8_0, which stays float32.
    embed = state["model.embed_tokens.weight"].numpy()
    path, _ = tiny_gguf(tmp_path / "mixed.gguf", Q.Q4_1, drop=("token_embd.weight",),
                        extra={"token_embd.weight": (gguf.quants.quantize(embed, Q.Q8_0), Q.Q8_0)})
    net, _, info = load_model(path)
    mixed = prepare(net, "int4", stored=info.stored).model
    assert not isinstance(mixed.lm_head, (Int4Linear, Int8Linear)) and mixed.lm_head.weight.dtype == torch.float32
    assert isinstance(mixed.transformer.h[0].mlp.c_fc, Int4Linear)
