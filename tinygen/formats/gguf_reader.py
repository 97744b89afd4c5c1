"""GGUF files (llama.cpp's and ollama's format) read into Hugging Face Llama form: a config dict in
LlamaConfig keys and a state dict with Hugging Face names, so that llama.py maps GGUF files and
Hugging Face folders the same way (gguf_layout.py holds the names and the metadata rules).

The gguf package (llama.cpp's gguf-py) parses and dequantizes; this module converts tensor by
tensor from its memory map. llama.cpp's converter changes llama weights in one way, permuting the
rows of q and k for its rotary layout, and that is undone here (qwen3's rotary kernel pairs Hugging
Face's halves as they are, so its weights are not permuted). gguf and numpy are imported only when
a file is read, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinygen.core.quantized import Q4_BLOCK, Q4Weight
from tinygen.errors import TinygenError
from tinygen.formats.gguf_layout import (
    ARCHITECTURES,
    BLOCK,
    config_from_fields,
    hf_shape,
    llama3_scaling,
    plan_tensors,
)

MAGIC = b"GGUF"


@dataclass
class ConversionReport:
    """What read_gguf converted, for stderr and for tests."""

    counts: dict[str, dict[str, int]]  # tensor kind (attn_q, token_embd, ...) -> GGUF type name -> tensors
    bytes_in: int  # tensor data in the file
    bytes_out: int  # the tensors returned (q8_0 ones at their int8 size)
    seconds: float  # parsing and converting
    dtype: torch.dtype

    def by_type(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for types in self.counts.values():
            for name, n in types.items():
                totals[name] = totals.get(name, 0) + n
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def lines(self) -> list[str]:
        return [f"{kind}: " + ", ".join(name if n == 1 else f"{name} x{n}" for name, n in types.items())
                for kind, types in self.counts.items()]

    def summary(self) -> str:
        n = sum(self.by_type().values())
        types = ", ".join(f"{name} x{k}" for name, k in self.by_type().items())
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"converted {n} tensors ({types}; {_mb(self.bytes_in)}) to {dtype} ({_mb(self.bytes_out)}) "
                f"in {self.seconds:.1f} s")


@dataclass
class GGUFModel:
    """A llama or qwen3 GGUF in Hugging Face form."""

    config: dict  # LlamaConfig keys (model_type "llama" or "qwen3")
    tensors: dict[str, torch.Tensor]  # Hugging Face names, q and k in Hugging Face's rotary layout
    fields: dict  # every metadata key (general.*, tokenizer.*, llama.*, ...) as plain Python values
    report: ConversionReport
    rope_freqs: torch.Tensor | None = None  # llama.cpp's per-frequency divisors; config has them as rope_scaling
    # The Q4_0 and Q4_1 matrices by Hugging Face name, each read from the file as stored only when
    # called: an int4 decode runs the file's own numbers, and no other run holds a second copy.
    q4: dict[str, Callable[[], Q4Weight]] = field(default_factory=dict)


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> GGUFModel:
    """Read a llama- or qwen3-architecture GGUF, every tensor dequantized into `dtype`. Problems are
    TinygenErrors."""
    from gguf import GGMLQuantizationType, dequantize

    start = time.perf_counter()
    if not dtype.is_floating_point:
        raise TinygenError(f"GGUF weights convert to a floating-point dtype, not {dtype}")
    path = Path(path)
    reader = _open(path)
    stamp = _stamp(path)
    where = path.name
    fields = _fields(reader, where)
    config = config_from_fields(fields, where)
    plan = plan_tensors(reader.tensors, config, where)

    counts: dict[str, dict[str, int]] = {}
    tensors: dict[str, torch.Tensor] = {}
    q4: dict[str, Callable[[], Q4Weight]] = {}
    bytes_in = bytes_out = 0
    rope_freqs = None
    for t, hf_name, heads in plan:
        qtype = t.tensor_type
        kind = BLOCK.sub(r"\2", t.name).removesuffix(".weight")
        counts.setdefault(kind, {})
        counts[kind][qtype.name] = counts[kind].get(qtype.name, 0) + 1
        bytes_in += int(t.n_bytes)
        if qtype in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1) and len(t.shape) == 2:
            q4[hf_name] = functools.partial(_read_q4, path, stamp, int(t.data_offset), tuple(t.data.shape),
                                            qtype == GGMLQuantizationType.Q4_1, heads)
        try:
            values = dequantize(t.data, qtype)
        except NotImplementedError:
            raise TinygenError(f"{where}: tensor {t.name} is {qtype.name}, which the gguf package cannot "
                               "dequantize; upgrade gguf or use a file in another quant type") from None
        if not values.flags.writeable:
            values = values.copy()  # F32 comes back as a view of the read-only memory map
        # rope_freqs stays float32: the rope scaling is read back from its exact values.
        weight = torch.from_numpy(values).to(torch.float32 if hf_name == "rope_freqs" else dtype)
        weight = weight.reshape(hf_shape(t))
        if heads:
            weight = _unpermute(weight, heads)
        bytes_out += weight.nbytes
        if hf_name == "rope_freqs":
            rope_freqs = weight
        else:
            tensors[hf_name] = weight
    if rope_freqs is not None and (scaling := llama3_scaling(rope_freqs, config, where)):
        config["rope_scaling"] = scaling
    report = ConversionReport(counts, bytes_in, bytes_out, time.perf_counter() - start, dtype)
    return GGUFModel(config, tensors, fields, report, rope_freqs, q4)


@dataclass
class GGUFHeader:
    """What a GGUF says about itself, without dequantizing a weight: for `tinygen info` and tokenize."""

    config: dict  # LlamaConfig keys, as read_gguf gives them
    fields: dict
    tensors: dict[str, tuple[tuple[int, ...], str]]  # Hugging Face name -> (shape, GGUF type name)


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The config, metadata and tensor types of a GGUF; only rope_freqs (a few hundred floats,
    which hold Llama 3's rope scaling) is read from the tensor data."""
    from gguf import dequantize

    path = Path(path)
    reader = _open(path)
    fields = _fields(reader, path.name)
    config = config_from_fields(fields, path.name)
    tensors = {}
    for t, hf_name, _ in plan_tensors(reader.tensors, config, path.name):
        if hf_name == "rope_freqs":
            freqs = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).to(torch.float32)
            if scaling := llama3_scaling(freqs, config, path.name):
                config["rope_scaling"] = scaling
            continue
        tensors[hf_name] = (hf_shape(t), t.tensor_type.name)
    return GGUFHeader(config, fields, tensors)


