"""The native block products (generate/native.py, blockdot.c): each GGUF type's layer equals, to
float32's precision, the float product of gguf's own dequantized weights and the activations
rounded to int8 per 32 inputs (the one rounding the products make, as llama.cpp's do); the portable
C path equals the vectorised one; the build is cached under a key that changes with the source;
and where nothing builds, stored matrices run on torch's kernels. Tests skip where this machine
has no C compiler."""

from __future__ import annotations

import ctypes
from dataclasses import replace

import pytest
import torch
from test_engine import _can_build_cpu_kernels
from test_kquants import blocks_of, gguf_values, mixed  # noqa: F401  (a fixture)

from tinygen.core.quantized import Int8Blocks, Q4Weight, StoredMatrix
from tinygen.formats.gguf_blocks import DECODERS, decode, stored_form
from tinygen.generate import native
from tinygen.generate.blockquant import BlockLinear, NativeRMSNorm

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler builds the native products here")


def rounded(x: torch.Tensor) -> torch.Tensor:
    """x (rows, K) as the products see it: each run of 32 inputs as int8 codes times amax / 127."""
    blocks = x.double().view(x.size(0), -1, 32)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).float().double()
    q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0)
    return (q * d).view_as(x)


def held(w):
    """w with its scales and lows rounded to float16, as BlockLinear holds them."""
    return replace(w, scales=w.scales.half().float(), lows=None if w.lows is None else w.lows.half().float())


def assert_product(layer: torch.nn.Module, w: torch.Tensor, x: torch.Tensor, bias=None) -> None:
    want = rounded(x) @ w.double().t() + (0 if bias is None else bias.double())
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), (got.double() - want).abs().max()


@pytest.mark.parametrize("type_name", list(DECODERS))
def test_each_types_layer_is_the_float_product_on_int8_activations(type_name):
    data = blocks_of(type_name, rows=48, cols=512, seed=1)
    w = decode(data, type_name)
    values = gguf_values(data, type_name)
    layer = BlockLinear(w, stored_form(type_name), bias=torch.randn(48))
    # Scales and lows are kept as float16: a K-quant's d * sc, within float16's rounding.
    assert (held(w).dequantize() - values).abs().max() <= 2 ** -10 * values.abs().max()
    if type_name.startswith("Q5"):  # 5-bit codes, packed to the file's own size
        assert layer.kind == native.FIVE_BITS and layer.codes.nbytes == 48 * 512 * 20 // 32
    x = torch.randn(11, 512, generator=torch.Generator().manual_seed(2))
    for rows in (1, 3, 4, 11):  # a decode step, a tile and a part of one, and a prefill
        assert_product(layer, held(w).dequantize(), x[:rows], layer.bias)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
@pytest.mark.parametrize("cols", [96, 800])
def test_a_width_of_odd_blocks_multiplies_as_any_other(type_name, cols):
    """3 and 25 blocks a row: the wide loops' odd last block and their scales past a run of 16."""
    w = decode(blocks_of(type_name, rows=8, cols=cols, seed=3), type_name)
    layer = BlockLinear(w, stored_form(type_name))
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(4))
    for rows in (1, 5):
        assert_product(layer, held(w).dequantize(), x[:rows])


