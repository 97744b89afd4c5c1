"""Checkpoints: one file round-trips a model with its tokenizer; GPT-2 folders load exactly;
broken files are clear user errors; writes are atomic, get the umask's mode, and clean up after
writers that died. (test_reliability.py fuzzes the loader and kills writers mid-save.)"""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.numpy import save_file

from tinygen.atomic import atomic_path, write_bytes
from tinygen.core.checkpoint import load_model, load_tokenizer, read_info, save_checkpoint
from tinygen.core.config import ModelConfig
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
    with pytest.raises(TinygenError, match="n_layer=3 but the file stores 2 blocks"):
        load_model(bad)
    save_torch(tensors, str(bad), metadata={**meta, "format_version": "99"})
    with pytest.raises(TinygenError, match="upgrade"):
        read_info(bad)


def test_a_config_the_weights_cannot_fill_is_refused_before_building(tmp_path, tokenizer):
    """A header may claim any shape; the model it would build must not cost more than the file
    holds. Here every name and the embedding agree with the config, but the blocks are stubs: a
    model of n_embd 4096 would take gigabytes."""
    from safetensors.torch import save_file as save_torch

    config = ModelConfig(n_layer=4, n_head=32, n_embd=4096, block_size=64, vocab_size=tokenizer.n_vocab)
    tensors = {"transformer.wte.weight": torch.zeros(tokenizer.n_vocab, 4096)}
    tensors |= {f"transformer.h.{i}.attn.c_attn.weight": torch.zeros(1) for i in range(4)}
    meta = {"format": "tinygen", "format_version": "1", "config": config.to_json(),
            "tokenizer": json.dumps(tokenizer.to_dict()), "provenance": "{}"}
    path = tmp_path / "stub.safetensors"
    save_torch(tensors, str(path), metadata=meta)
    with pytest.raises(TinygenError, match="needs more weights than the file"):
        load_model(path)


def test_configs_from_files_are_checked_field_by_field():
    good = dict(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=300)
    assert ModelConfig.from_dict(good).head_dim == 4
    for change, needle in [({"n_layer": "2"}, "whole number"), ({"n_embd": 8.0}, "whole number"),
                           ({"n_head": True}, "whole number"), ({"rope_theta": float("nan")}, "finite"),
                           ({"block_size": 10**9}, "at most"), ({"dropout": 1.5}, r"\[0, 1\)"),
                           ({"norm_eps": 0}, "positive"), ({"arch": ["rope"]}, "unknown arch")]:
        with pytest.raises(TinygenError, match=needle):
            ModelConfig.from_dict({**good, **change})
    with pytest.raises(TinygenError, match="JSON object"):
        ModelConfig.from_dict([1, 2])


def test_a_broken_gpt2_config_json_is_a_user_error(tmp_path, hf_gpt2_dir):
    import shutil

    folder = tmp_path / "gpt2"
    shutil.copytree(hf_gpt2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    for broken, needle in [({**config, "n_embd": "32"}, "whole number"), ({k: v for k, v in config.items() if k != "n_layer"},
                           "no 'n_layer'"), ([config], "not a JSON object"), ({**config, "n_layer": 5}, "n_layer=5")]:
        (folder / "config.json").write_text(json.dumps(broken))
        with pytest.raises(TinygenError, match=needle):
            load_model(folder)


# -- atomic writes ---------------------------------------------------------------------------------


def test_written_files_get_the_mode_open_would_give(tmp_path, tokenizer, rope_config):
    """The umask decides, as for any file a program writes (safetensors alone makes 0600)."""
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "m.safetensors", make_model(rope_config), tokenizer)
        write_bytes(tmp_path / "metrics.jsonl", b"{}\n")
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"m.safetensors": 0o640, "metrics.jsonl": 0o640, "plain.txt": 0o640}


def test_a_missing_folder_is_an_error_not_created(tmp_path, tokenizer, rope_config):
    target = tmp_path / "no" / "such" / "m.safetensors"
    with pytest.raises(TinygenError, match=f"no folder {tmp_path / 'no' / 'such'}; create it first"):
        save_checkpoint(target, make_model(rope_config), tokenizer)
    with pytest.raises(TinygenError, match="create it first"):
        write_bytes(tmp_path / "nope" / "x.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_a_dead_writers_temp_folder_goes_with_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".m.json.{dead.pid}.tmp"
        busy = tmp_path / f".m.json.{alive.pid}.tmp"
        other = tmp_path / f".other.json.{dead.pid}.tmp"
        for folder in (stale, busy, other):
            folder.mkdir()
            (folder / "m.json").write_bytes(b"half")
        write_bytes(tmp_path / "m.json", b"whole")
        assert (tmp_path / "m.json").read_bytes() == b"whole"
        assert not stale.exists()  # its writer is gone
        assert busy.exists() and other.exists()  # a live writer's, and another file's
    finally:
        alive.kill()
        alive.wait()


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "m.json"
    write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"] and target.read_bytes() == b"old"
