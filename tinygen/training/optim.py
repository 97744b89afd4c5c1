"""The optimizers `train` can use: AdamW for every parameter, or (the default where torch has it)
Muon for the matrices inside the transformer blocks and AdamW for the rest, as nanochat and
modded-nanogpt do. Their names and default learning rates are in settings.py.

Muon orthogonalizes each matrix's momentum, which suits the blocks' hidden maps from activations
to activations. The embeddings, the output head, the norms and the biases are not such maps, and
torch's Muon takes only 2-D tensors anyway, so they stay with AdamW. The pair runs as one
`Combined` optimizer, so the loop's schedule, its step and the state file (state.py) treat either
choice the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tinygen.errors import TinygenError

if TYPE_CHECKING:
    from tinygen.core.model import GPT
    from tinygen.training.settings import TrainSettings


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


def orthogonalized(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                   eps: float) -> torch.Tensor:
    """The Newton-Schulz quintic torch's Muon runs (Keller Jordan's), in float32 rather than bf16:
    roughly U Vᵀ of update's SVD, with singular values left somewhere near 1."""
    a, b, c = coefficients
    x = update.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # the spectral norm is at most the Frobenius norm: now at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Float32Muon(torch.optim.Muon if hasattr(torch.optim, "Muon") else torch.optim.Optimizer):
    """torch's Muon (its groups, defaults and state: a "momentum_buffer" per matrix, so state files
    are interchangeable), with the orthogonalization in float32.

    torch's step always orthogonalizes in bf16, which a CPU without bf16 instructions emulates many
    times slower than float32 (docs/speed.md). Only the update's lr scale "match_rms_adamw" is
    implemented, the one make_optimizer asks for."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["adjust_lr_fn"] != "match_rms_adamw":
                raise ValueError("Float32Muon scales its updates as match_rms_adamw only")
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalized(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                # As torch's _adjust_lr: an orthogonal update's RMS is 1/sqrt(max(A, B)); AdamW's is about 0.2.
                p.add_(update, alpha=-lr * 0.2 * max(p.shape) ** 0.5)


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
    if not hasattr(torch.optim, "Muon"):
        raise TinygenError(f"--optimizer muon needs torch 2.9 or newer (this is {torch.__version__})")
    # On every CPU, not only those without bf16 instructions (where bf16 is emulated): the
    # orthogonalization is a small share of a CPU step, it then does not depend on the CPU's bf16
    # support, and two DDP ranks end where one process does (in bf16 the all-reduce's summation
    # order flips roundings).
    muon_class = Float32Muon if device.type == "cpu" else torch.optim.Muon
    muon = muon_class(hidden, lr=s.lr, weight_decay=s.weight_decay, adjust_lr_fn="match_rms_adamw")
    return Combined(_adamw([p for p in model.parameters() if id(p) not in taken], s, device), muon)


def _adamw(params: list[torch.nn.Parameter], s: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on matrices (and the embedding) only: decaying gains and biases just hurts."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused on a CPU too: one kernel over every tensor, several times faster than the foreach path
    # on small models (docs/speed.md).
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, fused=device.type in ("cuda", "cpu"))
