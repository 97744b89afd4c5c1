"""The optimizers `train` can use: AdamW for every parameter (the default), or Muon for the
matrices inside the transformer blocks and AdamW for the rest, as nanochat and modded-nanogpt do.

Muon orthogonalizes each matrix's momentum, which suits the blocks' hidden maps from activations
to activations. The embeddings, the output head, the norms and the biases are not such maps, and
torch's Muon takes only 2-D tensors anyway, so they stay with AdamW. The pair runs as one
`Combined` optimizer, so the loop's schedule, its step and the state file (state.py) treat either
choice the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tinygen.core.model import GPT
    from tinygen.training.loop import TrainSettings

OPTIMIZERS = ("adamw", "muon")


class Combined:
    """Optimizers over disjoint parameters, seen as one. `param_groups` is all their groups in
    order (the live dicts, so setting a group's lr reaches its optimizer). The state dict numbers
    the parameters straight through them, the first optimizer's 0..n-1 and the next's from n, as
    one optimizer over all their groups would: the state file's `opt.{pid}` ids stay unique and
    the same from save to load."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({pid + offset: st for pid, st in sd["state"].items()})
            groups += [{**g, "params": [pid + offset for pid in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError(f"the state has {len(sd['param_groups'])} parameter groups, the optimizer "
                             f"{len(self.param_groups)}")
        start = offset = 0
        for opt in self.optimizers:
            mine = sd["param_groups"][start : start + len(opt.param_groups)]
            ids = [pid for g in mine for pid in g["params"]]
            opt.load_state_dict({"state": {pid - offset: sd["state"][pid] for pid in ids if pid in sd["state"]},
                                 "param_groups": [{**g, "params": [pid - offset for pid in g["params"]]}
                                                  for g in mine]})
            start += len(mine)
            offset += len(ids)


def make_optimizer(model: GPT, s: TrainSettings, device: torch.device) -> torch.optim.Optimizer | Combined:
    """AdamW over everything, or (s.optimizer "muon") Muon over the blocks' matrices and AdamW over
    the rest. A tied head is the embedding's own parameter, which model.parameters() yields once."""
    if s.optimizer == "adamw":
        return _adamw(list(model.parameters()), s, device)
    hidden = [p for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2]
    taken = {id(p) for p in hidden}
    # One --lr for both: "match_rms_adamw" (Moonshot, "Muon is Scalable for LLM Training") scales
    # each matrix's orthogonalized update to the RMS an AdamW update has, so the lr and weight decay
    # tuned for AdamW carry over and the warmup and decay apply to both alike. The alternative, a
    # second lr near nanochat's 0.02, would be one more flag to tune and to keep on --resume.
    muon = torch.optim.Muon(hidden, lr=s.lr, weight_decay=s.weight_decay, adjust_lr_fn="match_rms_adamw")
    return Combined(_adamw([p for p in model.parameters() if id(p) not in taken], s, device), muon)


def _adamw(params: list[torch.nn.Parameter], s: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on matrices (and the embedding) only: decaying gains and biases just hurts."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, fused=device.type == "cuda")
