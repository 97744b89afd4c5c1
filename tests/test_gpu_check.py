"""scripts/gpu-check, what the first session with a GPU runs: it parses, it lists its steps, and one
step of its dry run writes a summary of them all. The whole dry run (about a minute and a half on
2 CPU cores) is marked slow."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check"
STEPS = ["versions", "cuda-tests", "train", "cudagraphs", "masks", "bench", "suite"]


def gpu_check(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run([str(SCRIPT), *args], check=False, capture_output=True, text=True, env=env, timeout=timeout)


def statuses(out: Path) -> dict[str, str]:
    """Each step's result, from the summary's table."""
    rows = re.findall(r"^\| ([a-z-]+) \| ([^|]+) \|", (out / "summary.md").read_text(), re.MULTILINE)
    return {step: status.strip() for step, status in rows if step != "step"}


def test_the_script_parses_and_runs_as_a_command():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.access(SCRIPT, os.X_OK)


def test_it_lists_its_steps_with_their_time_boxes():
    r = subprocess.run([str(SCRIPT), "--list"], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == STEPS
    assert all(re.fullmatch(r"\d+s", line.split()[1]) for line in lines)


def test_an_unknown_step_is_refused(tmp_path):
    r = gpu_check(tmp_path / "out", "--only", "versions,nope", timeout=30)
    assert r.returncode == 2 and "unknown step 'nope'" in r.stderr


def test_one_step_writes_a_summary_of_every_step(tmp_path):
    out = tmp_path / "out"
    r = gpu_check(out, "--only", "versions", timeout=180)
    assert r.returncode == 0, r.stdout[-3000:]
    assert statuses(out) == {"versions": "ok", **{step: "skipped" for step in STEPS[1:]}}
    assert "===== versions" in (out / "log.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["checks.json", "log.txt", "summary.md"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this is the ten-minute check itself, not a dry run")
def test_the_dry_run_runs_what_a_cpu_can_and_skips_the_rest(tmp_path):
    out = tmp_path / "out"
    r = gpu_check(out, timeout=600)
    assert r.returncode == 0, r.stdout[-5000:]
    assert statuses(out) == {"versions": "ok", "cuda-tests": "skipped", "train": "ok", "cudagraphs": "skipped",
                             "masks": "skipped", "bench": "ok", "suite": "skipped"}
    assert len(list(out.iterdir())) <= 8  # what a device run brings back
