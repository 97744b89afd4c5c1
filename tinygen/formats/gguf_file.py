"""A GGUF file's header, metadata and tensor table, read from one memory map.

gguf's GGUFReader builds numpy views for every element of every metadata array, which for a
vocabulary of a quarter of a million tokens takes longer than loading the weights. This reader
walks the same layout with struct, reads numeric arrays with one np.frombuffer each and string
arrays with one scan of their length prefixes, and leaves tensor data in the map. Metadata comes
out as plain Python values (what GGUFReader's field.contents() gives); tensors offer the parts of
gguf's ReaderTensor that tinygen uses. The layout and type tables are gguf's own.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGMLQuantizationType,
    GGUFValueType,
)
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS
from gguf.quants import quant_shape_to_byte_shape

from tinygen.errors import TinygenError

MAGIC = b"GGUF"
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# Metadata scalars by GGUF value type: their struct code and the numpy dtype of an array of them.
_SCALARS = {
    GGUFValueType.UINT8: ("B", np.uint8), GGUFValueType.INT8: ("b", np.int8),
    GGUFValueType.UINT16: ("H", np.uint16), GGUFValueType.INT16: ("h", np.int16),
    GGUFValueType.UINT32: ("I", np.uint32), GGUFValueType.INT32: ("i", np.int32),
    GGUFValueType.FLOAT32: ("f", np.float32), GGUFValueType.BOOL: ("?", np.bool_),
    GGUFValueType.UINT64: ("Q", np.uint64), GGUFValueType.INT64: ("q", np.int64),
    GGUFValueType.FLOAT64: ("d", np.float64),
}
_STRUCTS = {t: struct.Struct("<" + code) for t, (code, _) in _SCALARS.items()}
# Tensor types GGUFReader shows as elements; every other type is shown as its raw bytes.
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class Damaged(ValueError):
    """The bytes do not follow the GGUF layout."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry, as gguf's ReaderTensor gives it (without its `field`)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # uint64 dimensions, innermost first as GGUF lists them
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray  # read-only view of the map: elements for float/int types, else (rows, row bytes) uint8


@dataclass
class GGUFFile:
    """What open_gguf read: the parts of gguf's GGUFReader that tinygen uses."""

    path: Path
    version: int
    fields: dict  # every metadata key but the header counts, as plain Python values
    tensors: list[GGUFTensor]
    alignment: int
    data_offset: int  # where tensor data starts


