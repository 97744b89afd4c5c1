"""Attention heads one at a time: what a prediction loses without some of them (ablation), and
which heads do a recognisable job (detection).

Ablation replaces a head's output, before the heads are mixed, with zeros or with its mean over the
prompt's positions (TransformerLens's zero and mean ablation, the mean taken over this prompt
rather than a dataset). Detection scores every head on a token sequence by where its attention
goes, as TransformerLens's head detector does:
- previous-token heads attend to the token just before;
- duplicate-token heads attend to earlier copies of the current token;
- induction heads attend to the token that followed an earlier copy of the current one, which is
  how a model continues a sequence it has seen once ("A B ... A" -> "B").
The default sequence is random tokens repeated once, on which the three kinds separate cleanly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError
from tinygen.inspect.activations import Edit, run

MODES = ("zero", "mean")
DETECTORS = ("previous-token", "duplicate-token", "induction")


def parse_head(text: str, n_layer: int, n_head: int) -> tuple[int, int]:
    """LAYER.HEAD, from 0, as --head takes it."""
    match = re.fullmatch(r"\s*(-?\d+)\s*[.:]\s*(\d+)\s*", text)
    if not match:
        raise TinygenError(f"--head {text!r}: write a head as LAYER.HEAD, e.g. --head 3.1")
    layer, head = int(match[1]), int(match[2])
    if not -n_layer <= layer < n_layer:
        raise TinygenError(f"--head {text}: this model has layers 0..{n_layer - 1}")
    if not 0 <= head < n_head:
        raise TinygenError(f"--head {text}: this model has heads 0..{n_head - 1} in each layer")
    return layer % n_layer, head


@dataclass
class Ablation:
    heads: list[tuple[int, int]]
    mode: str
    before: torch.Tensor  # (V,) next-token probabilities with every head
    after: torch.Tensor  # (V,) ... and with the heads ablated

    def top(self, k: int) -> tuple[list[tuple[int, float, float]], list[tuple[int, float, float]]]:
        """The k likeliest next tokens before and after, each as (id, p before, p after)."""
        def listing(probs: torch.Tensor) -> list[tuple[int, float, float]]:
            ids = probs.topk(min(k, probs.numel())).indices.tolist()
            return [(i, float(self.before[i]), float(self.after[i])) for i in ids]

        return listing(self.before), listing(self.after)


@torch.inference_mode()
def ablate(model, ids: list[int], heads: list[tuple[int, int]], mode: str = "zero") -> Ablation:
    """The next-token distribution with and without the heads."""
    if mode not in MODES:
        raise TinygenError(f"unknown --mode {mode!r}; choose from {', '.join(MODES)}")
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def knock_out(which: list[int]) -> Edit:
        def edit(z: torch.Tensor) -> torch.Tensor:  # (B, T, n_head, head_dim)
            z = z.clone()
            z[:, :, which] = 0 if mode == "zero" else z[:, :, which].mean(1, keepdim=True)
            return z
        return edit

    idx = torch.tensor([ids], device=model.device)
    before, _ = run(model, idx)
    after, _ = run(model, idx, edits={("z", layer): knock_out(which) for layer, which in by_layer.items()})
    return Ablation(list(heads), mode, before[0].softmax(-1).cpu(), after[0].softmax(-1).cpu())


def repeated_random(tokenizer: Tokenizer, vocab_size: int, length: int, batch: int, seed: int) -> list[list[int]]:
    """`batch` sequences of `length` random tokens, each repeated once (after BOS where the model
    expects one); special tokens are never drawn."""
    special = torch.tensor(sorted(tokenizer.special_ids), dtype=torch.long)
    pool = torch.ones(vocab_size, dtype=torch.bool)
    pool[special[special < vocab_size]] = False
    choices = pool.nonzero()[:, 0]
    g = torch.Generator().manual_seed(seed)
    first = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    seqs = []
    for _ in range(batch):
        half = choices[torch.randint(len(choices), (length,), generator=g)].tolist()
        seqs.append(first + half + half)
    return seqs


def detection_masks(ids: list[int]) -> dict[str, torch.Tensor]:
    """For each detector, the keys (T, T) each query should attend to: the token before it; earlier
    copies of it; the tokens after earlier copies of it."""
    t = torch.tensor(ids)
    T = len(ids)
    earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)  # key j < query i
    same = (t[:, None] == t[None, :]) & earlier
    after_copy = torch.zeros(T, T, dtype=torch.bool)
    after_copy[:, 1:] = (t[:, None] == t[None, :-1]) & earlier[:, 1:]  # key j follows a copy of token i
    return {"previous-token": torch.eye(T, dtype=torch.bool).roll(-1, 1).tril(-1),
            "duplicate-token": same, "induction": after_copy}


@dataclass
class HeadScores:
    scores: torch.Tensor  # (len(DETECTORS), n_layer, n_head), each in [0, 1]

    def rows(self) -> list[dict]:
        """A JSON row per head and kind: {"layer", "head", "kind", "score"}."""
        return [{"layer": layer, "head": head, "kind": kind, "score": round(float(self.scores[k, layer, head]), 6)}
                for k, kind in enumerate(DETECTORS) for layer in range(self.scores.size(1))
                for head in range(self.scores.size(2))]

    def top(self, kind: str, n: int) -> list[tuple[int, int, float]]:
        """The n best heads of a kind as (layer, head, score)."""
        grid = self.scores[DETECTORS.index(kind)]
        best = grid.flatten().topk(min(n, grid.numel()))
        return [(*divmod(int(i), grid.size(1)), float(s)) for i, s in zip(best.indices, best.values)]


@torch.inference_mode()
def detect(model, sequences: list[list[int]]) -> HeadScores:
    """Each head's score for each detector: the attention its queries give the keys the detector
    expects, averaged over the queries that have such keys, over every sequence (of one length)."""
    _, atts = model.attention(torch.tensor(sequences, device=model.device))
    pattern = torch.stack([a.float().cpu() for a in atts], 1)  # (B, n_layer, n_head, T, T)
    total = torch.zeros(len(DETECTORS), *pattern.shape[1:3])
    counted = torch.zeros(len(DETECTORS))
    for b, ids in enumerate(sequences):
        for k, mask in enumerate(detection_masks(ids).values()):
            queries = mask.any(1)
            if not queries.any():
                continue
            mass = (pattern[b] * mask).sum(-1)[..., queries]  # (n_layer, n_head, queries)
            total[k] += mass.sum(-1)
            counted[k] += int(queries.sum())
    if not bool((counted > 0).all()):
        missing = [kind for kind, c in zip(DETECTORS, counted) if c == 0]
        raise TinygenError(f"the text cannot score {' or '.join(missing)} heads: no token in it has what they look "
                           "for; give a longer text in which tokens come back, or leave --text out for random "
                           "repeated tokens")
    return HeadScores(total / counted[:, None, None])
