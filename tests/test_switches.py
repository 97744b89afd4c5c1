"""The speedrun switches (qk-norm, ReLU², an untied head, logit soft-capping, value embeddings) and
the warmup-stable-decay schedule: each does what it says, round-trips through a checkpoint,
decodes from the KV cache as a full recompute does, and is kept by --resume; checkpoints from
before them load with unchanged outputs; formats that cannot hold them refuse them in one line."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tinygen.core.checkpoint import load_model, save_checkpoint
from tinygen.core.config import SPEEDRUN_SWITCHES, ModelConfig
from tinygen.core.model import GPT
from tinygen.errors import TinygenError
from tinygen.generate.engine import generate_batch
from tinygen.generate.sampling import SamplingParams
from tinygen.training.schedule import lr_at
from tinygen.training.settings import TrainSettings
from tinygen.training.optim import make_optimizer

from conftest import TINY, assert_ok, assert_one_line_error, make_model

FIXTURES = Path(__file__).parent / "fixtures"
BUNDLED = Path(__file__).resolve().parents[1] / "weights"
SWITCHES = {"qk_norm": {"qk_norm": True}, "relu2": {"mlp": "relu2"}, "untied": {"tie_embeddings": False},
            "softcap": {"logit_softcap": 10.0}, "value_embeds": {"value_embeds": 2},
            "all": {"qk_norm": True, "mlp": "relu2", "tie_embeddings": False, "logit_softcap": 10.0,
                    "value_embeds": 1, "n_kv_head": 2}}


def _config(**kw) -> ModelConfig:
    return ModelConfig(**{"n_layer": 4, "n_head": 4, "n_embd": 64, "block_size": 48, "vocab_size": 97, **kw})


def _header_config(path: Path) -> dict:
    """The model config exactly as the file's safetensors header holds it."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["config"])


# -- older checkpoints ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rope", "gpt2", "llama"])
def test_checkpoints_from_before_the_switches_load_with_unchanged_outputs(name):
    """tests/fixtures/make_old.py wrote these with tinygen fb2d453, and the logits it computed."""
    model, _, _ = load_model(FIXTURES / f"old-{name}.safetensors")
    expected = load_file(str(FIXTURES / "old-logits.safetensors"))
    with torch.no_grad():
        logits = model(expected["idx"])[:, -4:]
    assert torch.allclose(logits, expected[name], atol=1e-4, rtol=1e-4)
    assert not model.config.unportable and model.config.value_embeds == 0


@pytest.mark.parametrize("path", [*(FIXTURES / f"old-{n}.safetensors" for n in ("rope", "gpt2", "llama")),
                                  *sorted(BUNDLED.glob("*.safetensors"))],
                         ids=lambda p: p.name)
def test_an_old_header_reads_back_as_written(path):
    """A header reads back exactly as written, and names only the switches the model uses (the
    bundled story model: qk-norm), so a model that uses none keeps the header older tinygens load."""
    model, _, _ = load_model(path)
    saved = _header_config(path)
    assert json.loads(model.config.to_json()) == saved
    assert all(saved[k] != default for k, default in SPEEDRUN_SWITCHES.items() if k in saved)
    if not model.config.switches:
        assert not set(SPEEDRUN_SWITCHES) & set(saved)


# -- each switch ----------------------------------------------------------------------------------

