"""The shared options of options.py: --dtype's short names and refusals, and the --model help."""

from __future__ import annotations

import pytest
import typer

from tinygen.cli.options import Dtype, parse_dtype

from conftest import assert_ok, assert_one_line_error, clean_env


@pytest.mark.parametrize("name, dtype", [("bf16", Dtype.bfloat16), ("BF16", Dtype.bfloat16),
                                         ("bfloat16", Dtype.bfloat16), ("fp32", Dtype.float32),
                                         ("f32", Dtype.float32), ("float32", Dtype.float32), ("auto", Dtype.auto),
                                         (Dtype.bfloat16, Dtype.bfloat16)])
def test_a_dtype_by_any_of_its_names_is_the_canonical_one(name, dtype):
    assert parse_dtype(name) is dtype


@pytest.mark.parametrize("name", ["fp16", "float16", "half", "int8", ""])
def test_a_dtype_no_command_runs_in_is_refused(name):
    with pytest.raises(typer.BadParameter):
        parse_dtype(name)


def test_short_dtype_names_give_the_same_output_as_the_long_ones(cli, model_path):
    def sample(*args):
        r = cli("sample", "-m", model_path, "-n", "3", "-t", "0", *args, "Once")
        assert_ok(r)
        return r.out

    assert sample("--dtype", "bf16") == sample("--dtype", "bfloat16")
    # --explain prints probabilities, whose digits tell the dtypes apart: bf16 was not dropped for the default
    explained = {d: sample("--explain", "--jsonl", "--dtype", d) for d in ("bf16", "bfloat16", "fp32", "float32")}
    assert explained["bf16"] == explained["bfloat16"]
    assert explained["fp32"] == explained["float32"]
    assert explained["bf16"] != explained["fp32"]


def test_the_scoring_commands_take_the_short_names_too(cli, model_path):
    def probs(dtype):
        r = cli("tokenize", "--probs", "-m", model_path, "--dtype", dtype, "Once upon a time")
        assert_ok(r)
        return r.out

    assert probs("bf16") == probs("bfloat16")
    assert probs("fp32") == probs("float32")


@pytest.mark.parametrize("command", [["sample", "hi"], ["chat", "--prompt", "hi"], ["tokenize", "--probs", "hi"]])
def test_float16_is_one_error_line_that_points_to_bf16(cli, model_path, command):
    r = cli(*command, "-m", model_path, "--dtype", "fp16")
    assert_one_line_error(r, "--dtype", "float16 is not supported", "bfloat16 (bf16)", "float32 (fp32)", rc=2)


def test_an_unknown_dtype_is_one_error_line_naming_the_choices(cli, model_path):
    r = cli("sample", "-m", model_path, "--dtype", "float64", "hi")
    assert_one_line_error(r, "'float64' is not a dtype", "auto", "float32 (fp32)", "bfloat16 (bf16)", rc=2)


@pytest.mark.parametrize("command", ["sample", "chat"])
def test_help_names_every_kind_of_model_and_the_dtype_choices(cli, command):
    r = cli(command, "--help", env=clean_env(COLUMNS="100"))
    assert_ok(r)
    text = " ".join(r.out.split())
    assert "GPT-2 folder" not in text
    for kind in (".safetensors", "Hugging Face folder (GPT-2 or the Llama family", "Qwen2", "SmolLM2", "GGUF file"):
        assert kind in text, kind
    assert "--dtype <auto|float32|bfloat16>" in text
    assert "bfloat16 (or bf16)" in text and "float32 (or fp32)" in text
