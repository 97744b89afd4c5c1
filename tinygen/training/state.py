"""A run's resumable state beside its checkpoint: `<out>.state.safetensors` (optimizer moments, RNG
states, and the last weights when the checkpoint keeps an earlier step's, as tensors) and
`<out>.state.json` (counters, settings, the evaluations so far, and what the run was made from, for
`--resume` to check). Never pickle.

Each rank draws its own dropout masks, so each rank's generator state is saved (`rng.torch.R`, and
`rng.cuda.R` for the GPU it trains on) and each rank gets its own back: with one saved state for
all, every rank would draw rank 0's masks after a resume. A CPU run never touches CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tinygen import atomic
from tinygen.atomic import atomic_path
from tinygen.errors import TinygenError
from tinygen.training.distributed import Dist, all_gather


def state_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".state.safetensors"), out.with_name(out.name + ".state.json")


def rng_states(dist: Dist, device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's dropout generators, gathered for rank 0 to save. All ranks call it together."""
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    return {f"rng.{kind}.{rank}": t for kind, state in mine.items() for rank, t in enumerate(all_gather(dist, state))}


def save_state(out: Path, optimizer, batch_rng: torch.Generator, rngs: dict[str, torch.Tensor], meta: dict,
               model: torch.nn.Module | None = None) -> None:
    """Optimizer moments and RNG states (rngs: from rng_states) as tensors, counters as JSON; both
    written atomically. model: the weights to continue from, when the checkpoint at out holds
    others (an earlier step's, kept for its lower validation loss)."""
    from safetensors.torch import save_file

    tensors_path, json_path = state_paths(out)
    sd = optimizer.state_dict()
    tensors = {f"opt.{pid}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for pid, st in sd["state"].items() for k, v in st.items()}
    if model is not None:  # a tied matrix once: safetensors refuses two names for one storage
        seen = set()
        for name, t in model.state_dict().items():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                tensors[f"model.{name}"] = t.detach().cpu().contiguous()
    tensors["rng.batch"] = batch_rng.get_state()
    tensors.update(rngs)
    meta = {**meta, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]}
    with atomic_path(tensors_path) as tmp:
        save_file(tensors, str(tmp))
    atomic.write_bytes(json_path, json.dumps(meta, indent=1).encode())


def read_state_meta(out: Path) -> dict:
    """The counters and settings of the run saved at out."""
    tensors_path, json_path = state_paths(out)
    if not (tensors_path.exists() and json_path.exists()):
        raise TinygenError(f"nothing to resume: {tensors_path.name} and {json_path.name} are not next to {out}")
    try:
        return json.loads(json_path.read_text())
    except ValueError as e:
        raise TinygenError(f"{json_path} is damaged ({e}); start afresh with --force") from None


def remove_state(out: Path) -> None:
    for path in state_paths(out):
        path.unlink(missing_ok=True)


def load_state(out: Path, optimizer, batch_rng: torch.Generator, rank: int, device: torch.device,
               model: torch.nn.Module | None = None) -> dict:
    """Restore the optimizer, the batch sampler's RNG and this rank's own dropout generators, and the
    model's weights where the state holds them (else the checkpoint's, which the model has, are the last)."""
    from safetensors.torch import load_file

    meta = read_state_meta(out)
    tensors = load_file(str(state_paths(out)[0]))
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    if weights and model is not None:
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if name in weights:
                    t.copy_(weights[name])
    sd = optimizer.state_dict()
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for group, saved in zip(sd["param_groups"], meta["param_groups"]):
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    batch_rng.set_state(tensors["rng.batch"])
    # Files from before per-rank states hold rank 0's alone, unsuffixed. A rank whose state is not
    # there (an older file, or more ranks than the run had) keeps the seed the loop gave it, which
    # differs per rank: not an exact continuation, but never a copy of another rank's masks.
    for kind in ("torch", "cuda"):
        state = tensors.get(f"rng.{kind}.{rank}", tensors.get(f"rng.{kind}") if rank == 0 else None)
        if state is None:
            continue
        if kind == "torch":
            torch.set_rng_state(state)
        elif device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
    return meta
