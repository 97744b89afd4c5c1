"""End-to-end tests of the `tinygen` command line, run the way users run it.

The checks run the CLI in real processes, so they see what a user sees: which bytes reach stdout
and which reach stderr, the exit code, and whether a traceback escapes.

Most cases go through conftest's fork server (the `cli` fixture). Checks that depend on interpreter start-up or shutdown run `python -m tinygen` itself: plain
sampling in a pipe, a broken pipe, `--version`/`--help`, TINYGEN_MODEL, and the import-time
checks. `test_sampling_is_reproducible` also checks that the fork server gives the same bytes as
`python -m tinygen`.
"""

from __future__ import annotations

import json
import random
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinygen import __version__
from tinygen.core.checkpoint import load_model
from tinygen.generate.engine import naive_generate, stream
from tinygen.generate.sampling import SamplingParams

from conftest import GPT2_TOKENIZER, Run, assert_ok, assert_one_line_error, clean_env, run_real, stats_tokens

PROMPT = "Once upon a time"

# -- sample: plain output, determinism, stdin, stop, lengths --------------------------------------


@pytest.fixture(scope="module")
def greedy_real(model_path) -> Run:
    """The greedy completion of PROMPT from `python -m tinygen`, shared by the tests below."""
    return run_real("sample", "-m", model_path, PROMPT, "-n", "10", "-t", "0")


def test_sample_in_a_pipe_prints_plain_completion_without_prompt(model_path, greedy_real):
    r = greedy_real
    assert_ok(r)
    assert r.text.strip(), "empty completion"
    assert not r.out.startswith(PROMPT), "the prompt is echoed in a pipe"
    assert r.err == "", f"nothing but text should be printed in a pipe, got stderr {r.err!r}"

    echoed = run_real("sample", "-m", model_path, PROMPT, "-n", "10", "-t", "0", "--echo")
    assert_ok(echoed)
    assert echoed.out.startswith(PROMPT)
    assert echoed.out == PROMPT + r.out, "--echo should print the prompt, then the same completion"


def test_sampling_is_reproducible(cli, model_path, greedy_real):
    args = ("sample", "-m", model_path, PROMPT, "-n", "20")
    seeded = [cli(*args, "--seed", "7", "-t", "1.0") for _ in range(2)]
    for r in seeded:
        assert_ok(r)
    assert seeded[0].raw == seeded[1].raw
    other_seed = cli(*args, "--seed", "8", "-t", "1.0")
    assert other_seed.text != seeded[0].text, "the seed has no effect, so the check above proves nothing"

    greedy = [cli("sample", "-m", model_path, PROMPT, "-n", "10", "-t", "0") for _ in range(2)]
    assert greedy[0].raw == greedy[1].raw
    # The fork server and `python -m tinygen` must agree byte for byte.
    assert greedy[0].raw == greedy_real.raw


def test_prompt_from_stdin(cli, model_path):
    greedy = ("sample", "-m", model_path, "-n", "5", "-t", "0")
    from_arg = cli(*greedy, PROMPT)
    assert_ok(from_arg)
    # A trailing newline in the prompt changes the greedy output, so the stripping is really checked.
    assert cli(*greedy, PROMPT + "\n").text != from_arg.text
    assert cli(*greedy, input=PROMPT + "\n").raw == from_arg.raw
    assert cli(*greedy, input=PROMPT + "\r\n").raw == from_arg.raw
    assert cli(*greedy, "-", input=PROMPT + "\n").raw == from_arg.raw
    # Seeded sampling reads the same prompt too.
    seeded = ("sample", "-m", model_path, "-n", "12", "-t", "1.0", "--seed", "7")
    assert cli(*seeded, input=PROMPT + "\n").raw == cli(*seeded, PROMPT).raw