def test_blocks_of_16_and_32_with_and_without_lows_and_extreme_codes():
    g = torch.Generator().manual_seed(0)
    for block, lows in ((16, False), (32, False), (32, True), (16, True)):
        codes = torch.randint(-128, 128, (40, 256), dtype=torch.int8, generator=g)
        codes[:, :block] = -128  # maddubs takes |code|: -128's magnitude does not fit an int8
        codes[1, :] = 127
        scales = (torch.rand(40, 256 // block, generator=g) / 50).half().float()
        w = Int8Blocks(codes, scales, (torch.randn(40, 256 // block, generator=g)).half().float() if lows else None)
        x = torch.randn(6, 256, generator=g) * 3
        x[0] = 0  # an all-zero block of inputs has a scale of 0
        assert_product(BlockLinear(w, "int8"), w.dequantize(), x)


def test_4_bit_codes_at_both_ends():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (24, 128), dtype=torch.uint8, generator=g)
    q[0], q[1] = 0, 15
    w = Q4Weight(q, (torch.rand(24, 4, generator=g) / 10).half().float(), (-torch.rand(24, 4, generator=g)).half().float())
    assert_product(BlockLinear(w, "int4"), w.dequantize(), torch.randn(5, 128, generator=g))


def test_a_matrix_read_in_runs_of_rows_is_the_matrix_read_whole():
    rows = 2 * 1024 + 40
    data = blocks_of("Q6_K", rows=rows, cols=256, seed=3)
    whole = decode(data, "Q6_K")
    matrix = StoredMatrix(stored_form("Q6_K"), lambda: whole, rows, lambda a, b: decode(data[a:b], "Q6_K"))
    a, b = BlockLinear(matrix.chunks(1024), matrix.form), BlockLinear(whole, matrix.form)
    for name, buffer in b.named_buffers():
        assert torch.equal(dict(a.named_buffers())[name], buffer), name
    x = torch.randn(2, 256)
    assert torch.equal(a(x), b(x))


def test_a_matrix_whose_later_rows_need_8_bits_is_kept_at_8(monkeypatch):
    """The first run of rows decides 5-bit codes; a later run that needs more is refused, and the
    plan builds the matrix again at 8 bits."""
    from tinygen.generate import plan

    g = torch.Generator().manual_seed(7)
    small = Int8Blocks(torch.randint(-16, 16, (8, 64), dtype=torch.int8, generator=g), torch.rand(8, 2, generator=g))
    wide = Int8Blocks(torch.randint(-128, 128, (8, 64), dtype=torch.int8, generator=g), torch.rand(8, 2, generator=g))
    whole = Int8Blocks(torch.cat([small.codes, wide.codes]), torch.cat([small.scales, wide.scales]))
    matrix = StoredMatrix("int8", lambda: whole, 16, lambda a, b: small if a == 0 else wide)
    monkeypatch.setattr(plan, "STORED_CHUNK_ROWS", 8)
    layer = plan._stored_layer(matrix, None)
    assert isinstance(layer, BlockLinear) and layer.kind == native.KIND["int8"]
    assert_product(layer, held(whole).dequantize(), torch.randn(3, 64, generator=g))


def test_casting_the_model_leaves_the_blocks_as_they_are():
    """Scales are held as int16 bits, so a cast of floating-point tensors (model.to(bfloat16))
    leaves what the native product reads unchanged; a bf16 input comes back bf16."""
    w = decode(blocks_of("Q4_K", rows=16, cols=256), "Q4_K")
    layer = BlockLinear(w, "int4")
    x = torch.randn(2, 256)
    before = layer(x)
    layer.to(torch.bfloat16)
    assert torch.equal(layer(x), before)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_the_portable_c_path_equals_the_vectorised_one(tmp_path, monkeypatch):
    """blockdot.c built without -march=native (no AVX2: the loops every other CPU runs) gives the
    products of the build in use, to float rounding."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiler = native.compiler_path()
    path = native.build(compiler, ["-O2"])
    assert path is not None and path.parent == tmp_path / "tinygen" / "kernels"
    portable = ctypes.CDLL(str(path))
    assert portable.blockdot_simd() == 0
    portable.block_matmul.argtypes = native.library().block_matmul.argtypes
    monkeypatch.setattr(native, "library", lambda: portable)
    for type_name in ("Q4_K", "Q5_K", "Q6_K", "Q8_0"):
        w = decode(blocks_of(type_name, rows=16, cols=256, seed=4), type_name)
        layer = BlockLinear(w, stored_form(type_name))
        x = torch.randn(5, 256, generator=torch.Generator().manual_seed(5))
        want = rounded(x) @ held(w).dequantize().double().t()
        assert (layer(x).double() - want).abs().max() <= 1e-5 * want.abs().max(), type_name


def test_the_build_is_cached_by_source_and_flags_and_failures_are_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiler = native.compiler_path()
    first = native.build(compiler, ["-O1"])
    assert first is not None and native.build(compiler, ["-O1"]) == first  # cached: the same file
    for path in (*native.SOURCES, native.HEADER):  # a copy of the sources, one of them changed
        (tmp_path / path.name).write_text(path.read_text() + ("\n/* changed */\n" if path.name == "blockdot.c" else ""))
    monkeypatch.setattr(native, "SOURCES", tuple(tmp_path / path.name for path in native.SOURCES))
    assert native.build(compiler, ["-O1"]) not in (None, first)  # a changed source is a new build
    assert native.build(compiler, ["-O1", "--no-such-flag"]) is None
    assert list((tmp_path / "tinygen" / "kernels").glob("*.failed"))  # asked once, not at every start
    assert not list((tmp_path / "tinygen" / "kernels").glob("*.tmp"))


def test_native_rms_norm_is_torchs():
    norm = torch.nn.RMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 96)
    assert torch.allclose(NativeRMSNorm(norm)(x), norm(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(NativeRMSNorm(norm)(x.double()), norm(x.double()))  # other dtypes: torch's own


@pytest.mark.skipif(not _can_build_cpu_kernels(), reason="torch.compile on a CPU needs a C++ compiler and Python's headers")
def test_a_compiled_step_runs_the_native_products(mixed, tmp_path, monkeypatch):  # noqa: F811
    """--compile on a file as stored: the block products are one opaque op in the graph, and the
    compiled step's greedy text is the eager one's."""
    from tinygen.core.checkpoint import load_model
    from tinygen.generate.engine import stream
    from tinygen.generate.plan import prepare
    from tinygen.generate.sampling import SamplingParams

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    path, _ = mixed
    net, tok, info = load_model(path, as_stored=True)
    prepared = prepare(net, compile=True, stored=info.stored, embedding_rows=info.embedding_rows)
    assert isinstance(prepared.model.transformer.h[0].attn.c_proj, BlockLinear)
    torch._dynamo.reset()
    prompt, greedy = tok.encode("Once upon a time"), SamplingParams(temperature=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = list(stream(prepared.model, prompt, greedy, 12, decoder=prepared.decoder))
    assert compiled == list(stream(prepared.model, prompt, greedy, 12))
