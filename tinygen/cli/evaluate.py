"""`tinygen eval`: a model's loss, perplexity and bits per byte on text."""

from __future__ import annotations

import contextlib
import json
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.common import load_model
from tinygen.cli.options import DeviceOpt, Dtype, ModelOpt, QuantOpt, ScoreDtypeOpt
from tinygen.errors import TinygenError


def eval_cmd(
    files: Annotated[list[str], typer.Argument(metavar="FILE", help="Text files, folders or globs to score (documents split on "
                                               "--separator).", show_default=False)],
    model: ModelOpt = None,
    separator: Annotated[str, typer.Option(metavar="TEXT", help="Text that separates documents.")] = "<|endoftext|>",
    stride: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Sliding-window stride in tokens "
                                                  "(default: half the context).", show_default=False)] = None,
    context: Annotated[Optional[int], typer.Option("--ctx", "--context", metavar="N", min=1, help="Score with a "
                                                   "window of N tokens (default: the model's whole context), as "
                                                   "llama-perplexity's -c.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", metavar="N", min=1, help="Windows scored "
                                                      "at once; fewer use less memory (default: up to 8, fewer "
                                                      "for a long context).", show_default=False)] = None,
    val_split: Annotated[Optional[float], typer.Option(metavar="X", min=0.0, help="Score only the text that "
                                                       "`tinygen train` with this --val-fraction (and --seed) held "
                                                       "out of the same FILES.", show_default=False)] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="With --val-split: the training run's --seed.")] = 1337,
    record: Annotated[bool, typer.Option("--record", metavar="", help="Also store the scores in the model's "
                                         "provenance (shown by `tinygen info`).")] = False,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Machine-readable output.")] = False,
    device: DeviceOpt = "auto",
    dtype: ScoreDtypeOpt = Dtype.float32,
    quantize: QuantOpt = None,
) -> None:
    """Score a model on text: mean loss, perplexity and bits per byte."""
    from tinygen.core.evaluate import score_tokens
    from tinygen.training import data as data_lib

    quantize = quantize and quantize.value
    docs = data_lib.read_documents(data_lib.expand_sources(files), separator)
    split_note = None
    if val_split is not None:
        if val_split >= 1:
            raise TinygenError(f"--val-split must be below 1, got {val_split}")
        split = data_lib.split_for_validation(docs, val_split, seed)
        docs = split.val
        if not docs:
            raise TinygenError("--val-split left no text to score")
        split_note = f"{val_split}, seed {seed}" + (", the end of the text" if split.method == "tail" else "")
    if record and quantize is not None:
        raise TinygenError("--record stores the model's own scores; drop --quantize to record")
    net, tok, meta, _ = load_model(model, device, dtype, quantize=quantize)
    block = net.config.block_size
    if context is not None and context > block:
        raise TinygenError(f"--ctx must be at most the model's context, {block}")
    window = context or block
    if stride is not None and stride > window:
        raise TinygenError(f"--stride must be at most the scoring window, {window} tokens")
    tokens = data_lib.encode_documents(docs, tok)
    with _progress() as progress:
        score = score_tokens(net, tokens, stride=stride, batch_size=batch_size, context=window,
                             n_bytes=sum(len(d.encode()) for d in docs), progress=progress)
    result = {"model": str(meta.path), "quantize": quantize, "documents": len(docs), "context": window,
              **score.as_dict()}
    if record:
        from tinygen.core.checkpoint import update_provenance

        update_provenance(meta.path, score.provenance(" ".join(files), split_note))
    if as_json:
        ui.write(json.dumps(result, indent=2) + "\n")
        return
    rows = [("model", str(meta.path) + (f" (--quantize {quantize})" if quantize else "")),
            ("documents", f"{len(docs):,}"), ("tokens", f"{score.tokens:,}"),
            ("loss", f"{score.loss:.4f} nats/token"), ("perplexity", f"{score.perplexity:.2f}"),
            ("bits per byte", f"{score.bits_per_byte:.4f}")]
    ui.info_table(rows, title="evaluation")


@contextlib.contextmanager
def _progress():
    """A progress callback for scoring: a bar on stderr when it is a terminal, nothing in a pipe."""
    console = ui.err()
    if not console.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("scoring", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
