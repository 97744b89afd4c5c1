"""Checkpoints: one file round-trips a model with its tokenizer; GPT-2 folders load exactly;
broken files are clear user errors."""

import json

import pytest
import torch
from safetensors.numpy import save_file

from tinygen.core.checkpoint import load_model, load_tokenizer, read_info, save_checkpoint
from tinygen.errors import TinygenError
from tinygen.generate.engine import generate_batch
from tinygen.generate.sampling import SamplingParams

from conftest import make_model


def test_round_trip(tmp_path, tokenizer, rope_config):
    model = make_model(rope_config, seed=3)
    path = save_checkpoint(tmp_path / "m.safetensors", model, tokenizer, {"steps": 12, "data": "unit test"})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    loaded, tok, info = load_model(path)
    assert info.config == rope_config
    assert info.provenance == {"steps": 12, "data": "unit test"}
    assert info.n_params == model.num_params()
    idx = torch.randint(0, rope_config.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert tok.encode("Once upon a time") == tokenizer.encode("Once upon a time")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_save_replaces_atomically(tmp_path, tokenizer, rope_config):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, make_model(rope_config, seed=1), tokenizer)
    save_checkpoint(path, make_model(rope_config, seed=2), tokenizer)
    loaded, _, _ = load_model(path)
    assert torch.equal(loaded.transformer.wte.weight, make_model(rope_config, seed=2).transformer.wte.weight)
    assert len(list(tmp_path.iterdir())) == 1


def test_header_has_everything(model_path):
    info = read_info(model_path)
    assert info.kind == "tinygen" and info.format_version == 1
    assert load_tokenizer(model_path).n_vocab == info.config.vocab_size


def test_hf_gpt2_folder_matches_transformers(hf_gpt2_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    ours, tok, info = load_model(hf_gpt2_dir)
    assert info.kind == "gpt2" and info.config.arch == "gpt2"
    assert tok.n_vocab == 50257
    idx = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. It was")])
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
    assert (got - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())
    prompt = idx[0].tolist()
    with torch.no_grad():
        hf_out = hf.generate(idx, max_new_tokens=20, do_sample=False, pad_token_id=50256,
                             attention_mask=torch.ones_like(idx))[0, len(prompt):].tolist()
    assert generate_batch(ours, [prompt], SamplingParams(temperature=0), 20)[0] == hf_out


def test_missing_and_corrupt_files_are_user_errors(tmp_path, model_path):
    with pytest.raises(TinygenError, match="no model"):
        read_info(tmp_path / "nope.safetensors")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(model_path.read_bytes()[:1000])
    with pytest.raises(TinygenError, match="not a valid safetensors"):
        load_model(trunc)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(TinygenError):
        load_model(junk)
    plain = tmp_path / "plain.safetensors"
    import numpy as np

    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(plain))
    with pytest.raises(TinygenError, match="not a tinygen checkpoint"):
        load_model(plain)
    with pytest.raises(TinygenError, match="config.json"):
        read_info(tmp_path)


def test_weights_that_disagree_with_config_are_user_errors(tmp_path, model_path):
    from safetensors import safe_open
    from safetensors.torch import save_file as save_torch

    with safe_open(str(model_path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    bad = tmp_path / "bad.safetensors"
    save_torch(tensors, str(bad), metadata={**meta, "config": json.dumps({**cfg, "n_embd": 128})})
    with pytest.raises(TinygenError, match="shape"):
        load_model(bad)
    save_torch(tensors, str(bad), metadata={**meta, "config": json.dumps({**cfg, "n_layer": 3})})
    with pytest.raises(TinygenError, match="missing"):
        load_model(bad)
    save_torch(tensors, str(bad), metadata={**meta, "format_version": "99"})
    with pytest.raises(TinygenError, match="upgrade"):
        read_info(bad)
