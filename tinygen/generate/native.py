"""The native block products (blockdot.c) and decode layer (layerstep.c), built once per machine
with its C compiler and loaded through ctypes; blockquant.BlockLinear and nativeblock.NativeBlock
call them, plan.py asks whether they are there.

No torch library multiplies a file's quantized blocks by int8 activations as llama.cpp does on a
CPU, so tinygen carries this one small C file and compiles it for the CPU it runs on (-march=native)
on first use, into $XDG_CACHE_HOME/tinygen/kernels under a name that hashes the source, the flags
and the CPU: a cached build is never stale, and deleting it only costs the next start a second.
Where no compiler works, or TINYGEN_NATIVE=0, library() is None and stored matrices run on torch's
int4 kernel instead (blockquant.Int8BlockLinear, quantize.Int4Linear).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

# At module level, for the custom op's annotations (this module's callers hold torch already).
import torch

from tinygen import atomic
from tinygen.errors import TinygenError
from tinygen.generate.compiled import tinygen_cache

# Compiled together; the header, which both include, is part of the build's key.
SOURCES = tuple(Path(__file__).with_name(name) for name in ("blockdot.c", "layerstep.c"))
HEADER = Path(__file__).with_name("blockdot.h")
# OpenMP shares each product's rows among torch's own threads (torch's wheels bring the same
# libgomp, which the loader then shares); a compiler without it builds a one-thread library.
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])


def cache_dir() -> Path:
    return tinygen_cache() / "kernels"


def _cpu() -> str:
    """What -march=native builds for: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(lines))


def build(compiler: str, flags: list[str]) -> Path | None:
    """The sources built with these flags, from the cache when they were built before; None where the
    compiler fails (remembered, so that it is asked once)."""
    sources = [path.read_bytes() for path in (*SOURCES, HEADER)]
    key = hashlib.sha256(b"\0".join([*sources, " ".join([compiler, *flags]).encode(), _cpu().encode()])).hexdigest()
    target = cache_dir() / f"blockdot-{key[:24]}.so"
    failed = target.with_suffix(".failed")  # so that a compiler without these flags is asked once
    if target.exists():
        return target
    if failed.exists():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic.atomic_path(target) as tmp:  # another process building the same key writes the same bytes
            subprocess.run([compiler, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", str(tmp), "-lm"],
                           check=True, capture_output=True, timeout=120)
    except subprocess.CalledProcessError as e:
        atomic.write_bytes(failed, e.stderr[-4096:])
        return None
    except (OSError, subprocess.SubprocessError, TinygenError):
        return None
    return target


def compiler_path() -> str | None:
    """$CC, else cc, gcc or clang, where one is installed."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None where it cannot be built or is switched off."""
    if os.environ.get("TINYGEN_NATIVE", "1") == "0":
        return None
    compiler = compiler_path()
    if compiler is None:
        return None
    for flags in FLAG_SETS:
        path = build(compiler, flags)
        if path is None:
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.block_matmul.argtypes = [i, p, p, p, i, i, i, p, i, p, i]
        lib.block_matmul.restype = i
        lib.rms_norm.argtypes = [p, p, ctypes.c_float, i, i, p]
        lib.rms_norm.restype = None
        lib.layer_step.argtypes = [ctypes.POINTER(Layer), p, p, p, p, p, p, i, i, i]
        lib.layer_step.restype = i
        return lib
    return None


class Matrix(ctypes.Structure):
    """blockdot.h's Matrix: a BlockLinear's blocks by address."""

    _fields_ = [("kind", ctypes.c_int), ("block", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int),
                ("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("lows", ctypes.c_void_p),
                ("bias", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    """layerstep.c's Layer: a decoder layer's matrices and gains by address, and its shape."""

    _fields_ = [*((name, Matrix) for name in ("qkv", "out", "up", "down")),
                *((name, ctypes.c_void_p) for name in ("norm1", "norm2", "post1", "post2", "q_norm", "k_norm")),
                *((name, ctypes.c_int) for name in ("n_head", "n_kv_head", "head_dim", "hidden", "gelu")),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


def layer_step(layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, kv_len: int) -> torch.Tensor:
    """A decoder layer on one token x (..., C) float32 at position kv_len - 1, its keys and values
    stored in the layer's cache k, v (1, n_kv_head, slots, head_dim), contiguous float32."""
    out = torch.empty_like(x)
    if library().layer_step(ctypes.byref(layer), x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                            k.data_ptr(), v.data_ptr(), k.size(2), kv_len, torch.get_num_threads()):
        raise MemoryError("out of memory for a decode step")
    return out


KIND = {"int4": 4, "int8": 8}  # core/quantized's forms, as block_matmul's kinds
FIVE_BITS = 5  # the kind of int8 codes that span 32 values, packed as 5 bits (blockdot.c's q5)


def pointers(kind: int, codes: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor | None, block: int) -> tuple:
    """A matrix as block_matmul_at takes it: codes, scales and lows as blockquant.BlockLinear keeps
    them (contiguous, on the CPU), by address, which a decode step then need not ask for again."""
    return kind, codes.data_ptr(), scales.data_ptr(), 0 if lows is None else lows.data_ptr(), block, scales.size(0)


def block_matmul_at(x: torch.Tensor, matrix: tuple) -> torch.Tensor:
    """x (M, K) float32, contiguous, times the rows of a matrix given by pointers(): (M, N) float32."""
    kind, codes, scales, lows, block, n = matrix
    y = torch.empty(x.size(0), n)
    if library().block_matmul(kind, codes, scales, lows, block, n, x.size(1), x.data_ptr(), x.size(0), y.data_ptr(),
                              torch.get_num_threads()):
        raise MemoryError("out of memory for a matrix product's activations")
    return y


@functools.cache
def register_op() -> None:
    """torch.ops.tinygen.block_matmul: block_matmul as one opaque call in a compiled graph (Dynamo
    cannot trace a ctypes call). Registered when a BlockLinear is first made, not at import."""

    @torch.library.custom_op("tinygen::block_matmul", mutates_args=())
    def op(x: torch.Tensor, kind: int, codes: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor | None,
           block: int) -> torch.Tensor:
        return block_matmul_at(x.contiguous(), pointers(kind, codes, scales, lows, block))

    @op.register_fake
    def _(x, kind, codes, scales, lows, block):
        return x.new_empty(x.size(0), scales.size(0), dtype=torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (K,), weight, eps) for x (..., K) float32, contiguous."""
    y = torch.empty_like(x)
    k = x.size(-1)
    library().rms_norm(x.data_ptr(), weight.data_ptr(), eps, x.numel() // k, k, y.data_ptr())
    return y
