"""Training: resume gives the same weights as an uninterrupted run, DDP on gloo matches one
process, the token cache is reused, eval numbers are right, and mistakes are one-line errors."""

import json
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinygen.core.checkpoint import load_model, save_checkpoint
from tinygen.core.config import ModelConfig
from tinygen.core.evaluate import score_tokens
from tinygen.core.model import GPT
from tinygen.errors import TinygenError
from tinygen.training import data as data_lib
from tinygen.training.events import Eval, Saved, Start, Step
from tinygen.training.loop import train
from tinygen.training.settings import TrainSettings

from conftest import STORY_LINES, TINY, assert_ok, ctrl_c_during, make_model

CPU = torch.device("cpu")


def _run(model, tokenizer, tokens, out, settings, **kw):
    return list(train(model, tokenizer, tokens, tokens[:500], out, settings, device=CPU, **kw))


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tokenizer, tokens, small_config):
    settings = TrainSettings(max_steps=12, batch_size=4, eval_every=4, warmup_steps=3, sample_tokens=8, lr=3e-3)
    torch.manual_seed(0)
    straight = GPT(small_config)
    events = _run(straight, tokenizer, tokens, tmp_path / "a.safetensors", settings)
    assert isinstance(events[0], Start)
    assert [e.step for e in events if isinstance(e, Step)] == list(range(1, 13))
    assert [e.step for e in events if isinstance(e, Eval)] == [4, 8, 12]

    # Interrupt after step 6, as Ctrl-C does: the loop saves and returns at the next step boundary.
    torch.manual_seed(0)
    first = GPT(small_config)
    count = {"n": 0}
    gen = train(first, tokenizer, tokens, tokens[:500], tmp_path / "b.safetensors", settings, device=CPU,
                should_stop=lambda: count["n"] >= 6)
    saved = []
    for e in gen:
        if isinstance(e, Step):
            count["n"] = e.step
        if isinstance(e, Saved):
            saved.append(e)
    assert saved[-1].reason == "interrupted" and saved[-1].step == 6

    loaded, _, _ = load_model(tmp_path / "b.safetensors")
    resumed = GPT(small_config)
    resumed.load_state_dict(loaded.state_dict())
    events = list(train(resumed, tokenizer, tokens, tokens[:500], tmp_path / "b.safetensors", settings,
                        device=CPU, resume=True))
    assert events[0].resumed_step == 6
    assert [e.step for e in events if isinstance(e, Step)] == list(range(7, 13))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    info = load_model(tmp_path / "b.safetensors")[2]
    assert info.provenance["steps"] == 12 and info.provenance["tokens_seen"] == 12 * 4 * 32


def test_loss_falls_and_provenance_is_recorded(tmp_path, tokenizer, tokens, small_config):
    torch.manual_seed(0)
    model = GPT(small_config)
    settings = TrainSettings(max_steps=40, batch_size=8, eval_every=20, warmup_steps=5, lr=3e-3, sample_tokens=0)
    events = _run(model, tokenizer, tokens, tmp_path / "m.safetensors", settings, provenance={"data": "stories"},
                  val_bytes=1000)
    losses = [e.loss for e in events if isinstance(e, Step)]
    assert losses[-1] < losses[0] - 1.0
    evals = [e for e in events if isinstance(e, Eval)]
    assert evals[-1].val_loss < evals[0].val_loss and evals[-1].val_bpb > 0
    prov = load_model(tmp_path / "m.safetensors")[2].provenance
    assert prov["data"] == "stories" and prov["steps"] == 40 and math.isclose(prov["val_loss"], evals[-1].val_loss)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer, tokens, small_config):
    out = tmp_path / "m.safetensors"
    save_checkpoint(out, GPT(small_config), tokenizer)
    before = out.read_bytes()
    model = GPT(small_config)
    with torch.no_grad():
        model.transformer.wte.weight.fill_(float("nan"))
    with pytest.raises(TinygenError, match="nan"):
        _run(model, tokenizer, tokens, out, TrainSettings(max_steps=3, batch_size=2, sample_tokens=0))
    assert out.read_bytes() == before


def test_data_smaller_than_a_sequence_is_a_user_error(tmp_path, tokenizer, small_config):
    with pytest.raises(TinygenError, match="smaller than one sequence"):
        _run(GPT(small_config), tokenizer, np.arange(10, dtype=np.uint16), tmp_path / "m.safetensors",
             TrainSettings(max_steps=1))


