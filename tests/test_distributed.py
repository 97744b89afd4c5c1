"""Multi-process training as a GPU cluster would run it, on gloo and the CPU: the waits for rank 0
outside the step timeout, each rank's own dropout generator across a resume, and Muon on two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from tinygen.training.state import load_state, rng_states, save_state

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun on gloo")


def torchrun(*args: str, cwd: Path, port: int, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TINYGEN_MODEL"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**env, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"})


def test_waits_for_rank_0_alone_outlast_the_step_timeout(tmp_path):
    """Rank 0 trains the tokenizer, evaluates and saves alone while the others wait. Those waits
    go through the control group, so they may outlast the timeout of the group that carries the
    gradients (NCCL's ten minutes on GPUs), which this test shrinks to two seconds."""
    script = tmp_path / "waits.py"
    script.write_text(textwrap.dedent("""
        import time
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        from tinygen.training import distributed as D
        from tinygen.training.stopping import agree

        D.STEP_TIMEOUT = timedelta(seconds=2)
        d, _ = D.init_distributed(torch.device("cpu"))
        if d.master:
            time.sleep(5)  # "tokenizing the data"
        D.barrier(d)
        if d.master:
            time.sleep(5)  # "evaluating and saving"
        print(f"rank {d.rank} agreed {agree(d, False, d.rank == 1, d.rank == 0, float(d.rank))}", flush=True)
        try:  # the premise: the step group does give up after two seconds
            if d.master:
                time.sleep(5)
            dist.barrier()
        except RuntimeError:
            print(f"rank {d.rank} step group timed out", flush=True)
    """))
    r = torchrun(str(script), cwd=tmp_path, port=29541, timeout=120)
    for rank in (0, 1):
        assert f"rank {rank} agreed (False, True, True, 1.0)" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "rank 1 step group timed out" in r.stdout, r.stdout + r.stderr[-3000:]


def test_each_rank_resumes_its_own_dropout_masks(tmp_path, corpus):
    """Two ranks with dropout, stopped at step 2 and resumed to step 4, end with the very weights
    of a run that never stopped. If every rank got rank 0's generator back, rank 1 would draw rank
    0's masks after the resume and the weights would differ. (Warmup longer than the run keeps the
    lr schedule the same whether the run was planned for 2 steps or 4.)"""
    from tinygen.core.checkpoint import load_model

    common = ["-m", "tinygen", "train", str(corpus), *TINY, "--dropout", "0.2", "--warmup-steps", "100",
              "--eval-every", "2", "--seed", "3", "--device", "cpu"]
    straight = torchrun(*common, "--out", "a.safetensors", "--max-steps", "4", cwd=tmp_path, port=29542)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = torchrun(*common, "--out", "b.safetensors", "--max-steps", "2", cwd=tmp_path, port=29543)
    assert first.returncode == 0, first.stderr[-3000:]
    state = load_state_tensors(tmp_path / "b.safetensors.state.safetensors")
    assert {"rng.torch.0", "rng.torch.1"} <= set(state) and "rng.cuda.0" not in state
    assert not torch.equal(state["rng.torch.0"], state["rng.torch.1"])
    second = torchrun(*common, "--out", "b.safetensors", "--max-steps", "4", "--resume", cwd=tmp_path, port=29544)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = (load_model(tmp_path / name)[0].state_dict() for name in ("a.safetensors", "b.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_muon_on_two_ranks_with_accumulation_matches_one_process(tmp_path, corpus):
    """Each rank runs Muon on the same all-reduced gradients, so two ranks of two rows, two
    micro-batches a step, end where one process of four rows does. On a CPU the orthogonalization
    runs in float32 (make_optimizer), where the two agree to 1e-8; torch's own Muon runs it in bf16,
    where the all-reduce's other summation order flipped roundings: 3e-4 apart after these 4 steps
    on a Zen 4 EPYC, against steps of about 5e-4 per weight."""
    from tinygen.core.checkpoint import load_model

    common = ["-m", "tinygen", "train", str(corpus), *TINY, "--max-steps", "4", "--eval-every", "100", "--seed", "7",
              "--batch-tokens", "256", "--optimizer", "muon", "--device", "cpu", "--dtype", "float32"]
    env = {k: v for k, v in os.environ.items() if k != "TINYGEN_MODEL"}
    one = subprocess.run([sys.executable, *common, "--out", "one.safetensors", "--batch-size", "4"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=180, env={**env, "NO_COLOR": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(*common, "--out", "two.safetensors", "--batch-size", "2", cwd=tmp_path, port=29545)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stderr

    def losses(name):
        rows = [json.loads(r) for r in (tmp_path / f"{name}.safetensors.metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in rows if "train_loss" in r]

    assert len(losses("two")) == 4
    assert np.allclose(losses("one"), losses("two"), rtol=1e-4, atol=1e-5)
    a, b = (load_model(tmp_path / name)[0].state_dict() for name in ("one.safetensors", "two.safetensors"))
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-4, name


def load_state_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# -- the state file, in one process --------------------------------------------------------------------

def _optimizer():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])


def test_a_rank_gets_its_own_generator_back_and_a_cpu_run_never_touches_cuda(tmp_path, monkeypatch):
    from tinygen.training.distributed import Dist

    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU run touched CUDA")

    monkeypatch.setattr(torch.cuda, "get_rng_state", no_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state", no_cuda)
    cpu = torch.device("cpu")
    torch.manual_seed(10)
    mine = rng_states(Dist(), cpu)
    assert set(mine) == {"rng.torch.0"}
    torch.manual_seed(11)
    rank1 = torch.get_rng_state()
    out = tmp_path / "m.safetensors"
    save_state(out, _optimizer(), torch.Generator(), {**mine, "rng.torch.1": rank1}, {"step": 1})
    for rank, expected in ((0, mine["rng.torch.0"]), (1, rank1)):
        torch.manual_seed(99)
        load_state(out, _optimizer(), torch.Generator(), rank, cpu)
        assert torch.equal(torch.get_rng_state(), expected)


def test_an_older_state_file_restores_rank_0_only(tmp_path):
    """Before per-rank states a file held one unsuffixed state: rank 0's. Another rank keeps the
    seed it was given rather than taking rank 0's masks."""
    cpu = torch.device("cpu")
    torch.manual_seed(5)
    legacy = torch.get_rng_state()
    out = tmp_path / "m.safetensors"
    save_state(out, _optimizer(), torch.Generator(), {"rng.torch": legacy}, {"step": 1})
    torch.manual_seed(6)
    own = torch.get_rng_state()
    load_state(out, _optimizer(), torch.Generator(), 1, cpu)
    assert torch.equal(torch.get_rng_state(), own)
    load_state(out, _optimizer(), torch.Generator(), 0, cpu)
    assert torch.equal(torch.get_rng_state(), legacy)
