"""GGUF's quantized types run as stored: each type's blocks decode to gguf's own dequantized values,
each type's layer multiplies like float32 arithmetic on those values (to bf16's precision, the
kernel's), a matrix fused from parts of different types takes their widest common form, and a
whole file in a Q4_K_M-like mix loads as stored, with no float copy of a quantized matrix, and
decodes like its dequantized float model, at the command line too. Files and blocks are built
here (modelfiles.py); the real SmolLM2 Q4_K_M in ../shared adds a greedy-text check."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_ok
from modelfiles import gguf_tokenizer_fields, random_blocks, tiny_llama, write_gguf

from tinygen.core.checkpoint import load_model
from tinygen.core.quantized import (
    INT4,
    INT8,
    Int8Blocks,
    Q4Weight,
    as_int8_blocks,
    fuse_rows,
)
from tinygen.core.tokenizer import EOT
from tinygen.formats.gguf_blocks import DECODERS, decode, stored_form
from tinygen.generate import native
from tinygen.generate.blockquant import BlockLinear, Int8BlockLinear, RowsEmbedding
from tinygen.generate.engine import generate_batch
from tinygen.generate.plan import prepare
from tinygen.generate.quantize import Int4Linear
from tinygen.generate.sampling import SamplingParams

Q = gguf.GGMLQuantizationType
SMOLLM2_K = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct" / \
    "SmolLM2-135M-Instruct.Q4_K_M.gguf"


def blocks_of(type_name: str, rows: int = 32, cols: int = 512, seed: int = 0) -> np.ndarray:
    """A (rows, cols) matrix in this type, as a GGUF stores it: quantized by gguf where it can, else
    random blocks (k-quants)."""
    qtype = getattr(Q, type_name)
    try:
        data = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
        return gguf.quants.quantize(data, qtype)
    except NotImplementedError:
        return random_blocks(qtype, (rows, cols), seed)


def gguf_values(data: np.ndarray, type_name: str) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, getattr(Q, type_name)), np.float32))


@pytest.mark.parametrize("type_name", list(DECODERS))
def test_each_type_decodes_to_ggufs_own_values(type_name):
    data = blocks_of(type_name)
    w = decode(data, type_name)
    assert torch.equal(w.dequantize(), gguf_values(data, type_name))  # bit for bit
    if stored_form(type_name) == INT4:
        assert isinstance(w, Q4Weight) and w.q.dtype == torch.uint8 and int(w.q.max()) <= 15
        assert w.scales.shape == (32, 512 // 32)
    else:
        assert isinstance(w, Int8Blocks) and w.codes.dtype == torch.int8 and w.scales.dtype == torch.float32
        assert w.block == (16 if type_name == "Q6_K" else 32)
        assert (w.lows is not None) == (type_name in ("Q5_1", "Q5_K"))


def test_large_matrices_decode_in_row_chunks_the_same(monkeypatch):
    from tinygen.formats import gguf_blocks

    data = blocks_of("Q5_K", rows=40, cols=256)
    whole = decode(data, "Q5_K")
    monkeypatch.setattr(gguf_blocks, "CHUNK_ROWS", 16)
    assert torch.equal(decode(data, "Q5_K").dequantize(), whole.dequantize())


def stored_layer(w, bias=None) -> torch.nn.Module:
    return Int4Linear(w, bias) if isinstance(w, Q4Weight) else Int8BlockLinear(w, bias)


@pytest.mark.parametrize("type_name", list(DECODERS))
def test_each_types_layer_multiplies_like_float_arithmetic_on_its_values(type_name):
    """The int4 kernel takes bf16 activations and bf16 scales and returns bf16, so the product is
    float32's to bf16's precision: a layout or zero-point mistake would be off by far more."""
    data = blocks_of(type_name, rows=48, cols=512, seed=1)
    w = gguf_values(data, type_name)
    bias = torch.randn(48)
    layer = stored_layer(decode(data, type_name), bias)
    assert isinstance(layer, Int4Linear if stored_form(type_name) == INT4 else Int8BlockLinear)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(2))
    for rows in (1, 3, 40):  # decode steps and a prefill, through the same kernel
        want = x[:rows].double() @ w.double().t() + bias.double()
        got = layer(x[:rows])
        assert got.dtype == torch.float32 and got.shape == (rows, 48)
        assert (got.double() - want).norm() / want.norm() < 5e-3, rows


def test_int8_blocks_of_16_and_32_with_and_without_lows():
    """The pair layout's zero point carries each block's constant: codes far from the middle, lows
    and blocks of 16 all come out right (Int8BlockLinear's docstring)."""
    g = torch.Generator().manual_seed(0)
    for block, lows in ((16, False), (32, False), (32, True), (16, True)):
        codes = torch.randint(-128, 128, (32, 256), dtype=torch.int8, generator=g)
        codes[:, :block] = 127  # a block at the top of the range
        scales = torch.rand(32, 256 // block, generator=g) / 50
        w = Int8Blocks(codes, scales, torch.randn(32, 256 // block, generator=g) if lows else None)
        x = torch.randn(5, 256, generator=g)
        want = x.double() @ w.dequantize().double().t()
        assert (Int8BlockLinear(w)(x).double() - want).norm() / want.norm() < 5e-3, (block, lows)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q8_0", "Q6_K"])
def test_a_matrix_read_a_run_of_rows_at_a_time_packs_as_when_read_whole(tmp_path, type_name):
    """A large matrix (an output head) is read and packed a run of rows at a time, from the file: the
    same layer as from the whole matrix, a height that is no multiple of 16 included."""
    from tinygen.core.quantized import StoredMatrix

    rows = 2 * 1024 + 40
    data = blocks_of(type_name, rows=rows, cols=256, seed=3)
    whole = decode(data, type_name)
    matrix = StoredMatrix(stored_form(type_name), lambda: whole, rows,
                          lambda start, stop: decode(data[start:stop], type_name))
    assert len(list(matrix.chunks(1024))) == 3
    layer = Int4Linear if stored_form(type_name) == INT4 else Int8BlockLinear
    a, b = layer(matrix.chunks(1024), None, rows), layer(whole)
    assert a.out_features == b.out_features == rows
    for name, buffer in b.named_buffers():
        assert torch.equal(dict(a.named_buffers())[name], buffer), name
    x = torch.randn(2, 256)
    assert torch.equal(a(x), b(x))


def test_fused_parts_take_the_widest_common_form():
    q4 = [decode(blocks_of(t, rows=16, cols=256, seed=i), t) for i, t in enumerate(("Q4_0", "Q4_1", "Q4_K"))]
    fused = fuse_rows(q4)
    assert isinstance(fused, Q4Weight)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in q4]))
    # Gemma's and SmolLM2's attention: q and k in Q5_0, v in Q8_0; a 4-bit part among 6-bit ones.
    for types, block in ((("Q5_0", "Q5_0", "Q8_0"), 32), (("Q4_K", "Q5_1", "Q6_K"), 16)):
        parts = [decode(blocks_of(t, rows=16, cols=256, seed=i), t) for i, t in enumerate(types)]
        fused = fuse_rows(parts)
        assert isinstance(fused, Int8Blocks) and fused.block == block, types
        assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts])), types
    with pytest.raises(ValueError, match="cannot split"):
        as_int8_blocks(fused, 32)


