"""`tinygen bench` and the transformers reference it compares against."""

import json
import subprocess
import sys

import pytest
import torch

from tinygen.config import ModelConfig
from tinygen.engine import generate_batch
from tinygen.sampling import SamplingParams

from conftest import make_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", ["rope", "gpt2"])
def test_reference_models_compute_the_same_function(arch):
    """The rope family equals Llama (rotate-half rotary, RMSNorm, SwiGLU) and gpt2 equals GPT-2,
    which checks our architecture against an independent implementation."""
    from tinygen.reference import hf_greedy, to_transformers

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
                        "--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["config"]["n_layer"] == 4 and result["params"] > 1e6
    for side in ("tinygen", "transformers"):
        assert result[side]["decode_tok_s"] > 0 and result[side]["prefill_tok_s"] > 0
    assert result["ratio"]["decode"] == pytest.approx(result["tinygen"]["decode_tok_s"] / result["transformers"]["decode_tok_s"])
    assert result["greedy_agreement"] == "8/8 tokens"


def test_bench_table_and_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinygen", "bench", "--shape", "tiny", "--prompt-tokens", "8",
                        "--new-tokens", "4", "--repeats", "1"], capture_output=True, text=True, timeout=300,
                       env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "120"})
    assert r.returncode == 0, r.stderr
    assert "decode tok/s" in r.stdout and "prefill tok/s" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "tinygen", "bench", "--shape", "huge"], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown shape" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_train_reports_throughput():
    r = subprocess.run([sys.executable, "-m", "tinygen", "bench", "--train", "--shape", "tiny", "--steps", "3",
                        "--batch-size", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["train_tok_s"] > 0 and result["batch"] == [2, 256] and result["steps"] == 3
    assert result["mfu"] is None  # MFU is a GPU figure
