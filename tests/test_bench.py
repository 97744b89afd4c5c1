"""`tinygen bench` and the transformers reference it compares against."""

import json
import subprocess
import sys

import pytest
import torch

from tinygen.core.config import ModelConfig
from tinygen.generate.engine import generate_batch
from tinygen.generate.sampling import SamplingParams

from conftest import make_model

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
                        "--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "1", "--batch-sizes", "1,3",
                        "--batch-new-tokens", "4", "--steps", "3", "--train-batch", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["config"]["n_layer"] == 4 and result["params"] > 1e6
    decode = result["decode"]
    for side in ("tinygen", "transformers"):
        assert decode[side]["decode_tok_s"] > 0 and decode[side]["prefill_tok_s"] > 0
    assert decode["ratio"]["decode"] == pytest.approx(decode["tinygen"]["decode_tok_s"] / decode["transformers"]["decode_tok_s"])
    assert decode["greedy_agreement"] == "8/8 tokens"
    roof = decode["roofline"]
    # 4 layers of 4*128*128 + 2*128*512*... : every weight but the embedding lookup, plus the tied head
    assert roof["bytes_per_token"] > 4 * result["params"] * 0.9
    assert roof["of_measured"] == pytest.approx(roof["achieved_bytes_s"] / roof["measured_bytes_s"])
    assert [row["batch"] for row in result["batch"]["rows"]] == [1, 3]
    assert all(row["tinygen_tok_s"] > 0 and row["ratio"] > 0 for row in result["batch"]["rows"])
    train = result["train"]
    assert train["batch"] == [2, 256] and train["tinygen"]["tok_s"] > 0 and train["reference"]["tok_s"] > 0
    assert 0 < train["tinygen"]["mfu"] < 1 and train["peak_kind"] == "measured fp32 matmul"


def test_bench_table_sections_and_errors():
    env = {"NO_COLOR": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "120"}
    r = subprocess.run([sys.executable, "-m", "tinygen", "bench", "--shape", "tiny", "--only", "decode",
                        "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "decode tok/s" in r.stdout and "prefill tok/s" in r.stdout and "measured" in r.stdout
    assert "training" not in r.stdout and "batch 8" not in r.stdout
    for args, message in ((["--shape", "huge"], "unknown shape"), (["--only", "decode,speed"], "unknown section"),
                          (["--batch-sizes", "1,x"], "--batch-sizes"), (["--quantize", "int4"], "'int4' is not one of 'int8'")):
        bad = subprocess.run([sys.executable, "-m", "tinygen", "bench", "--shape", "tiny", *args],
                             capture_output=True, text=True, env=env)
        assert bad.returncode in (1, 2) and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
