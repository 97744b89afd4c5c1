"""From `tinygen train` arguments (a Recipe, settings.py) to a ready run: data, tokenizer, model
and settings.

A fresh run will not overwrite a model unless told to (--force). A resumed one takes what it is
made of from its state file, and checks the flags typed again against it (resume.py). Under
torchrun, rank 0 trains the tokenizer and fills the token cache while the other ranks wait at a
barrier, then everyone reads the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from tinygen import atomic
from tinygen.core.checkpoint import load_model, load_tokenizer_source
from tinygen.core.config import PRESETS, ModelConfig
from tinygen.core.model import GPT
from tinygen.core.template import Renderer, template_for, with_chat_template
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError
from tinygen.training import chatdata
from tinygen.training import data as data_lib
from tinygen.training import plan as plan_lib
from tinygen.training import resume as resume_lib
from tinygen.training.batches import ChatSupervision
from tinygen.training.distributed import Dist, all_gather, barrier
from tinygen.training.precision import training_dtype
from tinygen.training.settings import Recipe, TrainSettings
from tinygen.training.state import read_state_meta


@dataclass
class Run:
    model: GPT
    tokenizer: Tokenizer
    train_data: np.ndarray
    val_data: np.ndarray
    val_bytes: int
    settings: TrainSettings
    provenance: dict
    recipe: dict  # what the state file keeps, for a later --resume to check and restore
    notes: list[str]  # for the user: defaults taken, changes made on resume, how validation was split
    chat: ChatSupervision | None = None
    plan: plan_lib.Plan | None = None  # what the run was planned as (a new model on text)


def prepare(recipe: Recipe, *, dist: Dist, device: torch.device | None = None) -> Run:
    """The run the recipe describes, ready to train on device: a new one, or the one saved at
    recipe.out (--resume). A new model trained on text follows a plan (plan.py) in what the user
    did not type."""
    _check(recipe)
    base = tokenizer = meta = None
    if recipe.resume:
        base, tokenizer, info = load_model(recipe.out)
        meta = read_state_meta(recipe.out)
        recipe, settings, notes = resume_lib.resumed(recipe, meta, base.config, info.provenance)
    elif recipe.chat or recipe.init:
        settings, notes = _fresh_settings(recipe)
    else:
        settings, notes = None, []  # from the plan, once the text is tokenized
    recipe.out.parent.mkdir(parents=True, exist_ok=True)
    if recipe.chat:
        return _prepare_chat(recipe, settings, notes, base, tokenizer, meta)
    return _prepare_text(recipe, settings, notes, base, tokenizer, meta, dist, device or torch.device("cpu"))


def _prepare_text(recipe: Recipe, settings: TrainSettings | None, notes: list[str], base: GPT | None,
                  tokenizer: Tokenizer | None, meta: dict | None, dist: Dist, device: torch.device) -> Run:
    """Training on text, from scratch or from --init: a resumed run (meta, its state) brings its
    base model and tokenizer; --init brings both, --tokenizer the tokenizer alone. A new model
    (settings None) is planned."""
    out = recipe.out
    files = data_lib.expand_sources(recipe.data)
    digest = data_lib.files_digest(files)
    if meta is not None:
        resume_lib.check_data(meta, digest, out)
    planning = settings is None
    if planning and not recipe.tokenizer and "vocab_size" not in recipe.given:
        text_bytes = sum(f.stat().st_size for f in files) * (1 - recipe.val_fraction)
        recipe = replace(recipe, vocab_size=plan_lib.vocab_for(round(text_bytes)))
    seed = settings.seed if settings else recipe.train.get("seed", TrainSettings.seed)
    cache_dir = out.parent / ".tinygen-cache"
    cache_dir.mkdir(exist_ok=True)
    if recipe.init and not recipe.resume:
        base, tokenizer, _ = load_model(recipe.init)
    elif recipe.tokenizer and not recipe.resume:
        tokenizer = load_tokenizer_source(recipe.tokenizer)
    elif tokenizer is None:
        tokenizer = _trained_tokenizer(recipe, files, digest, cache_dir, seed, dist)
    load = partial(data_lib.load_tokens, files, tokenizer, cache_dir, separator=recipe.separator,
                   val_fraction=recipe.val_fraction, seed=seed, digest=digest)
    tokens = _on_rank0_first(load, dist)
    plan = None
    if planning:
        plan = _plan(recipe, len(tokens.train), tokenizer.n_vocab, dist, device)
        recipe = replace(recipe, preset=plan.preset if plan.preset in PRESETS else recipe.preset,
                         block_size=plan.block_size, dropout=plan.dropout)
        settings, notes = _fresh_settings(recipe, plan)
    elif meta is not None and meta["recipe"].get("plan"):
        plan = plan_lib.Plan.from_dict(meta["recipe"]["plan"])
    model = _text_model(recipe, base, tokenizer, settings.seed, notes, len(tokens.train))
    if tokenizer.n_vocab > model.config.vocab_size:
        raise TinygenError(f"the tokenizer has {tokenizer.n_vocab} tokens but the model only {model.config.vocab_size}")
    if not len(tokens.val):
        notes.append("validation: none (--val-fraction 0, or too little text to hold any out)")
    else:
        notes.append(f"validation: {tokens.description}" + (" (too few documents to hold out whole ones)"
                                                             if tokens.split == "tail" else ""))
    saved = {**_saved_recipe(recipe, digest, tokens.split), **({"plan": plan.to_dict()} if plan else {})}
    provenance = {
        "data": _listing(files),
        "train_docs": tokens.n_docs[0], "val_docs": tokens.n_docs[1],
        "train_tokens": len(tokens.train), "val_tokens": len(tokens.val),
        "val_split": tokens.description,
        **({"init": saved["init"]} if saved["init"] else {}),
        **({"plan": plan.line()} if plan else {}),
    }
    return Run(model, tokenizer, tokens.train, tokens.val, tokens.val_bytes, settings, provenance, saved, notes,
               plan=plan)


def _on_rank0_first(load, dist: Dist):
    """load() on rank 0 while the others wait, then on the others: rank 0 fills the token cache
    that they then read."""
    if dist.master:
        tokens = load()
    barrier(dist)
    if not dist.master:
        tokens = load()
    return tokens


def _text_model(recipe: Recipe, base: GPT | None, tokenizer: Tokenizer, seed: int, notes: list[str],
                train_tokens: int) -> GPT:
    """The model to train: the resumed one, the --init one, or a new one of the recipe's shape."""
    if recipe.resume:
        return _continued(base, base.config.dropout)
    if base is not None:
        return _fine_tuned(recipe, base, notes)
    shape = {k: getattr(recipe, k) for k in resume_lib.SHAPE_FIELDS if getattr(recipe, k) is not None}
    preset_block = PRESETS[recipe.preset or "tiny"]["block_size"]
    if "block_size" not in recipe.given and shape.get("block_size", preset_block) < preset_block:
        notes.append(f"context: {shape['block_size']} tokens, since the text has only {train_tokens:,} training "
                     f"tokens (the preset's {preset_block} would leave too few different windows)")
    switches = {k: getattr(recipe, k) for k in resume_lib.SWITCH_FIELDS}
    if switches["qk_norm"] is None:
        switches["qk_norm"] = recipe.arch == "rope"
    config = ModelConfig(**{**PRESETS[recipe.preset or "tiny"], **shape}, vocab_size=tokenizer.n_vocab,
                         arch=recipe.arch, dropout=recipe.dropout, **switches)
    torch.manual_seed(seed)
    return GPT(config)


