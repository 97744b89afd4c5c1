"""Which model a run leaves at --out, and when it ends on its own: the weights of the lowest validation
loss are kept (the last ones stay in the training state, so that --resume is still exact), --keep
last keeps the last, overfitting is named once, --early-stop and --patience end the run, evaluations
come a few times per pass, and a text too small for the preset's context still trains."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STORY_LINES, assert_ok

from tinygen.core.checkpoint import load_model
from tinygen.core.evaluate import Score
from tinygen.core.model import GPT
from tinygen.training.events import Eval, Kept, Overfit, Saved, Step
from tinygen.training.keeping import EVAL_EVERY_LEAST, EVAL_EVERY_MOST, eval_interval
from tinygen.training.loop import Trainer, train
from tinygen.training.settings import TrainSettings
from tinygen.training.state import state_paths

CPU = torch.device("cpu")


@pytest.fixture()
def scripted(monkeypatch):
    """Make the run's validation losses (one per evaluation, in order) and, optionally, its training
    losses (one per step) what the test says; the training itself is real."""

    real = Trainer.mean_loss

    def script(val: list[float], train_losses: list[float] | None = None):
        vals, steps, by_step = iter(val), iter(train_losses or []), {}

        def validation(self, final):  # each step's evaluation scores one value, however it is asked
            if self.state.step not in by_step:
                by_step[self.state.step] = next(vals)
            return Score(by_step[self.state.step] * 100, 100, 0)

        monkeypatch.setattr(Trainer, "validation", validation)
        if train_losses is not None:
            monkeypatch.setattr(Trainer, "mean_loss", lambda self, s: (real(self, s), next(steps))[1])

    return script


def _run(small_config, tokenizer, tokens, out, settings, seed=0, **kw):
    torch.manual_seed(seed)
    model = GPT(small_config)
    return model, list(train(model, tokenizer, tokens, tokens[:500], out, settings, device=CPU, **kw))


def _run_until(step: int, small_config, tokenizer, tokens, out, settings) -> list:
    """The run interrupted after `step`, as Ctrl-C does (saved at the next step boundary)."""
    torch.manual_seed(0)
    done = {"n": 0}
    events = []
    for e in train(GPT(small_config), tokenizer, tokens, tokens[:500], out, settings, device=CPU,
                   should_stop=lambda: done["n"] >= step):
        done["n"] = e.step if isinstance(e, Step) else done["n"]
        events.append(e)
    assert [e for e in events if isinstance(e, Saved)][-1] == Saved(out, step, "interrupted")
    return events


def _weights(path):
    return load_model(path)[0].state_dict()


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_lowest_validation_loss_is_kept_and_the_last_weights_stay_in_the_state(tmp_path, tokenizer, tokens,
                                                                                   small_config, scripted):
    settings = TrainSettings(max_steps=12, batch_size=4, eval_every=3, warmup_steps=2, sample_tokens=0, lr=3e-3)
    scripted([3.0, 2.0, 2.5, 2.7])  # evaluations at steps 3, 6, 9, 12: step 6 is the lowest
    out = tmp_path / "m.safetensors"
    model, events = _run(small_config, tokenizer, tokens, out, settings)
    kept = events[-1]
    assert isinstance(kept, Kept) and (kept.step, kept.val_loss, kept.last_step, kept.evaluations) == (6, 2.0, 12, 4)
    info = load_model(out)[2]
    assert info.provenance["steps"] == 6 and info.provenance["val_loss"] == 2.0
    assert info.provenance["kept"] == "the lowest validation loss"
    # The checkpoint is step 6's weights: the same run, interrupted at step 7, kept these (an interrupt
    # saves the training state; the checkpoint stays the best evaluated).
    scripted([3.0, 2.0])
    _run_until(7, small_config, tokenizer, tokens, tmp_path / "six.safetensors", settings)
    assert load_model(tmp_path / "six.safetensors")[2].provenance["steps"] == 6
    assert _same(_weights(out), _weights(tmp_path / "six.safetensors"))
    # The state holds the last weights, the model as trained.
    from safetensors.torch import load_file

    last = {k.removeprefix("model."): v for k, v in load_file(state_paths(out)[0]).items() if k.startswith("model.")}
    assert last and all(torch.equal(last[k], v) for k, v in model.state_dict().items() if k in last)
    state = json.loads(state_paths(out)[1].read_text())
    assert state["kept_step"] == 6 and state["best"] == {"step": 6, "val_loss": 2.0} and len(state["evals"]) == 4


def test_resuming_after_an_earlier_step_was_kept_equals_the_uninterrupted_run(tmp_path, tokenizer, tokens, small_config,
                                                                              scripted):
    settings = TrainSettings(max_steps=12, batch_size=4, eval_every=3, warmup_steps=2, sample_tokens=0, lr=3e-3)
    scripted([3.0, 2.0, 2.5, 2.7])
    straight, _ = _run(small_config, tokenizer, tokens, tmp_path / "a.safetensors", settings)

    scripted([3.0, 2.0, 2.5, 2.7])
    out = tmp_path / "b.safetensors"
    _run_until(10, small_config, tokenizer, tokens, out, settings)
    assert load_model(out)[2].provenance["steps"] == 6  # the checkpoint holds the best step, not the last

    scripted([2.7])  # the evaluation still to come, at step 12 (final)
    loaded, _, _ = load_model(out)
    resumed = GPT(small_config)
    resumed.load_state_dict(loaded.state_dict())
    events = list(train(resumed, tokenizer, tokens, tokens[:500], out, settings, device=CPU, resume=True))
    assert events[0].resumed_step == 10
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert events[-1].step == 6  # the best is still step 6's


def test_keep_last_keeps_the_last_step(tmp_path, tokenizer, tokens, small_config, scripted):
    settings = TrainSettings(max_steps=9, batch_size=4, eval_every=3, warmup_steps=2, sample_tokens=0, lr=3e-3,
                             keep="last")
    scripted([3.0, 2.0, 2.5])
    out = tmp_path / "m.safetensors"
    model, events = _run(small_config, tokenizer, tokens, out, settings)
    assert events[-1].step == 9 and load_model(out)[2].provenance["kept"] == "the last step"
    assert _same(_weights(out), model.state_dict())
    from safetensors.torch import load_file

    assert not [k for k in load_file(state_paths(out)[0]) if k.startswith("model.")]  # not twice


def test_overfitting_is_named_once_and_early_stop_ends_the_run_there(tmp_path, tokenizer, tokens, small_config, scripted):
    falling = [5.0 - 0.1 * i for i in range(40)]
    settings = TrainSettings(max_steps=30, batch_size=4, eval_every=3, warmup_steps=2, sample_tokens=0, lr=3e-3)
    scripted([3.0, 2.0, 2.2, 2.4, 2.6, 2.1, 2.3, 2.5, 2.8, 3.0, 3.1], falling)
    _, events = _run(small_config, tokenizer, tokens, tmp_path / "a.safetensors", settings)
    warnings = [e for e in events if isinstance(e, Overfit)]
    assert len(warnings) == 1  # named once, though it happens again later
    w = warnings[0]
    assert (w.step, w.since, w.best_val, w.val, w.stopping) == (12, 6, 2.0, 2.4, False)
    assert w.train_loss == pytest.approx(sum(falling[9:12]) / 3)
    assert [e.step for e in events if isinstance(e, Eval)][-1] == 30  # the run went on

    scripted([3.0, 2.0, 2.2, 2.4, 2.6], falling)
    settings = TrainSettings(**{**settings.__dict__, "early_stop": True})
    _, events = _run(small_config, tokenizer, tokens, tmp_path / "b.safetensors", settings)
    assert [e.step for e in events if isinstance(e, Step)][-1] == 12
    assert events[-1].halted == "overfitting" and events[-1].step == 6
    assert load_model(tmp_path / "b.safetensors")[2].provenance["steps"] == 6


def test_validation_rising_while_training_does_not_fall_is_not_overfitting(tmp_path, tokenizer, tokens, small_config,
                                                                             scripted):
    settings = TrainSettings(max_steps=12, batch_size=4, eval_every=3, warmup_steps=2, sample_tokens=0, lr=3e-3)
    scripted([3.0, 2.0, 2.2, 2.4], [4.0] * 12)  # a plateau: too high a learning rate, say, not memorising
    _, events = _run(small_config, tokenizer, tokens, tmp_path / "m.safetensors", settings)
    assert not [e for e in events if isinstance(e, Overfit)]


def test_patience_ends_the_run_after_so_many_evaluations_without_a_new_best(tmp_path, tokenizer, tokens, small_config,
                                                                            scripted):
    settings = TrainSettings(max_steps=300, batch_size=4, eval_every=3, warmup_steps=2, sample_tokens=0, lr=3e-3,
                             patience=2)
    scripted([3.0, 2.0, 2.1, 1.9, 1.95, 2.0, 2.3])
    _, events = _run(small_config, tokenizer, tokens, tmp_path / "m.safetensors", settings)
    assert [e.step for e in events if isinstance(e, Step)][-1] == 18  # evaluations 5 and 6 brought nothing new
    assert events[-1].halted == "patience" and events[-1].step == 12
    # Resumed, the run goes on (until patience ends it again, at the next evaluation without a new best).
    scripted([2.4])
    loaded, _, _ = load_model(tmp_path / "m.safetensors")
    model = GPT(small_config)
    model.load_state_dict(loaded.state_dict())
    events = list(train(model, tokenizer, tokens, tokens[:500], tmp_path / "m.safetensors", settings, device=CPU,
                        resume=True))
    assert [e.step for e in events if isinstance(e, Step)] == [19, 20, 21] and events[-1].halted == "patience"


def test_evaluations_come_a_few_times_per_pass():
    assert eval_interval(400_000, 8192) == 12  # about 49 steps a pass
    assert eval_interval(100_000, 8192) == EVAL_EVERY_LEAST  # 12 steps a pass: not every 3 steps
    assert eval_interval(1_000, 8192) == EVAL_EVERY_LEAST
    assert eval_interval(10**9, 8192) == EVAL_EVERY_MOST


def test_the_command_line_says_which_step_it_kept(cli, tmp_path):
    corpus = tmp_path / "stories.txt"
    corpus.write_text("\n<|endoftext|>\n".join(STORY_LINES * 12))
    out = tmp_path / "m.safetensors"
    r = cli("train", corpus, "--out", out, "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
            "--vocab-size", "300", "--batch-size", "4", "--max-steps", "12", "--eval-every", "4", "--device", "cpu",
            timeout=120)
    assert_ok(r)
    state = json.loads(state_paths(out)[1].read_text())
    kept = state["kept_step"]
    assert f"saved {out} at step {kept}" in r.err
    assert kept == min(state["evals"], key=lambda e: e[1])[0]
    info = cli("info", "-m", out)
    assert_ok(info)
    assert "the lowest validation loss" in info.text and f"{kept}" in info.text


@pytest.mark.parametrize("text, note", [
    ("Spot ran to the park. " * 30, "context: "),  # one document, shorter than four of the preset's windows
    ("\n".join(STORY_LINES), "context: "),  # no separator at all
])
def test_a_text_too_small_for_the_presets_context_trains_on_a_shorter_one(cli, tmp_path, text, note):
    corpus = tmp_path / "small.txt"
    corpus.write_text(text)
    out = tmp_path / "m.safetensors"
    r = cli("train", corpus, "--out", out, "--vocab-size", "300", "--max-steps", "3", "--device", "cpu", timeout=120)
    assert_ok(r)
    assert note in r.err and "Traceback" not in r.err
    net, _, info = load_model(out)
    assert net.config.block_size < 256 and info.provenance["val_tokens"] > 0


def test_a_tiny_text_with_no_flags_at_all_gets_a_plan_that_trains(cli, tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("\n".join(STORY_LINES * 3))
    out = tmp_path / "m.safetensors"
    r = cli("train", corpus, "--out", out, "--device", "cpu", timeout=300)
    assert_ok(r)
    first = r.err.splitlines()[0]
    assert first.startswith("plan: ") and "until validation stops improving" in first
    assert "context: " in r.err and f"saved {out}" in r.err
    net, tok, info = load_model(out)
    assert tok.n_vocab <= 512 and net.config.block_size < 256
    state = json.loads(state_paths(out)[1].read_text())
    plan = state["recipe"]["plan"]
    # no budget given: the run stops within the plan's passes (patience may stop it sooner)
    assert plan["open_ended"] and state["tokens_seen"] < plan["passes"] * plan["train_tokens"] + state["tokens_per_step"]
