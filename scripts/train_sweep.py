"""A sweep of `tinygen train` settings on one corpus at one time budget: each setting trains for the
same wall-clock time (keeping its best checkpoint), and the kept model is scored on the run's own
validation text in bits per byte. Rows go to a JSON-lines file, one per run, so that a sweep cut
short keeps what it finished and a rerun skips those.

    python scripts/train_sweep.py CORPUS --time 5m --out sweep.jsonl [--grid default|small]

What it measures is what docs/training.md's table of corpus size against plan reports: the best
setting per corpus and budget, against the plan's default and against fixed defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRIDS = {
    # preset x dropout x weight decay: what a small text's best model depends on most.
    "default": {"preset": ["tiny", "mini", "small"], "dropout": [0.0, 0.1, 0.2], "weight_decay": [0.1, 0.2]},
    "small": {"preset": ["tiny", "mini"], "dropout": [0.0, 0.2], "weight_decay": [0.1]},
}


def settings(grid: str) -> list[dict]:
    axes = GRIDS[grid]
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def run(corpus: Path, setting: dict, budget: str, workdir: Path) -> dict:
    out = workdir / "m.safetensors"
    for old in workdir.glob("m.safetensors*"):
        old.unlink()
    args = [sys.executable, "-m", "tinygen", "train", str(corpus), "--out", str(out), "--time", budget,
            "--device", "cpu", "--force", "--preset", setting["preset"], "--dropout", str(setting["dropout"]),
            "--weight-decay", str(setting["weight_decay"])]
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    state = json.loads(out.with_name(out.name + ".state.json").read_text())
    metrics = [json.loads(line) for line in out.with_name(out.name + ".metrics.jsonl").read_text().splitlines()]
    bpb = {m["step"]: m["val_bpb"] for m in metrics if m.get("val_bpb") is not None}
    best = state["best"]
    return {"kept_step": state["kept_step"], "steps": state["step"], "tokens_seen": state["tokens_seen"],
            "val_loss": best["val_loss"], "val_bpb": bpb.get(best["step"]),
            "final_val_loss": state["last"].get("val_loss"), "seconds": round(time.monotonic() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--time", default="5m", help="each run's budget, as `tinygen train --time` takes it")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, appended to")
    ap.add_argument("--grid", choices=GRIDS, default="default")
    a = ap.parse_args()
    done = set()
    if a.out.exists():
        done = {json.dumps(r["setting"], sort_keys=True) for r in map(json.loads, a.out.read_text().splitlines())
                if r["corpus"] == str(a.corpus) and r["time"] == a.time}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings(a.grid):
            if json.dumps(setting, sort_keys=True) in done:
                continue
            row = {"corpus": str(a.corpus), "bytes": a.corpus.stat().st_size, "time": a.time, "setting": setting,
                   **run(a.corpus, setting, a.time, Path(tmp))}
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
