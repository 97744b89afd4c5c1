"""The plan `tinygen train` makes from the size of the text and the budget (training/plan.py)."""

import json
import math

import pytest
import torch
from conftest import assert_ok
from safetensors import safe_open

from tinygen.core.checkpoint import load_model
from tinygen.core.config import PRESETS, ModelConfig
from tinygen.errors import TinygenError
from tinygen.training import plan as plan_lib
from tinygen.training.plan import Budget, make_plan, vocab_for

CPU_RATE = 40e9  # training FLOP/s of a 2-core CPU
GPU_RATE = 100e12
BASE = ModelConfig(arch="rope", qk_norm=True)
COUNTS = [10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000, 30_000_000, 100_000_000]


def plans(rate, budget=None, **typed):
    return [make_plan(n, vocab_for(n * 3), budget or Budget(), rate, BASE, typed) for n in COUNTS]


def test_vocabulary_grows_with_the_text_within_its_range():
    sizes = [vocab_for(b) for b in (1_000, 30_000, 100_000, 200_000, 400_000, 5_000_000, 10**9)]
    assert sizes == sorted(sizes)
    assert sizes[0] == plan_lib.VOCAB_RANGE[0] and sizes[-1] == plan_lib.VOCAB_RANGE[1]
    assert all(v & (v - 1) == 0 for v in sizes)  # powers of two


@pytest.mark.parametrize("rate", [CPU_RATE, GPU_RATE])
def test_the_default_plan_over_token_counts_from_10k_to_100m(rate):
    ps = plans(rate)
    order = list(plan_lib.CANDIDATES)
    sizes = [order.index(p.preset) for p in ps]
    assert sizes == sorted(sizes), "a larger text never gets a smaller model"
    assert ps[0].preset == "tiny"
    for p in ps:
        assert 0 < p.passes <= plan_lib.MAX_PASSES
        assert p.seconds <= plan_lib.DEFAULT_BUDGET_S * 1.001  # the default budget bounds the estimate
        assert p.max_tokens == round(p.passes * p.train_tokens)
        assert p.block_size == PRESETS[p.preset]["block_size"]
        assert 0 <= p.dropout <= 0.2 and p.weight_decay > 0
    dropouts = [p.dropout for p in ps]
    assert dropouts == sorted(dropouts, reverse=True), "more text, as much dropout or less"
    assert ps[0].dropout == 0.2  # 10K tokens are seen many times over
    assert ps[-1].passes < ps[0].passes


def test_a_fast_machine_and_a_large_text_get_a_larger_model():
    cpu, gpu = plans(CPU_RATE)[-1], plans(GPU_RATE)[-1]
    assert cpu.preset == "tiny"
    assert plan_lib.CANDIDATES.index(gpu.preset) >= plan_lib.CANDIDATES.index("small")
    # and a model large for its text is not chosen however fast the machine: repeats teach less
    assert plans(GPU_RATE)[0].preset == "tiny"


def test_a_time_budget_is_spent_and_sizes_the_model():
    short = make_plan(1_000_000, 4096, Budget(seconds=120), CPU_RATE, BASE, {})
    long = make_plan(30_000_000, 4096, Budget(seconds=7 * 24 * 3600), GPU_RATE, BASE, {})
    assert short.preset == "tiny" and math.isclose(short.seconds, 120)
    assert short.passes < 1 and short.dropout == 0.0
    assert long.preset != "tiny" and long.passes > plan_lib.MAX_PASSES  # a given budget is not capped
    assert long.dropout == 0.2


def test_tokens_and_steps_budgets():
    by_tokens = make_plan(100_000, 1024, Budget(tokens=300_000), CPU_RATE, BASE, {})
    assert math.isclose(by_tokens.passes, 3.0)
    by_steps = make_plan(100_000, 1024, Budget(steps=10, step_sequences=32), CPU_RATE, BASE, {})
    assert by_steps.max_tokens == 10 * 32 * 256
    both = make_plan(100_000, 1024, Budget(steps=10, step_sequences=32, tokens=1000), CPU_RATE, BASE, {})
    assert both.max_tokens == 1000  # the first limit reached


def test_typed_parts_stay_as_typed():
    shape = {**PRESETS["mini"], "name": "mini"}
    p = make_plan(10_000, 512, Budget(), CPU_RATE, BASE,
                  {"shape": shape, "preset": "mini", "dropout": 0.05, "weight_decay": 0.3, "lr": 0.02})
    assert (p.preset, p.dropout, p.weight_decay, p.lr) == ("mini", 0.05, 0.3, 0.02)
    assert p.typed == ("dropout", "lr", "preset", "weight_decay")
    assert make_plan(10_000, 512, Budget(), CPU_RATE, BASE, {"block_size": 64}).block_size == 64


def test_a_text_shorter_than_a_few_windows_gets_a_shorter_context():
    assert make_plan(600, 512, Budget(), CPU_RATE, BASE, {}).block_size == 128
    with pytest.raises(TinygenError, match="too little to learn from"):
        make_plan(20, 512, Budget(), CPU_RATE, BASE, {})


def test_the_plan_line_and_its_record():
    p = make_plan(1_200_000, 4096, Budget(), CPU_RATE, BASE, {})
    line = p.line()
    assert line.startswith("1.2M tokens → tiny (") and "params" in line and "on this CPU" in line
    assert "dropout" in line and "up to " in line and "passes" in line and "until validation stops" in line
    timed = make_plan(1_200_000, 4096, Budget(seconds=600), CPU_RATE, BASE, {}).line()
    assert timed.endswith(", ~10 min on this CPU") and "up to" not in timed
    assert plan_lib.Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_the_rate_probe_is_a_positive_finite_rate():
    rate = plan_lib.step_rate(torch.device("cpu"), torch.float32)
    assert math.isfinite(rate) and rate > 1e8


def _provenance(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["provenance"])


def test_train_prints_the_plan_first_and_records_it(tmp_path, cli):
    text = tmp_path / "t.txt"
    text.write_text("\n<|endoftext|>\n".join(f"story {i}: the cat sat on the mat and the dog ran far away."
                                             for i in range(300)))
    out = tmp_path / "m.safetensors"
    r = cli("train", text, "-o", out, "--max-steps", "2", "--dropout", "0.15", "--device", "cpu", timeout=300)
    assert_ok(r)
    assert r.err.splitlines()[0].startswith("plan: ")
    assert "dropout 0.15" in r.err.splitlines()[0]
    prov = _provenance(out)
    state = json.loads(out.with_name(out.name + ".state.json").read_text())
    assert prov["plan"] == r.err.splitlines()[0].removeprefix("plan: ")
    assert state["recipe"]["plan"]["train_tokens"] == prov["train_tokens"]
    # the BPE was asked for the plan's vocabulary, and the plan records what it found
    _, tok, _ = load_model(out)
    assert state["recipe"]["vocab_size"] == vocab_for(round(text.stat().st_size * 0.95))
    assert state["recipe"]["plan"]["vocab_size"] == tok.n_vocab <= state["recipe"]["vocab_size"]
    assert state["recipe"]["plan"]["typed"] == ["dropout"]
    r = cli("train", text, "-o", out, "--max-steps", "3", "--resume", "--device", "cpu", timeout=300)
    assert_ok(r)
    assert r.err.splitlines()[0] == f"plan: {prov['plan']}"  # not planned again: the run's own plan
    assert _provenance(out)["plan"] == prov["plan"]
