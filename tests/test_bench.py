"""`tinygen bench` and the transformers reference it compares against."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_ok, assert_one_line_error, clean_env, make_model

from tinygen.bench.measure import interleave, paired_ratio
from tinygen.core.config import ModelConfig
from tinygen.generate.engine import generate_batch
from tinygen.generate.sampling import SamplingParams

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", ["rope", "gpt2"])
def test_reference_models_compute_the_same_function(arch):
    """The rope family equals Llama (rotate-half rotary, RMSNorm, SwiGLU) and gpt2 equals GPT-2,
    which checks our architecture against an independent implementation."""
    from tinygen.bench.reference import hf_greedy, to_transformers

    model = make_model(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=300, arch=arch), scale=3.0)
    hf = to_transformers(model)
    idx = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = model(idx), hf(idx).logits
    assert (ours - ref).abs().max().item() < 1e-4
    prompt = idx[0, :10].tolist()
    assert generate_batch(model, [prompt], SamplingParams(temperature=0), 25)[0] == hf_greedy(hf, prompt, 25)


def test_bench_compare_json():
    r = subprocess.run([sys.executable, "-m", "tinygen", "bench", "--shape", "tiny", "--compare", "--json",
                        "--device", "cpu", "--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "3",
                        "--batch-sizes", "1,3", "--batch-new-tokens", "4", "--steps", "3", "--train-batch", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["config"]["n_layer"] == 4 and result["params"] > 1e6 and result["repeats"] == 3
    decode = result["decode"]
    for side in ("tinygen", "transformers"):
        assert decode[side]["decode_tok_s"] > 0 and decode[side]["prefill_tok_s"] > 0
    # Same weights, same greedy rule: the reference must agree on every token, or the ratios compare
    # two different computations.
    assert decode["greedy_agreement"] == "8/8 tokens"
    # Each ratio is the median of per-repeat ratios, so it lies within their range.
    brackets = [(decode["ratio"][k], decode["spread"][k]) for k in ("decode", "prefill", "first_token")]
    brackets += [(row["ratio"], row["spread"]) for row in result["batch"]["rows"]]
    brackets.append((result["train"]["ratio"], result["train"]["spread"]))
    chat = result["chat"]
    brackets.append((chat["ratio"], chat["spread"]))
    # Five turns of 25-token messages and replies fill the tiny shape's 256-token context; the kept
    # cache gives the replies of re-prefilling.
    assert chat["message_tokens"] == 25 and len(chat["tinygen"]["first_token_ms"]) == 5 and chat["same_replies"]
    for ratio, (lo, hi) in brackets:
        assert 0 < lo <= ratio <= hi
    roof = decode["roofline"]
    # 4 layers of 4*128*128 + 2*128*512*... : every weight but the embedding lookup, plus the tied head
    assert roof["bytes_per_token"] > 4 * result["params"] * 0.9
    assert [row["batch"] for row in result["batch"]["rows"]] == [1, 3]
    train = result["train"]
    # --steps 3 would time one step; --repeats 3 asks for three, after the two warm-up steps.
    assert train["batch"] == [2, 256] and train["steps"] == 5
    assert train["tinygen"]["tok_s"] > 0 and train["reference"]["tok_s"] > 0
    # The peak is measured here too, so MFU can top 100% when load on the machine drops mid-run; in
    # the dtype training computes in, which is bf16 by default on a CPU with bf16 instructions.
    kind = {"float32": "fp32", "bfloat16": "bf16"}[train["dtype"]]
    assert train["tinygen"]["mfu"] > 0 and train["peak_kind"] == f"measured {kind} matmul"


def test_bench_table_without_compare_has_only_the_sections_asked_for(cli):
    r = cli("bench", "--shape", "tiny", "--only", "decode", "--device", "cpu", "--prompt-tokens", "8",
            "--new-tokens", "4", "--repeats", "1", env=clean_env(COLUMNS="120"), timeout=300)
    assert_ok(r)
    assert "decode tok/s" in r.out and "prefill tok/s" in r.out and "measured" in r.out
    assert "training" not in r.out and "batch 8" not in r.out
    assert "range" not in r.out and "warning" not in r.err  # no reference, so no ratios to spread
    r = cli("bench", "--shape", "tiny", "--only", "decode", "--device", "cpu", "--prompt-tokens", "8",
            "--new-tokens", "4", "--repeats", "2", "--json", timeout=300)
    assert_ok(r)
    result = json.loads(r.out)
    assert "decode" in result and "batch" not in result and "train" not in result
    assert "transformers" not in result["decode"] and "spread" not in result["decode"]


@pytest.mark.parametrize("args,rc,needles", [
    (["--shape", "huge"], 2, ["'huge' is not one of 'tiny'"]),
    (["--repeats", "0"], 2, ["--repeats"]),
    (["--steps", "2"], 2, ["--steps"]),
    (["--quantize", "int3"], 2, ["'int3' is not one of 'int8', 'int4'"]),
    (["--only", "decode,speed"], 1, ["unknown section speed"]),
    (["--batch-sizes", "1,x"], 1, ["--batch-sizes"]),
    (["--batch-sizes", "8,0"], 1, ["--batch-sizes"]),
])
def test_bench_mistakes_are_one_line(cli, args, rc, needles):
    assert_one_line_error(cli("bench", "--shape", "tiny", "--device", "cpu", *args), *needles, rc=rc)


# -- the measurements, without timing anything ----------------------------------------------------

def test_ours_and_the_reference_are_timed_in_turn():
    calls = []
    ours, ref = interleave(lambda: calls.append("o") or len(calls), lambda: calls.append("r") or len(calls), 3,
                           warmup=2)
    # Warm-up of both, then pairs back to back with the first place alternating.
    assert "".join(calls) == "oror" + "or" + "ro" + "or"
    assert ours == [5, 8, 9] and ref == [6, 7, 10]
    assert interleave(lambda: 1, None, 2) == ([1, 1], [])


def test_ratio_is_the_median_of_paired_ratios_with_their_range():
    ratio, spread = paired_ratio([10.0, 30.0, 20.0], [10.0, 10.0, 5.0])
    assert ratio == 3.0 and spread == [1.0, 4.0]


def test_a_wide_spread_is_a_warning_on_stderr(monkeypatch, capsys):
    """A busy machine: the table shows each ratio's range, and stderr says which ratios moved and
    what that means, in JSON mode too."""
    from tinygen.bench import bench as bench_lib
    from tinygen.cli.app import main

    canned = {"model": "tiny (random weights)", "device": "cpu", "device_name": "a CPU", "dtype": "float32",
              "quantize": None, "threads": 2, "params": 1e6, "repeats": 3, "compile": False,
              "transformers_version": "x", "config": {"arch": "rope"},
              "decode": {"prompt_tokens": 16, "new_tokens": 8, "greedy_agreement": "8/8 tokens",
                         "tinygen": {"decode_tok_s": 100.0, "first_token_ms": 5.0, "prefill_tok_s": 900.0},
                         "transformers": {"decode_tok_s": 50.0, "first_token_ms": 6.0, "prefill_tok_s": 800.0},
                         "ratio": {"decode": 2.0, "first_token": 1.2, "prefill": 1.1},
                         "spread": {"decode": [0.09, 6.29], "first_token": [1.1, 1.3], "prefill": [1.0, 1.2]},
                         "roofline": {"bytes_per_token": 8e6, "achieved_bytes_s": 8e8, "measured_bytes_s": 1e10,
                                      "of_measured": 0.08}},
              "batch": {"prompt_tokens": 16, "new_tokens": 4,
                        "rows": [{"batch": 8, "tinygen_tok_s": 90.0, "transformers_tok_s": 60.0, "ratio": 1.5,
                                  "spread": [1.4, 1.6]}]}}
    monkeypatch.setattr(bench_lib, "run", lambda **kw: canned)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "120")
    outs = []
    for extra in ([], ["--json"]):
        monkeypatch.setattr(sys, "argv", ["tinygen", "bench", "--shape", "tiny", "--compare", *extra])
        with pytest.raises(SystemExit) as exit:
            main()
        out, err = capsys.readouterr()
        outs.append(out)
        assert exit.value.code == 0
        assert err.startswith("warning: ") and len(err.splitlines()) == 1, err
        assert "decode 0.09–6.29x" in err and "busy" in err and "not trustworthy" in err
        assert "prefill" not in err and "batch 8" not in err  # their ranges are narrow
    table, as_json = outs
    assert "range" in table and "0.09–6.29" in table and "1.40–1.60" in table
    assert json.loads(as_json)["decode"]["spread"]["decode"] == [0.09, 6.29]


@pytest.mark.parametrize("stored", [None, "7 matrices as the file stores them"])
def test_the_table_title_says_when_a_file_runs_as_stored(stored):
    import io

    from rich.console import Console

    from tinygen.cli.bench import print_table

    result = {"model": "m.gguf", "device": "cpu", "device_name": "a CPU", "dtype": "float32", "quantize": None,
              "threads": 2, "params": 1e6, "repeats": 1, "config": {"arch": "rope"}}
    if stored:
        result["stored"] = stored
    out = io.StringIO()
    print_table(result, Console(file=out, width=140))
    shown = " ".join(out.getvalue().split())  # the title wraps to the table's width
    assert shown.startswith("m.gguf · 1.0M params · rope · cpu float32 · ")
    assert ("as the file stores them" in shown) == bool(stored)
    assert f"cpu float32 · {stored} · 2 threads" in shown if stored else "cpu float32 · 2 threads" in shown


def test_llama_cpp_on_the_same_gguf_is_a_column_when_installed(monkeypatch, tmp_path):
    """bench --compare on a GGUF times llama.cpp on the same file, in turn with ours, when
    llama-cpp-python is importable, and says how to get it when it is not. A stand-in for the
    bindings (greedy through tinygen's float model) checks the plumbing here; the real figures are
    in the README."""
    import io
    import time

    from rich.console import Console

    from tinygen.bench import bench as bench_lib
    from tinygen.bench import llamacpp
    from tinygen.cli.bench import print_table
    from tinygen.core.checkpoint import load_model
    from tinygen.generate import engine

    from test_quantize import tiny_gguf

    path, _ = tiny_gguf(tmp_path / "m.gguf", pytest.importorskip("gguf").GGMLQuantizationType.Q8_0)

    class StandIn:
        version = "stand-in"

        def __init__(self, model, threads, n_ctx):
            assert model == str(path) and threads == torch.get_num_threads() and n_ctx >= 12
            self.net = load_model(model)[0]

        def prefill(self, prompt):
            engine.prefill(self.net, [prompt])

        def greedy(self, prompt, n, stamps):
            out = []
            for token in engine.stream(self.net, prompt, SamplingParams(temperature=0), n):
                stamps.append(time.perf_counter())
                out.append(token)
            return out

    def bench():
        return bench_lib.run(model=str(path), sections=("decode",), prompt_tokens=8, new_tokens=4, repeats=2,
                             compare=True, device="cpu")

    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert "pip install llama-cpp-python" in bench()["skipped"]["llama.cpp"]
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    monkeypatch.setattr(llamacpp, "LlamaCpp", StandIn)
    result = bench()
    lc = result["decode"]["llama_cpp"]
    assert lc["greedy_agreement"] == "4/4 tokens" and lc["decode_tok_s"] > 0 and "llama.cpp" not in result.get("skipped", {})
    for name in ("decode", "prefill", "first_token"):
        lo, hi = lc["spread"][name]
        assert lo <= lc["ratio"][name] <= hi
    out = io.StringIO()
    print_table(result, Console(file=out, width=140))
    assert "llama.cpp, same file: decode tok/s" in out.getvalue() and "llama-cpp-python stand-in" in out.getvalue()
    assert result["stored"].endswith("matrices as the file stores them") and result["stored"] in out.getvalue()
