"""Causal tracing and activation patching: which hidden states carry what a prediction needs.

Both run a prompt in a broken form, then restore one activation at a time from a clean run and
measure how much of the clean prediction comes back:
- tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME) breaks the
  prompt by adding Gaussian noise to the subject's token embeddings, and scores the target token's
  probability;
- patching breaks it by running a second prompt of the same length in tokens ("The Colosseum is
  in" for "The Eiffel Tower is in"), and scores the logit difference between the target and a
  foil (TransformerLens's get_act_patch_*).

A restored cell is the residual stream entering a layer ("resid"), or what that layer's attention
or MLP adds to it ("attn", "mlp"), at one position. The cells of one layer and kind are one batched
pass, a row per position (and noise sample), started at that layer from the broken run's residual
stream: the layers before it are the same in every row and are not run again. A position before
the first token the break changes is the same in both runs, so restoring it changes nothing: it
gets the broken run's score without a pass.
"""

from __future__ import annotations

from collections.abc import Callable
import copy
from dataclasses import dataclass, field

import torch

from tinygen.errors import TinygenError
from tinygen.core.kvcache import CacheSlots, KVCache
from tinygen.inspect.activations import Edit, Site, Target, embedding_std, put, run

KINDS = ("resid", "mlp", "attn")
NOISE_SCALE = 3.0  # ROME's: three times the embeddings' standard deviation
MAX_ROWS = 64  # rows of one batched pass: enough to keep the matrix products busy, little memory

Metric = Callable[[torch.Tensor], torch.Tensor]  # last-position logits (B, V) -> a score per row (B,)
Progress = Callable[[int, int], None]  # (passes done, passes in all)


@dataclass
class Grid:
    """One kind's restored runs."""

    kind: str
    scores: torch.Tensor  # (n_layer, T): the metric with that layer's activation at that position restored
    recovered: torch.Tensor  # (n_layer, T): (score - broken) / (clean - broken); 1 brings all of it back

    def peak(self) -> tuple[int, int]:
        """(layer, position) of the cell that brings most back."""
        layer, pos = divmod(int(self.recovered.argmax()), self.recovered.size(1))
        return layer, pos


@dataclass
class Experiment:
    """What trace and patch report: the metric on the clean and broken runs, and a grid per kind."""

    clean: float
    broken: float
    metric: str  # what the scores are, in words
    grids: dict[str, Grid] = field(default_factory=dict)
    passes: int = 0  # batched forward passes, the clean and broken runs included

    def rows(self, labels: list[str]) -> list[dict]:
        """A JSON row per cell: {"layer", "position", "token", "kind", "score", "recovered"}; labels:
        the broken prompt's tokens."""
        return [{"layer": layer, "position": pos, "token": labels[pos], "kind": kind,
                 "score": round(float(g.scores[layer, pos]), 6), "recovered": round(float(g.recovered[layer, pos]), 6)}
                for kind, g in self.grids.items() for layer in range(g.scores.size(0))
                for pos in range(g.scores.size(1))]


def probability(target: Target) -> Metric:
    return lambda logits: logits.softmax(-1)[:, target.token]


def logit_difference(target: Target, foil: Target) -> Metric:
    return lambda logits: logits[:, target.token] - logits[:, foil.token]


def restorable(n_layer: int, kinds: tuple[str, ...]) -> list[Site]:
    return [(kind, layer) for kind in kinds for layer in range(n_layer)]


def check_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise TinygenError(f"unknown --kind {unknown[0] if unknown else ''!r}; choose from {', '.join(KINDS)}")
    return tuple(dict.fromkeys(kinds))


def trace(model, ids: list[int], subject: range, target: Target, kinds: tuple[str, ...] = KINDS, samples: int = 1,
          seed: int = 0, window: int = 1, progress: Progress | None = None) -> Experiment:
    """Causal tracing: the target's probability with noise on the subject's embeddings (`samples`
    draws, seeded), and with each clean activation restored."""
    T, n_layer = len(ids), model.config.n_layer
    metric = probability(target)
    idx = torch.tensor([ids], device=model.device)
    clean_logits, clean = run(model, idx, record=restorable(n_layer, kinds))
    std = embedding_std(model)
    noise = torch.randn(samples, len(subject), model.config.n_embd, generator=torch.Generator().manual_seed(seed))
    noise = (NOISE_SCALE * std * noise).to(model.device)

    def add_noise(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, subject.start:subject.stop] += noise.to(x.dtype)
        return x

    broken = Broken(model, idx.expand(samples, T), edits={("resid", 0): add_noise})
    experiment = Experiment(float(metric(clean_logits)[0]), float(metric(broken.logits).mean()),
                            f"p({target.text!r})", passes=2)
    _restore(model, ids, {s: a[0] for s, a in clean.items()}, broken, metric, kinds, subject.start, window,
             experiment, progress)
    return experiment