def _trained_tokenizer(recipe: Recipe, files: list[Path], digest: str, cache_dir: Path, seed: int,
                       dist: Dist) -> Tokenizer:
    """A BPE trained on the training side of the split only, so that no validation text leaks into
    its merges; cached, and trained by rank 0 while the others wait."""
    key = data_lib.cache_key(digest, recipe.vocab_size, recipe.separator, recipe.val_fraction, seed)
    path = cache_dir / f"tokenizer-{key}.json"
    if dist.master and not path.exists():
        docs = data_lib.split_for_validation(data_lib.read_documents(files, recipe.separator),
                                             recipe.val_fraction, seed).train
        atomic.write_bytes(path, json.dumps(Tokenizer.train(docs, recipe.vocab_size).to_dict()).encode())
    barrier(dist)
    return Tokenizer.from_dict(json.loads(path.read_text()))


def _check(recipe: Recipe) -> None:
    out = recipe.out
    if recipe.preset is not None and recipe.preset not in PRESETS:
        raise TinygenError(f"unknown preset {recipe.preset!r}; choose from {', '.join(PRESETS)}")
    if recipe.resume and recipe.force:
        raise TinygenError("--resume continues the run at --out and --force replaces it: pass one of them")
    if recipe.resume and not out.exists():
        raise TinygenError(f"nothing to resume: {out} does not exist")
    if not recipe.resume and out.exists() and not recipe.force:
        raise TinygenError(f"{out} already exists; continue its training with --resume, or pass --force to start "
                           f"afresh and replace it (with its training state and metrics)")
    if recipe.chat and not (recipe.init or recipe.resume):
        raise TinygenError("--chat fine-tunes an existing model: pass --init BASE.safetensors (or --resume)")