def open_gguf(path: str | Path) -> GGUFFile:
    """The GGUF at `path`, or a TinygenError that says what is wrong with the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if head == MAGIC else None
    except IsADirectoryError:
        raise TinygenError(f"{path} is a folder; pass the .gguf file inside it") from None
    except (OSError, ValueError) as e:
        raise TinygenError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if buf is None:
        raise TinygenError(f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r})")
    try:
        return _Parser(buf, path).parse()
    except _BigEndian:
        raise TinygenError(f"{path} is a big-endian GGUF; tinygen reads little-endian ones") from None
    except _BadText as e:
        raise TinygenError(f"{path.name}: metadata {e.args[0]} is not valid UTF-8; the file is damaged") from None
    except (Damaged, struct.error, ValueError, OverflowError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "GGMLQuantizationType" in reason:
            raise TinygenError(f"{path} holds a tensor type the installed gguf package does not know ({reason}); "
                               "upgrade gguf") from None
        raise TinygenError(f"{path} is truncated or damaged (gguf: {reason}); download it again") from None


class _BigEndian(Exception):
    pass


class _BadText(Exception):
    pass


class _Parser:
    """One pass over the header; `pos` is where the next read starts."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos = buf, path, 4
        self.size = len(buf)
        self.alignment_type: GGUFValueType | None = None

    def parse(self) -> GGUFFile:
        version = self.u32()
        if version & 0xFFFF == 0:  # the version read in the other byte order, as GGUFReader tells them apart
            raise _BigEndian
        if version not in READER_SUPPORTED_VERSIONS:
            raise Damaged(f"version {version}, which gguf cannot read")
        n_tensors, n_fields = self.u64(), self.u64()
        fields = {}
        for _ in range(n_fields):
            key = self.string("a metadata key")
            if key in fields:
                raise Damaged(f"metadata key {key} appears twice")
            kind = self.u32()
            fields[key] = self.value(kind, key)
        infos = [self.tensor_info() for _ in range(n_tensors)]
        alignment = fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if "general.alignment" in fields and (self.alignment_type != GGUFValueType.UINT32
                                              or alignment == 0 or alignment & (alignment - 1)):
            raise Damaged(f"general.alignment {alignment!r} is not a power of two stored as uint32")
        start = -(-self.pos // alignment) * alignment
        return GGUFFile(self.path, version, fields, self.tensors(infos, start), alignment, start)

    # -- reads ---------------------------------------------------------------------------------

    def take(self, n: int) -> int:
        """Where n bytes start; moves past them."""
        at = self.pos
        if n < 0 or at + n > self.size:
            raise Damaged(f"the file ends at byte {self.size:,}, inside its header")
        self.pos = at + n
        return at

    def u32(self) -> int:
        return _U32.unpack_from(self.buf, self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.buf, self.take(8))[0]

    def string(self, what: str, key: str | None = None) -> str:
        """A length-prefixed UTF-8 string: `what` names it if it is not UTF-8, or `key` when it is a
        metadata value (a damaged value is reported by its key)."""
        n = self.u64()
        at = self.take(n)
        try:
            return str(self.buf[at:at + n], "utf-8")
        except UnicodeDecodeError:
            raise (_BadText(key) if key else Damaged(f"{what} is not valid UTF-8")) from None

    def value(self, kind: int, key: str):
        kind = GGUFValueType(kind)
        if key == "general.alignment":
            self.alignment_type = kind
        if kind == GGUFValueType.STRING:
            return self.string("a metadata value", key)
        if kind in _STRUCTS:
            s = _STRUCTS[kind]
            return s.unpack_from(self.buf, self.take(s.size))[0]
        if kind == GGUFValueType.ARRAY:
            return self.array(key)
        raise Damaged(f"metadata {key} has value type {kind.name}, which gguf does not read")

    def array(self, key: str) -> list:
        """An array's elements as a list; nested arrays come flat, as GGUFReader gives them."""
        kind = GGUFValueType(self.u32())
        n = self.u64()
        if kind in _SCALARS:
            dtype = np.dtype(_SCALARS[kind][1]).newbyteorder("<")
            at = self.take(n * dtype.itemsize)
            return np.frombuffer(self.buf, dtype, n, at).tolist()
        if kind == GGUFValueType.STRING:
            return self.strings(n, key)
        if kind == GGUFValueType.ARRAY:
            return [x for _ in range(n) for x in self.array(key)]
        raise Damaged(f"metadata {key} is an array of {kind.name}, which gguf does not read")

    def strings(self, n: int, key: str) -> list[str]:
        """n length-prefixed strings: one scan finds them, one decode reads them all."""
        buf, unpack, pos, size = self.buf, _U64.unpack_from, self.pos, self.size
        starts = []
        for _ in range(n):
            if pos + 8 > size:
                raise Damaged(f"the file ends at byte {size:,}, inside metadata {key}")
            pos += 8
            starts.append(pos)
            pos += unpack(buf, pos - 8)[0]
        if pos > size:
            raise Damaged(f"the file ends at byte {size:,}, inside metadata {key}")
        self.pos = pos
        return _decode_all(self.buf, np.array(starts, np.int64), pos, key)

    def tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self.string("a tensor name")
        n_dims = self.u32()
        at = self.take(8 * n_dims)
        dims = list(struct.unpack_from(f"<{n_dims}Q", self.buf, at))
        return name, dims, self.u32(), self.u64()

    def tensors(self, infos: list, start: int) -> list[GGUFTensor]:
        out, names = [], set()
        for name, dims, raw_type, offset in infos:
            if name in names:
                raise Damaged(f"tensor {name} appears twice")
            names.add(name)
            qtype = GGMLQuantizationType(raw_type)
            n_elements = int(np.prod(dims, dtype=np.uint64)) if dims else 1
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = n_elements * type_size // block
            at = start + offset
            if at + n_bytes > self.size:
                raise Damaged(f"tensor {name} runs past the end of the file ({self.size:,} bytes)")
            shape = tuple(reversed(dims))
            if qtype in _ELEMENT_DTYPES:
                dtype = np.dtype(_ELEMENT_DTYPES[qtype])
            else:
                dtype, shape = np.dtype(np.uint8), quant_shape_to_byte_shape(shape, qtype)
            data = np.frombuffer(self.buf, dtype, n_bytes // dtype.itemsize, at).reshape(shape)
            out.append(GGUFTensor(name, qtype, np.array(dims, np.uint64), n_elements, n_bytes, at, data))
        return out


def _decode_all(buf, starts: np.ndarray, end: int, key: str) -> list[str]:
    """The strings at `starts`, each running to the next one's 8-byte length prefix and the last
    to `end`: their bytes joined and decoded at once, then cut at character offsets."""
    if len(starts) == 0:
        return []
    base = int(starts[0]) - 8
    raw = np.frombuffer(buf, np.uint8, end - base, base)
    keep = np.ones(len(raw), bool)
    keep[((starts - base - 8)[:, None] + np.arange(8)).ravel()] = False  # the length prefixes
    text_bytes = raw[keep]
    lengths = np.diff(np.append(starts, end + 8)) - 8
    # Each string must be whole UTF-8 on its own: joined they decode, and none starts mid-character.
    firsts = raw[(starts - base)[lengths > 0]]
    if ((firsts & 0xC0) == 0x80).any():
        raise _BadText(key)
    try:
        text = text_bytes.tobytes().decode("utf-8")
    except UnicodeDecodeError:
        raise _BadText(key) from None
    chars = np.zeros(len(text_bytes) + 1, np.int64)  # character offset of each byte offset
    np.cumsum((text_bytes & 0xC0) != 0x80, out=chars[1:])
    bounds = chars[np.concatenate(([0], np.cumsum(lengths)))].tolist()
    return [text[a:b] for a, b in pairwise(bounds)]
