"""`tinygen bench --only structured`: decode under a JSON schema against the same rows without it.
The shape of the figures and the schema's hold on the text, on tiny random models; no timing is
asserted (the figures on a real model are in docs/speed.md)."""

import io
import json

import pytest
from conftest import assert_ok, make_model

from tinygen.bench import bench as bench_lib
from tinygen.bench.measure import in_step
from tinygen.bench.structured import SCHEMA, structured_section
from tinygen.core.config import ModelConfig

pytest.importorskip("llguidance")

FIGURES = ("constrained_tok_s", "plain_tok_s", "constrained_step_ms", "plain_step_ms", "mask_ms_per_step",
           "mask_ms_per_token", "advance_ms_per_token", "constrained_first_token_ms", "plain_first_token_ms")
# Short enough to finish on a small context: an enum, bounded integers, strings with a maxLength, an
# array and a nested object.
SHORT = {"type": "object", "additionalProperties": False, "required": ["kind", "n", "tags", "inner"],
         "properties": {"kind": {"enum": ["cat", "dog"]}, "n": {"type": "integer", "minimum": 3, "maximum": 7},
                        "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 3}},
                        "inner": {"type": "object", "additionalProperties": False, "required": ["x"],
                                  "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 5}}}}}


def check_shape(section: dict, batch_sizes):
    assert [row["batch"] for row in section["rows"]] == list(batch_sizes)
    for row in section["rows"]:
        for key in FIGURES:
            assert row[key] > 0, key
        lo, hi = row["spread"]
        assert 0 < lo <= row["ratio"] <= hi
        assert row["overhead"] > -1
        assert len(row["texts"]) == row["batch"]


def test_the_section_on_a_model_file_through_the_cli(cli, model_path):
    """--only structured runs the section alone, --json carries its rows, and the table shows them.
    The default schema's text is longer than the tiny context, so every row decodes all its tokens on
    both sides, and what each wrote is the start of the schema's JSON."""
    from rich.console import Console

    from tinygen.cli.bench import print_table

    r = cli("bench", "-m", model_path, "--only", "structured", "--device", "cpu", "--prompt-tokens", "8",
            "--new-tokens", "24", "--repeats", "2", "--batch-sizes", "1,3", "--json", timeout=300)
    assert_ok(r)
    result = json.loads(r.out)
    assert set(result) & {"decode", "batch", "chat", "train"} == set()
    section = result["structured"]
    assert section["schema"] == SCHEMA and section["new_tokens"] == 24 and 0 < section["prompt_tokens"] <= 8
    check_shape(section, (1, 3))
    for row in section["rows"]:
        assert row["tokens_per_row"] == row["plain_tokens_per_row"] == 24 and row["complete_rows"] == 0
        assert all(text.startswith('{"team": "') for text in row["texts"])
    out = io.StringIO()
    print_table(result, Console(file=out, width=160))
    table = out.getvalue()
    for label in ("JSON schema: decode tok/s, batch 1 (24 new)", "JSON schema: step ms, batch 3",
                  "JSON schema: mask ms a step (a token), batch 3", "unconstrained", "of step", "range"):
        assert label in table, label
    assert "seeded sampling at temperature 0.8" in table


def test_rows_that_finish_follow_the_schema(tokenizer):
    """A schema short enough to finish: every row's text is complete JSON the schema validates."""
    jsonschema = pytest.importorskip("jsonschema")
    net = make_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=192, vocab_size=tokenizer.n_vocab))
    section = structured_section(net, tokenizer, prompt_tokens=8, new_tokens=150, batch_sizes=(1, 4), repeats=1,
                                 say=lambda message: None, schema=SHORT, prompt="Once upon a time")
    check_shape(section, (1, 4))
    for row in section["rows"]:
        assert row["complete_rows"] == row["batch"] and row["tokens_per_row"] < row["plain_tokens_per_row"] == 150
        for text in row["texts"]:
            jsonschema.validate(json.loads(text), SHORT)


def test_a_shape_has_no_vocabulary_to_constrain():
    result = bench_lib.run(shape="tiny", sections=("structured",), prompt_tokens=8, new_tokens=4, repeats=1,
                           device="cpu")
    assert "structured" not in result and "no vocabulary" in result["skipped"]["structured"]


def test_the_default_sections_leave_it_out():
    assert "structured" not in bench_lib.SECTIONS and "structured" in bench_lib.OPT_IN


def test_steps_run_in_turn_until_every_side_is_spent():
    calls = []

    def side(name, n):
        for i in range(n):
            calls.append(name)
            yield f"{name}{i}"

    a, b = in_step([side("a", 3), side("b", 2)])
    assert "".join(calls) == "ab" + "ba" + "a"  # the first place alternates; a spent side drops out
    assert [item for _, item in a] == ["a0", "a1", "a2"] and [item for _, item in b] == ["b0", "b1"]
    assert all(seconds >= 0 for seconds, _ in a + b)
