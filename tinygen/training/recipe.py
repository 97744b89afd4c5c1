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
from tinygen.core.checkpoint import load_model, load_tokenizer_source
from tinygen.core.config import PRESETS, ModelConfig
from tinygen.core.model import GPT
from tinygen.core.template import Renderer, template_for, with_chat_template
from tinygen.core.tokenizer import EOT, Tokenizer
from tinygen.errors import TinygenError
from tinygen.training import chatdata
from tinygen.training import data as data_lib
from tinygen.training.distributed import Dist
from tinygen.training.loop import ChatSupervision, TrainSettings
from tinygen.training.state import state_paths

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
    chat: ChatSupervision | None = None


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
    chat: bool = False,
) -> Run:
    shape = {k: v for k, v in (shape or {}).items() if v is not None}
    out.parent.mkdir(parents=True, exist_ok=True)
    if chat:
        if not (init or resume):
            raise TinygenError("--chat fine-tunes an existing model: pass --init BASE.safetensors (or --resume)")
        return _prepare_chat(sources, out, settings, stops, init=init, resume=resume, dropout=dropout,
                             val_fraction=val_fraction)
    files = data_lib.expand_sources(sources)
    cache_dir = out.parent / ".tinygen-cache"
    base = None
    # ---------------------------------------------------------------- tokenizer
    if resume:
        base, tokenizer, settings = _resumed(out, stops)
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
        model = _continued(base, dropout)
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
        "data": _listing(files),
        "train_docs": tokens.n_docs[0], "val_docs": tokens.n_docs[1],
        "train_tokens": int(len(tokens.train)), "val_tokens": int(len(tokens.val)),
    }
    if init:
        provenance["init"] = str(init)
    return Run(model, tokenizer, tokens.train, tokens.val, tokens.val_bytes, settings, provenance, tokens.cached)


def _listing(items) -> str:
    """The first few data paths for provenance, and how many more there were."""
    return ", ".join(str(i) for i in items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")


def _resumed(out: Path, stops: dict) -> tuple[GPT, Tokenizer, TrainSettings]:
    """The interrupted run's model, tokenizer and settings; stop limits given now may extend it."""
    if not out.exists():
        raise TinygenError(f"nothing to resume: {out} does not exist")
    base, tokenizer, _ = load_model(out)
    json_path = state_paths(out)[1]
    if not json_path.exists():
        raise TinygenError(f"nothing to resume: {json_path.name} is missing next to {out}")
    saved = json.loads(json_path.read_text())
    kept = {f.name: saved["settings"][f.name] for f in fields(TrainSettings) if f.name in saved["settings"]}
    kept["betas"] = tuple(kept["betas"])
    return base, tokenizer, replace(TrainSettings(**kept), **{k: v for k, v in stops.items() if v})


def _continued(base: GPT, dropout: float, vocab_size: int | None = None) -> GPT:
    """A trainable copy of base with this run's dropout. Rows added to the vocabulary (new special
    tokens) start at the mean embedding, a neutral point the fine-tune moves from."""
    config = replace(base.config, dropout=dropout, vocab_size=vocab_size or base.config.vocab_size)
    model = GPT(config)
    weights = base.state_dict()
    wte = weights["transformer.wte.weight"]
    if config.vocab_size > len(wte):
        extra = wte.mean(0, keepdim=True).expand(config.vocab_size - len(wte), -1)
        weights["transformer.wte.weight"] = weights["lm_head.weight"] = torch.cat([wte, extra])
    model.load_state_dict(weights)
    return model


def _prepare_chat(sources: list[str], out: Path, settings: TrainSettings | None, stops: dict, *, init: str | None,
                  resume: bool, dropout: float, val_fraction: float) -> Run:
    """Supervised fine-tuning on conversations: the template's special tokens join the tokenizer
    (and the embeddings grow to match) when the base model lacks them."""
    if resume:
        base, tokenizer, settings = _resumed(out, stops)
        if tokenizer.chat_template is None:
            raise TinygenError(f"{out} was not a chat fine-tune; resume it without --chat")
    else:
        base, tokenizer, _ = load_model(init)
        tokenizer, _ = with_chat_template(tokenizer)
    model = _continued(base, dropout, max(base.config.vocab_size, tokenizer.n_vocab))
    convs = chatdata.read_conversations(sources)
    train_convs, val_convs = data_lib.split_documents(convs, val_fraction, settings.seed)
    renderer = Renderer(tokenizer, template_for(tokenizer))
    block = model.config.block_size
    train_set, dropped = chatdata.encode_conversations(train_convs, tokenizer, renderer, block)
    val_set, dropped_val = chatdata.encode_conversations(val_convs, tokenizer, renderer, block)
    if not len(train_set.starts):
        raise TinygenError("no conversation has an assistant reply within the model's context")
    provenance = {
        "data": _listing(sources),
        "chat": True, "train_conversations": len(train_set.starts), "val_conversations": len(val_set.starts),
        "dropped_conversations": dropped + dropped_val,
        "train_tokens": int(len(train_set.tokens)), "trained_tokens": int(train_set.mask.sum()),
        "val_tokens": int(len(val_set.tokens)), "init": str(init or out),
    }
    return Run(model, tokenizer, train_set.tokens, val_set.tokens, 0, settings, provenance, cached=False,
               chat=ChatSupervision(train_set.mask, val_set.mask, train_set.starts))