def test_settings_need_a_stop():
    with pytest.raises(TinygenError, match="stop"):
        TrainSettings()


def test_score_tokens_sliding_windows_score_each_token_once(tokenizer):
    model = make_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=tokenizer.n_vocab))
    toks = np.array(tokenizer.encode(" ".join(STORY_LINES)), dtype=np.int64)
    assert len(toks) > 40
    for stride in (4, 8, 16):
        assert score_tokens(model, toks, stride=stride).tokens == len(toks) - 1
    # Non-overlapping windows equal the mean loss of each chunk computed by hand.
    block = 16
    nll = 0.0
    with torch.no_grad():
        for s in range(0, len(toks) - 1, block):
            chunk = torch.tensor(toks[s : s + block + 1])
            logits = model(chunk[:-1][None])
            nll += torch.nn.functional.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
    assert math.isclose(score_tokens(model, toks, stride=block).nll, nll, rel_tol=1e-4)
    # Short text: one window, the plain mean cross-entropy.
    short = torch.tensor(toks[:10])
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(short[:-1][None])[0], short[1:]).item()
    assert math.isclose(score_tokens(model, toks[:10]).loss, ce, rel_tol=1e-5)


def test_token_cache_is_reused_and_keyed(tmp_path, tokenizer):
    text = tmp_path / "t.txt"
    text.write_text("<|endoftext|>".join(STORY_LINES))
    cache = tmp_path / "cache"
    first = data_lib.load_tokens([text], tokenizer, cache, val_fraction=0.3, seed=1)
    again = data_lib.load_tokens([text], tokenizer, cache, val_fraction=0.3, seed=1)
    assert not first.cached and again.cached
    assert np.array_equal(first.train, again.train) and np.array_equal(first.val, again.val)
    assert first.n_docs == (5, 2) and first.train.dtype == np.uint16
    assert first.train[0] == tokenizer.eot_id  # each document starts with end-of-text
    other_tok = type(tokenizer).train(STORY_LINES * 5, vocab_size=300)
    assert not data_lib.load_tokens([text], other_tok, cache, val_fraction=0.3, seed=1).cached
    text.write_text("<|endoftext|>".join(STORY_LINES[:-1]))
    assert not data_lib.load_tokens([text], tokenizer, cache, val_fraction=0.3, seed=1).cached


def test_documents_from_files_folders_globs_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one<|endoftext|>\ntwo\n<|endoftext|>\n\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "three"}\n\n{"text": "four"}\n')
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    files = data_lib.expand_sources([str(tmp_path)])
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    assert data_lib.read_documents(files) == ["one", "two", "three", "four"]
    assert data_lib.expand_sources([str(tmp_path / "*.txt")]) == [tmp_path / "a.txt"]
    with pytest.raises(TinygenError, match="no such file"):
        data_lib.expand_sources([str(tmp_path / "missing.txt")])
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(TinygenError, match="bad.jsonl:1"):
        data_lib.read_documents([tmp_path / "bad.jsonl"])
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n")
    with pytest.raises(TinygenError, match="empty"):
        data_lib.read_documents([tmp_path / "empty.txt"])


def test_validation_split_is_by_whole_document():
    docs = [f"doc {i}" for i in range(40)]
    train_docs, val_docs = data_lib.split_documents(docs, 0.1, seed=3)
    assert len(val_docs) == 4 and sorted(train_docs + val_docs) == sorted(docs)
    assert data_lib.split_documents(docs, 0.1, seed=3) == (train_docs, val_docs)


# -- through the command line -------------------------------------------------------------------

