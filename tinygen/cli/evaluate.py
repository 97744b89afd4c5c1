"""`tinygen eval`: a model's loss, perplexity and bits per byte on text."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.common import load_model
from tinygen.cli.options import DeviceOpt, ModelOpt, QuantOpt
from tinygen.errors import TinygenError


def eval_cmd(
    files: Annotated[list[str], typer.Argument(help="Text files to score (documents split on --separator).",
                                               show_default=False)],
    model: ModelOpt = None,
    separator: Annotated[str, typer.Option(help="Text that separates documents.")] = "<|endoftext|>",
    stride: Annotated[Optional[int], typer.Option(help="Sliding-window stride in tokens (default: half the context).")] = None,
    val_split: Annotated[Optional[float], typer.Option(help="Score only the documents that `tinygen train` with this "
                                                       "--val-fraction (and --seed) held out of the same FILES.")] = None,
    seed: Annotated[int, typer.Option(help="With --val-split: the training run's --seed.")] = 1337,
    record: Annotated[bool, typer.Option("--record", help="Also store the scores in the model's provenance "
                                         "(shown by `tinygen info`).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    device: DeviceOpt = "auto",
    quantize: QuantOpt = None,
) -> None:
    """Score a model on text: mean loss, perplexity and bits per byte."""
    from tinygen.core.evaluate import score_tokens

    quantize = quantize and quantize.value
    from tinygen.training import data as data_lib

    docs = data_lib.read_documents(data_lib.expand_sources(files), separator)
    if val_split is not None:
        _, docs = data_lib.split_documents(docs, val_split, seed)
        if not docs:
            raise TinygenError("--val-split left no documents to score")
    if record and quantize is not None:
        raise TinygenError("--record stores the model's own scores; drop --quantize to record")
    net, tok, meta = load_model(model, device, quantize=quantize)
    if stride is not None and not 0 < stride <= net.config.block_size:
        raise TinygenError(f"--stride must be in 1..{net.config.block_size}")
    tokens = data_lib.encode_documents(docs, tok)
    score = score_tokens(net, tokens, stride=stride, n_bytes=sum(len(d.encode()) for d in docs))
    result = {"model": str(meta.path), "quantize": quantize, "documents": len(docs), **score.as_dict()}
    if record:
        from tinygen.core.checkpoint import update_provenance

        label = "val" if val_split is not None else "eval"
        update_provenance(meta.path, {f"{label}_loss": score.loss, f"{label}_bpb": score.bits_per_byte,
                                      f"{label}_data": " ".join(files) + (f" (val split {val_split}, seed {seed})"
                                                                          if val_split is not None else "")})
    if as_json:
        ui.write(json.dumps(result, indent=2) + "\n")
        return
    rows = [("model", str(meta.path) + (f" (--quantize {quantize})" if quantize else "")),
            ("documents", f"{len(docs):,}"), ("tokens", f"{score.tokens:,}"),
            ("loss", f"{score.loss:.4f} nats/token"), ("perplexity", f"{score.perplexity:.2f}"),
            ("bits per byte", f"{score.bits_per_byte:.4f}")]
    ui.info_table(rows, title="evaluation")