# -- a whole file in a Q4_K_M-like mix -------------------------------------------------------------

# Each kind of matrix in a type of its own; c_attn fuses three types, c_fc two.
MIX = {"attn_q": Q.Q4_K, "attn_k": Q.Q5_1, "attn_v": Q.Q8_0, "attn_output": Q.Q4_K, "ffn_gate": Q.Q5_0,
       "ffn_up": Q.Q5_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q8_0, "output": Q.Q4_K}


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def mixed(request, tmp_path_factory, tokenizer):
    """(path, tied) of a llama GGUF with MIX's types, 256 wide so that k-quants fit; the untied one
    has a Q4_K embedding (a 4-bit table read from the file) and a Q4_K head."""
    tied = request.param
    n_vocab = len(tokenizer.ranks) + 1
    config, state = tiny_llama(n_layer=2, d=256, n_head=4, n_kv=2, ff=512, vocab=n_vocab, tied=tied)
    types = {**MIX, **({} if tied else {"token_embd": Q.Q4_K})}
    path = tmp_path_factory.mktemp("mixed") / f"mixed-{'tied' if tied else 'untied'}.gguf"
    write_gguf(path, config, state, Q.Q5_0, meta=gguf_tokenizer_fields(tokenizer.ranks, [EOT]), types=types,
               quiet_ids=[n_vocab - 1])
    return path, tied