def patch(model, clean_ids: list[int], broken_ids: list[int], target: Target, foil: Target,
          kinds: tuple[str, ...] = KINDS, window: int = 1, progress: Progress | None = None) -> Experiment:
    """Activation patching: the target-minus-foil logit difference on the broken prompt, and with
    each activation of the clean prompt patched in."""
    n_layer = model.config.n_layer
    metric = logit_difference(target, foil)
    clean_logits, clean = run(model, torch.tensor([clean_ids], device=model.device),
                              record=restorable(n_layer, kinds))
    broken = Broken(model, torch.tensor([broken_ids], device=model.device))
    experiment = Experiment(float(metric(clean_logits)[0]), float(metric(broken.logits)[0]),
                            f"logit({target.text!r}) - logit({foil.text!r})", passes=2)
    first = next(i for i, (a, b) in enumerate(zip(clean_ids, broken_ids)) if a != b)
    _restore(model, broken_ids, {s: a[0] for s, a in clean.items()}, broken, metric, kinds, first, window,
             experiment, progress)
    return experiment


def _restore(model, ids: list[int], clean: dict[Site, torch.Tensor], broken: Broken, metric: Metric,
             kinds: tuple[str, ...], first: int, window: int, experiment: Experiment,
             progress: Progress | None) -> None:
    """Fill experiment.grids: the metric with clean[site][position] restored into the broken runs.

    clean: each restorable site's clean activation (T, ...); first: the first position the break
    changes; window: MLP and attention outputs restored over this many layers around each."""
    S, T, n_layer = broken.samples, len(ids), model.config.n_layer
    chunks = broken.chunks(first, T)
    total, done = n_layer * len(chunks), 0
    scores = {kind: torch.full((n_layer, T), experiment.broken) for kind in kinds}
    for layer in range(n_layer):
        for positions in chunks:
            # One pass for every kind: a block of rows per kind, a row per position and noise sample.
            start, n = broken.start_of(positions), len(positions) * S
            rows = positions.repeat_interleave(S)
            samples = torch.arange(S).repeat(len(positions) * len(kinds))
            spans = {kind: _window(kind, layer, window, n_layer) for kind in kinds}
            edits = {(kind, j): put(torch.arange(i * n, (i + 1) * n), rows - start, clean[(kind, j)][rows])
                     for i, kind in enumerate(kinds) for j in spans[kind]}
            logits = broken.run_from(model, ids, min(r.start for r in spans.values()), start, samples, edits)
            values = metric(logits).float().cpu().view(len(kinds), len(positions), S).mean(2)
            for kind, v in zip(kinds, values):
                scores[kind][layer, positions] = v
            done += 1
            if progress is not None:
                progress(done, total)
    span = experiment.clean - experiment.broken
    for kind in kinds:
        recovered = (scores[kind] - experiment.broken) / span if span else torch.zeros(n_layer, T)
        experiment.grids[kind] = Grid(kind, scores[kind], recovered)
    experiment.passes += done


def _window(kind: str, layer: int, window: int, n_layer: int) -> range:
    """The layers restored for a cell: ROME restores an MLP or attention output over a window of
    layers centred on the cell's, since one layer's alone moves the prediction little."""
    if kind == "resid":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(n_layer, layer - (-window // 2)))


class Broken:
    """The broken runs (a row per noise sample) as the restored runs start from them: the residual
    stream entering each layer, and every layer's keys and values. A restored run at position p
    changes nothing before p, so it runs positions p and later only, reading the earlier positions'
    keys and values from the broken run's cache; rows are grouped into a few chunks by position,
    few enough to keep each pass's batch large."""

    CHUNKS = 4

    def __init__(self, model, idx: torch.Tensor, edits: dict[Site, Edit] | None = None):
        self.samples, T = idx.shape
        cfg = model.config
        # A sliding layer's ring that has wrapped no longer holds the early positions a chunk reads.
        self.cached = not cfg.sliding_window or T <= cfg.sliding_window
        self.cache = KVCache(cfg, self.samples, model.device, model.dtype, T) if self.cached else None
        slots = CacheSlots(self.cache, torch.arange(T, device=model.device), T) if self.cached else None
        self.logits, seen = run(model, idx, record=restorable(cfg.n_layer, ("resid",)), edits=edits, slots=slots)
        self.resid = [seen[("resid", layer)] for layer in range(cfg.n_layer)]

    def chunks(self, first: int, T: int) -> list[torch.Tensor]:
        positions = torch.arange(first, T)
        return list(positions.tensor_split(min(self.CHUNKS if self.cached else 1, len(positions))))

    def start_of(self, positions: torch.Tensor) -> int:
        """The first position a chunk's pass runs: its own first, or 0 without the cache."""
        return int(positions[0]) if self.cached else 0

    def run_from(self, model, ids: list[int], layer: int, start: int, samples: torch.Tensor,
                 edits: dict[Site, Edit]) -> torch.Tensor:
        """Last-position logits of rows of the given samples, run from `layer` at positions start
        and later, with the edits (whose positions count from start)."""
        T, device = len(ids), model.device
        idx = torch.tensor([ids[start:]], device=device).expand(len(samples), T - start)
        slots = None
        if self.cached:
            cache = copy.copy(self.cache)
            cache.select(samples.to(device))
            mask = torch.ones(T - start, T, dtype=torch.bool, device=device).tril(start)[None, None]
            slots = CacheSlots(cache, torch.arange(start, T, device=device), T, mask)
        resid = self.resid[layer][samples.to(device), start:]
        logits, _ = run(model, idx, edits=edits, start=(layer, resid), slots=slots)
        return logits
