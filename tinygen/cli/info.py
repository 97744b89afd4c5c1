"""`tinygen info`: a model's config, size, tokenizer and provenance, from its header alone."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from tinygen.cli import ui


def info(
    model: Annotated[Optional[str], typer.Argument(help="Model file or GPT-2 folder (default: as for --model).",
                                                   show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show a model's config, size, tokenizer and provenance (reads the header only)."""
    from tinygen.core.checkpoint import load_tokenizer, read_info

    meta = read_info(model)
    tok = load_tokenizer(info=meta)
    cfg = meta.config
    summary = {
        "path": str(meta.path),
        "kind": meta.kind,
        "format_version": meta.format_version,
        "config": json.loads(cfg.to_json()),
        "parameters": meta.n_params,
        "file_size": meta.file_size,
        "dtypes": list(meta.dtypes),
        "tokenizer": {"name": tok.name, "n_vocab": tok.n_vocab, "special_tokens": tok.special},
        "chat_template": tok.chat_template,
        "provenance": meta.provenance,
    }
    if as_json:
        ui.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        return
    rows = [
        ("path", str(meta.path)),
        ("kind", meta.kind + (f" (format v{meta.format_version})" if meta.format_version else "")),
        ("architecture", cfg.arch),
        ("shape", f"n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} "
                  f"block_size={cfg.block_size} vocab_size={cfg.vocab_size}"),
        ("parameters", f"{ui.human_count(meta.n_params)} ({meta.n_params:,})"),
        ("file size", ui.human_bytes(meta.file_size)),
        ("dtype", ", ".join(meta.dtypes)),
        ("tokenizer", f"{tok.name}, {tok.n_vocab:,} tokens, special: {' '.join(tok.special)}"),
        ("chat", "chat-tuned: " + " ".join(f"{r}={p}…{s}" for r, (p, s) in tok.chat_template["roles"].items())
         if tok.chat_template else "not chat-tuned (`tinygen chat` uses a plain User:/Assistant: transcript)"),
    ]
    rows += [(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in meta.provenance.items()]
    ui.info_table(rows, title=f"tinygen model: {meta.path.name}")
