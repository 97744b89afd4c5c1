"""GGUF's quantized blocks, decoded from their bytes into the forms that run as stored
(core/quantized.py): the 4-bit types (Q4_0, Q4_1, Q4_K) into Q4Weight, the 5-, 6- and 8-bit ones
(Q5_0, Q5_1, Q5_K, Q6_K, Q8_0) into Int8Blocks. The layouts are ggml's (ggml-common.h), decoded as
gguf-py's quants.py dequantizes them, so each stored form's weights are gguf's float values exactly.
Other types (Q2_K, Q3_K, the i-quants, ...) have no exact kernel form and load dequantized.

Each decoder takes a matrix's bytes, (rows, row bytes) uint8 as a GGUF tensor's data, and works on
whole rows at once with numpy; a large matrix goes in row chunks, so that its temporaries stay small.
torch is imported only to hand the result over, so that `tinygen info` can ask stored_form cheaply.
"""

from __future__ import annotations

import numpy as np

from tinygen.core.quantized import INT4, INT8, Int8Blocks, Q4Weight, StoredWeight

QK_K = 256  # weights per K-quant super-block
CHUNK_ROWS = 4096


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of each block, as float32: (rows, n_blocks)."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """ggml's 4-bit packing: byte j of a run holds weight j in its low nibble and weight j + run
    length in its high one. packed (..., n) -> (..., 2n)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _high_bits(qh: np.ndarray, n: int) -> np.ndarray:
    """Q5_0/Q5_1's fifth bits: bit j of a block's little-endian uint32 belongs to weight j."""
    return np.unpackbits(qh, axis=-1, count=n, bitorder="little")


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of 6-bit sub-scales and sub-mins: (..., 8) each (gguf's get_scale_min)."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mins.astype(np.float32)


def q4_0(b: np.ndarray):  # {half d; uint8 qs[16]}
    d = _half(b, 0)
    return _nibbles(b[..., 2:18]), d, -8 * d


def q4_1(b: np.ndarray):  # {half d; half m; uint8 qs[16]}
    return _nibbles(b[..., 4:20]), _half(b, 0), _half(b, 2)


def q4_k(b: np.ndarray):  # {half d; half dmin; uint8 scales[12]; uint8 qs[128]}: 8 sub-blocks of 32
    sc, mins = _k_scales(b[..., 4:16])
    q = _nibbles(b[..., 16:144].reshape(*b.shape[:-1], 4, 32))  # (.., 4, 64): sub-blocks 2i and 2i + 1
    return q, _half(b, 0)[..., None] * sc, -(_half(b, 2)[..., None] * mins)


def q5_0(b: np.ndarray):  # {half d; uint8 qh[4]; uint8 qs[16]}
    q = _nibbles(b[..., 6:22]) | (_high_bits(b[..., 2:6], 32) << 4)
    return q.view(np.int8) - 16, _half(b, 0), None


def q5_1(b: np.ndarray):  # {half d; half m; uint8 qh[4]; uint8 qs[16]}
    q = _nibbles(b[..., 8:24]) | (_high_bits(b[..., 4:8], 32) << 4)
    return q.view(np.int8), _half(b, 0), _half(b, 2)


def q5_k(b: np.ndarray):  # {half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]}
    sc, mins = _k_scales(b[..., 4:16])
    low = _nibbles(b[..., 48:176].reshape(*b.shape[:-1], 4, 32)).reshape(*b.shape[:-1], 8, 32)
    # Bit i of qh[j] is the fifth bit of weight j of sub-block i.
    high = (b[..., 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # (.., 32, 8)
    q = low | (np.swapaxes(high, -1, -2) << 4)
    return q.view(np.int8), _half(b, 0)[..., None] * sc, -(_half(b, 2)[..., None] * mins)


def q6_k(b: np.ndarray):  # {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d}: 16 sub-blocks of 16
    lead = b.shape[:-1]
    low = _nibbles(b[..., 0:128].reshape(*lead, 2, 64)).reshape(*lead, 8, 32)
    high = (b[..., 128:192].reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = (low | (high.reshape(*lead, 8, 32) << 4)).view(np.int8) - 32
    scales = _half(b, 208)[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)
    return q, scales, None


def q8_0(b: np.ndarray):  # {half d; int8 qs[32]}
    return b[..., 2:34].view(np.int8), _half(b, 0), None


# GGUF type name -> (form, bytes per block, weights per block, decoder giving (codes, scales, lows)
# per block: codes (.., weights per block) or with sub-block axes, scales and lows per block or
# sub-block).
DECODERS = {
    "Q4_0": (INT4, 18, 32, q4_0), "Q4_1": (INT4, 20, 32, q4_1), "Q4_K": (INT4, 144, QK_K, q4_k),
    "Q5_0": (INT8, 22, 32, q5_0), "Q5_1": (INT8, 24, 32, q5_1), "Q5_K": (INT8, 176, QK_K, q5_k),
    "Q6_K": (INT8, 210, QK_K, q6_k), "Q8_0": (INT8, 34, 32, q8_0),
}


def stored_form(type_name: str) -> str | None:
    """The form a matrix of this GGUF type runs in as stored (int4 or int8), or None: dequantized."""
    return DECODERS[type_name][0] if type_name in DECODERS else None


def decode(data: np.ndarray, type_name: str) -> StoredWeight:
    """A (rows, row bytes) matrix of a type in DECODERS, as its stored form."""
    import torch  # `tinygen info` asks stored_form without it

    form, size, _, decoder = DECODERS[type_name]
    rows, n_blocks = data.shape[0], data.shape[1] // size
    out = None  # codes, scales, lows: allocated once the first chunk shows their dtypes and widths
    for start in range(0, rows, CHUNK_ROWS):
        chunk = decoder(data[start:start + CHUNK_ROWS].reshape(-1, n_blocks, size))
        flat = [None if part is None else part.reshape(len(part), -1) for part in chunk]
        if out is None:
            out = [None if part is None else np.empty((rows, part.shape[1]), part.dtype) for part in flat]
        for target, part in zip(out, flat):
            if part is not None:
                target[start:start + len(part)] = part
    codes, scales, lows = (None if a is None else torch.from_numpy(a) for a in out)
    if form == INT4:
        return Q4Weight(codes, scales, lows)
    return Int8Blocks(codes, scales, lows)
