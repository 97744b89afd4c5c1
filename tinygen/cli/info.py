"""`tinygen info`: a model's config, size, tokenizer and provenance, from its header alone."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.options import ModelOpt
from tinygen.errors import TinygenError


def info(
    ctx: typer.Context,
    path: Annotated[Optional[str], typer.Argument(metavar="MODEL", help="Model file or GPT-2 folder; the same as "
                                                  "--model.", show_default=False)] = None,
    model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Machine-readable output, at full "
                                          "precision.")] = False,
) -> None:
    """Show a model's config, size, tokenizer and provenance (reads the header only)."""
    from tinygen.core.checkpoint import load_tokenizer, read_info

    if path is not None and model is not None:
        if ctx.get_parameter_source("model").name != "ENVIRONMENT":
            raise TinygenError("name the model once: as an argument or with --model, not both")
        model = None  # a model named on the command line outranks $TINYGEN_MODEL
    meta = read_info(path or model)
    tokenizer = load_tokenizer(info=meta)
    if as_json:
        ui.write(json.dumps(meta.summary(tokenizer), indent=2, ensure_ascii=False) + "\n")
        return
    ui.info_table(meta.rows(tokenizer), title=f"tinygen model: {meta.path.name}")
