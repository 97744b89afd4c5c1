"""`tinygen info`: a model's config, size, tokenizer and provenance, from its header alone."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.filesize import decimal

from tinygen.cli import ui
from tinygen.cli.options import ModelOpt
from tinygen.errors import TinygenError

if TYPE_CHECKING:
    from tinygen.core.checkpoint import ModelInfo
    from tinygen.core.tokenizer import Tokenizer


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
    ui.info_table(rows(meta, tokenizer), title=f"tinygen model: {meta.path.name}")


def rows(meta: ModelInfo, tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """What `info` shows people, as (label, text) rows: sizes in units, numbers rounded, and the
    provenance indented under its own heading (its keys may repeat the labels above)."""
    from tinygen.core.template import template_for

    cfg = meta.config
    template = template_for(tokenizer)
    shown = [
        ("path", str(meta.path)),
        ("kind", meta.kind + (f" (format v{meta.format_version})" if meta.format_version else "")),
        ("architecture", cfg.arch),
        ("shape", (f"n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} "
                   f"block_size={cfg.block_size} vocab_size={cfg.vocab_size}")),
        ("parameters", f"{ui.human_count(meta.n_params)} ({meta.n_params:,})"),
        ("file size", decimal(meta.file_size)),
        ("dtype", ", ".join(meta.dtypes)),
        ("tokenizer", f"{tokenizer.name}, {tokenizer.n_vocab:,} tokens, special: {' '.join(tokenizer.special)}"),
        ("chat", "chat-tuned: " + " ".join(f"{r}={p}…{s}" for r, (p, s) in template.roles.items())
         if template.tuned else "not chat-tuned (`tinygen chat` uses a plain User:/Assistant: transcript)"),
    ]
    if meta.provenance:
        shown += [("provenance", "")] + [(f"  {k}", readable(v)) for k, v in meta.provenance.items()]
    return shown


def readable(value) -> str:
    """A provenance value for people: floats to 4 significant digits, whole numbers with thousands
    separators, text as it is, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return json.dumps(value, ensure_ascii=False)
