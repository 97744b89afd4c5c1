"""Reading and changing a forward pass's activations, through the model's one hook (core/model.Hook).

A site is a (point, layer) pair of core/model.HOOK_POINTS. `run` records the sites asked for and
applies edits to others; the lens, tracing, patching and ablation are all built on it, so they run
the model's own forward pass in its own kernels (int4, int8 or bf16 weights as loaded), never a copy
of the model. Rows of a batch can carry different edits, which is how a grid of patched runs
becomes a few batched passes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from tinygen.core.kvcache import CacheSlots
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError

Site = tuple[str, int]  # (point, layer), core/model.HOOK_POINTS
Edit = Callable[[torch.Tensor], torch.Tensor]  # an activation in, the one to use instead out


@torch.inference_mode()
def run(model, idx: torch.Tensor, record: Collection[Site] = (), edits: dict[Site, Edit] | None = None,
        all_positions: bool = False, start: tuple[int, torch.Tensor] | None = None,
        slots: CacheSlots | None = None) -> tuple[torch.Tensor, dict[Site, torch.Tensor]]:
    """Logits, float32, of the last position (B, V), or of every position (B, T, V), for token ids idx
    (B, T), with `edits` applied where the pass reaches their sites; and the activations at the
    `record` sites as the pass used them (after any edit there). start: (layer, residual stream
    entering it) skips the layers before it; slots: a KV cache the pass reads and writes (GPT.hidden)."""
    edits = edits or {}
    seen: dict[Site, torch.Tensor] = {}

    def hook(point: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        site = (point, layer)
        if site in edits:
            x = edits[site](x)
        if site in record:
            seen[site] = x
        return x

    h, _ = model.hidden(idx.to(model.device), slots, hook=hook, start=start)
    return model.head(h if all_positions else h[:, -1]).float(), seen


def put(rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> Edit:
    """An edit that sets row rows[i]'s activation at positions[i] to values[i] (one vector, or one
    (n_head, head_dim) block of head outputs), leaving the rest as the pass made them."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[rows.to(x.device), positions.to(x.device)] = values.to(x.device, x.dtype)
        return x

    return edit


def sites(n_layer: int, point: str) -> list[Site]:
    """Every layer's site of one point; "resid" has n_layer + 1 (the final norm's input last)."""
    return [(point, layer) for layer in range(n_layer + (point == "resid"))]


@dataclass(frozen=True)
class Target:
    token: int
    text: str  # the token's own text
    note: str | None = None  # said to the user when the text is several tokens


def target_token(tokenizer: Tokenizer, text: str, flag: str = "--target") -> Target:
    """The token a prediction is scored by: the text's first token, as TransformerLens takes it.
    " Paris" (with its space) is usually one token where "Paris" after a space would not be."""
    if not text:
        raise TinygenError(f"{flag} needs a token's text, e.g. {flag} ' Paris'")
    ids = tokenizer.encode(text, special=False)
    if not ids:
        raise TinygenError(f"{flag} {text!r} has no tokens")
    label = tokenizer.label(ids[0])
    note = None
    if len(ids) > 1:
        parts = ", ".join(repr(tokenizer.label(i)) for i in ids)
        note = f"{flag} {text!r} is {len(ids)} tokens ({parts}); scoring its first, {label!r}"
    return Target(ids[0], label, note)


@torch.inference_mode()
def embedding_std(model, rows: int = 4096) -> float:
    """The standard deviation of the token embeddings as the first block reads them (with Gemma's
    scale), over up to `rows` rows evenly spread across the vocabulary: a GGUF's table is read
    from its file a row at a time, and a sample of rows gives the same figure to a few digits."""
    wte = model.transformer.wte
    ids = torch.linspace(0, wte.num_embeddings - 1, min(rows, wte.num_embeddings)).long()
    x = wte(ids.to(model.device)).float()
    if model.config.embed_scale:
        x = x * model.embed_factor.float()
    return float(x.std())
