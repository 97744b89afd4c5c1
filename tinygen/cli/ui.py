"""Terminal output: what goes to stdout and stderr, and how it looks.

Generated text is the only thing on stdout; status, stats and warnings go to stderr. Colour and
Rich layout appear only on a terminal, and NO_COLOR turns colour off (Rich honours it).
Consoles are made per call so they follow whatever sys.stdout/sys.stderr are at the time.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.filesize import pick_unit_and_suffix
from rich.table import Table
from rich.text import Text

from tinygen.core.tokenizer import Tokenizer

TOKEN_COLOURS = ("on #3b4261", "on #2d4f67", "on #4f3b61", "on #3d5a3b", "on #5a4a2d", "on #5a2d3b")


def out() -> Console:
    return Console(file=_Stdout(), highlight=False, soft_wrap=True)


def err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


class OutputClosed(Exception):
    """stdout's reader has gone (`| head`). Not an OSError, so that Typer lets it through to main."""


class _Stdout:
    """sys.stdout (as it is at each call) for a Rich console, with a closed pipe raised as OutputClosed."""

    def write(self, text: str) -> int:
        try:
            return sys.stdout.write(text)
        except BrokenPipeError:
            raise OutputClosed from None

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            raise OutputClosed from None

    def __getattr__(self, name):  # isatty, fileno, encoding: what Rich asks to decide on colour and width
        return getattr(sys.stdout, name)


def write(text: str) -> None:
    """Plain text to stdout, flushed: what pipes and scripts read."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None


def is_tty(stream=None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty()


def warn(message: str) -> None:
    err().print(Text("warning: ", style="yellow bold") + Text(message))


def note(message: str) -> None:
    """Progress for the user, on stderr, dim on a terminal."""
    err().print(Text(message, style="dim"))


def error(message: str) -> None:
    err().print(Text("error: ", style="red bold") + Text(message))


class TextSink:
    """Streams generated text to stdout: styled on a terminal, plain bytes in a pipe."""

    def __init__(self) -> None:
        self.tty = is_tty()
        self.console = out() if self.tty else None

    def prompt(self, text: str) -> None:
        self._write(text, "dim")

    def text(self, text: str) -> None:
        self._write(text, "bold")

    def _write(self, text: str, style: str) -> None:
        if not text:
            return
        if self.console is None:
            write(text)
            return
        self.console.print(Text(text, style=style), end="")
        self.console.file.flush()

    def end(self) -> None:
        self._write("\n", "")


def stats_line(n_tokens: int, seconds: float, prefill_seconds: float | None = None) -> None:
    rate = n_tokens / seconds if seconds > 0 else float("inf")
    parts = [f"{n_tokens} tokens", f"{rate:.1f} tok/s"]
    if prefill_seconds is not None:
        parts.append(f"first token {prefill_seconds * 1000:.0f} ms")
    err().print(Text(" · ".join(parts), style="dim"))


def show_tokens(tokenizer: Tokenizer, ids: list[int], text: str) -> None:
    """The tokenizer-viewer display: coloured tokens, then their ids, then a count."""
    if not is_tty():
        # In a pipe, one token per line (id, then the token as a JSON string) reads and greps well.
        write("".join(f"{i}\t{json.dumps(tokenizer.label(i), ensure_ascii=False)}\n" for i in ids))
        err().print(f"{len(ids)} tokens, {len(text)} characters")
        return
    console = out()
    # NO_COLOR strips colours but keeps attributes, so token boundaries then alternate reverse video.
    palette = ("reverse", "") if console.no_color else TOKEN_COLOURS
    line = Text()
    for n, i in enumerate(ids):
        label = tokenizer.label(i).replace("\n", "↵\n")
        style = "bold magenta on #202020" if i in tokenizer.special_ids else palette[n % len(palette)]
        line.append(label, style=style)
    console.print(line)
    console.print(Text(" ".join(str(i) for i in ids), style="cyan"))
    console.print(Text(f"{len(ids)} tokens, {len(text)} characters", style="dim"))


def info_table(rows: list[tuple[str, str]], title: str) -> None:
    """Labelled values under a title (`info`, `eval`). On a terminal, a Rich table; in a pipe, plain
    `label  value` lines, values aligned, with nothing padded after them."""
    if not is_tty():
        width = max((len(label) for label, _ in rows), default=0)
        lines = [title]
        for label, value in rows:
            value = value.replace("\n", "\n" + " " * (width + 2))  # a value's own lines stay in its column
            lines.append(f"{label:<{width}}  {value}".rstrip())
        write("\n".join(lines) + "\n")
        return
    table = Table(title=title, show_header=False, title_justify="left", box=None)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    out().print(table)


def human_count(n: int) -> str:
    """A count as people say it: 3443136 -> 3.4M."""
    unit, suffix = pick_unit_and_suffix(n, ["", "K", "M", "B"], 1000)
    return f"{n / unit:.1f}{suffix}" if unit > 1 else str(n)
