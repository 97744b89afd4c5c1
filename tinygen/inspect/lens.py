"""The logit lens (nostalgebraist, 2020): read the residual stream as a prediction at every layer.

The model's own output is its final norm and unembedding applied to the residual stream after the
last block. Applying the same two to the stream entering each block shows what the model would
predict if it stopped there: how " Paris" rises, layer by layer, after "The Eiffel Tower is in
the city of". Layer 0 is the embeddings alone; layer n_layer is the model's own output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinygen.inspect.activations import Target, run, sites


@dataclass
class Lens:
    labels: list[str]  # the prompt's tokens
    top_ids: torch.Tensor  # (n_layer + 1, T, k) the likeliest tokens at each layer and position
    top_p: torch.Tensor  # (n_layer + 1, T, k) their probabilities
    target: Target | None = None
    target_p: torch.Tensor | None = None  # (n_layer + 1, T) the target's probability
    target_rank: torch.Tensor | None = None  # (n_layer + 1, T) 1 for the likeliest token

    @property
    def n_layer(self) -> int:
        return self.top_ids.size(0) - 1

    def rows(self, label) -> list[dict]:
        """A JSON row per (layer, position): {"layer", "position", "token", "top": [[text, p], ...],
        "target": {"text", "p", "rank"}}; label(id) gives a token's text."""
        rows = []
        for layer in range(self.n_layer + 1):
            for pos, token in enumerate(self.labels):
                row = {"layer": layer, "position": pos, "token": token,
                       "top": [[label(int(i)), round(float(p), 6)]
                               for i, p in zip(self.top_ids[layer, pos], self.top_p[layer, pos])]}
                if self.target is not None:
                    row["target"] = {"text": self.target.text, "p": round(float(self.target_p[layer, pos]), 6),
                                     "rank": int(self.target_rank[layer, pos])}
                rows.append(row)
        return rows


@torch.inference_mode()
def logit_lens(model, ids: list[int], labels: list[str], target: Target | None = None, k: int = 5) -> Lens:
    """The lens over every layer and position of a prompt."""
    resid = sites(model.config.n_layer, "resid")
    _, seen = run(model, torch.tensor([ids], device=model.device), record=resid)
    top_ids, top_p, target_p, target_rank = [], [], [], []
    for site in resid:
        # Layer by layer, so a 262,144-token vocabulary holds one layer's probabilities at a time.
        probs = model.head(model.transformer.ln_f(seen[site][0])).float().softmax(-1)  # (T, V)
        top = probs.topk(min(k, probs.size(-1)))
        top_ids.append(top.indices.cpu())
        top_p.append(top.values.cpu())
        if target is not None:
            p = probs[:, target.token]
            target_p.append(p.cpu())
            target_rank.append(((probs > p[:, None]).sum(-1) + 1).cpu())
    lens = Lens(labels, torch.stack(top_ids), torch.stack(top_p))
    if target is not None:
        lens.target, lens.target_p, lens.target_rank = target, torch.stack(target_p), torch.stack(target_rank)
    return lens
