"""`tinygen export`: a model for other tools, as a Hugging Face folder or a GGUF file."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.filesize import decimal

from tinygen.cli import ui
from tinygen.formats.export import FORMATS, GGUF_TYPES

# Built from core's lists, so the flags and the library never disagree on what exists.
Format = Enum("Format", {f: f for f in FORMATS}, type=str)
GGUFType = Enum("GGUFType", {t: t for t in GGUF_TYPES}, type=str)


def export(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="The model to export: a tinygen .safetensors file, a "
                                         "Hugging Face folder or a GGUF file.", show_default=False)],
    fmt: Annotated[Format, typer.Option("--format", "-f", help="hf: a folder transformers loads "
                                           "(AutoModelForCausalLM, AutoTokenizer); gguf: a file llama.cpp and "
                                           "ollama load (rope models only).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", help="The folder (hf) or file (gguf) to "
                                      "write.", show_default=False)],
    gguf_type: Annotated[Optional[GGUFType], typer.Option("--type", help="GGUF tensor type for the matrices (norms "
                                                     "stay f32). Default: f16.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace PATH if it exists.")] = False,
) -> None:
    """Write a model for other tools: a Hugging Face folder or a llama.cpp GGUF file."""
    from tinygen.formats.export import export as export_model

    done = export_model(model, fmt.value, out, gguf_type and gguf_type.value, force)
    for note in done.notes:
        ui.note(note)
    ui.note(f"wrote {done.path} ({done.what}; {decimal(done.size)})")
