"""The `tinygen` command line. Commands are thin: parse, call the library, print.

torch is imported inside the commands that need it, so `tinygen --help`, `tokenize` and `info`
start fast. TinygenError, usage errors, a closed pipe and Ctrl-C all end in `main` as one line
on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from tinygen import __version__
from tinygen.cli import bench, chat, evaluate, info, inspect, sample, tokens, train, ui
from tinygen.errors import TinygenError

RICH_HELP = ui.is_tty() and not os.environ.get("NO_COLOR")
app = typer.Typer(
    name="tinygen",
    help="Train, run and look inside compact GPT-style language models.",
    add_completion=False,
    pretty_exceptions_enable=False,
    # Boxed, coloured help on a terminal; plain text in a pipe, which also skips importing Rich's
    # Markdown renderer (a third of the start-up time of `tinygen --help`).
    rich_markup_mode="rich" if RICH_HELP else None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# The commands, in the order `tinygen --help` lists them.
app.command()(sample.sample)
app.command()(chat.chat)
app.command()(tokens.tokenize)
app.command()(info.info)
app.command()(inspect.attention)
app.command()(inspect.embed)
app.command()(train.train)
app.command("chat-data")(train.chat_data)
app.command("eval")(evaluate.eval_cmd)
app.command()(bench.bench)


def _version(value: bool) -> None:
    if value:
        print(f"tinygen {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """Train, run and look inside compact GPT-style language models."""
    if ctx.invoked_subcommand is None:  # bare `tinygen`: the help, and success
        help_text = ctx.get_help()  # on a terminal Typer's Rich help prints itself and returns ""
        if help_text:
            ui.write(help_text + "\n")
        raise typer.Exit()


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except TinygenError as e:
        ui.error(str(e))
        rc = 1
    except typer.TyperException as e:  # Typer's (vendored) click errors: usage mistakes, bad values
        ctx = getattr(e, "ctx", None)
        ui.error(f"{e.format_message()} (see `{ctx.command_path if ctx else 'tinygen'} --help`)")
        rc = getattr(e, "exit_code", 1)
    except (typer.Abort, KeyboardInterrupt):
        rc = 130
    except ui.OutputClosed:
        # The reader went away (`| head`): stop quietly, and keep Python's exit flush from failing too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 0
    sys.exit(rc if isinstance(rc, int) else 0)