DEFAULT_PATIENCE = 3
# Fine-tuning (--init, --chat) without a budget: until validation stops improving, at most this many steps.
DEFAULT_STEPS = 1000


def _plan(recipe: Recipe, train_tokens: int, n_vocab: int, dist: Dist, device: torch.device) -> plan_lib.Plan:
    """The plan for a new model on this text: what the user typed, and the plan's choice for the rest."""
    given, train = recipe.given, recipe.train
    typed = {k: v for k in ("dropout", "block_size") if k in given and (v := getattr(recipe, k)) is not None}
    typed |= {k: train[k] for k in ("weight_decay", "lr") if k in given and train.get(k) is not None}
    shape = {k: getattr(recipe, k) for k in resume_lib.SHAPE_FIELDS if k != "block_size" and k in given}
    if recipe.preset is not None or shape:
        typed["shape"] = {**PRESETS[recipe.preset or "tiny"], **shape, "name": recipe.preset or "custom"}
        typed["preset"] = recipe.preset or "custom"
    switches = {k: getattr(recipe, k) for k in resume_lib.SWITCH_FIELDS}
    if switches["qk_norm"] is None:
        switches["qk_norm"] = recipe.arch == "rope"
    base = ModelConfig(arch=recipe.arch, **switches)
    budget = plan_lib.Budget(seconds=train.get("max_time"), tokens=train.get("max_tokens"), steps=train.get("max_steps"),
                             step_sequences=train.get("batch_size", TrainSettings.batch_size) * dist.world,
                             step_tokens=train.get("batch_tokens"))
    rate = plan_lib.step_rate(device, training_dtype(device, train.get("dtype", "auto")))
    # Every rank must make the same plan (its passes are the budget they stop at together): rank 0's probe.
    rate = all_gather(dist, torch.tensor([rate], dtype=torch.float64))[0].item() * dist.world
    return plan_lib.make_plan(train_tokens, n_vocab, budget, rate, base, typed,
                              "GPU" if device.type == "cuda" else "CPU")


def _fresh_settings(recipe: Recipe, plan: plan_lib.Plan | None = None) -> tuple[TrainSettings, list[str]]:
    """The settings of a new run: as typed, with the plan's choices (a new model) or, for a fine-tune
    given no budget, until validation stops improving within DEFAULT_STEPS."""
    train, notes = dict(recipe.train), []
    if plan is not None and "weight_decay" not in recipe.given:
        train["weight_decay"] = plan.weight_decay
    if not any(train.get(k) for k in resume_lib.STOPS):
        if train.get("patience") is None:
            train["patience"] = DEFAULT_PATIENCE
        if plan is not None:
            train["max_tokens"] = plan.max_tokens
            limit = f"at most {plan.max_tokens:,} tokens (the plan's passes)"
        else:
            train["max_steps"] = DEFAULT_STEPS
            limit = f"at most {DEFAULT_STEPS} steps"
        notes.append(f"no --max-steps, --tokens or --time given: training until validation stops improving "
                     f"({train['patience']} evaluations without a new lowest loss), {limit}")
    settings = TrainSettings(**train)
    if recipe.init and train.get("lr") is None:
        # Fine-tuning at the learning rate that trains from scratch would undo much of what the base
        # model learned; nanochat fine-tunes at a few percent of its pretraining rate.
        settings = replace(settings, lr=settings.lr / 10)
        notes.insert(0, f"fine-tuning --init: --lr {settings.lr:g}, a tenth of {settings.optimizer}'s default")
    return settings, notes


def _saved_recipe(recipe: Recipe, digest: str, split: str) -> dict:
    """What the state file keeps; paths as seen from the output's folder (resume_lib.portable)."""
    kept = {name: getattr(recipe, name) for name in resume_lib.SAVED_FIELDS}
    if not recipe.resume:  # a resumed recipe holds the saved paths already
        kept.update({name: resume_lib.portable(kept[name], recipe.out) if kept[name] else None
                     for name in ("tokenizer", "init")})
    return {**kept, "data_digest": digest, "split": split}


