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
import typer.core

from tinygen import __version__
from tinygen.cli import (
    bench,
    chat,
    circuits,
    convert,
    evaluate,
    export,
    info,
    inspect,
    sample,
    tokens,
    train,
    ui,
)
from tinygen.errors import TinygenError

RICH_HELP = ui.is_tty() and not os.environ.get("NO_COLOR")


class _Help:
    """Typer's Rich help shows `<bool>` after its own --help flag, which takes no value; blank it,
    as options.py does for every flag of ours."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_Help, typer.core.TyperCommand):
    pass


class _Group(_Help, typer.core.TyperGroup):
    pass


app = typer.Typer(
    name="tinygen",
    cls=_Group,
    help="Train, run and look inside compact GPT-style language models.",
    add_completion=False,
    pretty_exceptions_enable=False,
    # Boxed, coloured help on a terminal; plain text in a pipe, which also skips importing Rich's
    # Markdown renderer, a large share of `tinygen --help`'s start-up (docs/speed.md).
    rich_markup_mode="rich" if RICH_HELP else None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# The commands, in the order `tinygen --help` lists them.
app.command(cls=_Command)(sample.sample)
app.command(cls=_Command)(chat.chat)
app.command(cls=_Command)(tokens.tokenize)
app.command(cls=_Command)(info.info)
app.command(cls=_Command)(inspect.attention)
app.command(cls=_Command)(inspect.embed)
app.command(cls=_Command)(circuits.lens)
app.command(cls=_Command)(circuits.trace)
app.command(cls=_Command)(circuits.patch)
app.command(cls=_Command)(circuits.ablate)
app.command(cls=_Command)(circuits.heads)
app.command(cls=_Command)(train.train)
app.command("chat-data", cls=_Command)(train.chat_data)
app.command("eval", cls=_Command)(evaluate.eval_cmd)
app.command(cls=_Command)(bench.bench)
app.command(cls=_Command)(export.export)
app.command(cls=_Command)(convert.convert)


def _version(value: bool) -> None:
    if value:
        print(f"tinygen {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="", help="Show the version and exit.")] = False,
) -> None:
    """Train, run and look inside compact GPT-style language models."""
    if ctx.invoked_subcommand is None:  # bare `tinygen`: the help, and success
        help_text = ctx.get_help()  # on a terminal Typer's Rich help prints itself and returns ""
        if help_text:
            ui.write(help_text + "\n")
        raise typer.Exit()


def main() -> None:
    try:
        rc = app(standalone_mode=False, prog_name="tinygen")
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
