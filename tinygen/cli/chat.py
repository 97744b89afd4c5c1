"""`tinygen chat`: a conversation with a model, on a terminal or through a pipe."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.common import compiled_decoder, load_model
from tinygen.cli.options import (
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    MaxNewOpt,
    MinPOpt,
    QuantOpt,
    RepPenOpt,
    SeedOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
)
from tinygen.errors import TinygenError


def chat(
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="MODEL", envvar="TINYGEN_MODEL",
                                                 show_envvar=False, help="Model to chat with. Default: $TINYGEN_MODEL, "
                                                 "else the bundled chat model. A model that was never chat-tuned "
                                                 "gets a plain User:/Assistant: transcript.", show_default=False)] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.", show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Answer this one message and exit.",
                                                  show_default=False)] = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", help='Replies as {"role", "content"} JSON lines; input lines may '
                                        "be JSON messages too (so they can hold newlines).")] = False,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TempOpt = 0.7,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 0.9,
    min_p: MinPOpt = 0.0,
    repetition_penalty: RepPenOpt = 1.1,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantOpt = None,
    compile: CompileOpt = False,
) -> None:
    """Chat with a model: a REPL on a terminal; in a pipe, each input line is one message."""
    from tinygen.cli.repl import Repl, banner
    from tinygen.core.checkpoint import DEFAULT_CHAT_MODEL, resolve_model_path
    from tinygen.generate.chat import ChatSession
    from tinygen.generate.sampling import SamplingParams

    if max_new_tokens < 1:
        raise TinygenError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    path = resolve_model_path(model, DEFAULT_CHAT_MODEL)
    net, tokenizer, _ = load_model(str(path), device, dtype, quantize)
    session = ChatSession(net, tokenizer, params, max_tokens=max_new_tokens, seed=seed, system=system,
                          compiled=compiled_decoder(net, compile))
    repl = Repl(session, jsonl=jsonl)
    interactive = prompt is None and sys.stdin.isatty()
    if not session.template.tuned and not interactive:
        ui.warn(f"{path.name} is not chat-tuned: using a plain User:/Assistant: transcript")
    if prompt is not None:
        repl.turn(prompt, show_stats=ui.is_tty())
    elif interactive:
        repl.interactive(banner(path.name, net.num_params(), session.template.tuned))
    else:
        repl.scripted(sys.stdin)
