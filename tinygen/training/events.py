"""What `train` tells its caller: the events it yields on rank 0 (Start, then Step, Eval and Saved
as they happen, Overfit once if it comes to that, Kept at the end) and the error it raises when
rank 0's evaluation, sampling or save failed.

The library never prints; the command line turns these into its display (cli/progress.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tinygen.errors import TinygenError


@dataclass
class Start:
    params: int
    tokens_per_step: int
    accum_steps: int
    world_size: int
    train_tokens: int
    val_tokens: int
    resumed_step: int
    device: str
    dtype: str  # "float32", or "bfloat16" (autocast over float32 weights)


@dataclass
class Step:
    step: int
    loss: float
    lr: float
    tokens_seen: int
    tokens_per_s: float
    mfu: float | None
    elapsed: float
    progress: float  # fraction of the budget used, 0..1


@dataclass
class Eval:
    step: int
    val_loss: float | None
    val_bpb: float | None
    sample: list[int] = field(default_factory=list)


@dataclass
class Overfit:
    """Validation loss has risen at two evaluations in a row while the training loss fell."""

    step: int
    since: int  # the step of the lowest validation loss
    best_val: float
    val: float
    train_loss: float  # the mean training loss since the evaluation before
    train_tokens: int
    stopping: bool  # --early-stop: the run ends here


@dataclass
class Kept:
    """What the checkpoint at --out holds when the run ends: the weights of `step`."""

    step: int
    val_loss: float | None  # as scored at that step's evaluation; None without validation
    rule: str  # "best": the lowest validation loss; "last": the last step
    last_step: int
    last_val: float | None
    evaluations: int
    halted: str | None  # why the run ended before its budget: "patience" or "overfitting"


@dataclass
class Saved:
    path: Path
    step: int
    reason: str  # "eval", "final", "interrupted", "error" (on the way out after a failure)


class TrainingFailed(TinygenError):
    """Rank 0's evaluation, sampling or save failed mid-run, and every rank stopped with it. The
    trained steps were saved on the way out when that could still be done (saved_step; -1: never)."""

    def __init__(self, doing: str, cause: Exception, out: Path, saved_step: int):
        why = str(cause) if isinstance(cause, TinygenError) else f"{type(cause).__name__}: {cause}"
        kept = (f"the model and its training state at step {saved_step} are saved in {out}" if saved_step >= 0
                else "nothing could be saved")
        super().__init__(f"{doing} failed ({why}); {kept}")
        self.saved_step = saved_step
