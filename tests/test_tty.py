"""On a terminal: Rich styling, the prompt echoed dimmed, a stats line; NO_COLOR turns colour off.

Runs the CLI under a real pseudo-terminal, as a user's shell would.
"""

import os
import pty
import re
import select
import subprocess
import sys

import pytest

# An SGR escape that sets a foreground or background colour (30-49, 90-107, 38;... and 48;...).
COLOUR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-9]|4[0-9]|9[0-7]|10[0-7])(?:;[0-9;]*)?m")


def run_in_pty(args, env_extra=None, timeout=120) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TINYGEN_MODEL", "FORCE_COLOR")}
    env.update({"TERM": "xterm-256color", "COLUMNS": "100", **(env_extra or {})})
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tinygen", *args], stdin=follower, stdout=follower, stderr=follower,
                            env=env, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], timeout)
        if not ready:
            proc.kill()
            pytest.fail("no output from the CLI under a pty")
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=timeout)
    os.close(leader)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode("utf-8", errors="replace")


def test_sample_on_a_terminal_is_styled_and_echoes_the_prompt(model_path):
    screen = run_in_pty(["sample", "-m", str(model_path), "--device", "cpu", "-n", "8", "-t", "0", "Once upon a time"])
    assert "\x1b[" in screen  # Rich styling
    assert "\x1b[2mOnce upon a time" in screen  # the prompt, dimmed
    assert "tok/s" in screen and "8 tokens" in screen  # the stats line


def test_no_color_on_a_terminal(model_path):
    screen = run_in_pty(["sample", "-m", str(model_path), "--device", "cpu", "-n", "8", "-t", "0", "Once upon a time"],
                        env_extra={"NO_COLOR": "1"})
    assert "Once upon a time" in screen and "tok/s" in screen
    assert not COLOUR.search(screen), screen  # attributes such as dim may stay; colours may not


def test_tokenize_with_no_color_still_shows_token_boundaries(model_path, tokenizer):
    screen = run_in_pty(["tokenize", "-m", str(model_path), "Once upon a time"], env_extra={"NO_COLOR": "1"})
    assert not COLOUR.search(screen)
    assert screen.count("\x1b[7m") >= len(tokenizer.encode("Once upon a time")) // 2  # reverse video, every other token


def test_tokenize_on_a_terminal_colours_tokens(model_path, tokenizer):
    screen = run_in_pty(["tokenize", "-m", str(model_path), "Once upon a time"])
    ids = tokenizer.encode("Once upon a time")
    assert " ".join(map(str, ids)) in screen
    assert f"{len(ids)} tokens" in screen
    assert screen.count("\x1b[") >= len(ids)  # a colour per token


@pytest.mark.parametrize("args", [
    ["attention", "Spot liked to run", "--matrix", "--device", "cpu"],
    ["sample", "Spot", "--explain", "-n", "2", "--seed", "0", "--device", "cpu"],
    ["tokenize", "--probs", "Spot liked to run", "--device", "cpu"],
])
def test_inside_views_are_coloured_on_a_terminal_only_without_no_color(model_path, args):
    screen = run_in_pty([*args, "-m", str(model_path)])
    assert COLOUR.search(screen), screen
    plain = run_in_pty([*args, "-m", str(model_path)], env_extra={"NO_COLOR": "1"})
    assert not COLOUR.search(plain), plain
    assert "Traceback" not in screen + plain
