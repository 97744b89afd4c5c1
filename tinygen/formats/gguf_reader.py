"""GGUF files (llama.cpp's and ollama's format) read into Hugging Face Llama form: a config dict in
LlamaConfig keys and a state dict with Hugging Face names, so that llama.py maps GGUF files and
Hugging Face folders the same way (gguf_layout.py holds the names and the metadata rules).

The gguf package (llama.cpp's gguf-py) dequantizes; this module converts tensor by tensor from
the file's memory map. A matrix in a type that runs as stored (gguf_blocks.py) is also offered as
stored, read from the file only when the decode plan calls for it; asked to, read_gguf leaves such
matrices out of the float weights altogether (on the meta device), so that no float copy is made.
llama.cpp's converter changes llama weights in one way, permuting the rows of q and k for its
rotary layout, and that is undone here (qwen3's rotary kernel pairs Hugging Face's halves as they
are, so its weights are not permuted). gguf and numpy are imported only when a file is read, and
torch only where tensors are made (Llama 3's rope_freqs among them), so reading most headers
(`tinygen tokenize`) never waits for it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tinygen.core.quantized import StoredMatrix, StoredWeight, map_rows
from tinygen.errors import TinygenError
from tinygen.formats.gguf_layout import (
    ARCHITECTURES,
    BLOCK,
    config_from_fields,
    hf_shape,
    llama3_scaling,
    plan_tensors,
)

if TYPE_CHECKING:
    import torch

MAGIC = b"GGUF"


@dataclass
class ConversionReport:
    """What read_gguf converted, for stderr and for tests."""

    counts: dict[str, dict[str, int]]  # tensor kind (attn_q, token_embd, ...) -> GGUF type name -> tensors
    bytes_in: int  # tensor data in the file
    bytes_out: int  # the float tensors returned
    seconds: float  # parsing and converting
    dtype: torch.dtype
    kept: int = 0  # matrices left as stored, not converted

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
        if not self.kept:
            return (f"converted {n} tensors ({types}; {_mb(self.bytes_in)}) to {dtype} ({_mb(self.bytes_out)}) "
                    f"in {self.seconds:.1f} s")
        return (f"read {n} tensors ({types}; {_mb(self.bytes_in)}) in {self.seconds:.1f} s: {self.kept} run as "
                f"stored, {n - self.kept} converted to {dtype} ({_mb(self.bytes_out)})")


@dataclass
class GGUFModel:
    """A llama or qwen3 GGUF in Hugging Face form."""

    config: dict  # LlamaConfig keys (model_type "llama" or "qwen3")
    tensors: dict[str, torch.Tensor]  # Hugging Face names, q and k in Hugging Face's rotary layout
    fields: dict  # every metadata key (general.*, tokenizer.*, llama.*, ...) as plain Python values
    report: ConversionReport
    rope_freqs: torch.Tensor | None = None  # llama.cpp's per-frequency divisors; config has them as rope_scaling
    # The matrices in a type that runs as stored, by Hugging Face name, each read from the file
    # only when called: a decode runs the file's own numbers, and no other run holds a second copy.
    stored: dict[str, StoredMatrix] = field(default_factory=dict)
    # The embedding's rows for token ids, dequantized from the file's map as looked up (when stored).
    embedding_rows: Callable[[torch.Tensor], torch.Tensor] | None = None


def read_gguf(path: str | Path, dtype: torch.dtype | None = None, as_stored: bool = False) -> GGUFModel:
    """Read a llama-family GGUF, every tensor dequantized into `dtype` (None: float32); with as_stored,
    the matrices in `stored` are left on the meta device instead. Problems are TinygenErrors."""
    import torch
    from gguf import dequantize

    from tinygen.formats.gguf_blocks import stored_form

    start = time.perf_counter()
    dtype = dtype or torch.float32
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
    stored: dict[str, StoredMatrix] = {}
    embedding_rows = None
    bytes_in = bytes_out = 0
    rope_freqs = None
    for t, hf_name, heads in plan:
        qtype = t.tensor_type
        kind = BLOCK.sub(r"\2", t.name).removesuffix(".weight")
        counts.setdefault(kind, {})
        counts[kind][qtype.name] = counts[kind].get(qtype.name, 0) + 1
        bytes_in += int(t.n_bytes)
        if stored_form(qtype.name) and len(t.shape) == 2:
            where_in_file = (path, stamp, int(t.data_offset), tuple(t.data.shape), qtype.name)
            # Rows of q and k are permuted by heads: those are read whole (they fuse anyway).
            rows = None if heads else functools.partial(_read_rows, *where_in_file)
            read = functools.partial(_read_stored, *where_in_file, heads)
            stored[hf_name] = StoredMatrix(stored_form(qtype.name), read, hf_shape(t)[0], rows)
            if hf_name == "model.embed_tokens.weight":
                embedding_rows = StoredRows(*where_in_file)
            if as_stored:
                tensors[hf_name] = torch.empty(hf_shape(t), dtype=dtype, device="meta")
                continue
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
    report = ConversionReport(counts, bytes_in, bytes_out, time.perf_counter() - start, dtype,
                              len(stored) if as_stored else 0)
    return GGUFModel(config, tensors, fields, report, rope_freqs, stored, embedding_rows)


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
            import torch

            freqs = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).to(torch.float32)
            if scaling := llama3_scaling(freqs, config, path.name):
                config["rope_scaling"] = scaling
            continue
        tensors[hf_name] = (hf_shape(t), t.tensor_type.name)
    return GGUFHeader(config, fields, tensors)


def _open(path: Path):
    """The parsed header of `path` (formats/gguf_file.py), or a TinygenError that says what is wrong
    with the file."""
    try:
        from tinygen.formats.gguf_file import open_gguf
    except ImportError:
        raise TinygenError("reading GGUF files needs the gguf package: pip install gguf") from None
    return open_gguf(path)


def _fields(reader, where: str) -> dict:
    """All metadata but the header counts, as plain Python values."""
    fields = reader.fields
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        *most, last = ARCHITECTURES
        raise TinygenError(f"{where}: architecture {arch!r} is not supported; tinygen reads "
                           f"{', '.join(most)} and {last} GGUFs")
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


def _map(path: Path, stamp: tuple[int, int], offset: int, shape: tuple[int, int]):
    """A tensor's bytes (rows, row bytes) mapped from the file, which must still be the file that was read."""
    import numpy as np

    try:
        if _stamp(path) != stamp:
            raise OSError("changed")
        return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
    except (OSError, ValueError):
        raise TinygenError(f"{path} was changed or removed since it was loaded; load it again") from None


