"""Batch generation through `tinygen sample`: every request keeps its own seed and settings, whatever
else shares the batch; every input line gets its output; samples of one prompt decode together."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

from conftest import assert_ok, clean_env

PROMPTS = ["Spot liked", "The sun", "Once upon a time"]


def jsonl(*objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def completions(r) -> list[str]:
    assert_ok(r)
    return [json.loads(line)["completion"] for line in r.out.splitlines()]


def completions_raw(r) -> list[str]:
    assert_ok(r)
    return r.out.splitlines()


def test_a_request_seed_is_its_own(cli, model_path):
    """Two identical lines with "seed": 3 give the same completion, and neither changes with
    --batch-size or with the requests around it (they shared one random stream before)."""
    same = {"prompt": "Spot liked", "temperature": 1.0, "max_new_tokens": 12, "seed": 3}
    other = {"prompt": "The sun", "temperature": 1.2, "top_k": 20, "max_new_tokens": 4}
    stdin = jsonl(same, other, same)
    args = ("sample", "-m", model_path, "--jsonl", "--device", "cpu", "--seed", "11")  # the unseeded row: 11 + 1
    base = completions(cli(*args, input=stdin))
    assert base[0] == base[2] != base[1]
    assert completions(cli(*args, input=jsonl(same))) == base[:1]
    for size in ("1", "2"):
        assert completions(cli(*args, "--batch-size", size, input=stdin)) == base, size


def test_rows_without_a_seed_take_the_command_seed_plus_their_index(cli, model_path, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    args = ("-m", model_path, "-n", "10", "-t", "1.0", "--device", "cpu")
    batch = cli("sample", *args, "--input", path, "--seed", "7")
    assert_ok(batch)
    singles = [cli("sample", *args, p, "--seed", str(7 + i)).text.replace("\n", " ") for i, p in enumerate(PROMPTS)]
    assert batch.out.splitlines() == singles
    for size in ("1", "2"):
        assert cli("sample", *args, "--input", path, "--seed", "7", "--batch-size", size).raw == batch.raw
    # A row's completion does not depend on what comes before it in the input.
    tail = tmp_path / "tail.txt"
    tail.write_text(PROMPTS[2] + "\n")
    assert cli("sample", *args, "--input", tail, "--seed", "9").text == singles[2]


def test_every_input_line_gets_one_output_line(cli, model_path):
    r = cli("sample", "-m", model_path, "--input", "-", "-n", "3", "-t", "0", "--device", "cpu", input="A\n\nB\n")
    assert_ok(r)
    lines = r.out.split("\n")
    assert len(lines) == 4 and lines[3] == ""  # three completions, each ending its line
    fresh = cli("sample", "-m", model_path, "", "-n", "3", "-t", "0", "--device", "cpu").text
    assert lines[1] == fresh.replace("\n", " ")  # the empty prompt starts a fresh document


def test_num_samples_in_batch_mode(cli, model_path):
    args = ("-m", model_path, "-n", "6", "-t", "1.0", "--seed", "5", "--num-samples", "2", "--device", "cpu")
    r = cli("sample", *args, "--input", "-", input="A\nB\n")
    assert_ok(r)
    lines = r.out.splitlines()
    assert len(lines) == 4  # two per prompt, in input order
    single = ("-m", model_path, "-n", "6", "-t", "1.0", "--device", "cpu")
    assert lines == [cli("sample", *single, p, "--seed", str(5 + k)).text.replace("\n", " ")
                     for k, p in enumerate(["A", "A", "B", "B"])]
    r = cli("sample", *args, "--jsonl", input=jsonl({"prompt": "A"}, {"prompt": "B"}))
    rows = [json.loads(x) for x in completions_raw(r)]
    assert [(x["prompt"], x["sample"]) for x in rows] == [("A", 0), ("A", 1), ("B", 0), ("B", 1)]
    assert [x["completion"].replace("\n", " ") for x in rows] == lines


def test_a_prompt_with_jsonl_writes_json_for_it(cli, model_path):
    r = cli("sample", "-m", model_path, "Spot liked", "--jsonl", "-n", "5", "-t", "0", "--device", "cpu")
    assert_ok(r)
    (row,) = [json.loads(x) for x in r.out.splitlines()]
    assert row["prompt"] == "Spot liked" and row["tokens"] <= 5
    assert row["completion"] == cli("sample", "-m", model_path, "Spot liked", "-n", "5", "-t", "0", "--device", "cpu").text


def test_batch_mode_on_a_terminal_says_what_it_waits_for(model_path):
    """`tinygen sample --jsonl` with a terminal on stdin: a hint on stderr, then it reads until Ctrl-D."""
    leader, follower = pty.openpty()
    err_r, err_w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "tinygen", "sample", "-m", str(model_path), "--jsonl", "-n", "3",
                             "-t", "0", "--device", "cpu"], stdin=follower, stdout=subprocess.PIPE, stderr=err_w,
                            env=clean_env(), close_fds=True)
    os.close(follower)
    os.close(err_w)
    hint, deadline = b"", time.time() + 60
    while b"Ctrl-D" not in hint and time.time() < deadline:
        if select.select([err_r], [], [], 1)[0]:
            hint += os.read(err_r, 4096)
    assert b"reading JSON requests from the terminal" in hint and b"Ctrl-D" in hint
    os.write(leader, b'{"prompt": "Spot"}\n')
    time.sleep(0.5)
    os.write(leader, b"\x04")  # Ctrl-D at the start of a line: end of input
    out, _ = proc.communicate(timeout=60)
    os.close(leader)
    os.close(err_r)
    assert proc.returncode == 0
    assert [json.loads(x)["prompt"] for x in out.decode().splitlines()] == ["Spot"]