@pytest.mark.parametrize("switch", SWITCHES.values(), ids=SWITCHES.keys())
def test_each_switch_round_trips_through_a_checkpoint(tmp_path, tokenizer, switch):
    config = _config(vocab_size=tokenizer.n_vocab, **switch)
    model = make_model(config, seed=1, scale=2.0)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, tokenizer, {"data": "random weights (test)", "steps": 0})
    loaded, _, _ = load_model(path)
    assert loaded.config == config
    header = _header_config(path)
    assert {k: header[k] for k in switch} == switch  # written out, as nothing at its default is
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    idx = torch.randint(0, tokenizer.n_vocab, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


@pytest.mark.parametrize("switch", SWITCHES.values(), ids=SWITCHES.keys())
def test_cached_decoding_equals_a_full_recompute_under_each_switch(switch):
    model = make_model(_config(**switch), seed=2, scale=3.0)
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    got = generate_batch(model, prompts, SamplingParams(temperature=0.0), 12)
    for prompt, tokens in zip(prompts, got):
        idx = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                idx.append(int(model(torch.tensor([idx]))[0, -1].argmax()))
        assert tokens == idx[len(prompt):]
    with torch.no_grad():  # the explicit attention path (what `tinygen attention` draws) computes the same
        idx = torch.tensor([prompts[0] * 3])
        assert torch.allclose(model.attention(idx)[0], model(idx), atol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    model = make_model(_config(qk_norm=True), seed=3)
    idx = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        before = model(idx)
        for block in model.transformer.h:
            qk = 2 * 64  # the query and key rows of c_attn
            block.attn.c_attn.weight[:qk] *= 50
        assert torch.allclose(model(idx), before, atol=1e-3)  # eps aside, RMSNorm forgets scale
        plain = make_model(_config(), seed=3)
        before = plain(idx)
        for block in plain.transformer.h:
            block.attn.c_attn.weight[:128] *= 50
        assert not torch.allclose(plain(idx), before, atol=1e-2)


def test_the_soft_cap_bounds_every_logit_and_leaves_small_ones_nearly_alone():
    model = make_model(_config(logit_softcap=10.0), seed=4)
    idx = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        h, _ = model.hidden(idx)
        raw = model.lm_head(h)
        assert torch.allclose(model(idx), 10.0 * torch.tanh(raw / 10.0))
        model.transformer.wte.weight.mul_(100)  # the tied head too
        assert model(idx).abs().max() <= 10.0


def test_relu2_is_relu_squared_between_two_matrices():
    model = make_model(_config(mlp="relu2"), seed=5)
    mlp = model.transformer.h[0].mlp
    assert mlp.c_fc.weight.shape == (4 * 64, 64) and mlp.c_proj.weight.shape == (64, 4 * 64)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.allclose(mlp(x), (torch.relu(x @ mlp.c_fc.weight.T) ** 2) @ mlp.c_proj.weight.T, atol=1e-5)
    # Two matrices of 4x hold what SwiGLU's three of 8/3x hold, at a width divisible by 3.
    sizes = [sum(p.numel() for p in GPT(ModelConfig(n_embd=192, n_head=6, n_layer=1, block_size=8, vocab_size=10,
                                                       **kw)).transformer.h[0].mlp.parameters())
             for kw in ({}, {"mlp": "relu2"})]
    assert sizes[0] == sizes[1]


def test_value_embeddings_add_to_the_values_of_the_first_and_last_blocks():
    config = _config(n_layer=6, value_embeds=2)
    assert [config.value_table(i) for i in range(6)] == [0, 1, None, None, 1, 0]
    model = make_model(config, seed=6)
    assert len(model.transformer.ve) == 2 and model.transformer.ve[0].weight.shape == (97, 64)
    idx = torch.randint(0, 97, (2, 20))
    plain = GPT(_config(n_layer=6), init=False).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".ve." not in k})
    with torch.no_grad():
        assert not torch.allclose(model(idx), plain(idx), atol=1e-3)
        for table in model.transformer.ve:
            table.weight.zero_()
        assert torch.allclose(model(idx), plain(idx), atol=1e-5)  # v + 0 is the plain block


def test_muon_leaves_value_embeddings_and_qk_norms_to_adamw(tokenizer):
    model = GPT(_config(qk_norm=True, value_embeds=2))
    adamw, muon = make_optimizer(model, TrainSettings(max_steps=1, optimizer="muon"), torch.device("cpu")).optimizers
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_muon) == (name.startswith("transformer.h.") and p.dim() == 2), name
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])