def _cli(*args, cwd, timeout=180, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TINYGEN_MODEL"}
    env.update(NO_COLOR="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "tinygen", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_train_sample_eval_and_errors(cli, tmp_path, corpus):
    out = tmp_path / "m.safetensors"
    r = cli("train", corpus, "--out", out, *TINY, "--max-steps", "10", "--device", "cpu", timeout=120)
    assert r.rc == 0, r.err
    assert r.out == ""  # progress is stderr's business
    assert "saved" in r.err and "eval @ 10" in r.err
    metrics = [json.loads(line) for line in (tmp_path / "m.safetensors.metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train_loss" in m] == list(range(1, 11))
    r = cli("sample", "-m", out, "-n", "5", "--seed", "1", "Once")
    assert r.rc == 0 and r.out.strip(), r.err
    r = cli("eval", "-m", out, corpus, "--json", "--device", "cpu")
    assert r.rc == 0 and r.err == "", r.err  # no progress bar in a pipe
    score = json.loads(r.out)
    assert math.isclose(score["perplexity"], math.exp(score["loss"]), rel_tol=1e-6) and score["bits_per_byte"] > 0
    # Mistakes: one line on stderr, non-zero exit, no traceback.
    (tmp_path / "empty.txt").write_text("")
    x = tmp_path / "x.safetensors"
    cases = [
        ("train", tmp_path / "nope.txt", "--out", x),
        ("train", tmp_path / "empty.txt", "--out", x),
        ("train", corpus, "--out", x, "--vocab-size", "100"),
        ("train", corpus, "--out", x, *TINY, "--block-size", "100000", "--max-steps", "1"),
        ("train", corpus, "--out", x, "--init", out, "--n-layer", "3", "--max-steps", "1"),
        ("train", corpus, "--out", x, "--time", "soon"),
        ("train", corpus, "--out", x, "--preset", "huge"),
        ("train", corpus, "--out", x, "--batch-size", "0"),
        ("train", corpus, "--out", tmp_path / "fresh.safetensors", "--resume"),
        ("eval", "-m", out, tmp_path / "nope.txt"),
        ("eval", "-m", out, corpus, "--val-split", "1"),
        ("chat-data", "bogus", corpus),
    ]
    for args in cases:
        r = cli(*args, "--device", "cpu") if args[0] != "chat-data" else cli(*args)
        assert r.rc != 0, args
        assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, (args, r.err)


def test_train_eval_and_chat_data_options_follow_the_conventions(cli):
    from tinygen.cli.train import ChatKind, Mlp
    from tinygen.core.config import MLPS
    from tinygen.training.chatdata import CONVERTERS

    train_help = cli("train", "--help").out
    for shown in ("--out FILE", "--preset <tiny|mini|small|medium|gpt2>", "--arch <rope|gpt2>", "--time DURATION",
                  "--init FILE", "--lr X", "--max-steps N", "0.0<=x<=1.0"):
        assert shown in train_help, shown
    for flag in ("--resume", "--force", "--chat", "--compile"):  # flags take no value, so show none
        assert re.search(rf"^  {flag}  +\S", train_help, re.M), flag
    assert "--dtype <auto|float32|bfloat16>" in cli("eval", "--help").out
    assert "KIND <topical-chat|dolly|stories|mix>" in cli("chat-data", "--help").out
    assert {kind.value for kind in ChatKind} == set(CONVERTERS)
    assert {mlp.value for mlp in Mlp} == set(MLPS) and "--mlp <swiglu|relu2|geglu>" in train_help


def test_train_builds_a_geglu_mlp(cli, tmp_path, corpus):
    """--mlp geglu: Gemma's MLP, SwiGLU's three matrices with tanh-GELU gating the up projection."""
    out = tmp_path / "g.safetensors"
    assert_ok(cli("train", corpus, "--out", out, *TINY, "--mlp", "geglu", "--max-steps", "2", "--device", "cpu",
                  timeout=120))
    model, _, _ = load_model(out)
    assert model.config.mlp == "geglu"
    mlp = model.transformer.h[0].mlp
    x = torch.randn(3, model.config.n_embd)
    gate, up = (x @ mlp.c_fc.weight.T).chunk(2, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), (F.gelu(gate, approximate="tanh") * up) @ mlp.c_proj.weight.T)


def test_ctrl_c_saves_exits_130_and_prints_a_resume_command_that_finishes(cli, tmp_path, corpus):
    args = ["train", str(corpus), "--out", str(tmp_path / "m.safetensors"), *TINY, "--max-steps", "100000",
            "--device", "cpu"]
    rc, text = ctrl_c_during(args, rb"step \d\d")  # once the live bar is up and running
    assert rc == 130, text[-2000:]  # so that `train && eval` does not go on
    assert "interrupted" in text and "Traceback" not in text
    stopped_at = json.loads((tmp_path / "m.safetensors.state.json").read_text())["step"]
    assert stopped_at >= 10
    lines = [line.strip() for line in re.split(r"[\r\n]+", text)]
    command = "tinygen " + shlex.join(args) + " --resume"
    assert command in lines, text[-2000:]  # a line of its own, not glued to the bar
    assert lines[lines.index(command) - 1] == "to continue:"
    r = cli(*shlex.split(command)[1:], "--max-steps", str(stopped_at + 5), timeout=120)  # a later flag wins
    assert r.rc == 0, r.err
    assert f"resuming at step {stopped_at}" in r.err
    assert json.loads((tmp_path / "m.safetensors.state.json").read_text())["step"] == stopped_at + 5


def test_ddp_on_gloo_matches_one_process(tmp_path, corpus):
    # float32: the ranks' other summation order shows up in bf16's rounding, which a CPU with bf16
    # instructions trains in by default; what is tested here is the arithmetic of the split.
    common = [str(corpus), *TINY, "--max-steps", "6", "--eval-every", "100", "--seed", "7", "--dtype", "float32"]
    one = _cli("train", *common, "--out", "one.safetensors", "--batch-size", "8", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    env = {k: v for k, v in os.environ.items() if k != "TINYGEN_MODEL"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          "-m", "tinygen", "train", *common, "--out", "two.safetensors", "--batch-size", "4"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stderr

    def losses(name):
        rows = (tmp_path / f"{name}.safetensors.metrics.jsonl").read_text().splitlines()
        return [json.loads(r)["train_loss"] for r in rows if "train_loss" in json.loads(r)]

    assert len(losses("two")) == 6
    assert np.allclose(losses("one"), losses("two"), rtol=1e-4, atol=1e-5)
    a, b = load_model(tmp_path / "one.safetensors")[0], load_model(tmp_path / "two.safetensors")[0]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5), name


@pytest.mark.parametrize("split", ["documents", "tail"])
def test_eval_val_split_reproduces_the_final_validation_numbers(cli, tmp_path, corpus, split):
    if split == "tail":  # one long text: too few documents to hold out whole ones
        corpus.write_text("\n".join(STORY_LINES * 12))
    out = tmp_path / "m.safetensors"
    r = cli("train", corpus, "--out", out, *TINY, "--max-steps", "4", "--val-fraction", "0.2", "--seed", "5",
            "--device", "cpu", timeout=120)
    assert r.rc == 0, r.err
    prov = load_model(out)[2].provenance
    assert prov["val_tokens"] > 0
    assert ("the last 20% of the text (too few documents" in r.err) == (split == "tail")
    r = cli("eval", "-m", out, corpus, "--val-split", "0.2", "--seed", "5", "--json", "--device", "cpu")
    assert r.rc == 0, r.err
    score = json.loads(r.out)
    assert math.isclose(score["loss"], prov["val_loss"], rel_tol=1e-5)
    assert math.isclose(score["bits_per_byte"], prov["val_bpb"], rel_tol=1e-5)
    assert score["documents"] == prov["val_docs"] and score["tokens"] == prov["val_tokens"] - 1
    before = load_model(out)[0].state_dict()
    r = cli("eval", "-m", out, corpus, "--val-split", "0.2", "--seed", "5", "--record", "--device", "cpu")
    assert r.rc == 0, r.err
    model, _, info = load_model(out)
    assert math.isclose(info.provenance["val_loss"], score["loss"], rel_tol=1e-9)
    assert "val split 0.2" in info.provenance["val_data"] and info.provenance["steps"] == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_with_bf16_autocast(tmp_path, tokenizer, tokens, small_config):
    torch.manual_seed(0)
    model = GPT(small_config)
    events = list(train(model, tokenizer, tokens, tokens[:500], tmp_path / "m.safetensors",
                        TrainSettings(max_steps=20, batch_size=8, eval_every=10, warmup_steps=2, lr=3e-3),
                        device=torch.device("cuda")))
    assert events[0].dtype == "bfloat16"
    losses = [e.loss for e in events if isinstance(e, Step)]
    assert losses[-1] < losses[0]
    evals = [e for e in events if isinstance(e, Eval)]
    assert [e.step for e in evals] == [10, 20] and all(e.sample for e in evals)  # sampling under autocast crashed
    loaded, _, _ = load_model(tmp_path / "m.safetensors")
    assert loaded.lm_head.weight.dtype == torch.float32  # master weights stay fp32; autocast does bf16 math