@pytest.mark.parametrize("built", [True, False], ids=["native", "torch-kernels"])
def test_a_mixed_file_loads_as_stored_with_no_float_matrix(mixed, built, monkeypatch):
    """With the native block products (native.py) where they build, and torch's int4 kernel where
    they do not."""
    if built and native.library() is None:
        pytest.skip("no C compiler builds the native block products here")
    if not built:
        monkeypatch.setattr(native, "library", lambda: None)
    path, tied = mixed
    net, tok, info = load_model(path, as_stored=True)
    assert all(p.is_meta for name, p in net.named_parameters() if p.dim() == 2)  # no float copy was made
    assert {name: m.form for name, m in info.stored.items() if ".h.0." in name} == {
        "transformer.h.0.attn.c_attn": INT8, "transformer.h.0.attn.c_proj": INT4,
        "transformer.h.0.mlp.c_fc": INT8, "transformer.h.0.mlp.c_proj": INT8}
    assert "run as stored" in info.notes[-1]
    prepared = prepare(net, stored=info.stored, embedding_rows=info.embedding_rows).model
    layers = prepared.transformer.h[0]
    int8, int4 = (BlockLinear, BlockLinear) if built else (Int8BlockLinear, Int4Linear)
    assert isinstance(layers.attn.c_attn, int8) and layers.attn.c_attn.block == 32
    assert isinstance(layers.attn.c_proj, int4)
    assert isinstance(layers.mlp.c_proj, int8) and layers.mlp.c_proj.block == 16
    assert isinstance(prepared.transformer.wte, RowsEmbedding)
    assert isinstance(prepared.lm_head, int8 if tied else int4)
    if built:
        assert {layers.attn.c_proj.kind, layers.mlp.c_proj.kind} == {native.KIND[INT4], native.KIND[INT8]}
    assert not [name for name, p in prepared.named_parameters() if p.dim() == 2]  # matrices are codes only
    stored_bytes = sum(b.nbytes for b in prepared.buffers())
    file_bytes = sum(p.stat().st_size for p in [path])
    assert stored_bytes < 1.5 * file_bytes

    float_net = load_model(path)[0]
    ids = torch.tensor([tok.encode("Once upon a time, Spot ran")])
    with torch.no_grad():
        assert torch.equal(prepared.transformer.wte(ids), float_net.transformer.wte(ids))  # rows from the file
        got, want = prepared(ids), float_net(ids)
    # The native products also round activations to int8 per 32 inputs (llama.cpp's rounding),
    # which on random weights moves the logits a little further.
    assert (got - want).norm() / want.norm() < (5e-2 if built else 3e-2)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8


def test_the_embedding_left_in_the_file_is_read_only_for_the_rows_looked_up(mixed):
    path, _ = mixed
    net, _, info = load_model(path, as_stored=True)
    looked_up = []
    model = prepare(net, stored=info.stored,
                    embedding_rows=lambda ids: looked_up.append(len(ids)) or info.embedding_rows(ids)).model
    assert model.device == torch.device("cpu") and model.dtype == torch.float32 and not looked_up  # no table read
    wte = model.transformer.wte
    wte(torch.tensor([[3, 5, 7]]))
    assert looked_up == [3]
    with pytest.raises(IndexError):
        wte(torch.tensor([[0, wte.num_embeddings]]))
    assert wte.weight.shape == (wte.num_embeddings, wte.embedding_dim)  # the whole table, for inspect's views


def test_the_command_line_runs_a_quantized_file_as_stored_unless_a_dtype_is_named(cli, mixed):
    from tinygen.cli.common import load_model as cli_load

    path, _ = mixed
    r = cli("sample", "-m", path, "Once upon a time", "-n", "6", "-t", "0")
    assert_ok(r)
    assert "run as stored" in r.err
    net, tok = cli_load(str(path), "cpu")[:2]
    ids = generate_batch(net, [tok.encode("Once upon a time")], SamplingParams(temperature=0), 6)[0]
    assert r.text == tok.decode(ids)
    r = cli("sample", "-m", path, "Once upon a time", "-n", "6", "-t", "0", "--dtype", "float32")
    assert_ok(r)
    assert "converted" in r.err and "run as stored" not in r.err
    r = cli("info", "-m", path)
    assert_ok(r)
    assert "Q6_K: as stored (int8 blocks)" in r.out and "embedding rows read from the file" in r.out


@pytest.mark.skipif(not SMOLLM2_K.exists(), reason=f"{SMOLLM2_K} is absent")
def test_smollm2_q4_k_m_as_stored_picks_the_dequantized_models_tokens():
    """Along the dequantized model's greedy text, the model as stored ranks first the same token
    wherever the dequantized one is not close to a tie: rounding activations to int8 (as llama.cpp
    does) may only flip near-ties."""
    from tinygen.cli.common import load_model as cli_load

    stored = cli_load(str(SMOLLM2_K), "cpu")
    dense = cli_load(str(SMOLLM2_K), "cpu", dtype="float32")
    tok = stored.tokenizer
    for prompt in ("The capital of France is", "def fibonacci(n):\n    "):
        prefix = tok.encode(prompt)
        ids = prefix + generate_batch(dense.model, [prefix], SamplingParams(temperature=0), 32)[0]
        with torch.no_grad():
            want, got = (m.model(torch.tensor([ids]))[0, len(prefix) - 1:] for m in (dense, stored))
        top2 = want.topk(2).values
        decided = top2[:, 0] - top2[:, 1] > 0.5
        assert decided.sum() >= 16
        assert torch.equal(got.argmax(-1)[decided], want.argmax(-1)[decided]), prompt
        tv = (got.softmax(-1) - want.softmax(-1)).abs().sum(-1) / 2  # total variation, per position
        assert tv.mean() < 0.05 and tv.max() < 0.15
