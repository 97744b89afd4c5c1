"""The `tinygen chat` front end: an interactive REPL on a terminal, a line protocol in pipes.

Line editing is GNU readline through Python's `readline` (history, Ctrl-R, ~/.inputrc, bracketed
paste), with no extra dependency or start-up cost; prompt_toolkit's full-screen editor is more than
chat needs. History holds whole messages, in a file written here: readline's own would split a
multi-line message at its newlines. Replies go to stdout and everything else to stderr, so
`tinygen chat < questions.txt > answers.txt` captures only the model's words. Ctrl-C on a terminal
stops a reply or clears the line, never the session (as ollama's): one pressed a moment too late to
stop a reply would otherwise quit with the conversation unsaved.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.text import Text

from tinygen.cli import ui
from tinygen.errors import TinygenError
from tinygen.generate.chat import SETTINGS, ChatSession

HELP = [
    ("/help", "this list"),
    ("/reset, /clear", "forget the conversation (the system prompt stays)"),
    ("/system [TEXT]", "set the system prompt; bare shows it, `/system off` clears it"),
    ("/set [NAME VALUE]", f"change a setting ({', '.join(SETTINGS)}); bare shows them"),
    ("/undo", "take back your last message and its reply"),
    ("/save FILE", "write the conversation as JSON (messages format)"),
    ("/load FILE", "continue a saved conversation"),
    ("/exit, /bye", "leave (so does Ctrl-D at the prompt; Ctrl-C stops a reply or clears the line)"),
]
QUIT_HINT = "(Ctrl-D or /bye to quit)"
MULTILINE = '"""'
HISTORY_LENGTH = 1000


class Exit(Exception):
    """Leave the REPL."""


def history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "tinygen" / "chat_history"


