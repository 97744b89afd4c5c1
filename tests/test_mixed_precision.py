"""Mixed precision, proven on the CPU: the KV cache and attention under bf16 autocast (what CUDA
training runs everything under), `train --dtype bfloat16` end to end, and the device and dtype
choices that would otherwise only show on a GPU host."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
import torch
from conftest import TINY, assert_one_line_error, clean_env, ctrl_c_during, make_model

from tinygen.core.config import ModelConfig
from tinygen.core.device import resolve_device
from tinygen.training.precision import training_dtype
from tinygen.errors import TinygenError
from tinygen.generate.engine import generate_batch, stream
from tinygen.generate.sampling import SamplingParams
from tinygen.inspect.attention import attention_map
from tinygen.training.loop import train
from tinygen.training.settings import TrainSettings

GREEDY = SamplingParams(temperature=0)
BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def sharp():
    """Sharpened logits keep greedy argmax far from ties, so bf16 rounding cannot flip it early."""
    return make_model(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=48, vocab_size=97), scale=3.0)


# -- the cache and attention under autocast ---------------------------------------------------------

def test_generation_under_autocast_writes_the_cache_in_its_own_dtype(sharp):
    """Under autocast the k/v projections come out bf16 while the cache is float32: writing them
    crashed (index_copy_ for rows in step, index_put_ for rows at different positions)."""
    rows = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]  # different lengths: per-row positions
    fp32 = generate_batch(sharp, rows, GREEDY, 8)
    with BF16:
        mixed = generate_batch(sharp, rows, GREEDY, 8)
        single = list(stream(sharp, rows[0], GREEDY, 8))
    for a, b in zip(fp32, mixed):
        assert a[:3] == b[:3]  # bf16 rounding may flip a near-tie later on
    assert single[:3] == fp32[0][:3]


def test_attention_weights_under_autocast_stay_close_to_float32(sharp, tokenizer):
    ids = list(range(10, 30))
    exact = attention_map(sharp, tokenizer, ids)
    with BF16:
        mixed = attention_map(sharp, tokenizer, ids)
    weights = [np.asarray(m.weights, dtype=np.float64) for m in (exact, mixed)]
    assert np.abs(weights[0] - weights[1]).max() < 0.05
    np.testing.assert_allclose(weights[1].sum(-1), 1.0, atol=1e-2)  # still probabilities, the future masked
    assert np.all(np.triu(weights[1], k=1) == 0)


def test_training_in_bf16_samples_saves_float32_and_resumes_exactly(tmp_path, tokenizer, rope_config):
    """The whole mixed-precision loop on the CPU: autocast steps, evaluation with samples, a
    float32 checkpoint, and a resume that continues as if never stopped."""
    from tinygen.core.checkpoint import load_model

    tokens = np.array(tokenizer.encode(" ".join(["Spot ran to the park and played with Tom."] * 80)), dtype=np.uint16)
    config = ModelConfig(**{**rope_config.__dict__, "dropout": 0.1})

    def run(out, steps, resume=False, model=None):
        settings = TrainSettings(max_steps=steps, batch_size=4, eval_every=3, warmup_steps=50, sample_tokens=8,
                                 eval_tokens=64, dtype="bfloat16")
        model = model or make_model(config, seed=1).train()
        events = list(train(model, tokenizer, tokens, tokens[:300], out, settings, device=torch.device("cpu"),
                            resume=resume))
        return model, events

    straight, events = run(tmp_path / "a.safetensors", 6)
    assert events[0].dtype == "bfloat16"
    samples = [e.sample for e in events if type(e).__name__ == "Eval"]
    assert samples and all(samples)
    assert all(p.dtype == torch.float32 for p in straight.parameters())
    saved = load_model(tmp_path / "a.safetensors")[0]
    assert all(t.dtype == torch.float32 for t in saved.state_dict().values())

    half, _ = run(tmp_path / "b.safetensors", 3)
    resumed = make_model(config, seed=99).train()
    resumed.load_state_dict(load_model(tmp_path / "b.safetensors")[0].state_dict())
    run(tmp_path / "b.safetensors", 6, resume=True, model=resumed)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generation_under_cuda_autocast_matches_float32(sharp):
    gpu = make_model(sharp.config, scale=3.0).to("cuda")
    rows = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    fp32 = generate_batch(gpu, rows, GREEDY, 8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = generate_batch(gpu, rows, GREEDY, 8)
    assert [r[:3] for r in mixed] == [r[:3] for r in fp32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_on_cuda_samples_saves_and_resumes(cli, tmp_path, corpus):
    out = tmp_path / "m.safetensors"
    r = cli("train", corpus, "--out", out, *TINY, "--max-steps", "10", "--device", "cuda", timeout=300)
    assert r.rc == 0, r.err
    assert "bf16 mixed precision" in r.err and "eval @ 5" in r.err
    r = cli("train", corpus, "--out", out, "--resume", "--max-steps", "15", "--device", "cuda", timeout=300)
    assert r.rc == 0, r.err
    assert "resuming at step 10" in r.err
    state = load_state_file(out)
    assert "rng.cuda.0" in state and "rng.torch.0" in state


def load_state_file(out):
    from safetensors.torch import load_file

    return load_file(str(out) + ".state.safetensors")


# -- the command line --------------------------------------------------------------------------------

def test_train_bf16_on_cpu_ctrl_c_saves_and_resume_finishes(cli, tmp_path, corpus):
    args = ["train", str(corpus), "--out", str(tmp_path / "m.safetensors"), *TINY, "--max-steps", "100000",
            "--dtype", "bfloat16", "--device", "cpu"]
    rc, text = ctrl_c_during(args, rb"eval @ 10")  # two evaluations with their samples are behind us
    assert rc == 130 and "Traceback" not in text, text[-2000:]
    assert "bf16 mixed precision" in text
    lines = [line.strip() for line in re.split(r"[\r\n]+", text)]
    after_eval = lines[lines.index(next(x for x in lines if x.startswith("eval @ 5"))) + 1]
    assert after_eval and not after_eval.startswith(("eval", "step")), text[-2000:]  # the sample
    state = json.loads((tmp_path / "m.safetensors.state.json").read_text())
    stopped_at = state["step"]
    assert stopped_at >= 10 and state["settings"]["dtype"] == "bfloat16"
    command = "tinygen " + shlex.join(args) + " --resume"
    assert command in lines, text[-2000:]
    r = cli(*shlex.split(command)[1:], "--max-steps", str(stopped_at + 5), timeout=120)
    assert r.rc == 0, r.err
    assert f"resuming at step {stopped_at}" in r.err and "bf16 mixed precision" in r.err
    from safetensors import safe_open

    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_resume_may_change_dtype_and_says_so(cli, tmp_path, corpus):
    out = tmp_path / "m.safetensors"
    assert cli("train", corpus, "--out", out, *TINY, "--max-steps", "3", "--device", "cpu", timeout=120).rc == 0
    r = cli("train", corpus, "--out", out, "--resume", "--max-steps", "6", "--dtype", "bfloat16", "--device", "cpu",
            timeout=120)
    assert r.rc == 0, r.err
    assert "resuming with --dtype bfloat16 (the run had --dtype auto)" in r.err and "bf16 mixed precision" in r.err


def test_scoring_and_inspection_default_to_float32_and_take_dtype(cli, model_path):
    """On every device they score in float32 unless --dtype says otherwise (on a CPU that is also
    what auto means, so the default is compared with both named dtypes)."""
    def probs(*flags):
        r = cli("tokenize", "--probs", "-m", model_path, "Spot liked to run in the park", *flags)
        assert r.rc == 0, r.err
        return r.out

    assert probs() == probs("--dtype", "float32") != probs("--dtype", "bfloat16")

    def weights(*flags):
        r = cli("attention", "-m", model_path, "Spot liked to run in the park", "--json", *flags)
        assert r.rc == 0, r.err
        return json.loads(r.out)["attention"]

    assert weights() == weights("--dtype", "float32") != weights("--dtype", "bfloat16")
    for command in (["eval"], ["attention"], ["tokenize"]):
        assert "float32" in cli(*command, "--help").out


# -- devices and dtypes ------------------------------------------------------------------------------

def test_cpu_only_work_takes_the_cpu_from_auto_and_refuses_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", cpu_only="--quantize int8") == torch.device("cpu")
    assert resolve_device("cpu", cpu_only="--quantize int8") == torch.device("cpu")
    with pytest.raises(TinygenError, match="--quantize int8 runs on the CPU"):
        resolve_device("cuda", cpu_only="--quantize int8")


def test_a_gpu_index_the_machine_lacks_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(TinygenError, match=r"--device cuda:7: this machine has 1 CUDA GPU \(cuda:0\)"):
        resolve_device("cuda:7")


def test_training_dtype_choices(monkeypatch):
    from tinygen.training import precision

    cpu = torch.device("cpu")
    for has_bf16, auto in ((True, torch.bfloat16), (False, torch.float32), (None, torch.float32)):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert training_dtype(cpu) == auto  # bf16 only where the CPU has the instructions for it
        assert training_dtype(cpu, "float32") == torch.float32
    assert training_dtype(cpu, "bfloat16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert training_dtype(torch.device("cuda")) == torch.float32  # auto: no bf16 on this GPU
    with pytest.raises(TinygenError, match="Tesla T4.*--dtype float32"):
        training_dtype(torch.device("cuda"), "bfloat16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_tinygen_device_picks_the_device_and_the_flag_wins(cli, model_path):
    env = clean_env(TINYGEN_DEVICE="cuda")
    assert_one_line_error(cli("sample", "-m", model_path, "x", "-n", "1", env=env), "cuda")
    r = cli("sample", "-m", model_path, "x", "-n", "1", "--device", "cpu", env=env)
    assert r.rc == 0, r.err
