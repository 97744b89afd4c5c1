"""The bundled model in weights/: loads with no --model, within budget, and writes stories."""

import subprocess
import sys

import pytest

from tinygen.checkpoint import default_model_path, read_info

BUNDLED = default_model_path()
pytestmark = pytest.mark.skipif(not BUNDLED.exists(), reason="no bundled model in weights/")


def test_bundled_model_is_within_budget_and_documented():
    info = read_info(None)
    assert info.path == BUNDLED
    assert info.file_size <= 32 * 1024 * 1024
    assert 4096 <= info.config.vocab_size <= 8192
    assert info.provenance["steps"] > 0 and info.provenance["val_loss"] > 0 and info.provenance["val_bpb"] > 0


def test_bundled_model_samples_a_story():
    r = subprocess.run([sys.executable, "-m", "tinygen", "sample", "Once upon a time", "-n", "40", "--seed", "1"],
                       capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1"})
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert len(words) >= 15
    # A trained story model writes mostly ordinary lowercase words, not byte soup.
    assert sum(w.strip('.,!?"').isalpha() for w in words) / len(words) > 0.8
