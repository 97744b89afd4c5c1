"""What `--resume` may change, and what it must keep.

A resumed run continues exactly only if everything that decides its data, its validation split,
its model, its batches and its optimizer is what it was: those come from the state file, and a
flag typed again with another value is refused, naming the flag and the saved value. The stop
limits, evaluation, the learning rate, --compile and --dtype may change; what changed is
reported. Only flags the user typed count (`Recipe.given`), never a default that differs from the
saved value.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path

from tinygen.core.config import PRESETS, ModelConfig
from tinygen.errors import TinygenError
from tinygen.training.settings import Recipe, TrainSettings

STOPS = ("max_steps", "max_tokens", "max_time")
CHANGEABLE = (*STOPS, "eval_every", "eval_tokens", "lr", "compile", "dtype", "keep", "patience", "early_stop")
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size")
SWITCH_FIELDS = ("qk_norm", "mlp", "tie_embeddings", "logit_softcap", "value_embeds")
MODEL_FIELDS = (*SHAPE_FIELDS, "arch", *SWITCH_FIELDS)
# What the state file keeps of a run's recipe, beside its TrainSettings and its checkpoint's config.
SAVED_FIELDS = ("val_fraction", "separator", "vocab_size", "tokenizer", "init", "chat")
FLAGS = {"max_tokens": "--tokens", "max_time": "--time"}


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def show(name: str, value) -> str:
    """A setting as the user would type it."""
    if name == "tie_embeddings":
        return "a tied head" if value else "--untied-head"
    if name == "mlp" and value is None:
        return "--mlp swiglu"
    if name == "qk_norm":
        return "--qk-norm" if value else "--no-qk-norm"
    if isinstance(value, bool):
        return flag(name) if value else f"no {flag(name)}"
    if value is None:
        return f"no {flag(name)}"
    if name == "max_time":
        return f"--time {value:g}s"
    if name == "separator":
        return f"--separator {value!r}"
    return f"{flag(name)} {value:g}" if isinstance(value, float) else f"{flag(name)} {value}"


def portable(path: str | os.PathLike, out: Path) -> str:
    """A path as seen from the output's folder: it stays right when the two move together, and a
    checkpoint's provenance does not carry someone's home folder."""
    return os.path.relpath(Path(path).resolve(), out.parent.resolve())


def model_mismatch(recipe: Recipe, config: ModelConfig, context_fixed: bool = True) -> tuple[str, str] | None:
    """The first typed model flag that the model being continued contradicts, and what the model has.
    context_fixed=False: --block-size may differ (a fine-tune of a model whose positions are computed)."""
    for name in MODEL_FIELDS:
        if name == "block_size" and not context_fixed:
            continue
        typed = getattr(recipe, name)
        if name == "mlp" and typed == "swiglu" and config.arch == "rope":
            typed = None  # the rope arch's own MLP, which its config spells None
        if name in recipe.given and (typed is not None or name in SWITCH_FIELDS) and typed != getattr(config, name):
            return show(name, typed), show(name, getattr(config, name))
    if recipe.preset is not None and any(getattr(config, k) != v for k, v in PRESETS[recipe.preset].items()):
        return f"--preset {recipe.preset}", " ".join(f"{k}={getattr(config, k)}" for k in PRESETS[recipe.preset])
    return None


def resumed(recipe: Recipe, meta: dict, config: ModelConfig, provenance: dict) -> tuple[Recipe, TrainSettings, list[str]]:
    """The recipe and settings that continue the run saved at recipe.out (meta: its state file;
    config and provenance: its checkpoint's), and a note for each change the typed flags make."""
    out = recipe.out
    kept = meta.get("kept_step", meta["step"])  # the step of the weights at out: the best one, or the last
    if provenance.get("steps", kept) != kept:
        raise TinygenError(f"{out} holds step {provenance['steps']} but its state file says step {kept}: a save "
                           f"was cut short, so the run cannot continue exactly; start afresh with --force")

    def refuse(what: str, saved: str) -> TinygenError:
        return TinygenError(f"{what} cannot change when resuming: the run at {out} has {saved}; drop the flag to "
                            f"continue it, or start a new run with --force")

    if mismatch := model_mismatch(recipe, config):
        raise refuse(*mismatch)
    if "dropout" in recipe.given and recipe.dropout != config.dropout:
        raise refuse(show("dropout", recipe.dropout), show("dropout", config.dropout))
    saved = meta.get("recipe", {})  # empty for a run saved before recipes were kept: nothing to check against
    for name in SAVED_FIELDS:
        if name in recipe.given and name in saved and not _same(name, getattr(recipe, name), saved[name], out):
            raise refuse(show(name, getattr(recipe, name)), show(name, saved[name]))
    settings = {f.name: meta["settings"][f.name] for f in fields(TrainSettings) if f.name in meta["settings"]}
    settings["betas"] = tuple(settings["betas"])
    # A run saved before a setting existed ran as its absence meant, whatever today's default is.
    settings.setdefault("optimizer", "adamw")
    settings.setdefault("schedule", "cosine")
    settings.setdefault("keep", "last")
    notes = []
    for name in sorted(recipe.given & set(settings)):
        typed, before = recipe.train[name], settings[name]
        if typed == before:
            continue
        if name not in CHANGEABLE:
            raise refuse(show(name, typed), show(name, before))
        settings[name] = typed
        notes.append(f"resuming with {show(name, typed)} (the run had {show(name, before)})")
    kept = {name: saved[name] for name in SAVED_FIELDS if name in saved}
    return replace(recipe, **kept, arch=config.arch, dropout=config.dropout), TrainSettings(**settings), notes


def _same(name: str, typed, saved, out: Path) -> bool:
    if name in ("tokenizer", "init") and typed is not None and saved is not None:
        return Path(typed).resolve() == (out.parent / saved).resolve()
    return typed == saved


def check_data(meta: dict, digest: str, out: Path) -> None:
    saved = meta.get("recipe", {}).get("data_digest")
    if saved is not None and saved != digest:
        raise TinygenError(f"DATA is not the text the run at {out} was trained on (its bytes differ); resume with "
                           f"the same files, or start a new run with --force")
