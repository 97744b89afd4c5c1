"""The Llama family in Hugging Face form: random small models built with transformers (grouped-query
attention, untied heads, other rotary bases, odd MLP sizes, Llama 3 rope scaling, Qwen2's q/k/v
biases, Qwen3's qk-norm) give tinygen the logits transformers gives, and folders with switches tinygen does not
implement are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from modelfiles import transformers_llama, write_gpt2_files

from tinygen.formats.llama import config_from_hf, state_from_hf
from tinygen.core.model import GPT
from tinygen.errors import TinygenError

transformers = pytest.importorskip("transformers")

BASE = dict(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
            max_position_embeddings=64, vocab_size=97, rms_norm_eps=1e-6, rope_theta=1e5, tie_word_embeddings=False)
CASES = {
    "gqa-untied": ("llama", {}),
    "tied-mha": ("llama", dict(num_key_value_heads=6, tie_word_embeddings=True, rope_theta=10000.0)),
    "llama3-scaling": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2-biases": ("qwen2", dict(num_key_value_heads=3)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=8)),  # Qwen3Config's head_dim defaults to 128, not hidden / heads
}


def hf_model(kind: str, overrides: dict, seed: int = 0):
    return transformers_llama(kind, {**BASE, **overrides}, seed)


@pytest.mark.parametrize("case", CASES)
def test_a_transformers_llama_gives_the_same_logits_in_tinygen(case):
    kind, overrides = CASES[case]
    hf = hf_model(kind, overrides)
    config, _ = config_from_hf(hf.config.to_dict(), "config.json")
    ours = GPT(config, init=False)
    state = state_from_hf(hf.state_dict(), config, "test")
    ours.load_state_dict(state, strict=False)
    ours.eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert config.kv_heads == hf.config.num_key_value_heads
    assert config.tie_embeddings == hf.config.tie_word_embeddings
    assert config.qk_norm == (kind == "qwen3")


def test_the_kv_cache_is_sized_by_the_kv_heads_and_decoding_matches_recompute():
    from tinygen.generate.engine import naive_generate, stream
    from tinygen.generate.sampling import SamplingParams

    hf = hf_model("llama", {})
    config, _ = config_from_hf(hf.config.to_dict(), "config.json")
    ours = GPT(config, init=False)
    ours.load_state_dict(state_from_hf(hf.state_dict(), config, "test"), strict=False)
    ours.eval()
    from tinygen.core.model import KVCache

    assert KVCache(config, 1, "cpu", torch.float32).ks[0].shape[1] == 2
    greedy = SamplingParams(temperature=0)
    assert list(stream(ours, [1, 2, 3], greedy, 20)) == naive_generate(ours, [1, 2, 3], 20)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer) -> Path:
    """A saved transformers Llama with a GPT-2-style tokenizer (the trained tokenizer's tokens and
    <|endoftext|>) written as tokenizer.json by transformers."""
    files = write_gpt2_files(tmp_path_factory.mktemp("gpt2-files"), tokenizer.ranks)
    folder = tmp_path_factory.mktemp("llama")
    hf = hf_model("llama", dict(vocab_size=len(tokenizer.ranks) + 1))
    hf.save_pretrained(folder, safe_serialization=True)
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(files))
    tok.save_pretrained(folder)
    assert tok.encode("river bank")  # a tokenizer.json with its vocabulary in it
    return folder


def test_a_saved_llama_folder_loads_and_generates_as_transformers_does(llama_folder, cli):
    from tinygen.core.checkpoint import load_model

    net, tok, info = load_model(llama_folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    ids = tok.encode("He sat on the river's bank and watched the water.")
    with torch.no_grad():
        torch.testing.assert_close(net(torch.tensor([ids])), hf(torch.tensor([ids])).logits, rtol=0, atol=1e-5)
        want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert info.kind == "llama" and info.n_params == sum(p.numel() for p in hf.parameters())
    r = cli("sample", "-m", llama_folder, "He sat on the river's bank and watched the water.", "-n", "12", "-t", "0",
            "--device", "cpu")
    assert r.rc == 0, r.err
    assert r.out.startswith(tok.decode(want.tolist())[:20])


@pytest.mark.parametrize("change, needle", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"head_dim": 16}, "head_dim"),
    ({"model_type": "phi3"}, "phi3"),
])
def test_a_switch_tinygen_does_not_implement_is_refused_by_name(llama_folder, tmp_path, cli, change, needle):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(llama_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    assert_one_line_error(cli("sample", "-m", folder, "x", "-n", "1", "--device", "cpu"), needle)
    with pytest.raises(TinygenError, match=needle):
        config_from_hf({**config, **change}, "config.json")


def test_a_folder_without_tokenizer_or_safetensors_is_one_line(llama_folder, tmp_path, cli):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(llama_folder, folder)
    (folder / "tokenizer.json").unlink()
    assert_one_line_error(cli("sample", "-m", folder, "x", "-n", "1", "--device", "cpu"), "tokenizer.json")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert_one_line_error(cli("sample", "-m", folder, "x", "-n", "1", "--device", "cpu"), "never pickle")


def test_an_imported_model_quantizes_inspects_scores_and_fine_tunes(llama_folder, tmp_path, cli, corpus):
    """What works on a tinygen model works on an imported one."""
    text = "He sat on the river's bank and watched the water."
    r = cli("sample", "-m", llama_folder, text, "-n", "8", "-t", "0", "--quantize", "int8", "--device", "cpu")
    assert r.rc == 0 and r.out, r.err
    r = cli("attention", "-m", llama_folder, text, "--json", "--device", "cpu")
    assert r.rc == 0, r.err
    weights = json.loads(r.out)["attention"]
    assert len(weights) == 2 and len(weights[0]) == 6  # every query head, though they share 2 key/value heads
    r = cli("eval", "-m", llama_folder, corpus, "--json", "--device", "cpu")
    assert r.rc == 0 and json.loads(r.out)["loss"] > 0, r.err
    out = tmp_path / "tuned.safetensors"
    r = cli("train", corpus, "--init", llama_folder, "--out", out, "--max-steps", "2", "--batch-size", "2",
            "--eval-every", "100", "--device", "cpu", timeout=300)
    assert r.rc == 0, r.err
    from tinygen.core.checkpoint import load_model

    tuned, tok, info = load_model(out)
    assert info.kind == "tinygen" and tuned.config.kv_heads == 2 and not tuned.config.tie_embeddings