def _read_stored(path: Path, stamp: tuple[int, int], offset: int, shape: tuple[int, int], type_name: str,
                 heads: int) -> StoredWeight:
    """One matrix as stored, read from its place in the file (GGUFModel.stored). The map is dropped
    once decoded, so the file's pages leave the process."""
    from tinygen.formats.gguf_blocks import decode

    w = decode(_map(path, stamp, offset, shape), type_name)
    return map_rows(w, lambda t: _unpermute(t, heads)) if heads else w


def _read_rows(path: Path, stamp: tuple[int, int], offset: int, shape: tuple[int, int], type_name: str,
               start: int, stop: int) -> StoredWeight:
    """Rows [start, stop) of a matrix as stored, mapping only their bytes: reading a large matrix a run
    of rows at a time never holds more of the file's pages, or of its decoded codes, than one run."""
    from tinygen.formats.gguf_blocks import decode

    return decode(_map(path, stamp, offset + start * shape[1], (stop - start, shape[1])), type_name)


class StoredRows:
    """An embedding's rows, read from the file's map as they are looked up, and dequantized: the
    table is never copied, and only the pages of the rows looked up are ever read."""

    def __init__(self, path: Path, stamp: tuple[int, int], offset: int, shape: tuple[int, int], type_name: str):
        self.where = (path, stamp, offset, shape)
        self.type_name = type_name
        self.data = None  # mapped at the first lookup: a float load never maps it

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        from tinygen.formats.gguf_blocks import decode

        if self.data is None:
            self.data = _map(*self.where)
        return decode(self.data[ids.cpu().numpy()], self.type_name).dequantize()


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB"

