"""The learning rate at each step: linear warmup, then warmup-stable-decay or cosine."""

from __future__ import annotations

import math

from tinygen.training.settings import TrainSettings


def lr_at(step: int, progress: float, s: TrainSettings) -> float:
    """Linear warmup, then either cosine from lr down to lr * min_lr_ratio over the rest of the
    budget, or (wsd) lr held until the last `cooldown` of the budget and from there straight down to 0.

    Warmup-stable-decay (Hu et al., MiniCPM; Hägele et al., 2024) matches cosine at the end and
    spends longer at the full lr; progress is a share of steps or of time, so under --time the
    cooldown starts when 1 - cooldown of the time is gone."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.schedule == "wsd":
        return s.lr * min(1.0, max(0.0, (1 - progress) / s.cooldown))
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cosine)
