"""A run's evaluations, and what follows from them: which weights the checkpoint at --out keeps
(the lowest validation loss, or the last), whether overfitting is named, and whether the run ends
before its budget (patience, early_stop).

Rank 0 keeps the record and the loop (loop.py) saves it in the state file, so that a resumed run
keeps the same best, warns once and counts patience as the uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from tinygen.training.events import Overfit
from tinygen.training.settings import TrainSettings

# Evaluations per pass over the training tokens, when --eval-every is not given: small data overfits
# within a few passes, and an evaluation only every EVAL_EVERY_MOST steps would see it too late.
# On a text of a few steps a pass, every EVAL_EVERY_LEAST steps: evaluating at every step costs a
# good share of the run, and patience counted in single steps stops at the first noisy pause.
EVALS_PER_PASS = 4
EVAL_EVERY_MOST = 250
EVAL_EVERY_LEAST = 4


def eval_interval(train_tokens: int, tokens_per_step: int) -> int:
    """Steps between evaluations: a few per pass over the training tokens, within
    [EVAL_EVERY_LEAST, EVAL_EVERY_MOST]."""
    return max(EVAL_EVERY_LEAST, min(EVAL_EVERY_MOST, round(train_tokens / tokens_per_step / EVALS_PER_PASS)))


@dataclass
class EvalRecord:
    best: dict | None = None  # {"step", "val_loss"} of the lowest validation loss so far
    kept_step: int | None = None  # the step of the weights at --out
    evals: list = field(default_factory=list)  # [step, validation loss, mean training loss since the one before]
    train_sum: float = 0.0  # training losses since the last evaluation, for that mean
    train_n: int = 0
    overfit_at: int | None = None  # where overfitting was named (once a run)
    halted: str | None = None  # why the run ends before its budget: "patience" or "overfitting"

    @classmethod
    def from_state(cls, meta: dict) -> EvalRecord:
        return cls(**{f.name: meta[f.name] for f in fields(cls) if f.name in meta})

    def to_state(self) -> dict:
        return asdict(self)

    def trained(self, loss: float) -> None:
        self.train_sum += loss
        self.train_n += 1

    def judge(self, step: int, val_loss: float | None, s: TrainSettings, train_tokens: int
              ) -> tuple[bool, Overfit | None]:
        """This evaluation against the run's earlier ones: whether it is the lowest validation loss
        yet, and overfitting when it is named (validation rising at two evaluations in a row while
        the mean training loss fell). Decides whether the run ends here."""
        if val_loss is None:  # no validation: nothing to keep by, so the last step is kept
            return True, None
        if self.evals and self.evals[-1][0] == step:  # judged already (a final evaluation after a halt)
            return False, None
        self.evals.append([step, val_loss, self.train_sum / self.train_n if self.train_n else None])
        self.train_sum, self.train_n = 0.0, 0
        improved = self.best is None or val_loss < self.best["val_loss"]
        if improved:
            self.best = {"step": step, "val_loss": val_loss}
        # Patience counts from the end of warmup: before the learning rate has peaked, a pause in
        # the loss's fall says nothing about where it will end.
        since = max(self.best["step"], s.warmup_steps)
        if s.patience and sum(1 for e in self.evals if e[0] > since) >= s.patience:
            self.halted = self.halted or "patience"
        if self.overfit_at is not None or len(self.evals) < 3:
            return improved, None
        (_, v0, t0), (_, v1, t1), (_, v2, t2) = self.evals[-3:]
        if not (v0 < v1 < v2 and None not in (t0, t1, t2) and t0 > t1 > t2):
            return improved, None
        self.overfit_at = step
        if s.early_stop:
            self.halted = "overfitting"
        return improved, Overfit(step, self.best["step"], self.best["val_loss"], val_loss, t2, train_tokens,
                                 s.early_stop)

    def kept_val(self, last_step: int, last_val: float | None) -> float | None:
        """The validation loss of the weights at --out, as its evaluation scored them."""
        if self.kept_step == last_step:
            return last_val
        return next((v for step, v, _ in self.evals if step == self.kept_step), None)
