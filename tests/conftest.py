"""Shared fixtures: a tokenizer trained in-process on a few lines, and tiny models saved to disk.

Everything here is made by the tests themselves; ../shared/data is only read by tests that skip
when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinygen.checkpoint import save_checkpoint
from tinygen.config import ModelConfig
from tinygen.model import GPT
from tinygen.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2_TOKENIZER = SHARED / "gpt2-tokenizer"

STORY_LINES = [
    "Once upon a time, there was a little dog named Spot.",
    "Spot liked to run in the park with his friend Tom.",
    "One day, Tom found a big red ball under a tree.",
    "They played all day and were very happy.",
    "The sun was warm and the sky was blue. Lily smiled.",
    "\"Can I play too?\" asked the little cat. \"Yes!\" said Spot.",
    "Café naïve – emoji 😀 and 日本語 appear too, so bytes matter.",
]


def make_model(config: ModelConfig, seed: int = 0, scale: float = 1.0) -> GPT:
    """A random model; scale > 1 sharpens its logits so greedy argmax is far from ties."""
    torch.manual_seed(seed)
    model = GPT(config)
    if scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() > 1:
                    p.mul_(scale)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(STORY_LINES * 20, vocab_size=400)


@pytest.fixture(scope="session")
def rope_config(tokenizer) -> ModelConfig:
    return ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=tokenizer.n_vocab)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory, tokenizer, rope_config) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_checkpoint(path, make_model(rope_config, scale=3.0), tokenizer, {"data": "random weights (test)", "steps": 0})
    return path


@pytest.fixture(scope="session")
def gpt2_arch_path(tmp_path_factory, tokenizer) -> Path:
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=tokenizer.n_vocab, arch="gpt2")
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2.safetensors"
    save_checkpoint(path, make_model(config, seed=1, scale=3.0), tokenizer)
    return path


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory) -> Path:
    """A small random GPT2LMHeadModel saved by transformers itself, with GPT-2's real tokenizer files."""
    transformers = pytest.importorskip("transformers")
    if not GPT2_TOKENIZER.exists():
        pytest.skip("../shared/data/gpt2-tokenizer is absent")
    import shutil

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # sharper logits, so greedy decoding has clear winners
        for p in hf.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    out = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    hf.save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(GPT2_TOKENIZER / name, out / name)
    return out
