"""Stopping early loses nothing and hangs nothing: a signal to any one torchrun worker stops every
rank at the same step with the checkpoint saved; a --time limit ends them together; a failure
while evaluating or sampling saves the trained steps first and says how to resume. (Ctrl-C in a
single process: test_train.py.)"""

import json
import math
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tinygen.core.checkpoint import load_model
from tinygen.core.config import ModelConfig
from tinygen.core.model import GPT
from tinygen.training import data as data_lib
from tinygen.training.events import TrainingFailed
from tinygen.training.loop import train
from tinygen.training.settings import TrainSettings
from tinygen.training.state import state_paths
from tinygen.training.stopping import StopFlag

from conftest import STORY_LINES, TINY, clean_env, make_model

CPU = torch.device("cpu")


def _step(out: Path) -> int:
    return json.loads(state_paths(out)[1].read_text())["step"]


# -- one process ----------------------------------------------------------------------------------

def test_a_repeated_signal_within_a_moment_is_the_same_request(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    told = []
    flag = StopFlag(on_request=lambda: told.append(now[0]))
    with flag.installed():
        os.kill(os.getpid(), signal.SIGTERM)  # Ctrl-C on a terminal, then torchrun's SIGTERM
        now[0] += 1.0
        os.kill(os.getpid(), signal.SIGINT)
        assert told == []  # the handler only records: it may have interrupted a write to stderr
        assert flag() and flag() and told == [101.0]  # told once, by the loop's own thread
        now[0] += 5.0
        with pytest.raises(KeyboardInterrupt):  # a later one means now
            flag.request()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("broken", ["evaluation", "sampling"])
def test_a_failed_evaluation_saves_the_trained_steps_first(tmp_path, tokenizer, monkeypatch, broken):
    tokens = data_lib.encode_documents(STORY_LINES * 30, tokenizer)
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.n_vocab)
    out = tmp_path / "m.safetensors"
    settings = TrainSettings(max_steps=8, batch_size=2, eval_every=3, warmup_steps=2, sample_tokens=4)

    def boom(*args, **kwargs):
        raise IndexError("index out of range in self")

    target = "tinygen.training.loop.score_tokens" if broken == "evaluation" else "tinygen.generate.engine.generate_batch"
    with monkeypatch.context() as patch:
        patch.setattr(target, boom)
        with pytest.raises(TrainingFailed, match=rf"{broken} at step 3 failed \(IndexError: index out of range"):
            list(train(make_model(config), tokenizer, tokens, tokens[:300], out, settings, device=CPU))
    assert _step(out) == 3 and load_model(out)[2].provenance["steps"] == 3
    model = GPT(config)
    model.load_state_dict(load_model(out)[0].state_dict())
    list(train(model, tokenizer, tokens, tokens[:300], out, settings, device=CPU, resume=True))
    assert _step(out) == 8


def test_cli_failure_while_sampling_is_one_line_that_says_how_to_resume(tmp_path, corpus):
    patched = tmp_path / "broken_sampler.py"
    patched.write_text("import sys\nimport tinygen.generate.engine as engine\n"
                       "def boom(*args, **kwargs):\n    raise IndexError('index out of range in self')\n"
                       "engine.generate_batch = boom\nfrom tinygen.cli.app import main\nmain()\n")
    args = ["train", str(corpus), "--out", "m.safetensors", *TINY, "--max-steps", "7", "--device", "cpu"]
    r = subprocess.run([sys.executable, str(patched), *args], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=clean_env())
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sampling at step 5 failed (IndexError: index out of range in self); the model "
                           "and its training state at step 5 are saved in m.safetensors; continue with: tinygen "), last
    assert shlex.split(last.split("continue with: ")[1]) == ["tinygen", *args, "--resume"]
    assert _step(tmp_path / "m.safetensors") == 5


# -- under torchrun, on gloo --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Torchrun:
    """`torchrun --nproc_per_node=2 [-m tinygen | script] ARGS`, its stderr read line by line as it comes."""

    def __init__(self, args: list[str], cwd: Path, script: Path | None = None):
        entry = [str(script)] if script else ["-m", "tinygen"]
        self.proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                      f"--master_port={_free_port()}", *entry, *args], cwd=cwd, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                     env=clean_env(OMP_NUM_THREADS="1"))
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stderr], daemon=True).start()

    def wait_for(self, prefix: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return
        self.kill()
        pytest.fail(f"no {prefix!r} line: {''.join(self.seen)[-3000:]}")

    def workers(self) -> dict[str, int]:
        """RANK -> pid of torchrun's worker processes, its children."""
        found = {}
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode().split("\0") if "=" in kv)
                    found[env["RANK"]] = int(proc.name)
            except (OSError, KeyError, ValueError):
                continue
        return found

    def finish(self, timeout: float) -> str:
        """The rest of stderr once torchrun has exited; fails (and kills every worker) if it hangs."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running after {timeout} s: {''.join(self.seen)[-3000:]}")
        time.sleep(0.2)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def test_sigterm_to_one_worker_stops_every_rank_and_resume_runs_to_a_time_limit(tmp_path, corpus):
    args = ["train", str(corpus), "--out", "m.safetensors", *TINY, "--max-steps", "100000", "--device", "cpu"]
    run = _Torchrun(args, tmp_path)
    run.wait_for("step 10 ")
    os.kill(run.workers()["1"], signal.SIGTERM)  # rank 1, which used to die alone and leave rank 0 waiting
    err = run.finish(timeout=60)
    assert run.proc.returncode == 0, err[-3000:]
    stopped = _step(tmp_path / "m.safetensors")
    # The checkpoint keeps the step of the lowest validation loss, perhaps an earlier one, and says so.
    assert "saved m.safetensors at step" in err and f"{stopped} (interrupted)" in err and stopped >= 10
    assert f"torchrun --nproc_per_node=2 -m tinygen {shlex.join(args)} --resume" in err.splitlines()
    # Resume, now to a time limit 3 s past what the run has used, evaluating and sampling at every
    # step: both ranks must see the limit at the same step, or one waits for the other forever.
    limit = math.ceil(json.loads(state_paths(tmp_path / "m.safetensors")[1].read_text())["elapsed"]) + 3
    run = _Torchrun([*args, "--resume", "--time", f"{limit}s", "--eval-every", "1"], tmp_path)
    err = run.finish(timeout=90)
    assert run.proc.returncode == 0, err[-3000:]
    state = json.loads(state_paths(tmp_path / "m.safetensors")[1].read_text())
    # "at step N (final)", or, when an earlier step is kept, "the last step, N (validation loss X) (final)".
    assert f"resuming at step {stopped}" in err
    assert re.search(rf"\b{state['step']} (\(validation loss [\d.]+\) )?\(final\)", err), err[-2000:]
    assert state["step"] > stopped and state["elapsed"] >= limit


def test_a_failure_on_rank_0_stops_every_rank_with_the_steps_saved(tmp_path, corpus):
    script = tmp_path / "broken_sampler.py"
    script.write_text("import tinygen.generate.engine as engine\n"
                      "def boom(*args, **kwargs):\n    raise IndexError('index out of range in self')\n"
                      "engine.generate_batch = boom\nfrom tinygen.cli.app import main\nmain()\n")
    run = _Torchrun(["train", str(corpus), "--out", "m.safetensors", *TINY, "--max-steps", "100", "--device", "cpu"],
                    tmp_path, script=script)
    err = run.finish(timeout=90)
    assert run.proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "sampling at step 5 failed" in errors[0] and "--resume" in errors[0], err[-3000:]
    assert _step(tmp_path / "m.safetensors") == 5