def test_stop_string_ends_the_completion(cli, model_path):
    args = ("sample", "-m", model_path, PROMPT, "-n", "40", "-t", "1.0", "--seed", "7")
    full = cli(*args)
    text = full.text
    # A printable 4-character stop string near the middle whose first occurrence is not at the start.
    mid = len(text) // 2
    stop = next((text[i:i + 4] for i in sorted(range(1, len(text) - 4), key=lambda i: abs(i - mid))
                 if text[i:i + 4].isprintable() and text.find(text[i:i + 4]) > 0), None)
    assert stop, f"no usable stop string in {text!r}; pick another seed"
    expected = text[: text.find(stop)]

    stopped = cli(*args, f"--stop={stop}")
    assert_ok(stopped)
    assert stop not in stopped.text
    assert full.out.startswith(stopped.text)
    assert stopped.text == expected, "output should end just before the first stop string"
    # --stop is repeatable; a stop that never appears changes nothing.
    assert cli(*args, "--stop=ZZ-never-ZZ", f"--stop={stop}").raw == stopped.raw


def test_max_new_tokens(cli, model_path, tokenizer):
    one = cli("sample", "-m", model_path, "Spot liked", "-n", "1", "-t", "0", env=clean_env(TINYGEN_STATS="1"))
    assert_ok(one)
    assert stats_tokens(one) <= 1
    assert one.text in {tokenizer.decode([t]) for t in range(tokenizer.n_vocab)}, f"{one.text!r} is not one token"
    assert_one_line_error(cli("sample", "-m", model_path, "x", "-n", "0"), "max-new-tokens", "greater than or equal to 1", rc=2)


def greedy_ids(path, ids: list[int], n: int) -> list[int]:
    """What the library itself generates greedily from these ids: the CLI must print exactly this."""
    model, tok, _ = load_model(path)
    return list(stream(model, ids, SamplingParams(temperature=0), n, stop_ids=[tok.eot_id]))


def decoded(path, ids: list[int]) -> str:
    return load_model(path)[1].decode(ids)


def test_long_prompt_warns_and_still_generates(cli, model_path, tokenizer):
    prompt = " ".join(["Spot liked to run in the park with his friend Tom.",
                       "One day, Tom found a big red ball under a tree."] * 12)
    n_prompt = len(tokenizer.encode(prompt))
    assert n_prompt > 200  # block_size of model_path is 64
    r = cli("sample", "-m", model_path, prompt, "-n", "5", "-t", "0")
    assert_ok(r)
    assert r.text == decoded(model_path, greedy_ids(model_path, tokenizer.encode(prompt)[-64:], 5))  # the tail
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: "), r.err
    assert "context" in lines[0] and str(n_prompt) in lines[0]


def test_generation_runs_past_the_context(cli, model_path):
    # 100 tokens after a 2-token prompt cross the 64-token context and slide the window three times.
    r = cli("sample", "-m", model_path, "Spot liked", "-n", "100", "-t", "0", env=clean_env(TINYGEN_STATS="1"))
    assert_ok(r)
    prompt = load_model(model_path)[1].encode("Spot liked")
    ids = greedy_ids(model_path, prompt, 100)
    assert r.text == decoded(model_path, ids)
    assert stats_tokens(r) == len(ids) > 64, "generation should slide the window, not stop at block_size"
    model = load_model(model_path)[0]
    assert ids[: 64 - len(prompt)] == naive_generate(model, prompt, 64 - len(prompt))  # until it slides


def test_num_samples(cli, model_path):
    args = ("sample", "-m", model_path, "Spot", "-n", "8", "-t", "1.0")
    three = cli(*args, "--num-samples", "3", "--seed", "1")
    assert_ok(three)
    assert cli(*args, "--num-samples", "3", "--seed", "1").raw == three.raw
    # Sample i uses seed + i, so each one equals a single run with that seed; blank lines between.
    singles = [cli(*args, "--seed", str(seed)).text for seed in (1, 2, 3)]
    assert len(set(singles)) > 1
    assert three.out == "\n\n".join(singles) + "\n"


def test_gpt2_arch_checkpoint_samples(cli, gpt2_arch_path):
    # block_size is 48: 70 tokens also exercise the sliding window with learned positions.
    r = cli("sample", "-m", gpt2_arch_path, "Spot", "-n", "70", "-t", "0", env=clean_env(TINYGEN_STATS="1"))
    assert_ok(r)
    ids = greedy_ids(gpt2_arch_path, load_model(gpt2_arch_path)[1].encode("Spot"), 70)
    assert r.text == decoded(gpt2_arch_path, ids)
    assert stats_tokens(r) == len(ids) > 48


