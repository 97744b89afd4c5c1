"""`train --optimizer muon`: Muon takes the blocks' matrices and AdamW the rest (a tied head
once), the pair saves and resumes bit for bit (with gradient accumulation), trains under bf16
autocast on a CPU, and the choice is recorded in the run and kept by --resume."""

import json

import pytest
import torch

from tinygen.cli.train import Optimizer
from tinygen.core.checkpoint import load_model
from tinygen.core.config import ModelConfig
from tinygen.core.model import GPT
from tinygen.errors import TinygenError
from tinygen.training.events import Saved, Start, Step
from tinygen.training.loop import train
from tinygen.training.settings import TrainSettings
from tinygen.training.optim import Combined, Float32Muon, make_optimizer, orthogonalized
from tinygen.training.settings import OPTIMIZERS
from tinygen.training.state import load_state, save_state, state_paths

from conftest import assert_ok, assert_one_line_error

CPU = torch.device("cpu")


def _config(tokenizer, **kw) -> ModelConfig:
    return ModelConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
                          "vocab_size": tokenizer.n_vocab, **kw})


def _names(model: GPT, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("kw", [{}, {"arch": "gpt2"}, {"tie_embeddings": False}], ids=["rope", "gpt2", "untied"])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(tokenizer, tokens, kw):
    torch.manual_seed(0)
    model = GPT(_config(tokenizer, **kw))
    optimizer = make_optimizer(model, TrainSettings(max_steps=1, optimizer="muon"), CPU)
    adamw, muon = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    hidden = {name for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2}
    assert _names(model, [p for g in muon.param_groups for p in g["params"]]) == hidden
    rest = [p for g in adamw.param_groups for p in g["params"]]
    assert _names(model, rest) == {name for name, _ in model.named_parameters()} - hidden
    assert len(rest) + len(hidden) == len(list(model.parameters()))  # every parameter once, a tied head too
    expect = {"transformer.wte.weight"} | ({"transformer.wpe.weight"} if "arch" in kw else set()) \
        | ({"lm_head.weight"} if "tie_embeddings" in kw else set())
    assert {n for n in _names(model, rest) if model.get_parameter(n).dim() == 2} == expect
    ids = [pid for g in optimizer.state_dict()["param_groups"] for pid in g["params"]]
    assert ids == list(range(len(list(model.parameters()))))

    # One step from the same weights on the same batch: AdamW's parameters move exactly as under
    # --optimizer adamw, the blocks' matrices do not.
    batch = torch.from_numpy(tokens[:65].astype("int64"))
    x, y = batch[:64].view(2, 32), batch[1:].view(2, 32)
    after = {}
    for name in ("adamw", "muon"):
        torch.manual_seed(0)
        m = GPT(_config(tokenizer, **kw))
        opt = make_optimizer(m, TrainSettings(max_steps=1, optimizer=name, lr=1e-3), CPU)
        m(x, y).backward()
        opt.step()
        after[name] = m.state_dict()
    for name, a in after["adamw"].items():
        assert torch.equal(a, after["muon"][name]) == (name not in hidden), name


def test_the_pair_round_trips_through_the_state_file(tmp_path, tokenizer, tokens):
    def stepped(n: int) -> tuple[GPT, Combined]:
        torch.manual_seed(0)
        model = GPT(_config(tokenizer))
        opt = make_optimizer(model, TrainSettings(max_steps=1, optimizer="muon"), CPU)
        for i in range(n):
            x = torch.from_numpy(tokens[i * 64 : i * 64 + 64].astype("int64")).view(2, 32)
            model(x, x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, opt

    model, opt = stepped(2)
    for group in opt.param_groups:
        group["lr"] = 0.0123  # as the schedule sets it
    save_state(tmp_path / "m.safetensors", opt, torch.Generator(), {}, {"step": 2})
    _, fresh = stepped(0)
    load_state(tmp_path / "m.safetensors", fresh, torch.Generator(), 0, CPU)
    saved, loaded = opt.state_dict(), fresh.state_dict()
    assert saved["param_groups"] == loaded["param_groups"] and all(g["lr"] == 0.0123 for g in loaded["param_groups"])
    assert saved["state"].keys() == loaded["state"].keys()
    assert {k for st in loaded["state"].values() for k in st} == {"step", "exp_avg", "exp_avg_sq", "momentum_buffer"}
    for pid, st in saved["state"].items():
        for k, v in st.items():
            assert torch.equal(v, loaded["state"][pid][k]), (pid, k)


def test_muon_resumed_with_accumulation_equals_uninterrupted(tmp_path, tokenizer, tokens):
    """As test_train's test for AdamW, with two micro-batches per step."""
    config = _config(tokenizer, dropout=0.1)
    settings = TrainSettings(max_steps=8, batch_size=2, batch_tokens=128, eval_every=4, warmup_steps=3,
                             sample_tokens=0, lr=3e-3, optimizer="muon")
    torch.manual_seed(0)
    straight = GPT(config)
    events = list(train(straight, tokenizer, tokens, tokens[:300], tmp_path / "a.safetensors", settings, device=CPU))
    assert events[0].accum_steps == 2

    torch.manual_seed(0)
    first = GPT(config)
    count, last = {"n": 0}, None
    for e in train(first, tokenizer, tokens, tokens[:300], tmp_path / "b.safetensors", settings, device=CPU,
                   should_stop=lambda: count["n"] >= 5):
        count["n"] = e.step if isinstance(e, Step) else count["n"]
        last = e if isinstance(e, Saved) else last
    assert last.reason == "interrupted" and last.step == 5

    resumed = GPT(config)
    resumed.load_state_dict(load_model(tmp_path / "b.safetensors")[0].state_dict())
    events = list(train(resumed, tokenizer, tokens, tokens[:300], tmp_path / "b.safetensors", settings, device=CPU,
                        resume=True))
    assert [e.step for e in events if isinstance(e, Step)] == [6, 7, 8]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # Another optimizer's moments would not fit: the library refuses before loading them.
    with pytest.raises(TinygenError, match="trained with --optimizer muon"):
        next(train(GPT(config), tokenizer, tokens, tokens[:300], tmp_path / "b.safetensors",
                   TrainSettings(max_steps=9, optimizer="adamw"), device=CPU, resume=True))


def test_muon_trains_under_bf16_autocast_on_a_cpu(tmp_path, tokenizer, tokens):
    torch.manual_seed(0)
    model = GPT(_config(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    events = list(train(model, tokenizer, tokens, tokens[:300], tmp_path / "m.safetensors",
                        TrainSettings(max_steps=3, batch_size=2, warmup_steps=1, sample_tokens=0, optimizer="muon",
                                      dtype="bfloat16"), device=CPU))
    assert isinstance(events[0], Start) and events[0].dtype == "bfloat16"
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in events if isinstance(e, Step))
    for name, w in model.state_dict().items():
        assert w.dtype == torch.float32 and not torch.equal(w, before[name]), name


def test_the_optimizer_is_recorded_and_resume_keeps_it(cli, corpus, tmp_path):
    assert "--optimizer <adamw|muon>" in cli("train", "--help").out
    assert {o.value for o in Optimizer} == set(OPTIMIZERS)
    base, fine = tmp_path / "base.safetensors", tmp_path / "fine.safetensors"
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", "300"]
    assert_ok(cli("train", corpus, "--out", base, *tiny, "--optimizer", "adamw", "--max-steps", "2",
                  "--device", "cpu", timeout=120))
    # Fine-tuning with Muon from an AdamW-trained model: a fresh optimizer over the base's weights.
    r = cli("train", corpus, "--out", fine, "--init", base, "--optimizer", "muon", "--max-steps", "2",
            "--warmup-steps", "1", "--device", "cpu", timeout=120)
    assert_ok(r)
    assert "warning" not in r.err  # a CPU without bf16 instructions orthogonalizes in float32, unwarned
    assert "--lr 0.0012, a tenth of muon's default" in r.err  # a fine-tune starts gentler than a new model

    def state(out):
        return json.loads(state_paths(out)[1].read_text())

    assert load_model(base)[2].provenance["optimizer"] == "adamw" and state(base)["settings"]["optimizer"] == "adamw"
    assert load_model(fine)[2].provenance["optimizer"] == "muon" and state(fine)["settings"]["optimizer"] == "muon"
    assert len(state(fine)["param_groups"]) == 3  # AdamW's decayed and undecayed groups, then Muon's

    assert_one_line_error(cli("train", corpus, "--out", fine, "--resume", "--optimizer", "adamw", "--device", "cpu"),
                          "--optimizer adamw", "has --optimizer muon;", "--force")
    r = cli("train", corpus, "--out", fine, "--resume", "--optimizer", "muon", "--max-steps", "3", "--device", "cpu",
            timeout=120)
    assert_ok(r)
    assert "resuming with --optimizer" not in r.err  # the saved choice typed again is no change
    assert state(fine)["step"] == 3 and state(fine)["settings"]["optimizer"] == "muon"
    # A run saved before --optimizer existed trained with AdamW.
    old = state(base)
    del old["settings"]["optimizer"]
    state_paths(base)[1].write_text(json.dumps(old))
    assert_one_line_error(cli("train", corpus, "--out", base, "--resume", "--optimizer", "muon", "--device", "cpu"),
                          "--optimizer muon", "has --optimizer adamw;", "--force")


def test_the_default_recipe_is_muon_wsd_and_qk_norm_and_older_runs_keep_theirs(cli, corpus, tmp_path):
    out = tmp_path / "m.safetensors"
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", "300"]
    assert_ok(cli("train", corpus, "--out", out, *tiny, "--max-steps", "2", "--device", "cpu", timeout=120))
    saved = json.loads(state_paths(out)[1].read_text())
    assert {k: saved["settings"][k] for k in ("optimizer", "lr", "schedule", "warmup_steps", "batch_size")} == {
        "optimizer": "muon", "lr": 1.2e-2, "schedule": "wsd", "warmup_steps": 20, "batch_size": 32}
    assert load_model(out)[0].config.qk_norm
    # A run saved before --schedule existed decayed by cosine, and resumes so.
    del saved["settings"]["schedule"]
    state_paths(out)[1].write_text(json.dumps(saved))
    assert_one_line_error(cli("train", corpus, "--out", out, "--resume", "--schedule", "wsd", "--device", "cpu"),
                          "--schedule wsd", "has --schedule cosine;")
    # The gpt2 arch has no qk-norm: its default is off, and asking for it is one line.
    gpt2 = tmp_path / "g.safetensors"
    assert_ok(cli("train", corpus, "--out", gpt2, *tiny, "--arch", "gpt2", "--max-steps", "1", "--device", "cpu",
                  timeout=120))
    assert not load_model(gpt2)[0].config.qk_norm
    assert_one_line_error(cli("train", corpus, "--out", gpt2, *tiny, "--arch", "gpt2", "--qk-norm", "--force",
                              "--max-steps", "1", "--device", "cpu"), "gpt2 arch", "qk-norm")


def test_float32_muon_steps_as_torchs_muon_would_in_float32(monkeypatch):
    """Float32Muon is torch's update rule (momentum, Nesterov, decoupled decay, the AdamW-matching
    lr scale) with only the orthogonalization's precision changed: with torch's own bf16
    orthogonalization swapped for the float32 one, both give the same weights, step after step,
    and their states are interchangeable."""
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", orthogonalized)
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (32, 32)]  # tall, wide and square
    ours = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    a, b = Float32Muon(ours, **kw), torch.optim.Muon(theirs, **kw)
    for _ in range(3):
        grads = [torch.randn(*shape) for shape in shapes]
        for opt, params in ((a, ours), (b, theirs)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    b.load_state_dict(a.state_dict())  # the same "momentum_buffer" state
    assert all(torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"]) for p, q in zip(ours, theirs))


def test_orthogonalized_is_nearly_orthogonal():
    torch.manual_seed(1)
    for shape in ((64, 16), (16, 64)):
        x = orthogonalized(torch.randn(*shape), (3.4445, -4.775, 2.0315), 5, 1e-7)
        assert x.dtype == torch.float32 and x.shape == shape
        s = torch.linalg.svdvals(x)
        assert s.min() > 0.5 and s.max() < 1.5  # the quintic's band around 1, as torch documents


def test_every_cpu_gets_the_float32_orthogonalization(tokenizer):
    """With or without bf16 instructions: the orthogonalization does not depend on the CPU's bf16
    support, and DDP ranks match one process (test_distributed)."""
    muon = make_optimizer(GPT(_config(tokenizer)), TrainSettings(max_steps=1, optimizer="muon"), CPU).optimizers[1]
    assert type(muon) is Float32Muon
