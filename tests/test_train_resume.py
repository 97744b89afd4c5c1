"""What a run on disk is protected from: `--resume` refuses the flags that would break an exact
continuation and applies (and reports) the ones that may change; `train` does not overwrite a model
unless --force; metrics come from the training loop itself, so a library caller gets them too."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tinygen.core.checkpoint import load_model
from tinygen.core.config import ModelConfig
from tinygen.core.model import GPT
from tinygen.errors import TinygenError
from tinygen.training import data as data_lib
from tinygen.training.distributed import Dist
from tinygen.training.events import Step
from tinygen.training.loop import train
from tinygen.training.settings import TrainSettings
from tinygen.training.metrics import metrics_path, read_metrics
from tinygen.training.recipe import Recipe, prepare
from tinygen.training.state import state_paths

from conftest import STORY_LINES, TINY, assert_ok, assert_one_line_error, make_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(STORY_LINES * 12))
    return path


@pytest.fixture(scope="module")
def trained(cli, corpus, tmp_path_factory) -> Path:
    """A 4-step run with a non-default split and dropout, saved as a resumable run."""
    out = tmp_path_factory.mktemp("run") / "m.safetensors"
    assert_ok(cli("train", corpus, "--out", out, *TINY, "--max-steps", "4", "--val-fraction", "0.2",
                  "--dropout", "0.1", "--device", "cpu", timeout=120))
    return out


@pytest.fixture()
def run_copy(trained, tmp_path) -> Path:
    """The trained run's files in a folder of this test's own."""
    for path in trained.parent.iterdir():
        (shutil.copytree if path.is_dir() else shutil.copy)(path, tmp_path / path.name)
    return tmp_path / trained.name


def _state(out: Path) -> dict:
    return json.loads(state_paths(out)[1].read_text())


def test_resume_refuses_flags_that_would_change_the_run(cli, corpus, run_copy, tmp_path):
    before = run_copy.read_bytes()
    # The flag as typed, and the saved value the error names. --val-fraction 0.05 is the default:
    # typed, it still counts.
    refused = [("--batch-size", "2", "--batch-size 4"), ("--val-fraction", "0.05", "--val-fraction 0.2"),
               ("--separator", "###", "--separator '<|endoftext|>'"), ("--seed", "3", "--seed 1337"),
               ("--warmup-steps", "5", "--warmup-steps 2"), ("--n-layer", "2", "--n-layer 1"),
               ("--dropout", "0", "--dropout 0.1"), ("--vocab-size", "400", "--vocab-size 300"),
               ("--batch-tokens", "512", "no --batch-tokens"), ("--weight-decay", "0", "--weight-decay 0.1")]
    for name, value, saved in refused:
        r = cli("train", corpus, "--out", run_copy, "--resume", name, value, "--device", "cpu")
        assert_one_line_error(r, name, value, f"has {saved};", "--force")
    other = tmp_path / "other.txt"
    other.write_text("\n<|endoftext|>\n".join(STORY_LINES[::-1] * 12))
    assert_one_line_error(cli("train", other, "--out", run_copy, "--resume", "--device", "cpu"), "DATA", "--force")
    assert run_copy.read_bytes() == before
    # The saved values themselves, typed again, are no change.
    r = cli("train", corpus, "--out", run_copy, "--resume", "--batch-size", "4", "--val-fraction", "0.2",
            "--max-steps", "5", "--device", "cpu")
    assert_ok(r)
    assert _state(run_copy)["step"] == 5
    # A checkpoint and a state file from different steps (a save cut short) cannot continue exactly.
    state = _state(run_copy)
    state_paths(run_copy)[1].write_text(json.dumps({**state, "step": 4, "kept_step": 4}))
    assert_one_line_error(cli("train", corpus, "--out", run_copy, "--resume", "--device", "cpu"), "step 5",
                          "step 4", "--force")


def test_resume_applies_and_reports_what_may_change(cli, corpus, run_copy):
    val_docs = load_model(run_copy)[2].provenance["val_docs"]
    r = cli("train", corpus, "--out", run_copy, "--resume", "--lr", "0.02", "--max-steps", "7", "--eval-every", "3",
            "--device", "cpu")
    assert_ok(r)
    assert "resuming with --lr 0.02 (the run had --lr 0.012)" in r.err
    assert "resuming with --max-steps 7 (the run had --max-steps 4)" in r.err
    state = _state(run_copy)
    assert state["step"] == 7 and state["settings"]["lr"] == 0.02 and state["settings"]["eval_every"] == 3
    assert state["last"]["lr"] > 0.001  # the schedule runs from the new peak
    # What was not typed comes from the saved run, not from the flags' defaults.
    assert state["recipe"]["val_fraction"] == 0.2 and state["settings"]["batch_size"] == 4
    model, _, info = load_model(run_copy)
    assert info.provenance["val_docs"] == val_docs and model.config.dropout == 0.1
    assert [m["step"] for m in read_metrics(metrics_path(run_copy)) if "val_loss" in m] == [4, 6, 7]


def test_train_does_not_overwrite_a_model_unless_forced(cli, corpus, run_copy):
    before = run_copy.read_bytes()
    r = cli("train", corpus, "--out", run_copy, *TINY, "--max-steps", "2", "--device", "cpu")
    assert_one_line_error(r, "already exists", "--resume", "--force")
    assert run_copy.read_bytes() == before
    assert_one_line_error(cli("train", corpus, "--out", run_copy, "--resume", "--force"), "--resume", "--force")
    r = cli("train", corpus, "--out", run_copy, *TINY, "--max-steps", "2", "--device", "cpu", "--force")
    assert_ok(r)
    assert "resuming" not in r.err and _state(run_copy)["step"] == 2
    # The old run's metrics went with it: only the new run's two steps are there.
    assert [m["step"] for m in read_metrics(metrics_path(run_copy)) if "train_loss" in m] == [1, 2]
    assert _state(run_copy)["recipe"]["val_fraction"] == 0.05


def test_the_training_loop_writes_the_metrics(tmp_path, tokenizer):
    tokens = data_lib.encode_documents(STORY_LINES * 30, tokenizer)
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.n_vocab)
    out = tmp_path / "runs" / "m.safetensors"  # a folder that does not exist yet
    settings = TrainSettings(max_steps=10, batch_size=2, eval_every=4, warmup_steps=2, sample_tokens=0)
    events = train(make_model(config), tokenizer, tokens, tokens[:300], out, settings, device=CPU)
    for ev in events:  # stopped dead after step 6, as a killed process would: the last save was at step 4
        if isinstance(ev, Step) and ev.step == 6:
            break
    events.close()
    rows = read_metrics(metrics_path(out))
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "val_loss" in r] == [4]
    assert {"train_loss", "lr", "tokens", "tokens_per_s", "time"} <= set(rows[0])
    model = GPT(config)
    model.load_state_dict(load_model(out)[0].state_dict())
    list(train(model, tokenizer, tokens, tokens[:300], out, settings, device=CPU, resume=True))
    rows = read_metrics(metrics_path(out))
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 11))  # 5 and 6 again, once each
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8, 10]


def test_resume_with_another_batch_geometry_is_refused(tmp_path, tokenizer):
    tokens = data_lib.encode_documents(STORY_LINES * 30, tokenizer)
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.n_vocab)
    out = tmp_path / "m.safetensors"
    settings = TrainSettings(max_steps=2, batch_size=2, warmup_steps=1, sample_tokens=0)
    list(train(make_model(config), tokenizer, tokens, tokens[:300], out, settings, device=CPU))
    with pytest.raises(TinygenError, match=r"64 tokens per step with 1 process.*resume it with 1 process"):
        next(train(make_model(config), tokenizer, tokens, tokens[:300], out, settings, device=CPU,
                   dist=Dist(world=2), resume=True))


def test_init_is_recorded_relative_to_the_output(tmp_path, tokenizer, corpus):
    base = tmp_path / "base" / "base.safetensors"
    base.parent.mkdir()
    from tinygen.core.checkpoint import save_checkpoint

    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.n_vocab)
    save_checkpoint(base, make_model(config), tokenizer)
    out = tmp_path / "runs" / "fine" / "m.safetensors"
    run = prepare(Recipe([str(corpus)], out, init=str(base.resolve()), train={"max_steps": 1}), dist=Dist())
    assert run.provenance["init"] == "../../base/base.safetensors"
    assert run.recipe["init"] == "../../base/base.safetensors"


def test_init_may_lengthen_a_rope_models_context_but_not_a_gpt2_models(tmp_path, tokenizer, corpus):
    """Rotary positions are computed, so --block-size on a fine-tune gives the same function on the
    old context and room for more; gpt2 stores a row per position, so its context is fixed."""
    from tinygen.core.checkpoint import save_checkpoint

    def fine_tune(arch: str, **recipe):
        base = tmp_path / f"{arch}.safetensors"
        config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.n_vocab, arch=arch)
        save_checkpoint(base, make_model(config), tokenizer)
        return load_model(base)[0], prepare(Recipe([str(corpus)], tmp_path / f"{arch}-fine.safetensors",
                                                   init=str(base), train={"max_steps": 1}, **recipe), dist=Dist())

    base, run = fine_tune("rope", block_size=64, given=frozenset({"block_size"}))
    assert run.model.config.block_size == 64 and "context: 64 tokens (the base model was trained on 32)" in run.notes
    ids = torch.randint(0, tokenizer.n_vocab, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(run.model.eval()(ids), base.eval()(ids), rtol=0, atol=0)
        assert run.model(torch.randint(0, tokenizer.n_vocab, (1, 64))).shape[1] == 64
    with pytest.raises(TinygenError, match=r"--block-size 64: a gpt2 model .* stays 32 tokens"):
        fine_tune("gpt2", block_size=64, given=frozenset({"block_size"}))
    # Other shape flags still cannot change a model being continued.
    with pytest.raises(TinygenError, match=r"--n-layer 2 does not match"):
        fine_tune("rope", n_layer=2, given=frozenset({"n_layer"}))
