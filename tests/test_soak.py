"""Soak: `tinygen sample --jsonl` over 10,000 short requests on the bundled model. Every request
gets exactly one result line, in order, and the process's memory stays flat once warm.

Slow (minutes), so outside the default run: `python -m pytest -m slow`. It runs the CLI as a
user does, so it holds whatever engine is behind it to the same bar.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import clean_env

BUNDLED = Path(__file__).resolve().parents[1] / "weights" / "stories.safetensors"
REQUESTS = 10_000
WARM_UP = 1_000  # results before the baseline: the first batches grow caches and allocator pools
WORDS = "Once upon a time the little dog cat Lily Tom ran saw a big red ball and sun park happy".split()

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not BUNDLED.exists(), reason="the bundled model weights/stories.safetensors is absent")]


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):  # the process has ended
        return None


def test_ten_thousand_jsonl_requests_flat_memory_one_line_each(tmp_path):
    rng = random.Random(0)
    requests = [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 8))), "max_new_tokens": rng.randint(1, 4),
                 **({"seed": i} if i % 3 else {}), **({"temperature": 0} if i % 5 == 0 else {})}
                for i in range(REQUESTS)]
    stdin = tmp_path / "requests.jsonl"
    stdin.write_text("".join(json.dumps(r) + "\n" for r in requests))
    # The default model (no --model): the bundled one.
    stderr = tmp_path / "stderr.txt"
    with open(stdin, "rb") as f, open(stderr, "wb") as e:  # a file, so no unread pipe can stall the run
        proc = subprocess.Popen([sys.executable, "-m", "tinygen", "sample", "--jsonl", "--device", "cpu"],
                                stdin=f, stdout=subprocess.PIPE, stderr=e, env=clean_env())
    done = 0
    samples: list[tuple[int, int]] = []  # (results so far, RSS in KiB)

    def watch() -> None:
        while proc.poll() is None:
            rss = rss_kib(proc.pid)
            if rss is not None:
                samples.append((done, rss))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    results = []
    try:
        for line in proc.stdout:
            results.append(line)
            done = len(results)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        watcher.join()
    err = stderr.read_text(errors="replace")
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err, err[-2000:]

    assert len(results) == REQUESTS
    for request, line in zip(requests, results):
        result = json.loads(line)
        assert result["prompt"] == request["prompt"]  # in input order, one each
        assert result["finish_reason"] in ("length", "stop")
        assert result["tokens"] <= request["max_new_tokens"]
        assert result["finish_reason"] == "stop" or result["tokens"] == request["max_new_tokens"]

    warm = [rss for n, rss in samples if n >= WARM_UP]
    assert len(warm) >= 10, f"too few RSS samples after warm-up: {samples[-5:]}"
    baseline = warm[0]
    assert max(warm) <= baseline * 1.10, (
        f"RSS grew from {baseline} KiB to {max(warm)} KiB after warm-up "
        f"(samples every ~1000 results: {[s for s in samples if s[0] % 1000 < 5][:20]})")
