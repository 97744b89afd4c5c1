"""The bundled models in weights/: load with no --model, within budget; one writes stories, one chats."""

import json
import os
import subprocess
import sys

import pytest

from tinygen.core.checkpoint import DEFAULT_CHAT_MODEL, default_model_path, load_tokenizer, read_info

BUNDLED = default_model_path()
pytestmark = pytest.mark.skipif(not BUNDLED.exists(), reason="no bundled model in weights/")


def test_bundled_model_is_within_budget_and_documented():
    info = read_info(None)
    assert info.path == BUNDLED
    assert info.file_size <= 32 * 1024 * 1024
    assert 4096 <= info.config.vocab_size <= 8192
    assert info.provenance["steps"] > 0 and info.provenance["val_loss"] > 0 and info.provenance["val_bpb"] > 0


@pytest.mark.parametrize("name", ["stories.safetensors", DEFAULT_CHAT_MODEL])
def test_bundled_provenance_names_no_machine_paths(name):
    """A path in a model's provenance means something beside the model, not on one developer's disk."""
    info = read_info(default_model_path(name))
    values = [v for v in info.provenance.values() if isinstance(v, str)]
    assert values and not [v for v in values if v.startswith("/") or "/work/" in v]


# No TINYGEN_MODEL or the like from the caller: the bundled models are found on their own. The
# CPU, as for every test; PYTHONPATH where it is how tinygen is importable (scripts/gpu-check).
BARE_ENV = {"PATH": "/usr/bin:/bin", "NO_COLOR": "1", "TINYGEN_DEVICE": "cpu",
            **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}


def test_bundled_model_samples_a_story():
    r = subprocess.run([sys.executable, "-m", "tinygen", "sample", "Once upon a time", "-n", "40", "--seed", "1"],
                       capture_output=True, text=True, timeout=120,
                       env=BARE_ENV)
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert len(words) >= 15
    # A trained story model writes mostly ordinary lowercase words, not byte soup.
    assert sum(w.strip('.,!?"').isalpha() for w in words) / len(words) > 0.8


CHAT = default_model_path(DEFAULT_CHAT_MODEL)


@pytest.mark.skipif(not CHAT.exists(), reason="no bundled chat model in weights/")
def test_bundled_chat_model_takes_turns_and_tells_stories():
    info = read_info(CHAT)
    assert info.file_size <= 32 * 1024 * 1024
    assert load_tokenizer(info=info).chat_template is not None and info.provenance["chat"] is True
    r = subprocess.run([sys.executable, "-m", "tinygen", "chat", "--jsonl", "--seed", "1"],
                       input="Tell me a story about a dog who finds a ball.\nHi! How are you?\n",
                       capture_output=True, text=True, timeout=120, env=BARE_ENV)
    assert r.returncode == 0, r.stderr
    story, greeting = (json.loads(line)["content"] for line in r.stdout.splitlines())
    assert "dog" in story.lower() and len(story.split()) >= 40  # a story, about what was asked
    # Both replies end by themselves, well before the 256-token cap: the model closes its turn.
    assert 0 < len(greeting.split()) < 60
    assert "<|" not in story + greeting
