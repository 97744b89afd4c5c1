"""`tinygen chat`: a conversation with a model, on a terminal or through a pipe."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.common import load_model
from tinygen.cli.options import (
    MODEL_KINDS,
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    QuantOpt,
    Sampling,
    constraint_flags,
    sampling_flags,
)
from tinygen.errors import TinygenError


@sampling_flags(max_new_tokens=256, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
@constraint_flags
def chat(
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="MODEL", envvar="TINYGEN_MODEL",
                                                 show_envvar=False, help=f"Model to chat with: {MODEL_KINDS}. "
                                                 "Default: $TINYGEN_MODEL, else the bundled chat model. A model that "
                                                 "was never chat-tuned gets a plain User:/Assistant: transcript.",
                                                 show_default=False)] = None,
    system: Annotated[Optional[str], typer.Option(metavar="TEXT", help="System prompt.", show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", metavar="TEXT", help="Answer this one message and exit.",
                                                  show_default=False)] = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", metavar="", help='Replies as {"role", "content"} JSON lines; '
                                        "input lines may be JSON messages too (so they can hold newlines).")] = False,
    sampling: Sampling = None,
    constraint=None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantOpt = None,
    compile: CompileOpt = False,
) -> None:
    """Chat with a model: a REPL on a terminal; in a pipe, each input line is one message."""
    from tinygen.cli.repl import Repl, banner, stdin_lines
    from tinygen.core.checkpoint import DEFAULT_CHAT_MODEL, resolve_model_path
    from tinygen.generate.chat import ChatSession

    if prompt is not None and not prompt.strip():
        raise TinygenError("--prompt is empty: give it the message to answer, or leave it out to chat")
    params = sampling.params()
    path = resolve_model_path(model, DEFAULT_CHAT_MODEL)
    net, tokenizer, _, decoder = load_model(str(path), device, dtype, quantize, compile)
    session = ChatSession(net, tokenizer, params, max_tokens=sampling.max_new_tokens, seed=sampling.seed, system=system,
                          compiled=decoder, constraint=constraint)
    repl = Repl(session, jsonl=jsonl)
    interactive = prompt is None and sys.stdin.isatty()
    if not session.template.tuned and not interactive:
        ui.warn(f"{path.name} is not chat-tuned: using a plain User:/Assistant: transcript")
    if prompt is not None:
        repl.turn(prompt, show_stats=ui.is_tty())
    elif interactive:
        repl.interactive(banner(path.name, net.num_params(), session.template.tuned))
    else:
        repl.scripted(stdin_lines(sys.stdin.buffer))
