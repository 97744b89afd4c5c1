"""A run's metrics, `<out>.metrics.jsonl`: one JSON row per optimizer step (train loss, lr, tokens,
throughput, time) and one per evaluation (val loss, bits per byte).

The training loop writes it on rank 0, so a library caller of `train()` gets it as the CLI does.
A fresh run starts the file anew; a resumed run drops the rows after the step it resumes from,
which an interrupted run may have logged after its last save.
"""

from __future__ import annotations

import json
from pathlib import Path


def metrics_path(out: Path) -> Path:
    return out.with_name(out.name + ".metrics.jsonl")


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    def __init__(self, out: Path):
        self.path = metrics_path(out)

    def start(self, resumed_step: int) -> None:
        if resumed_step == 0:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= resumed_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict) -> None:
        # Appended and closed row by row, so that a run killed mid-way keeps what it logged.
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
