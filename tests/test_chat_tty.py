"""`tinygen chat` on a real pseudo-terminal: the REPL a user types into.

Covers line continuation, slash commands, Ctrl-C during a reply, at the prompt and just after a
reply (the session goes on each time), Ctrl-D, and the readline history file.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from tinygen.cli.repl import QUIT_HINT, Repl
from tinygen.core.checkpoint import load_model
from tinygen.generate.chat import ChatSession
from tinygen.generate.sampling import SamplingParams


def _own_terminal() -> None:
    """Make the pty the child's controlling terminal, so that Ctrl-C on it sends SIGINT, with
    SIGINT's default disposition, as a shell in a terminal gives it. A test run started in the
    background by a non-interactive shell ignores SIGINT, children inherit that, and Python then
    never raises KeyboardInterrupt."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """A child process on a pty, driven like expect(1)."""

    def __init__(self, args, env_extra):
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TINYGEN_MODEL", "FORCE_COLOR")}
        env.update({"TERM": "xterm-256color", "COLUMNS": "100", **env_extra})
        self.fd, follower = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "tinygen", *map(str, args)], stdin=follower,
                                     stdout=follower, stderr=follower, env=env, close_fds=True,
                                     preexec_fn=_own_terminal)
        os.close(follower)
        self.screen = ""
        self.pos = 0

    def expect(self, pattern: str, timeout: float = 60) -> None:
        """Wait until pattern appears after the previous match."""
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.screen[self.pos :])):
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                pytest.fail(f"waited for {pattern!r}; the screen shows:\n{self.screen[-2000:]}")
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                data = b""
            if not data:
                pytest.fail(f"the process ended before {pattern!r}:\n{self.screen[-2000:]}")
            self.screen += data.decode("utf-8", "replace")
        self.pos += m.end()

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def finish(self, timeout: float = 30) -> int:
        try:
            while select.select([self.fd], [], [], timeout)[0]:
                data = os.read(self.fd, 4096)
                if not data:
                    break
                self.screen += data.decode("utf-8", "replace")
        except OSError:
            pass
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the process did not exit; the screen shows:\n{self.screen[-2000:]!r}")
        finally:
            os.close(self.fd)


@pytest.fixture
def term(chat_model_path, tmp_path):  # noqa: F811
    terms = []

    def start(*extra):
        t = Terminal(["chat", "-m", chat_model_path, "--device", "cpu", "-t", "0", *extra],
                     {"XDG_STATE_HOME": str(tmp_path / "state")})
        terms.append(t)
        return t

    yield start
    for t in terms:
        if t.proc.poll() is None:
            t.proc.kill()


def test_a_conversation_with_commands_and_line_continuation(term, tmp_path):
    t = term("-n", "6")
    t.expect(r"chat-tuned")
    t.expect(r">>> ")
    t.send("hello \\\r")
    t.expect(r"\.\.\. ")
    t.send("world\r")
    t.expect(r"tok/s · first token \d+ ms · context \d+/64")  # the stats line after the reply
    t.send("/set top_k 5\r")
    t.expect(r"top_k = 5")
    t.send("/nope\r")
    t.expect(r"unknown command /nope")
    t.send(f"/save {tmp_path / 't.json'}\r")
    t.expect(r"saved 2 messages")
    # readline draws the prompt after it puts the tty in raw mode; a ^D typed before that is
    # consumed by the cooked line discipline as an end-of-file marker and reaches readline as NUL
    t.expect(r">>> ")
    t.send("\x04")  # Ctrl-D
    assert t.finish() == 0
    assert "Traceback" not in t.screen
    assert "\x1b[" in t.screen  # styled on a terminal
    saved = json.loads((tmp_path / "t.json").read_text())["messages"]
    assert saved[0] == {"role": "user", "content": "hello \nworld"}  # one message over two lines
    history = (tmp_path / "state" / "tinygen" / "chat_history").read_text()
    assert "/set top_k 5" in history


def test_ctrl_c_stops_a_reply_and_the_session_goes_on(term, tmp_path):
    t = term("-n", "100000")  # the test model never ends a turn by itself
    t.expect(r">>> ")
    t.send("tell me everything\r")
    t.expect(r"\x1b\[32m")  # the reply has started (green)
    time.sleep(0.3)
    t.send("\x03")
    t.expect(r"reply interrupted")
    t.expect(r">>> ")
    t.send(f"/save {tmp_path / 'after.json'}\r")
    t.expect(r"saved 2 messages")
    t.send("/undo\r")
    t.expect(r"took back 2 message")
    t.expect(r">>> ")
    t.send("\x04")
    assert t.finish() == 0
    assert "Traceback" not in t.screen
    assert QUIT_HINT not in t.screen  # a Ctrl-C that stops a reply is not one at the prompt
    partial = json.loads((tmp_path / "after.json").read_text())["messages"][1]
    assert partial["role"] == "assistant" and partial["content"]


HINT = re.escape(QUIT_HINT)


def _saved_on_leaving(t, path, n_messages: int) -> list[dict]:
    """Save the conversation, leave with /bye, and return the messages saved."""
    t.send(f"/save {path}\r")
    t.expect(rf"saved {n_messages} messages")
    t.send("/bye\r")
    assert t.finish() == 0
    assert "Traceback" not in t.screen
    return json.loads(path.read_text())["messages"]


def test_ctrl_c_at_the_prompt_clears_the_line_and_the_session_goes_on(term, tmp_path):
    t = term("-n", "3")
    t.expect(r">>> ")
    t.send("half a thou")
    t.expect(r"half a thou")  # readline has echoed it, so it is reading keys
    # CPython's readline loop checks for signals before it blocks in select(), so a Ctrl-C in the
    # instant between echoing and blocking waits for the next key; people are slower.
    time.sleep(0.3)
    t.send("\x03")
    t.expect(HINT)
    t.expect(r">>> ")
    time.sleep(0.3)
    t.send("\x03")  # at an empty prompt too, and twice in a row
    t.expect(HINT)
    t.expect(r">>> ")
    t.send("hello\r")
    t.expect(r"context \d+/64")
    # the cleared text did not join the next message
    assert _saved_on_leaving(t, tmp_path / "c.json", 2)[0]["content"] == "hello"


def test_ctrl_c_just_after_a_reply_does_not_end_the_session(term, tmp_path):
    t = term("-n", "3")
    t.expect(r">>> ")
    t.send("hello\r")
    t.expect(r"context \d+/64")
    t.send("\x03")  # as soon as the stats line shows: before the prompt, or as it is drawn
    # A Ctrl-C that lands while CPython's readline sets up the prompt is only seen once a line is
    # entered (see above); an empty line brings it out, and is nothing to the REPL otherwise.
    time.sleep(0.3)
    t.send("\r")
    t.expect(HINT)
    t.send("again\r")
    t.expect(r"context \d+/64")
    assert [m["content"] for m in _saved_on_leaving(t, tmp_path / "r.json", 4)[::2]] == ["hello", "again"]


def test_a_ctrl_c_between_the_reply_and_the_prompt_is_held_for_the_prompt(chat_model_path, tmp_path, monkeypatch,
                                                                           capsys):
    """The same moment as above, made exact: SIGINT arrives while the stats line prints."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    model, tok, _ = load_model(chat_model_path)
    repl = Repl(ChatSession(model, tok, SamplingParams(temperature=0), max_tokens=3))
    typed = iter(["hello", "/bye"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(typed))
    note = repl.note

    def note_with_ctrl_c(text, style="dim"):
        if "tok/s" in text:
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler at its next instruction, in here
        note(text, style)

    monkeypatch.setattr(repl, "note", note_with_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    repl.interactive("banner")  # returns at /bye: no KeyboardInterrupt escapes
    assert signal.getsignal(signal.SIGINT) is before
    err = capsys.readouterr().err
    assert "tok/s" in err and QUIT_HINT in err.split("tok/s", 1)[1]
    assert len(repl.session.messages) == 2  # the reply stayed


def test_multiline_block(term, tmp_path):
    t = term("-n", "3")
    t.expect(r">>> ")
    t.send('"""\rfirst line\rsecond line\r"""\r')
    t.expect(r"context \d+/64")
    t.send(f"/save {tmp_path / 'm.json'}\r/exit\r")
    assert t.finish() == 0
    assert json.loads((tmp_path / "m.json").read_text())["messages"][0]["content"] == "first line\nsecond line"


UP = "\x1b[A"


def _recall(t, keys: str, path, leave: str) -> str:
    """Type keys that send one message, save the conversation once the reply is in, and leave;
    returns the message as the conversation holds it."""
    t.send(keys)
    t.expect(r"context \d+/64")
    t.send(f"/save {path}\r")
    t.expect(r"saved 2 messages")
    t.send(leave)
    assert t.finish() == 0
    return json.loads(path.read_text())["messages"][0]["content"]


def test_up_arrow_recalls_a_message_of_several_lines_whole(term, tmp_path):
    t = term("-n", "3")
    t.expect(r">>> ")
    t.send("hello \\\r")
    t.expect(r"\.\.\. ")
    t.send("world\r")
    t.expect(r"context \d+/64")
    t.expect(r">>> ")
    t.send('"""\rfirst line\rsecond line\r"""\r')
    t.expect(r"context \d+/64")
    t.send("/clear\r")
    t.expect(r"conversation cleared")
    t.expect(r">>> ")
    # Up twice, past /clear: the whole block, not its closing """.
    assert _recall(t, UP * 2 + "\r", tmp_path / "a.json", "/bye\r") == "first line\nsecond line"
    # The next session reads the history file back, newlines and all: Up six times goes back past
    # /bye, /save, the block, /clear and the block to the continued message.
    t = term("-n", "3")
    t.expect(r">>> ")
    assert _recall(t, UP * 6 + "\r", tmp_path / "b.json", "/exit\r") == "hello \nworld"