def test_hf_gpt2_folder_samples(cli, hf_gpt2_dir):
    r = cli("sample", "-m", hf_gpt2_dir, "Hello world", "-n", "8", "-t", "0")
    assert_ok(r)
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    ids = transformers.GPT2TokenizerFast.from_pretrained(hf_gpt2_dir).encode("Hello world")
    reference = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                            pad_token_id=0)[0, len(ids):].tolist()
    reference = reference[: reference.index(50256)] if 50256 in reference else reference  # both stop at end-of-text
    assert r.text == decoded(hf_gpt2_dir, reference)


def test_tinygen_model_env_var(cli, model_path, tmp_path):
    with_flag = cli("sample", "-m", model_path, "-n", "3", "-t", "0", "x")
    r = run_real("sample", "-n", "3", "-t", "0", "x", env=clean_env(TINYGEN_MODEL=str(model_path)))
    assert_ok(r)
    assert r.raw == with_flag.raw
    missing = tmp_path / "absent.safetensors"
    assert_one_line_error(cli("sample", "-n", "3", "x", env=clean_env(TINYGEN_MODEL=str(missing))), str(missing))


# -- errors ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, model_path) -> dict[str, Path]:
    import numpy as np
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("bad")
    files = {"missing": d / "nope.safetensors", "missing_txt": d / "nope.txt", "model": model_path,
             "truncated": d / "truncated.safetensors", "random": d / "random.safetensors",
             "foreign": d / "foreign.safetensors"}
    files["truncated"].write_bytes(model_path.read_bytes()[:1000])
    files["random"].write_bytes(random.Random(0).randbytes(4096))
    save_file({"weight": np.zeros((4, 4), dtype=np.float32)}, str(files["foreign"]), metadata={"format": "pt"})
    return files


_ERRORS = [
    # id, argv (with {placeholders} from bad_files), stdin, exit code, words the error must contain
    ("missing-model", ["sample", "-m", "{missing}", "x", "-n", "1"], None, 1, ["no model"]),
    ("truncated-model", ["sample", "-m", "{truncated}", "x", "-n", "1"], None, 1, ["not a valid safetensors"]),
    ("random-bytes-model", ["sample", "-m", "{random}", "x", "-n", "1"], None, 1, ["not a valid safetensors"]),
    ("foreign-safetensors", ["sample", "-m", "{foreign}", "x", "-n", "1"], None, 1, ["not a tinygen checkpoint"]),
    ("negative-temperature", ["sample", "-m", "{model}", "x", "-t", "-1"], None, 2, ["temperature", "greater than or equal to 0"]),
    ("top-p-zero", ["sample", "-m", "{model}", "x", "--top-p", "0"], None, 1, ["top-p"]),
    ("top-p-above-one", ["sample", "-m", "{model}", "x", "--top-p", "1.5"], None, 2, ["top-p", "less than or equal to 1"]),
    ("negative-top-k", ["sample", "-m", "{model}", "x", "--top-k", "-1"], None, 2, ["top-k", "greater than or equal to 0"]),
    ("min-p-one", ["sample", "-m", "{model}", "x", "--min-p", "1"], None, 1, ["min-p"]),
    ("repetition-penalty-zero", ["sample", "-m", "{model}", "x", "--repetition-penalty", "0"], None, 1,
     ["repetition penalty"]),
    ("temperature-not-a-number", ["sample", "-m", "{model}", "x", "-t", "abc"], None, 2, ["temperature"]),
    ("unknown-option", ["sample", "-m", "{model}", "x", "--bogus"], None, 2, ["--bogus"]),
    ("zero-num-samples", ["sample", "-m", "{model}", "x", "--num-samples", "0"], None, 2, ["num-samples"]),
    ("prompt-and-input", ["sample", "-m", "{model}", "x", "-i", "{missing_txt}"], None, 1, ["PROMPT", "--input"]),
    ("non-utf8-stdin", ["sample", "-m", "{model}", "-n", "1"], b"\xff\xfe", 1, ["UTF-8"]),
    ("non-utf8-stdin-dash", ["sample", "-m", "{model}", "-n", "1", "-"], b"ok \xff\xfe", 1, ["UTF-8"]),
    ("unknown-device", ["sample", "-m", "{model}", "x", "-n", "1", "--device", "tpu"], None, 1, ["device"]),
    pytest.param("cuda-without-gpu", ["sample", "-m", "{model}", "x", "-n", "1", "--device", "cuda"], None, 1,
                 ["cuda"], marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present"),
                 id="cuda-without-gpu"),
    ("missing-input-file", ["sample", "-m", "{model}", "-i", "{missing_txt}"], None, 1, ["no such input file"]),
    ("info-foreign-safetensors", ["info", "{foreign}"], None, 1, ["not a tinygen checkpoint"]),
    ("info-missing-model", ["info", "{missing}"], None, 1, ["no model"]),
    ("tokenize-truncated-model", ["tokenize", "-m", "{truncated}", "hi"], None, 1, ["not a valid safetensors"]),
    ("decode-id-out-of-range", ["tokenize", "-m", "{model}", "--decode", "1 2 400"], None, 1, ["400", "outside"]),
    ("decode-not-ids", ["tokenize", "-m", "{model}", "--decode", "1, two"], None, 1, ["--decode"]),
]


