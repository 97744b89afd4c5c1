"""Exports of a tinygen model for other tools: a Hugging Face folder (export_hf.py) or a llama GGUF
(export_gguf.py), written whole or not at all. Torch and the writers' packages are imported only
by the format being written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tinygen.atomic import atomic_path, remove_stale
from tinygen.errors import TinygenError

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0")


@dataclass
class Exported:
    """What export() wrote, for the summary line."""

    path: Path
    size: int  # bytes on disk
    what: str  # e.g. "LlamaForCausalLM, float32" or "llama, q8_0"
    notes: list[str] = field(default_factory=list)


def export(model: str | os.PathLike, fmt: str, out: str | os.PathLike, gguf_type: str | None = None,
           force: bool = False) -> Exported:
    """Write `model` (anything load_model reads) to `out` as a Hugging Face folder or a GGUF file.
    An existing `out` is replaced only with `force`, and only once the new one is complete."""
    from tinygen.core.checkpoint import load_model

    if fmt not in FORMATS:
        raise TinygenError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if gguf_type is not None and fmt != "gguf":
        raise TinygenError("--type is the GGUF tensor type; a Hugging Face export keeps the weights' own dtype")
    gguf_type = gguf_type or "f16"
    if gguf_type not in GGUF_TYPES:
        raise TinygenError(f"unknown GGUF type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.parent.is_dir():
        remove_stale(out)  # an export cut off between its two renames gets its old folder back first
    if out.exists() and not force:
        raise TinygenError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise TinygenError(f"cannot write {out}: there is no folder {out.parent}; create it first")
    net, tokenizer, info = load_model(model, device="cpu")
    if tokenizer.kind != "byte-level BPE":
        raise TinygenError(f"{info.path.name} has a {tokenizer.kind} vocabulary, which tinygen exports do not "
                           "write yet (they write byte-level BPE)")
    if fmt == "hf":
        from tinygen.formats.export_hf import write_hf

        what = _replace(out, lambda tmp: write_hf(net, tokenizer, tmp))
    else:
        from tinygen.formats.export_gguf import write_gguf

        what = _replace(out, lambda tmp: write_gguf(net, tokenizer, tmp, gguf_type, name=info.path.stem))
    size = sum(p.stat().st_size for p in out.iterdir()) if out.is_dir() else out.stat().st_size
    return Exported(out, size, what, list(info.notes))


def _replace(out: Path, write) -> str:
    """Run write(tmp) on a temp path beside `out`, then put the result in place of whatever is at `out`
    (a file or a folder), so that an interrupted export never leaves a half-written one under its
    name, nor loses the previous one before the new one is in."""
    try:
        with atomic_path(out, replace_folder=True) as tmp:
            what = write(tmp)
    except OSError as e:
        raise TinygenError(f"cannot write {out}: {e.strerror or e}") from e
    return what