def _open(path: Path):
    """The gguf reader of `path`, or a TinygenError that says what is wrong with the file."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise TinygenError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except IsADirectoryError:
        raise TinygenError(f"{path} is a folder; pass the .gguf file inside it") from None
    except OSError as e:
        raise TinygenError(f"cannot read {path}: {e.strerror or e}") from None
    if head != MAGIC:
        raise TinygenError(f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r})")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - a damaged file fails inside gguf in many ways
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "GGMLQuantizationType" in reason:
            raise TinygenError(f"{path} holds a tensor type the installed gguf package does not know ({reason}); "
                               "upgrade gguf") from None
        raise TinygenError(f"{path} is truncated or damaged (gguf: {reason}); download it again") from None
    if reader.byte_order != "I":
        raise TinygenError(f"{path} is a big-endian GGUF; tinygen reads little-endian ones")
    return reader


def _fields(reader, where: str) -> dict:
    """All metadata but the header counts, as plain Python values."""
    fields = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            fields[key] = f.contents()
        except UnicodeDecodeError:
            raise TinygenError(f"{where}: metadata {key} is not valid UTF-8; the file is damaged") from None
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise TinygenError(f"{where}: architecture {arch!r} is not supported; tinygen reads "
                           f"{' and '.join(ARCHITECTURES)} GGUFs")
    if fields.get("split.count", 1) != 1:
        raise TinygenError(f"{where} is one part of a split GGUF; merge the parts with "
                           "`llama-gguf-split --merge` first")
    return fields


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute: within each head it interleaves the two
    rotary halves (rows i and i + head_dim/2 become neighbours); Hugging Face keeps them apart.
    Rows only, so it applies to weights, biases and per-row quant scales alike."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _stamp(path: Path) -> tuple[int, int]:
    """What tells a file from another written at the same path since: its size and modification time."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _read_q4(path: Path, stamp: tuple[int, int], offset: int, shape: tuple[int, int], with_min: bool,
             heads: int) -> Q4Weight:
    """One Q4_0/Q4_1 matrix as stored, read from its place in the file (GGUFModel.q4), which must still
    be the file that was read."""
    import numpy as np

    try:
        if _stamp(path) != stamp:
            raise OSError("changed")
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
    except (OSError, ValueError):
        raise TinygenError(f"{path} was changed or removed since it was loaded; load it again") from None
    w = _q4(data, with_min)
    return Q4Weight(*(_unpermute(x, heads) for x in (w.q, w.scales, w.lows))) if heads else w


def _q4(data, with_min: bool) -> Q4Weight:
    """ggml's block_q4_1 {half d; half m; uint8 qs[16]} or block_q4_0 {half d; uint8 qs[16]}: byte j
    holds input j of the block in its low nibble and input j + 16 in its high one."""
    import numpy as np

    rows = data.shape[0]
    head = 4 if with_min else 2
    blocks = data.reshape(rows, -1, head + Q4_BLOCK // 2)
    halves = np.ascontiguousarray(blocks[..., :head]).view(np.float16)  # (rows, n_blocks, 1 or 2)
    packed = blocks[..., head:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
    scales = torch.from_numpy(np.ascontiguousarray(halves[..., 0]))
    lows = torch.from_numpy(np.ascontiguousarray(halves[..., 1])) if with_min else -8 * scales.float()
    return Q4Weight(torch.from_numpy(np.ascontiguousarray(q)), scales, lows)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB"

