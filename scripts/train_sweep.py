"""A sweep of `tinygen train` settings on one corpus at one time budget: each setting trains for the
same time on this CPU (keeping its best checkpoint), and the kept model is scored on the run's own
validation text in bits per byte. Rows go to a JSON-lines file, one per run, so that a sweep cut
short keeps what it finished and a rerun skips those.

    python scripts/train_sweep.py DATA... --name NAME --time 2m --out sweep.jsonl [--grid default] [--threads 1]

The budget is turned into training tokens per setting from a calibration (each preset and vocabulary's
training tokens per second on this machine, measured once, alone, and kept in the same file), so
that a run's result does not depend on what else the machine was doing meanwhile and two sweeps
can share it. `--fixed` adds the row of the flags' defaults before the plan (training/plan.py)
existed. `--time default` gives no budget at all, so that each run follows the plan's own budget
and patience; `--only '{}'` is then the plan as it stands.

What it measures is what docs/training.md's table of corpus size against plan reports: the best
setting per corpus and budget, against the plan and against the fixed defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

GRIDS = {
    # What a small text's best model depends on most: size, dropout, and the vocabulary, whose rare
    # tokens a small text cannot teach.
    "default": {"preset": ["tiny", "mini"], "dropout": [0.0, 0.2], "vocab_size": [1024, 4096]},
    "wide": {"preset": ["tiny", "mini", "small"], "dropout": [0.0, 0.1, 0.2], "vocab_size": [1024, 2048, 4096]},
}
FIXED = {"preset": "tiny", "dropout": 0.0, "vocab_size": 4096}  # the defaults before the plan
CALIBRATION_STEPS = 14


def settings(grid: str) -> list[dict]:
    axes = GRIDS[grid]
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def train(data: list[str], setting: dict, budget: list[str], workdir: Path, threads: int) -> tuple[Path, float]:
    """One `tinygen train` run in workdir (whose token and tokenizer cache later runs share)."""
    out = workdir / "m.safetensors"
    for old in workdir.glob("m.safetensors*"):
        old.unlink()
    args = [sys.executable, "-m", "tinygen", "train", *data, "--out", str(out), *budget, "--device", "cpu",
            "--force"]
    for name, value in setting.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return out, time.monotonic() - start


def calibrate(data: list[str], preset: str, vocab: int, workdir: Path, threads: int) -> float:
    """Training tokens per second of this preset and vocabulary here: the median step after the first few."""
    out, _ = train(data, {"preset": preset, "vocab_size": vocab, "eval_every": 10_000, "keep": "last"},
                   ["--max-steps", str(CALIBRATION_STEPS)], workdir, threads)
    rows = [json.loads(line) for line in out.with_name(out.name + ".metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 4)


def result(out: Path) -> dict:
    state = json.loads(out.with_name(out.name + ".state.json").read_text())
    metrics = [json.loads(line) for line in out.with_name(out.name + ".metrics.jsonl").read_text().splitlines()]
    bpb = {m["step"]: m["val_bpb"] for m in metrics if m.get("val_bpb") is not None}
    best = state["best"]
    with safe_open(out, "pt") as f:
        provenance = json.loads(f.metadata()["provenance"])
    return {"kept_step": state["kept_step"], "steps": state["step"], "tokens_seen": state["tokens_seen"],
            "train_tokens": provenance["train_tokens"], "plan": provenance.get("plan"),
            "val_loss": best["val_loss"], "val_bpb": bpb.get(best["step"]),
            "final_val_loss": state["last"].get("val_loss")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", help="files, folders or globs, as `tinygen train` takes them")
    ap.add_argument("--name", help="the corpus's name in the rows (default: the data as typed)")
    ap.add_argument("--time", default="3m", help="each run's budget on this CPU: 90s, 3m; or default, none typed")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, appended to")
    ap.add_argument("--grid", choices=GRIDS, default="default")
    ap.add_argument("--only", action="append", default=[], help="run only the settings of this JSON object")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fixed", action="store_true", help="add the row of the pre-plan defaults")
    ap.add_argument("--calibrate", action="store_true", help="only measure the grid's speeds (do it alone)")
    a = ap.parse_args()
    # "default": no budget flag, so that the run follows the plan's own budget and patience.
    budget_s = None if a.time == "default" else float(a.time[:-1]) * {"s": 1, "m": 60, "h": 3600}[a.time[-1]]
    name = a.name or " ".join(a.data)
    rows = [json.loads(line) for line in a.out.read_text().splitlines()] if a.out.exists() else []
    speed = {(r["preset"], r["vocab_size"]): r["tokens_per_s"] for r in rows
             if r.get("calibration") and r["threads"] == a.threads}
    done = {json.dumps(r["setting"], sort_keys=True) for r in rows
            if r.get("corpus") == name and r.get("time") == a.time}
    todo = [json.loads(s) for s in a.only] or settings(a.grid) + ([FIXED] if a.fixed else [])
    todo = list({json.dumps(s, sort_keys=True): s for s in todo}.values())

    def emit(row: dict) -> None:
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for setting in todo:
            if json.dumps(setting, sort_keys=True) in done:
                continue
            key = (setting.get("preset"), setting.get("vocab_size"))
            if budget_s is None:
                row = {"corpus": name, "time": a.time, "setting": setting}
                out, seconds = train(a.data, setting, [], Path(tmp), a.threads)
                emit({**row, **result(out), "seconds": round(seconds, 1)})
                continue
            if key not in speed:
                speed[key] = calibrate(a.data, *key, Path(tmp), a.threads)
                emit({"calibration": True, "preset": key[0], "vocab_size": key[1], "threads": a.threads,
                      "tokens_per_s": speed[key]})
            if a.calibrate:
                continue
            tokens = round(budget_s * speed[key])
            row = {"corpus": name, "time": a.time, "setting": setting, "budget_tokens": tokens}
            try:
                out, seconds = train(a.data, setting, ["--tokens", str(tokens)], Path(tmp), a.threads)
                row.update(result(out), seconds=round(seconds, 1))
            except RuntimeError as e:
                row["error"] = str(e)
            emit(row)


if __name__ == "__main__":
    main()