def read_history(path: Path) -> list[str]:
    """The saved entries, oldest first: one a line, and a JSON string where the entry holds a
    newline (or opens with a quote, so that plain lines stay unambiguous)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    entries = []
    for line in lines[-HISTORY_LENGTH:]:
        if line.startswith('"'):
            try:
                decoded = json.loads(line)
            except ValueError:
                decoded = None
            line = decoded if isinstance(decoded, str) else line
        entries.append(line)
    return entries


def write_history(path: Path, entries: list[str]) -> None:
    from tinygen import atomic

    lines = (json.dumps(e, ensure_ascii=False) if "\n" in e or "\r" in e or e.startswith('"') else e
             for e in entries[-HISTORY_LENGTH:])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, "".join(line + "\n" for line in lines).encode("utf-8"))


def stdin_lines(stream) -> Iterator[str]:
    """Lines of a byte stream as text, as they arrive; invalid UTF-8 stops the session, as it
    stops `sample`, rather than reaching the model as replacement characters."""
    for n, raw in enumerate(stream, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TinygenError(f"line {n} of stdin is not valid UTF-8 (byte {e.start + 1} of the line); "
                               "convert it first, e.g. with iconv") from None


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class Repl:
    def __init__(self, session: ChatSession, *, jsonl: bool = False):
        self.session = session
        self.jsonl = jsonl
        self.out = ui.out()
        self.err = ui.err()
        self.styled = ui.is_tty() and not self.out.no_color
        self.interruptible = False  # whether a Ctrl-C may raise KeyboardInterrupt now; see interactive()
        self.interrupt_held = False

    # -- output ----------------------------------------------------------------------------------

    def note(self, text: str, style: str = "dim") -> None:
        self.err.print(Text(text, style=style))

    def _show(self, piece: str) -> None:
        if ui.is_tty():
            try:
                self.out.print(Text(piece, style="green"), end="")
                self.out.file.flush()
            except BrokenPipeError:
                raise ui.OutputClosed from None
        else:
            ui.write(piece)

    def turn(self, text: str, show_stats: bool) -> None:
        """One exchange. Ctrl-C stops the reply; what was said so far stays in the history."""
        replies = self.session.reply(text)
        # Shown as the history stores it, stripped: whitespace is held back until text follows it.
        started, held = False, ""
        try:
            with self.interrupts():
                for piece in replies:
                    text = held + piece
                    if not started:
                        text = text.lstrip()
                        started = bool(text)
                    body = text.rstrip()
                    held = text[len(body):]
                    if body and not self.jsonl:
                        self._show(body)
        except KeyboardInterrupt:
            replies.close()  # the partial reply joins the history
            if not self.jsonl:
                self._show("\n")
            self.note("(reply interrupted)")
            return
        last = self.session.last
        complete = last.completion.complete
        if self.jsonl:
            record = {"role": "assistant", "content": self.session.messages[-1].content}
            ui.write(json.dumps(record if complete is None else {**record, "complete": complete},
                                ensure_ascii=False) + "\n")
        else:
            self._show("\n")
        if complete is False:
            why = (f"ran out of tokens (max_tokens {self.session.max_tokens})"
                   if last.completion.finish_reason == "length" else "could not go on")
            ui.warn(f"the reply {why} before its {self.session.constraint.label} was complete")
        if last.trimmed:
            dropped = "message was" if last.trimmed == 1 else f"{last.trimmed} messages were"
            self.note(f"(the context was full: the oldest {dropped} dropped)")
        if show_stats:
            c = last.completion
            rate = c.n_tokens / c.seconds if c.seconds else 0.0
            first = f" · first token {c.first_token_seconds * 1000:.0f} ms" if c.first_token_seconds else ""
            reused = f", {last.reused} cached" if last.reused else ""
            self.note(f"{count(c.n_tokens, 'token')} · {rate:.0f} tok/s{first} · "
                      f"context {last.context}/{self.session.block_size}{reused}")

    # -- commands --------------------------------------------------------------------------------

    def command(self, line: str) -> None:
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("exit", "quit", "bye"):
            raise Exit
        if name in ("help", "?"):
            for cmd, what in HELP:
                self.err.print(Text(f"  {cmd:<20}", style="bold cyan") + Text(what))
        elif name in ("reset", "clear"):
            s.reset()
            self.note("(conversation cleared)")
        elif name == "system":
            if not arg:
                self.note(f"system prompt: {s.system.content!r}" if s.system else "no system prompt")
            else:
                s.set_system(None if arg == "off" else arg)
                self.note("(system prompt cleared)" if arg == "off" else "(system prompt set)")
        elif name == "set":
            if not arg:
                for key, value in s.settings().items():
                    self.err.print(Text(f"  {key:<20}", style="bold cyan") + Text(str(value)))
                return
            key, _, value = arg.partition(" ")
            key = {"temp": "temperature", "max_new_tokens": "max_tokens"}.get(key.replace("-", "_"), key.replace("-", "_"))
            if not value.strip():
                raise TinygenError(f"usage: /set {key} VALUE")
            s.set(key, value.strip())
            self.note(f"({key} = {s.settings()[key]})")
        elif name == "undo":
            n = s.undo()
            self.note(f"(took back {count(n, 'message')})" if n else "(nothing to undo)")
        elif name == "save":
            if not arg:
                raise TinygenError("usage: /save FILE")
            s.save(arg)
            self.note(f"(saved {count(len(s.transcript()), 'message')} to {arg})")
        elif name == "load":
            if not arg:
                raise TinygenError("usage: /load FILE")
            self.note(f"(loaded {count(s.load(arg), 'message')} from {arg})")
        else:
            raise TinygenError(f"unknown command /{name}; /help lists the commands")

    def handle(self, line: str, show_stats: bool) -> None:
        """A command or a message; mistakes are one line, and the session goes on."""
        try:
            if line.startswith("/") and not line.startswith("//"):
                self.command(line)
            else:
                self.turn(line[1:] if line.startswith("//") else line, show_stats)
        except TinygenError as e:
            ui.error(str(e))

    # -- Ctrl-C --------------------------------------------------------------------------------

    @contextmanager
    def interrupts(self):
        """The stretch where a Ctrl-C raises KeyboardInterrupt: at the prompt and while a reply
        streams. In the REPL, one pressed elsewhere is held for the next prompt (on_sigint)."""
        self.interruptible = True
        try:
            yield
        finally:
            self.interruptible = False

    def on_sigint(self, signum, frame) -> None:
        # Holding, not raising, outside interrupts() is what keeps every moment between a reply and
        # the prompt (the stats line, the history, a command) from ending the session.
        if self.interruptible:
            raise KeyboardInterrupt
        self.interrupt_held = True

    def prompt_for_message(self) -> str:
        """The next message; KeyboardInterrupt for a Ctrl-C at the prompt or held since the last one."""
        with self.interrupts():
            if self.interrupt_held:
                self.interrupt_held = False
                raise KeyboardInterrupt
            return self.read_message()

    # -- the two loops ---------------------------------------------------------------------------

    def interactive(self, banner: str) -> None:
        import readline

        hist = history_path()
        # Readline would add each line typed; a message of several lines goes in once, whole.
        readline.set_auto_history(False)
        for entry in read_history(hist):
            readline.add_history(entry)
        self.err.print(Text(banner, style="bold"))
        self.note('/help for commands · end a line with \\ or wrap it in """ for several lines · '
                  'Ctrl-C stops a reply · Ctrl-D quits')
        previous = signal.signal(signal.SIGINT, self.on_sigint)
        try:
            while True:
                try:
                    line = self.prompt_for_message()
                except EOFError:
                    self.err.print()
                    return
                except KeyboardInterrupt:  # readline has dropped the line; the cursor is still on it
                    self.err.print()
                    self.note(QUIT_HINT)
                    continue
                n = readline.get_current_history_length()
                if line.strip() and (not n or readline.get_history_item(n) != line):
                    readline.add_history(line)
                if line.strip():
                    self.handle(line.strip(), show_stats=True)
        except Exit:
            return
        finally:
            signal.signal(signal.SIGINT, previous)
            entries = [readline.get_history_item(i) for i in range(1, readline.get_current_history_length() + 1)]
            try:
                write_history(hist, entries)
            except (OSError, TinygenError):  # an unwritable state folder costs the history, not the session
                pass

    def _prompt(self, text: str) -> str:
        # \001 and \002 tell readline the escape codes take no room, or line editing misplaces the cursor.
        return f"\001\033[1;36m\002{text}\001\033[0m\002" if self.styled else text

    def read_message(self) -> str:
        """One message: a line; lines ending in \\ continue; a \"\"\" line opens a block until the next one.
        A message recalled from the history arrives whole, newlines and all."""
        line = input(self._prompt(">>> "))
        if line.strip() == MULTILINE:
            block = []
            while (more := input(self._prompt("... "))).strip() != MULTILINE:
                block.append(more)
            return "\n".join(block)
        while line.endswith("\\"):
            line = line[:-1] + "\n" + input(self._prompt("... "))
        return line

    def scripted(self, lines: Iterable[str]) -> None:
        """Each input line is one user turn (or a command); each reply is written as it comes."""
        try:
            for raw in lines:
                line = raw.rstrip("\r\n")
                if self.jsonl and line.lstrip().startswith("{"):
                    line = self._json_line(line)
                    if line is None:
                        continue
                if line.strip():
                    self.handle(line.strip(), show_stats=bool(os.environ.get("TINYGEN_STATS")))
        except Exit:
            return

    def _json_line(self, line: str) -> str | None:
        """--jsonl input: {"role": "user"|"system", "content": ...}; a system message sets the system prompt."""
        try:
            msg = json.loads(line)
            role, content = msg.get("role", "user"), msg["content"]
        except (ValueError, KeyError, AttributeError):
            ui.error(f'not a message: {line[:60]!r}; expected {{"role": "user", "content": ...}}')
            return None
        if role == "system":
            self.session.set_system(content or None)
            return None
        if role != "user" or not isinstance(content, str):
            ui.error(f"only user and system messages can be sent, got role {role!r}")
            return None
        return "//" + content if content.startswith("/") else content


def banner(name: str, n_params: int, tuned: bool) -> str:
    kind = "chat-tuned" if tuned else "not chat-tuned: plain User:/Assistant: transcript"
    return f"tinygen chat · {name} ({ui.human_count(n_params)} params, {kind})"