def _listing(items) -> str:
    """The first few data paths for provenance, and how many more there were."""
    return ", ".join(str(i) for i in items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")


def _continued(base: GPT, dropout: float, vocab_size: int | None = None, block_size: int | None = None) -> GPT:
    """A trainable copy of base with this run's dropout. Rows added to the vocabulary (new special
    tokens) start at the mean of their table's rows, a neutral point the fine-tune moves from.
    A rope model's context can change because its positions are computed, not stored: a story
    model trained on 256-token windows (faster per token) fine-tunes into a 512-token chat model."""
    config = replace(base.config, dropout=dropout, vocab_size=vocab_size or base.config.vocab_size,
                     block_size=block_size or base.config.block_size)
    model = GPT(config)
    weights = base.state_dict()
    grow = config.vocab_size - base.config.vocab_size
    if grow > 0:
        # Every table with a row per token: the embedding, the head (tied or not), the value embeddings.
        for k in ("transformer.wte.weight", "lm_head.weight", *(f"transformer.ve.{i}.weight"
                                                              for i in range(config.value_embeds))):
            weights[k] = torch.cat([weights[k], weights[k].mean(0, keepdim=True).expand(grow, -1)])
    model.load_state_dict(weights)
    return model


def _fine_tuned(recipe: Recipe, base: GPT, notes: list[str], vocab_size: int | None = None) -> GPT:
    """The model that --init continues: its shape and switches as they are (a flag contradicting
    them is refused), except the context, which --block-size may change on a rope model."""
    block = recipe.block_size if "block_size" in recipe.given else None
    if block and block != base.config.block_size and base.config.arch == "gpt2":
        raise TinygenError(f"--block-size {block}: a gpt2 model learned one embedding per position, so its context "
                           f"stays {base.config.block_size} tokens; drop the flag")
    if mismatch := resume_lib.model_mismatch(recipe, base.config, context_fixed=False):
        raise TinygenError(f"{mismatch[0]} does not match the model being continued ({mismatch[1]}); drop the "
                           f"flag or start a new model")
    if block and block != base.config.block_size:
        notes.append(f"context: {block} tokens (the base model was trained on {base.config.block_size})")
    return _continued(base, recipe.dropout, vocab_size, block)


def _prepare_chat(recipe: Recipe, settings: TrainSettings, notes: list[str], base: GPT | None,
                  tokenizer: Tokenizer | None, meta: dict | None) -> Run:
    """Supervised fine-tuning on conversations: the template's special tokens join the tokenizer
    (and the embeddings grow to match) when the base model lacks them."""
    out = recipe.out
    digest = data_lib.files_digest(data_lib.expand_sources(recipe.data))
    if meta is not None:
        resume_lib.check_data(meta, digest, out)
        if tokenizer.chat_template is None:
            raise TinygenError(f"{out} was not a chat fine-tune; resume it without --chat")
    else:
        base, tokenizer, _ = load_model(recipe.init)
        tokenizer, _ = with_chat_template(tokenizer)
    vocab_size = max(base.config.vocab_size, tokenizer.n_vocab)
    model = _continued(base, base.config.dropout, vocab_size) if meta is not None else \
        _fine_tuned(recipe, base, notes, vocab_size)
    convs = chatdata.read_conversations(recipe.data)
    train_convs, val_convs = data_lib.split_documents(convs, recipe.val_fraction, settings.seed)
    renderer = Renderer(tokenizer, template_for(tokenizer))
    block = model.config.block_size
    train_set, dropped = chatdata.encode_conversations(train_convs, tokenizer, renderer, block)
    val_set, dropped_val = chatdata.encode_conversations(val_convs, tokenizer, renderer, block)
    if not len(train_set.starts):
        raise TinygenError("no conversation has an assistant reply within the model's context")
    saved = _saved_recipe(recipe, digest, "documents")
    provenance = {
        "data": _listing(recipe.data),
        "chat": True, "train_conversations": len(train_set.starts), "val_conversations": len(val_set.starts),
        "dropped_conversations": dropped + dropped_val,
        "train_tokens": len(train_set.tokens), "trained_tokens": int(train_set.mask.sum()),
        "val_tokens": len(val_set.tokens), "init": saved["init"],
    }
    notes.append(f"validation: {len(val_convs):,} of {len(convs):,} conversations")
    return Run(model, tokenizer, train_set.tokens, val_set.tokens, 0, settings, provenance, saved, notes,
               chat=ChatSupervision(train_set.mask, val_set.mask, train_set.starts))
