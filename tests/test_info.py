"""`tinygen info`: the exact table a pipe gets (aligned, unpadded, numbers readable), the JSON at
full precision, and where the model comes from (argument, -m/--model, $TINYGEN_MODEL)."""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open

from tinygen.cli import ui
from tinygen.core.checkpoint import save_checkpoint

from conftest import assert_ok, assert_one_line_error, clean_env, make_model

SPECIALS = "<|endoftext|> <|system|> <|user|> <|assistant|> <|end|>"


def header_params(path) -> int:
    with safe_open(str(path), framework="numpy") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def test_a_pipe_gets_plain_aligned_rows(cli, model_path, tokenizer):
    r = cli("info", "-m", model_path)
    assert_ok(r)
    n = header_params(model_path)
    size = model_path.stat().st_size
    assert r.out == (
        "tinygen model: tiny.safetensors\n"
        f"path          {model_path}\n"
        "kind          tinygen (format v1)\n"
        "architecture  rope, rope theta 10000\n"
        "shape         n_layer=2 n_head=4 n_embd=64 mlp=192 vocab_size=400\n"
        "context       64 tokens\n"
        f"parameters    {n / 1e3:.1f}K ({n:,})\n"
        f"file size     {size / 1e3:.1f} kB\n"
        "dtype         F32\n"
        f"tokenizer     byte-level BPE (tinygen), 400 tokens, special: {SPECIALS}\n"
        "chat          not chat-tuned (`tinygen chat` uses a plain User:/Assistant: transcript)\n"
        "provenance\n"
        "  data        random weights (test)\n"
        "  steps       0\n"
    )


def test_numbers_are_rounded_in_the_table_and_exact_in_json(cli, tmp_path, tokenizer, rope_config):
    provenance = {"train_loss": 2.288607120513916, "train_seconds": 4800.7, "tokens_seen": 14655488,
                  "lr": 0.0003, "chat": True, "splits": [0.9, 0.1], "val_data": "stories/ (seed 1)"}
    path = save_checkpoint(tmp_path / "m.safetensors", make_model(rope_config), tokenizer, provenance)
    r = cli("info", path)
    assert_ok(r)
    assert r.out.split("provenance\n")[1] == (
        "  train_loss     2.289\n"
        "  train_seconds  4801\n"
        "  tokens_seen    14,655,488\n"
        "  lr             0.0003\n"
        "  chat           true\n"
        "  splits         [0.9, 0.1]\n"
        "  val_data       stories/ (seed 1)\n"
    )
    r = cli("info", path, "--json")
    assert_ok(r)
    assert json.loads(r.out)["provenance"] == provenance  # every float to the last bit


def test_json_describes_the_file(cli, model_path, tokenizer, rope_config):
    r = cli("info", "--model", model_path, "--json")
    assert_ok(r)
    meta = json.loads(r.out)
    assert meta == {
        "path": str(model_path),
        "kind": "tinygen",
        "format_version": 1,
        "config": json.loads(rope_config.to_json()),
        "parameters": header_params(model_path),
        "file_size": model_path.stat().st_size,
        "dtypes": ["F32"],
        "tokenizer": {"name": "tinygen", "n_vocab": 400, "special_tokens": tokenizer.special},
        "chat_template": None,
        "provenance": {"data": "random weights (test)", "steps": 0},
    }
    assert meta["parameters"] == make_model(rope_config).num_params()


def test_a_chat_model_shows_its_template(cli, chat_model_path, chat_tokenizer):
    plain = cli("info", "-m", chat_model_path)
    assert_ok(plain)
    assert ("chat          chat-tuned: system=<|system|>…<|end|> user=<|user|>…<|end|> "
            "assistant=<|assistant|>…<|end|>\n") in plain.out
    r = cli("info", "-m", chat_model_path, "--json")
    assert json.loads(r.out)["chat_template"] == chat_tokenizer.chat_template


def test_a_gpt2_folder(cli, hf_gpt2_dir):
    transformers = pytest.importorskip("transformers")
    r = cli("info", "-m", hf_gpt2_dir)
    assert_ok(r)
    assert "\nkind          gpt2\n" in r.out
    assert r.out.endswith("provenance\n  source      Hugging Face GPT-2 folder\n")
    meta = json.loads(cli("info", hf_gpt2_dir, "--json").out)
    assert meta["kind"] == "gpt2" and meta["config"]["arch"] == "gpt2" and meta["tokenizer"]["n_vocab"] == 50257
    assert meta["parameters"] == transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).num_parameters()


def test_where_the_model_comes_from(cli, model_path, chat_model_path):
    by_option = cli("info", "-m", model_path)
    assert_ok(by_option)
    assert cli("info", model_path).out == by_option.out
    assert cli("info", "--model", model_path).out == by_option.out
    from_env = cli("info", env=clean_env(TINYGEN_MODEL=str(model_path)))
    assert_ok(from_env)
    assert from_env.out == by_option.out
    # A model named on the command line outranks the environment's, without a clash.
    named = cli("info", chat_model_path, env=clean_env(TINYGEN_MODEL=str(model_path)))
    assert_ok(named)
    assert named.out.startswith("tinygen model: chat.safetensors\n")
    assert_one_line_error(cli("info", chat_model_path, "-m", model_path), "not both")
    assert_one_line_error(cli("info", env=clean_env(TINYGEN_MODEL="/nonexistent/m.safetensors")),
                          "no model at /nonexistent/m.safetensors")


@pytest.mark.parametrize("field,value,needle", [
    ("provenance", "[1, 2]", "'provenance' is not a JSON object"),
    ("tokenizer", None, "chat template is malformed"),
    ("format_version", "one", "format_version 'one' is not a number"),
], ids=["provenance-list", "bad-template", "bad-version"])
def test_a_corrupt_header_is_one_line(cli, tmp_path, model_path, field, value, needle):
    from safetensors.numpy import load_file, save_file

    with safe_open(str(model_path), framework="numpy") as f:
        meta = dict(f.metadata())
    if value is None:
        broken = json.loads(meta["tokenizer"])
        broken["chat_template"] = {"roles": {"user": ["<|user|>"]}}
        value = json.dumps(broken)
    path = tmp_path / "broken.safetensors"
    save_file(load_file(str(model_path)), str(path), metadata={**meta, field: value})
    assert_one_line_error(cli("info", path), needle)


def test_info_table_in_a_pipe(capsys):
    """What `eval` prints too: values aligned after the longest label, nothing after them."""
    ui.info_table([("model", "m.safetensors"), ("bits per byte", "0.8806"), ("empty", ""), ("notes", "one\ntwo")],
                  title="evaluation")
    assert capsys.readouterr().out == (
        "evaluation\n"
        "model          m.safetensors\n"
        "bits per byte  0.8806\n"
        "empty\n"
        "notes          one\n"
        "               two\n"
    )
