"""The fast GGUF opener (tinygen.formats.gguf_file) against gguf's own GGUFReader: the same metadata
values and tensor entries on files written here with every value type, quant types and alignments,
and on the SmolLM2 GGUF in ../shared/models when present; each way a file can be wrong is one
TinygenError line, as the reader gave before."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from modelfiles import tiny_llama, write_gguf

from tinygen.errors import TinygenError
from tinygen.formats.gguf_file import open_gguf
from tinygen.formats.gguf_reader import read_gguf, read_gguf_header

gguf = pytest.importorskip("gguf")
Q, V = gguf.GGMLQuantizationType, gguf.GGUFValueType

SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = Path("/work/models/gemma-3-270m-q4_k_m.gguf")


def assert_same_as_gguf_reader(path: Path) -> None:
    ours = open_gguf(path)
    theirs = gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(expected)
    for key, value in expected.items():
        assert ours.fields[key] == value and type(ours.fields[key]) is type(value), key
        if isinstance(value, list):
            assert [type(v) for v in ours.fields[key]] == [type(v) for v in value], key
    assert ours.data_offset == theirs.data_offset and ours.alignment == theirs.alignment
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == \
            (b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset)
        assert a.shape.dtype == b.shape.dtype and np.array_equal(a.shape, b.shape)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data) and not a.data.flags.writeable, a.name


# Every metadata value type, alone and in arrays (nested ones too, which GGUFReader reads flat).
TYPED = {
    "t.u8": (7, V.UINT8), "t.i8": (-7, V.INT8), "t.u16": (65535, V.UINT16), "t.i16": (-300, V.INT16),
    "t.u32": (4_000_000_000, V.UINT32), "t.i32": (-5, V.INT32), "t.f32": (0.1, V.FLOAT32), "t.bool": (True, V.BOOL),
    "t.u64": (2**63 + 5, V.UINT64), "t.i64": (-(2**40), V.INT64), "t.f64": (1e-300, V.FLOAT64),
    "t.str": ("héllo ▁ 日本語 😀", V.STRING), "t.empty": ("", V.STRING),
}
ARRAYS = {
    "a.u8": ([1, 2, 255], V.UINT8), "a.i16": ([-1, 2], V.INT16), "a.u32": ([1, 2**32 - 1], V.UINT32),
    "a.i32": ([-1, 0, 3], V.INT32), "a.f32": ([0.5, -1000.0, 1e-7], V.FLOAT32), "a.bool": ([True, False], V.BOOL),
    "a.u64": ([2**64 - 1], V.UINT64), "a.i64": ([-(2**62)], V.INT64), "a.f64": ([0.1, 2.5], V.FLOAT64),
    "a.str": (["", "▁the", "<0x0A>", "日本", "😀", "", "a" * 300, "\n\n"], V.STRING),
}


def write_typed(path: Path, alignment: int | None = None, endian=None) -> Path:
    w = gguf.GGUFWriter(path, "llama", **({"endianess": endian} if endian is not None else {}))
    if alignment:
        w.add_custom_alignment(alignment)
    for key, (value, kind) in TYPED.items():
        w.add_key_value(key, value, kind)
    for key, (value, kind) in ARRAYS.items():
        w.add_key_value(key, value, V.ARRAY, kind)
    w.add_key_value("a.nested", [["x", "yz"], ["", "é"]], V.ARRAY, V.ARRAY)
    w.add_key_value("a.nested_int", [[1, 2], [3]], V.ARRAY, V.ARRAY)
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 64)).astype(np.float16))
    w.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    w.add_tensor("vec", rng.standard_normal(7).astype(np.float32))
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.BF16):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (4, 256 // block * size), dtype=np.uint8)
        w.add_tensor(f"q.{qtype.name}", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64, 8])
def test_every_value_type_and_tensor_type_reads_as_gguf_reader_reads_it(tmp_path, alignment):
    path = write_typed(tmp_path / "typed.gguf", alignment)
    assert_same_as_gguf_reader(path)
    fields = open_gguf(path).fields
    assert fields["a.str"][3] == "日本" and fields["a.nested"] == ["x", "yz", "", "é"]
    assert fields["t.u64"] == 2**63 + 5 and fields["a.u64"] == [2**64 - 1]


@pytest.mark.parametrize("qtype", [None, Q.Q4_0, Q.Q8_0, Q.Q4_K])
def test_model_files_read_as_gguf_reader_reads_them(tmp_path, qtype):
    config, state = tiny_llama(d=256, ff=256)
    assert_same_as_gguf_reader(write_gguf(tmp_path / "m.gguf", config, state, qtype=qtype))


@pytest.mark.skipif(not SMOLLM2.exists(), reason=f"{SMOLLM2} is absent")
def test_smollm2_reads_as_gguf_reader_reads_it():
    assert_same_as_gguf_reader(SMOLLM2)


@pytest.mark.skipif(not GEMMA3.exists(), reason=f"{GEMMA3} is absent")
def test_gemma3_vocabulary_arrays():
    fields = open_gguf(GEMMA3).fields
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == 262144
    assert tokens[105:107] == ["<start_of_turn>", "<end_of_turn>"] and tokens[238] == "<0x00>"
    assert all(isinstance(t, str) for t in tokens) and isinstance(scores[0], float)


# --- what is wrong with a file, in one line ------------------------------------------------------------


def one_line_error(path, match: str) -> None:
    with pytest.raises(TinygenError, match=match) as e:
        open_gguf(path)
    assert "\n" not in str(e.value)


@pytest.fixture
def typed(tmp_path):
    return write_typed(tmp_path / "typed.gguf")


@pytest.mark.parametrize("keep", [6, 20, 0.1, 0.3, 0.5, 0.9, 0.999])
def test_truncated_anywhere(typed, tmp_path, keep):
    data = typed.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    one_line_error(cut, "cut.gguf is truncated or damaged .*download it again")


def test_a_string_length_past_the_end(typed, tmp_path):
    data = bytearray(typed.read_bytes())
    at = data.index(b"a" * 300) - 8
    data[at:at + 8] = struct.pack("<Q", 2**40)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    one_line_error(tmp_path / "bad.gguf", "truncated or damaged")


def test_not_a_gguf_folder_and_missing(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 a zip")
    one_line_error(tmp_path / "x.gguf", r"x.gguf is not a GGUF file \(it starts with b'PK\\x03\\x04'")
    (tmp_path / "empty.gguf").write_bytes(b"")
    one_line_error(tmp_path / "empty.gguf", "empty.gguf is not a GGUF file")
    one_line_error(tmp_path, "is a folder; pass the .gguf file inside it")
    one_line_error(tmp_path / "nope.gguf", "cannot read .*nope.gguf")


def test_big_endian(tmp_path):
    path = write_typed(tmp_path / "be.gguf", endian=gguf.GGUFEndian.BIG)
    one_line_error(path, "be.gguf is a big-endian GGUF; tinygen reads little-endian ones")


def test_tensor_type_unknown_to_gguf(typed, tmp_path):
    data = typed.read_bytes()
    name = b"f32"
    at = data.index(name + struct.pack("<I", 2)) + len(name) + 4 + 2 * 8  # after n_dims and two dims
    assert struct.unpack_from("<I", data, at)[0] == Q.F32
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:at] + struct.pack("<I", 99) + data[at + 4:])
    one_line_error(bad, "holds a tensor type the installed gguf package does not know .*99.*upgrade gguf")


def test_value_type_unknown(typed, tmp_path):
    data = bytearray(typed.read_bytes())
    at = data.index(b"t.u8") + 4
    data[at:at + 4] = struct.pack("<I", 77)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    one_line_error(tmp_path / "bad.gguf", "truncated or damaged .*77")


@pytest.mark.parametrize("key", ["t.str", "a.str"])  # alone, and in an array
def test_metadata_that_is_not_utf8(typed, tmp_path, key):
    data = bytearray(typed.read_bytes())
    at = data.index("日本".encode(), data.index(key.encode()))
    data[at] = 0xFF
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    one_line_error(tmp_path / "bad.gguf", f"bad.gguf: metadata {key} is not valid UTF-8; the file is damaged")


def test_a_string_split_mid_character_is_refused(tmp_path):
    # "日本" cut as "\xe6" + "\x97\xa5\xe6\x9c\xac": joined the bytes decode, alone neither does.
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    w.add_key_value("a.str", [b"\xe6", b"\x97\xa5\xe6\x9c\xac"], V.ARRAY, V.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    one_line_error(tmp_path / "m.gguf", "metadata a.str is not valid UTF-8")


def test_duplicate_key_and_tensor(typed, tmp_path):
    data = typed.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data.replace(b"t.i8", b"t.u8", 1))
    one_line_error(bad, "truncated or damaged .*t.u8 appears twice")
    bad.write_bytes(data.replace(b"\x03\x00\x00\x00\x00\x00\x00\x00f16", b"\x03\x00\x00\x00\x00\x00\x00\x00f32", 1))
    one_line_error(bad, "truncated or damaged .*tensor f32 appears twice")


def test_split_and_foreign_architecture_through_the_reader(tmp_path):
    config, state = tiny_llama()
    path = write_gguf(tmp_path / "m.gguf", config, state, meta={"split.count": 2})
    with pytest.raises(TinygenError, match="one part of a split GGUF; merge the parts"):
        read_gguf_header(path)
    path = write_gguf(tmp_path / "g.gguf", config, state, arch="gpt2")
    with pytest.raises(TinygenError, match="architecture 'gpt2' is not supported"):
        read_gguf(path)
