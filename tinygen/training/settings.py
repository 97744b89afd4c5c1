"""What a training run is asked to be: `Recipe`, `tinygen train`'s flags as typed, and
`TrainSettings`, the part of them the loop reads, each checked as it is made.

Plain data below the modules that act on it: recipe.py and resume.py read a Recipe, optim.py and
loop.py read TrainSettings, and none of them is imported here. The optimizers' names and default
learning rates live here too, because a TrainSettings is not valid without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinygen.core.tokenizer import EOT
from tinygen.errors import TinygenError

SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")
KEEPS = ("best", "last")
# Each optimizer's default --lr, the best of a sweep on the bundled model's data and shape (README,
# "A faster recipe"): Muon's orthogonal steps stay stable at a learning rate that makes AdamW diverge.
DEFAULT_LR = {"adamw": 1e-3, "muon": 1.2e-2}


def default_optimizer() -> str:
    """Muon where torch has it (2.9 and newer), else AdamW."""
    return "muon" if hasattr(torch.optim, "Muon") else "adamw"


@dataclass
class TrainSettings:
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None  # seconds
    batch_size: int = 32  # sequences per micro-batch on each process
    batch_tokens: int | None = None  # tokens per optimizer step over all processes; default: one micro-batch each
    lr: float | None = None  # None: the optimizer's own default (DEFAULT_LR)
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 20
    schedule: str = "wsd"  # warmup, stable at lr, then a linear cooldown to 0; or "cosine" (schedule.lr_at)
    cooldown: float = 0.2  # wsd: the share of the budget spent cooling down
    weight_decay: float = 0.1  # decoupled, on matrices and the embedding; Muon's matrices too
    # "muon": Muon for the blocks' matrices, AdamW for the rest (optim.py); or "adamw". None: muon
    # where torch has it.
    optimizer: str | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int | None = None  # None: a few times per pass over the training tokens (loop.eval_interval)
    eval_tokens: int = 200_000  # validation tokens scored per eval (all of them if fewer)
    sample_tokens: int = 48  # length of the sample shown at each eval; 0 turns samples off
    seed: int = 1337
    compile: bool = False
    dtype: str = "auto"  # what the forward and backward compute in (precision.training_dtype)
    keep: str = "best"  # the checkpoint at --out: the weights of the lowest validation loss so far, or the last
    patience: int | None = None  # stop after this many evaluations without a new lowest validation loss
    early_stop: bool = False  # stop where overfitting is named (validation rising twice while training falls)

    def __post_init__(self):
        if not (self.max_steps or self.max_tokens or self.max_time):
            raise TinygenError("say when to stop: --max-steps, --tokens or --time")
        for name in ("batch_size", "eval_every", "patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TinygenError(f"--{name.replace('_', '-')} must be at least 1")
        if self.keep not in KEEPS:
            raise TinygenError(f"unknown --keep {self.keep!r}; choose from {', '.join(KEEPS)}")
        if self.optimizer is None:
            self.optimizer = default_optimizer()
        if self.optimizer not in OPTIMIZERS:
            raise TinygenError(f"unknown --optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        if not self.lr > 0:
            raise TinygenError(f"--lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise TinygenError(f"unknown --schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if not 0 < self.cooldown <= 1:
            raise TinygenError(f"--cooldown is a share of the budget, above 0 and at most 1; got {self.cooldown}")


@dataclass
class Recipe:
    """A run as `tinygen train`'s flags describe it. `given` names the fields the user typed: on
    --resume the others come from the saved run, and the typed ones are checked against it."""

    data: list[str]
    out: Path
    preset: str | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    arch: str = "rope"
    dropout: float = 0.0
    # The speedrun switches, named as ModelConfig's fields (resume.SWITCH_FIELDS).
    qk_norm: bool | None = None  # None: on for the rope arch
    mlp: str | None = None
    tie_embeddings: bool = True
    logit_softcap: float | None = None
    value_embeds: int = 0
    vocab_size: int = 4096
    tokenizer: str | None = None
    init: str | None = None
    chat: bool = False
    val_fraction: float = 0.05
    separator: str = EOT
    train: dict = field(default_factory=dict)  # TrainSettings fields; the stop limits may be None
    resume: bool = False
    force: bool = False
    given: frozenset[str] = frozenset()