@pytest.mark.parametrize("name,argv,stdin,rc,needles",
                         [c if isinstance(c, type(pytest.param())) else pytest.param(*c, id=c[0]) for c in _ERRORS])
def test_bad_input_is_one_line_error(cli, bad_files, name, argv, stdin, rc, needles):
    r = cli(*(a.format(**bad_files) for a in argv), input=stdin)
    assert_one_line_error(r, *needles, rc=rc)


def test_bad_model_error_from_real_process(bad_files):
    # The same check as above without the fork server, for one case.
    assert_one_line_error(run_real("sample", "-m", bad_files["truncated"], "x", "-n", "1"), "not a valid safetensors")


@pytest.fixture(scope="module")
def broken_pipe(cli, model_path, tmp_path_factory):
    """`tinygen sample ... 2>err.txt | head -c 20` in bash without pipefail: (head's bytes, stderr, tinygen's exit)."""
    args = ["sample", "-m", str(model_path), "-n", "400", "-t", "1.0", "--seed", "3"]
    # With this seed the first 60 tokens alone are far more than 20 bytes (a seeded run with a larger -n
    # only adds to them), so `head -c 20` really closes the pipe while tinygen is still writing.
    assert len(cli(*args[:3], "-n", "60", *args[5:]).raw) > 100
    d = tmp_path_factory.mktemp("pipe")
    err, rc = d / "err.txt", d / "rc.txt"
    cmd = " ".join(map(shlex.quote, [sys.executable, "-m", "tinygen", *args]))
    script = f'set +o pipefail; {cmd} 2>{shlex.quote(str(err))} | head -c 20; echo "${{PIPESTATUS[0]}}" >{shlex.quote(str(rc))}'
    p = subprocess.run(["bash", "-c", script], stdin=subprocess.DEVNULL, capture_output=True, env=clean_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout, err.read_text(errors="replace"), int(rc.read_text())


def test_broken_pipe_is_quiet(broken_pipe):
    head, stderr, _ = broken_pipe
    assert len(head) == 20
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr == ""


def test_broken_pipe_exits_zero(broken_pipe):
    assert broken_pipe[2] == 0, "main() means a closed pipe to end with exit 0"


# -- batch mode -----------------------------------------------------------------------------------


def test_batch_input_file(cli, model_path, tmp_path):
    prompts = ["Spot liked", "The sun", PROMPT]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    n = ("-n", "6", "-t", "0")
    singles = [cli("sample", "-m", model_path, p, *n).text.replace("\n", " ") for p in prompts]
    assert len(set(singles)) == 3, "completions must differ for the order check to mean anything"

    batch = cli("sample", "-m", model_path, "--input", path, *n)
    assert_ok(batch)
    assert batch.out.splitlines() == singles
    assert batch.out.count("\n") == 3
    assert cli("sample", "-m", model_path, "--input", path, "--batch-size", "1", *n).raw == batch.raw
    # Two slots for three prompts: the third takes over the first slot that frees up.
    assert cli("sample", "-m", model_path, "--input", path, "--batch-size", "2", *n).raw == batch.raw
    assert cli("sample", "-m", model_path, "--input", "-", *n, input=path.read_bytes()).raw == batch.raw


def test_batch_completion_does_not_depend_on_other_prompts(cli, gpt2_arch_path, tokenizer, tmp_path):
    # gpt2_arch_path has a 48-token context. The long prompt fills it at once, so the batch slides its
    # window; the short prompt alone (26 + 20 tokens) never fills it and needs no sliding.
    long = ('day and were very happy. The sun was warm and the sky was blue. Lily smiled. '
            '"Can I play too?" asked the little cat. "Yes!" said Spot.')
    short = "Once upon a time, there was a little dog named Spot. Spot liked to run in the park with"
    n = 20
    assert len(tokenizer.encode(long)) >= 45 and len(tokenizer.encode(short)) + n < 48
    path = tmp_path / "prompts.txt"
    path.write_text(f"{long}\n{short}\n", encoding="utf-8")
    args = ("-n", str(n), "-t", "0")
    single = cli("sample", "-m", gpt2_arch_path, short, *args).text.replace("\n", " ")
    batch = cli("sample", "-m", gpt2_arch_path, "--input", path, *args)
    assert_ok(batch)
    lines = batch.out.splitlines()
    assert len(lines) == 2
    assert lines[1] == single, "the short prompt's completion changed because a longer prompt shared its batch"


_JSONL_LINES = [
    {"prompt": PROMPT, "max_new_tokens": 5, "temperature": 0},
    {"prompt": "Spot liked", "max_new_tokens": 7, "temperature": 1.0, "seed": 3},
    {"prompt": "The sun", "max_new_tokens": 30, "temperature": 1.0, "seed": 3, "stop": "a"},
]


def test_jsonl_batch(cli, model_path):
    stdin = "".join(json.dumps(obj) + "\n" for obj in _JSONL_LINES)
    r = cli("sample", "-m", model_path, "--jsonl", input=stdin)
    assert_ok(r)
    rows = [json.loads(line) for line in r.out.splitlines()]
    assert len(rows) == len(_JSONL_LINES)
    for row, req in zip(rows, _JSONL_LINES):
        assert set(row) == {"prompt", "completion", "tokens", "finish_reason"}
        assert row["prompt"] == req["prompt"]
        assert 0 <= row["tokens"] <= req["max_new_tokens"]
        assert row["finish_reason"] in {"stop", "length"}
        if row["finish_reason"] == "length":
            assert row["tokens"] == req["max_new_tokens"]
    assert rows[0]["completion"] == cli("sample", "-m", model_path, PROMPT, "-n", "5", "-t", "0").text
    assert "a" not in rows[2]["completion"]
    assert cli("sample", "-m", model_path, "--jsonl", input=stdin).raw == r.raw  # seeds make it reproducible


def test_jsonl_error_on_a_later_line(cli, model_path):
    r = cli("sample", "-m", model_path, "--jsonl", input=json.dumps(_JSONL_LINES[0]) + "\nnot json\n")
    assert_one_line_error(r, "line 2")


@pytest.mark.parametrize("line,needles", [
    ("not json", ["line 1", "JSON"]),
    ('{"prompt": "x", "bogus": 1}', ["line 1", "bogus"]),
    ('{"text": "x"}', ["line 1", "prompt"]),
    ('{"prompt": 5}', ["line 1", "prompt"]),
    ("[1, 2]", ["line 1"]),
], ids=["not-json", "unknown-field", "no-prompt", "prompt-not-string", "not-an-object"])
def test_jsonl_bad_line_is_one_line_error(cli, model_path, line, needles):
    assert_one_line_error(cli("sample", "-m", model_path, "--jsonl", input=line + "\n"), *needles)


@pytest.mark.parametrize("line", [
    '{"prompt": "x", "max_new_tokens": "lots"}',
    '{"prompt": "x", "seed": "abc", "temperature": 1.0}',
], ids=["max-new-tokens-not-a-number", "seed-not-a-number"])
def test_jsonl_bad_field_value_is_one_line_error(cli, model_path, line):
    assert_one_line_error(cli("sample", "-m", model_path, "--jsonl", "-n", "2", input=line + "\n"), "line 1")


# -- tokenize -------------------------------------------------------------------------------------


def test_tokenize_ids_decode_count(model_path, tokenizer):
    expected = tokenizer.encode(PROMPT)
    ids = run_real("tokenize", "-m", model_path, "--ids", PROMPT)
    assert_ok(ids)
    assert [int(t) for t in ids.out.split()] == expected
    assert ids.out == " ".join(map(str, expected)) + "\n"

    decoded = run_real("tokenize", "-m", model_path, "--decode", " ".join(map(str, expected)))
    assert_ok(decoded)
    assert decoded.out == PROMPT + "\n"

    count = run_real("tokenize", "-m", model_path, "--count", PROMPT)
    assert_ok(count)
    assert count.out == f"{len(expected)}\n"

    from_stdin = run_real("tokenize", "-m", model_path, "--ids", input=PROMPT + "\n")
    assert from_stdin.raw == ids.raw

    text = "Café 😀 日本語"
    uni = run_real("tokenize", "-m", model_path, "--ids", text)
    assert [int(t) for t in uni.out.split()] == tokenizer.encode(text)
    assert run_real("tokenize", "-m", model_path, "--decode", "-", input=uni.out.replace(" ", ",")).out == text + "\n"


def test_tokenize_default_view_in_a_pipe(model_path, tokenizer):
    r = run_real("tokenize", "-m", model_path, PROMPT)
    assert_ok(r)
    lines = r.out.splitlines()
    expected = tokenizer.encode(PROMPT)
    assert len(lines) == len(expected)
    pieces = []
    for line, token in zip(lines, expected):
        id_text, sep, label = line.partition("\t")
        assert sep and int(id_text) == token, line
        pieces.append(json.loads(label))
    assert "".join(pieces) == PROMPT
    assert f"{len(expected)} tokens" in r.err and "Traceback" not in r.err


def test_tokenize_with_gpt2_tokenizer(hf_gpt2_dir):
    import transformers

    r = run_real("tokenize", "--tokenizer", hf_gpt2_dir, "--ids", "Hello world")
    assert_ok(r)
    want = transformers.GPT2TokenizerFast.from_pretrained(hf_gpt2_dir).encode("Hello world")
    assert r.out.split() == [str(i) for i in want]


@pytest.mark.skipif(not GPT2_TOKENIZER.exists(), reason="../shared/data/gpt2-tokenizer is absent")
def test_tokenize_with_gpt2s_own_files():
    r = run_real("tokenize", "--tokenizer", GPT2_TOKENIZER, "--ids", "Hello world")
    assert_ok(r)
    assert r.out.split() == ["15496", "995"]


@pytest.mark.parametrize("argv,shows", [
    (["tokenize", "-m", "{model}", "--ids", "hi"], None),
    (["info", "{model}"], "n_layer=2"),
], ids=["tokenize", "info"])
def test_tokenize_and_info_do_not_import_torch(model_path, tokenizer, argv, shows):
    argv = [a.format(model=model_path) for a in argv]
    code = (
        "import sys\n"
        "from tinygen.cli.app import main\n"
        f"sys.argv = ['tinygen', *{argv!r}]\n"
        "try:\n"
        "    main()\n"
        "    rc = 0\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print(f'\\nRC={rc} TORCH={\"torch\" in sys.modules}')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(),
                       stdin=subprocess.DEVNULL, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.rstrip().endswith("RC=0 TORCH=False"), p.stdout
    # The command really ran (the check above would be empty otherwise).
    if shows:
        assert shows in p.stdout
    else:
        assert p.stdout.split("\n")[0].split() == [str(t) for t in tokenizer.encode("hi")]


# -- version and help -----------------------------------------------------------------------------


def test_version_and_help():
    v = run_real("--version")
    assert_ok(v)
    assert v.out == f"tinygen {__version__}\n"

    script = shutil.which("tinygen", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the tinygen console script is not installed next to this Python")
    p = subprocess.run([script, "--help"], capture_output=True, text=True, env=clean_env(),
                       stdin=subprocess.DEVNULL, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout
    for command in ("sample", "tokenize", "info"):
        assert re.search(rf"^\W*{command}\s", p.stdout, re.M), f"{command} missing from --help:\n{p.stdout}"


def test_bare_tinygen_prints_help_once():
    r = run_real()
    assert "Traceback" not in r.err
    assert "sample" in r.out
    assert r.out.count("Usage:") == 1, r.out