@pytest.mark.parametrize("bad", [{"mlp": "gelu"}, {"logit_softcap": 0.0}, {"logit_softcap": -3}, {"logit_softcap": True},
                                 {"value_embeds": -1}, {"value_embeds": 5}, {"value_embeds": 1.5}, {"qk_norm": "yes"},
                                 {"arch": "gpt2", "qk_norm": True}, {"arch": "gpt2", "mlp": "relu2"},
                                 {"arch": "gpt2", "mlp": "swiglu"}, {"arch": "gpt2", "value_embeds": 1}])
def test_a_bad_switch_in_a_config_is_a_clear_error(bad):
    with pytest.raises(TinygenError):
        _config(**bad)


def test_swiglu_by_name_is_the_rope_arch_s_own_mlp():
    assert _config(mlp="swiglu") == _config()
    assert _config(mlp="swiglu").to_json() == _config().to_json()


# -- the schedule ---------------------------------------------------------------------------------

def test_wsd_warms_up_holds_then_cools_down_linearly_to_zero():
    s = TrainSettings(max_steps=100, lr=1.0, warmup_steps=10, schedule="wsd", cooldown=0.25)
    assert [lr_at(i, i / 100, s) for i in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_at(10, 0.1, s) == lr_at(50, 0.5, s) == lr_at(75, 0.75, s) == 1.0
    assert lr_at(87, 0.875, s) == pytest.approx(0.5)
    assert lr_at(100, 1.0, s) == 0.0 and lr_at(120, 1.2, s) == 0.0
    cosine = TrainSettings(max_steps=100, lr=1.0, warmup_steps=10, schedule="cosine")
    assert lr_at(50, 0.5, cosine) < 1.0 and lr_at(100, 1.0, cosine) == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [{"schedule": "linear"}, {"cooldown": 0.0}, {"cooldown": 1.5}])
def test_a_bad_schedule_is_a_clear_error(bad):
    with pytest.raises(TinygenError):
        TrainSettings(max_steps=1, **bad)


# -- the command line -----------------------------------------------------------------------------

def test_train_builds_the_switches_and_resume_keeps_them(cli, corpus, tmp_path):
    out, base = tmp_path / "m.safetensors", tmp_path / "base.safetensors"
    flags = ["--qk-norm", "--mlp", "relu2", "--untied-head", "--logit-softcap", "20", "--value-embeds", "1"]
    r = cli("train", corpus, "--out", out, *TINY, *flags, "--schedule", "wsd", "--cooldown", "0.5",
            "--max-steps", "3", "--device", "cpu", timeout=120)
    assert_ok(r)
    model, _, _ = load_model(out)
    c = model.config
    assert (c.qk_norm, c.mlp, c.tie_embeddings, c.logit_softcap, c.value_embeds) == (True, "relu2", False, 20.0, 1)
    info = cli("info", out).out
    for words in ("qk-norm", "relu² MLP", "untied head", "logit soft-cap 20", "value embeddings ×1"):
        assert words in info
    state = json.loads(out.with_name(out.name + ".state.json").read_text())
    assert (state["settings"]["schedule"], state["settings"]["cooldown"]) == ("wsd", 0.5)

    # Typed again on --resume: the same values continue, others are refused by name.
    assert_ok(cli("train", corpus, "--out", out, "--resume", *flags, "--max-steps", "4", "--device", "cpu", timeout=120))
    assert json.loads(out.with_name(out.name + ".state.json").read_text())["step"] == 4
    assert_one_line_error(cli("train", corpus, "--out", out, "--resume", "--mlp", "swiglu", "--device", "cpu"),
                          "--mlp swiglu", "has --mlp relu2")
    assert_one_line_error(cli("train", corpus, "--out", out, "--resume", "--schedule", "cosine", "--device", "cpu"),
                          "--schedule cosine", "has --schedule wsd")
    # Fine-tuning keeps the base's switches; contradicting one is refused.
    assert_ok(cli("train", corpus, "--out", base, *TINY, "--max-steps", "1", "--device", "cpu", timeout=120))
    assert_one_line_error(cli("train", corpus, "--out", tmp_path / "f.safetensors", "--init", base, "--no-qk-norm",
                              "--max-steps", "1", "--device", "cpu"), "--no-qk-norm does not match", "(--qk-norm)")
    assert_one_line_error(cli("train", corpus, "--out", tmp_path / "g.safetensors", *TINY, "--logit-softcap", "0",
                              "--max-steps", "1", "--device", "cpu"), "logit_softcap")


