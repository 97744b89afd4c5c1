"""From `tinygen train` arguments to a ready run: data, tokenizer, model and settings.

Under torchrun, rank 0 trains the tokenizer and fills the token cache while the other ranks
wait at a barrier, then everyone reads the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from tinygen import atomic
from tinygen import data as data_lib
from tinygen.checkpoint import load_model, load_tokenizer_source
from tinygen.config import ModelConfig
from tinygen.errors import TinygenError
from tinygen.model import GPT
from tinygen.tokenizer import EOT, Tokenizer
from tinygen.train import PRESETS, Dist, TrainSettings, state_paths

SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size")


@dataclass
class Run:
    model: GPT
    tokenizer: Tokenizer
    train_data: np.ndarray
    val_data: np.ndarray
    val_bytes: int
    settings: TrainSettings
    provenance: dict
    cached: bool


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def prepare(
    sources: list[str],
    out: Path,
    settings: TrainSettings | None,
    stops: dict,
    *,
    dist: Dist,
    preset: str | None = None,
    shape: dict | None = None,
    arch: str = "rope",
    dropout: float = 0.0,
    vocab_size: int = 4096,
    tokenizer_from: str | None = None,
    init: str | None = None,
    resume: bool = False,
    separator: str = EOT,
    val_fraction: float = 0.05,
) -> Run:
    shape = {k: v for k, v in (shape or {}).items() if v is not None}
    files = data_lib.expand_sources(sources)
    cache_dir = out.parent / ".tinygen-cache"
    base = None
    # ---------------------------------------------------------------- tokenizer
    if resume:
        if not out.exists():
            raise TinygenError(f"nothing to resume: {out} does not exist")
        base, tokenizer, _ = load_model(out)
        saved = json.loads(state_paths(out)[1].read_text()) if state_paths(out)[1].exists() else None
        if saved is None:
            raise TinygenError(f"nothing to resume: {state_paths(out)[1].name} is missing next to {out}")
        kept = {f.name: saved["settings"][f.name] for f in fields(TrainSettings) if f.name in saved["settings"]}
        kept["betas"] = tuple(kept["betas"])
        # Continue exactly as configured; stop limits given now may extend the run.
        settings = replace(TrainSettings(**kept), **{k: v for k, v in stops.items() if v})
    elif init:
        base, tokenizer, _ = load_model(init)
    elif tokenizer_from:
        tokenizer = load_tokenizer_source(tokenizer_from)
    else:
        tok_path = cache_dir / f"tokenizer-{data_lib.files_digest(files, vocab_size, separator, val_fraction, settings.seed)}.json"
        if dist.master and not tok_path.exists():
            docs, _ = data_lib.split_documents(data_lib.read_documents(files, separator), val_fraction, settings.seed)
            tokenizer = Tokenizer.train(docs, vocab_size)
            atomic.write_bytes(tok_path, json.dumps(tokenizer.to_dict()).encode())
        _barrier(dist)
        tokenizer = Tokenizer.from_dict(json.loads(tok_path.read_text()))
    # ---------------------------------------------------------------- tokens
    if dist.master:
        tokens = data_lib.load_tokens(files, tokenizer, cache_dir, separator=separator,
                                      val_fraction=val_fraction, seed=settings.seed)
    _barrier(dist)
    if not dist.master:
        tokens = data_lib.load_tokens(files, tokenizer, cache_dir, separator=separator,
                                      val_fraction=val_fraction, seed=settings.seed)
    # ---------------------------------------------------------------- model
    if base is not None:
        for name, value in shape.items():
            if getattr(base.config, name) != value:
                raise TinygenError(f"--{name.replace('_', '-')} {value} does not match the model being continued "
                                   f"({name}={getattr(base.config, name)}); drop the flag or start a new model")
        if preset and any(getattr(base.config, k) != v for k, v in PRESETS[preset].items()):
            raise TinygenError(f"--preset {preset} does not match the shape of the model being continued")
        config = replace(base.config, dropout=dropout)
        model = GPT(config)
        model.load_state_dict(base.state_dict())
    else:
        if preset is not None and preset not in PRESETS:
            raise TinygenError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        dims = {**PRESETS[preset or "tiny"], **shape}
        config = ModelConfig(**dims, vocab_size=tokenizer.n_vocab, arch=arch, dropout=dropout)
        torch.manual_seed(settings.seed)
        model = GPT(config)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise TinygenError(f"the tokenizer has {tokenizer.n_vocab} tokens but the model only {model.config.vocab_size}")
    provenance = {
        "data": ", ".join(str(f) for f in files[:5]) + (f" (+{len(files) - 5} more)" if len(files) > 5 else ""),
        "train_docs": tokens.n_docs[0], "val_docs": tokens.n_docs[1],
        "train_tokens": int(len(tokens.train)), "val_tokens": int(len(tokens.val)),
    }
    if init:
        provenance["init"] = str(init)
    return Run(model, tokenizer, tokens.train, tokens.val, tokens.val_bytes, settings, provenance, tokens.cached)
