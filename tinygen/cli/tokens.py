"""`tinygen tokenize`: how text splits into tokens, their probabilities, and training a tokenizer alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.common import load_model, text_arg
from tinygen.cli.options import DeviceOpt, Dtype, ModelOpt, ScoreDtypeOpt
from tinygen.errors import TinygenError


def tokenize(
    text: Annotated[Optional[str], typer.Argument(metavar="TEXT", help="Text to tokenize (or ids with --decode); `-` "
                                                  "or piped stdin reads stdin.", show_default=False)] = None,
    model: ModelOpt = None,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", metavar="PATH", help="Use this tokenizer "
                                                      "instead: any model that loads (a checkpoint, a Hugging Face "
                                                      "folder, a GGUF), a folder with vocab.json + merges.txt, or "
                                                      "a file from --train.",
                                                      show_default=False)] = None,
    ids: Annotated[bool, typer.Option("--ids", metavar="", help="Print only the ids, space-separated.")] = False,
    decode: Annotated[bool, typer.Option("--decode", metavar="", help="Turn ids (space or comma separated) back "
                                         "into text.")] = False,
    count: Annotated[bool, typer.Option("--count", metavar="", help="Print only the number of tokens.")] = False,
    probs: Annotated[bool, typer.Option("--probs", metavar="", help="Colour each token by the model's probability "
                                        "of it, with its loss, and the text's perplexity (runs the model).")] = False,
    train: Annotated[Optional[list[str]], typer.Option("--train", metavar="PATH", help="Train a new BPE tokenizer "
                                                       "on these files, folders or globs (repeatable) and write it "
                                                       "to --out.", show_default=False)] = None,
    vocab_size: Annotated[int, typer.Option(metavar="N", help="With --train: vocabulary size, special tokens "
                                            "included.")] = 4096,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE", help="With --train: the tokenizer "
                                                "file to write (.json).", show_default=False)] = None,
    separator: Annotated[str, typer.Option(metavar="TEXT", help="With --train: text that separates "
                                           "documents.")] = "<|endoftext|>",
    device: DeviceOpt = "auto",
    dtype: ScoreDtypeOpt = Dtype.float32,
) -> None:
    """Show how text splits into tokens, with ids and a count; or train a tokenizer."""
    from tinygen.core.checkpoint import load_tokenizer, load_tokenizer_source

    if train:
        _train_tokenizer(train, vocab_size, out, separator)
        return
    if probs and not decode:
        if tokenizer:
            raise TinygenError("--probs scores with the model's own tokenizer; drop --tokenizer")
        _token_probs(model, text_arg(text), device, dtype)
        return
    tok = load_tokenizer_source(tokenizer) if tokenizer else load_tokenizer(model)
    text = text_arg(text)
    if decode:
        try:
            token_ids = [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise TinygenError("--decode expects token ids: integers separated by spaces or commas") from None
        bad = [t for t in token_ids if not 0 <= t < tok.n_vocab]
        if bad:
            raise TinygenError(f"token id {bad[0]} is outside this vocabulary (0..{tok.n_vocab - 1})")
        ui.write(tok.decode(token_ids) + "\n")
        return
    token_ids = tok.encode(text)
    if count:
        ui.write(f"{len(token_ids)}\n")
    elif ids:
        ui.write(" ".join(map(str, token_ids)) + "\n")
    else:
        ui.show_tokens(tok, token_ids, text)


def _token_probs(model: Optional[str], text: str, device: str, dtype: Dtype) -> None:
    from tinygen.cli import views
    from tinygen.core.evaluate import document_start
    from tinygen.inspect.explain import surprisal

    net, tok = load_model(model, device, dtype)[:2]
    ids = tok.encode(text)
    if not ids:
        raise TinygenError("no text to score")
    s = surprisal(net, ids, document_start(tok))  # the first token is scored as the start of a document
    labels = [tok.label(i) for i in ids]
    summary = (f"{len(ids)} tokens · mean loss {s.mean_loss:.3f} nats/token over {s.scored} · "
               f"perplexity {s.perplexity:.2f}")
    if not ui.is_tty():
        # One token per line, as plain tokenize writes in a pipe: id, text, probability, loss in nats.
        ui.write("".join(f"{i}\t{json.dumps(label, ensure_ascii=False)}\t{p:.6g}\t{loss:.4f}\n"
                         for i, label, p, loss in zip(ids, labels, s.probs, s.losses)))
        ui.err().print(summary)
        return
    console = ui.out()
    views.surprisal(console, labels, s.probs, s.context)
    console.print(summary, style="bold")


def _train_tokenizer(sources: list[str], vocab_size: int, out: Optional[Path], separator: str) -> None:
    from tinygen import atomic
    from tinygen.core.tokenizer import Tokenizer
    from tinygen.training import data as data_lib

    if out is None:
        raise TinygenError("--train needs --out FILE for the tokenizer")
    docs = data_lib.read_documents(data_lib.expand_sources(sources), separator)
    tok = Tokenizer.train(docs, vocab_size)
    atomic.write_bytes(out, json.dumps(tok.to_dict()).encode())
    ui.err().print(f"wrote {out}: {tok.n_vocab:,} tokens ({len(tok.ranks):,} merged + {len(tok.special)} special), "
                   f"trained on {len(docs):,} documents")