def test_formats_without_the_switches_refuse_them_in_one_line(cli, tmp_path, tokenizer):
    """qk-norm alone is Qwen3's, so it exports; what no outside model has is refused by name."""
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, make_model(_config(vocab_size=tokenizer.n_vocab, block_size=256, qk_norm=True,
                                                     logit_softcap=15.0)),
                    tokenizer, {"data": "random weights (test)", "steps": 0})
    for fmt in ("hf", "gguf"):
        r = cli("export", path, "--format", fmt, "--out", tmp_path / f"out-{fmt}")
        assert_one_line_error(r, "logit soft-cap", "tinygen only")
        assert "qk-norm" not in r.err
        assert not (tmp_path / f"out-{fmt}").exists()
    assert_one_line_error(cli("bench", "-m", path, "--compare", "--only", "decode", "--device", "cpu"),
                          "logit soft-cap", "without --compare")


@pytest.mark.parametrize("fields, family, unportable", [
    ({}, "llama", []),
    ({"qkv_bias": True}, "qwen2", []),
    ({"qk_norm": True, "n_kv_head": 2, "tie_embeddings": False}, "qwen3", []),
    ({"qk_norm": True, "qkv_bias": True}, "qwen3", ["qk-norm with q/k/v biases"]),
    ({"mlp": "relu2", "value_embeds": 1}, "llama", ["relu² MLP", "value embeddings"]),
])
def test_each_model_has_an_outside_family_and_says_what_it_cannot_hold(fields, family, unportable):
    cfg = _config(**fields)
    assert (cfg.family, cfg.unportable) == (family, unportable)


def test_a_qk_norm_model_is_qwen3_in_transformers():
    """transformers' Qwen3 (RMSNorm on each q and k head before rotary) computes what tinygen does."""
    pytest.importorskip("transformers")
    from tinygen.bench.reference import to_transformers

    model = make_model(_config(qk_norm=True, n_kv_head=2, tie_embeddings=False), seed=5, scale=3.0)
    with torch.no_grad():  # gains off 1, so a gain applied to the wrong head or half would show
        for name, p in model.named_parameters():
            if "_norm" in name:
                p.normal_(1.0, 0.5)
    hf = to_transformers(model)
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() < 1e-4


def test_a_chat_fine_tune_grows_every_table_with_a_row_per_token():
    """New special tokens get a row in the embedding, an untied head and each value embedding."""
    from tinygen.training.recipe import _continued

    base = make_model(_config(tie_embeddings=False, value_embeds=2), seed=7)
    grown = _continued(base, 0.1, vocab_size=101)
    assert grown.config.vocab_size == 101 and grown.config.dropout == 0.1
    old, new = base.state_dict(), grown.state_dict()
    for k in ("transformer.wte.weight", "lm_head.weight", "transformer.ve.0.weight", "transformer.ve.1.weight"):
        assert new[k].shape == (101, 64)
        assert torch.equal(new[k][:97], old[k]) and torch.allclose(new[k][97:], old[k].mean(0).expand(4, -1)), k
    assert not torch.equal(new["lm_head.weight"], new["transformer.wte.weight"])
