"""The explorer: one standalone HTML page that works offline, with a tab per view of a model.

explorer.html holds the page (plain JS, CSS and SVG); this module checks each view's data and
inlines it. The views are the attention maps (`attention --html`), the logit lens, causal tracing,
activation patching, the head detector and head ablation; a page holds any of them.

Attention weights travel as the causal lower triangle of each head, in integer 1/100000 units: the
upper triangle is all zeros, and a short integer takes far less text than a float. The other views'
floats travel rounded to six significant digits, more than any view shows.
"""

from __future__ import annotations

import json
import math
import re
from importlib.resources import files
from pathlib import Path

import numpy as np

from tinygen.atomic import write_bytes
from tinygen.inspect.heads import MODES

# 0.001% steps, ten times finer than the page shows: at 0.01% steps the page rounded twice
# (35.548% -> 35.55% -> "35.6%") and disagreed with the terminal's 35.5%.
SCALE = 100_000
PLACEHOLDER = "__TINYGEN_EXPLORER_DATA__"
VIEWS = ("lens", "trace", "patch", "heads", "ablate", "attention")  # the page's tab order; it opens on the first
KINDS = ("resid", "mlp", "attn")  # trace and patch grids, in the order the page draws them


def render_page(model: str, views: dict[str, dict]) -> str:
    """The page for some views: {"lens": ..., "attention": ...}, each in the format its tab reads."""
    unknown = sorted(set(views) - set(VIEWS))
    if unknown or not views:
        what = f"unknown views {unknown}" if unknown else "no views to show"
        raise ValueError(f"{what}; a page holds some of {', '.join(VIEWS)}")
    payload = {"model": model, "views": {name: PACK[name](views[name]) for name in VIEWS if name in views}}
    # ASCII-only JSON with every `<` escaped: token text can then neither end the <script> element
    # (`</script>`) nor open an HTML comment in it, and `\u003c` still parses back to `<`. NaN is
    # refused: the page's JSON.parse would stop at it.
    blob = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    template = files("tinygen.cli").joinpath("explorer.html").read_text(encoding="utf-8")
    return template.replace(PLACEHOLDER, blob)


def write_page(path: Path, model: str, views: dict[str, dict]) -> None:
    write_bytes(Path(path), render_page(model, views).encode("utf-8"))


def render_html(data: dict) -> str:
    """The page of one attention dict (AttentionMap.to_dict's keys; "attention" is L x H x T x T)."""
    return render_page(data["model"], {"attention": data})


def write_html(path: Path, data: dict) -> None:
    write_page(path, data["model"], {"attention": data})


def _attention(data: dict) -> dict:
    T = len(data["tokens"])
    weights = np.asarray(data["attention"], dtype=np.float64)
    if weights.shape != (data["n_layer"], data["n_head"], T, T):
        raise ValueError(f"attention has shape {weights.shape}; expected (n_layer, n_head, T, T) = "
                         f"{(data['n_layer'], data['n_head'], T, T)} for {T} tokens")
    if not 0 <= data["query"] < T:
        raise ValueError(f"query {data['query']} is not a token index (0..{T - 1})")
    rows, cols = np.tril_indices(T)  # row-major: row i is entries i*(i+1)/2 .. +i
    units = np.rint(weights[..., rows, cols] * SCALE).astype(np.int32)
    return {**data, "attention": units.tolist(), "attention_scale": SCALE}


def _lens(data: dict) -> dict:
    data = _rounded(data)
    T, L = len(data["tokens"]), data["n_layer"]
    _expect("lens", "top", data["top"], (L + 1, T))
    if data.get("target") is not None:
        for key in ("p", "rank"):
            _expect("lens", f"target {key}", data["target"][key], (L + 1, T))
    return data


def _trace(data: dict) -> dict:
    data = _grids("trace", _rounded(data))
    first, last = data["subject"]
    if not 0 <= first <= last < len(data["tokens"]):
        raise ValueError(f"trace: subject {first}..{last} is not a span of the {len(data['tokens'])} tokens")
    return data


def _patch(data: dict) -> dict:
    data = _grids("patch", _rounded(data))
    _expect("patch", "clean_tokens", data["clean_tokens"], (len(data["tokens"]),))
    return data


def _grids(view: str, data: dict) -> dict:
    """Trace and patch data, its grids in the page's order, once they are checked to be layers x tokens."""
    grids = data["grids"]
    unknown = sorted(set(grids) - set(KINDS))
    if unknown or not grids:
        raise ValueError(f"{view}: grids {unknown or 'none'}; expected some of {', '.join(KINDS)}")
    L = len(next(iter(grids.values()))["recovered"])
    for kind, grid in grids.items():
        for key in ("recovered", "score"):
            _expect(view, f"{kind} {key}", grid[key], (L, len(data["tokens"])))
    return {**data, "grids": {kind: grids[kind] for kind in KINDS if kind in grids}}


def _heads(data: dict) -> dict:
    data = _rounded(data)
    for kind, scores in data["scores"].items():
        _expect("heads", f"{kind} scores", scores, (data["n_layer"], data["n_head"]))
    return data


def _ablate(data: dict) -> dict:
    """Next tokens with their probability with every head and with the heads ablated; a probability
    that is not finite arrives as null, which the page shows as n/a."""
    data = _rounded(data)
    if not _strings(data["tokens"]):
        raise ValueError("ablate: tokens should be a list of the prompt's token texts")
    heads = data["heads"]
    if not heads or not _strings(heads) or not all(re.fullmatch(r"\d+\.\d+", h) for h in heads):
        raise ValueError(f"ablate: heads {heads!r} should be a list of LAYER.HEAD strings, e.g. ['3.1']")
    if data["mode"] not in MODES:
        raise ValueError(f"ablate: mode {data['mode']!r}; expected one of {', '.join(MODES)}")
    if not isinstance(data["rows"], list):
        raise ValueError(f"ablate: rows should be a list; it is a {type(data['rows']).__name__}")
    for row in data["rows"]:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                and all(p is None or (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1)
                        for p in row[1:])):
            raise ValueError(f"ablate: row {row!r} should be [text, p with every head, p ablated], each p in 0..1")
    return data


PACK = {"attention": _attention, "lens": _lens, "trace": _trace, "patch": _patch, "heads": _heads,
        "ablate": _ablate}


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _expect(view: str, what: str, value, dims: tuple[int, ...]) -> None:
    """Raise unless value is nested lists whose leading dimensions are dims."""
    def fits(v, ds) -> bool:
        return not ds or (isinstance(v, list) and len(v) == ds[0] and all(fits(x, ds[1:]) for x in v))

    if not fits(value, dims):
        size = len(value) if isinstance(value, list) else type(value).__name__
        raise ValueError(f"{view}: {what} should be {' x '.join(map(str, dims))} nested lists; it has {size} at the top")


def _rounded(value):
    """value with arrays and tensors as lists and floats at six significant digits. A float that is
    not finite (a recovered share when clean equals broken) becomes null: JSON has no NaN."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value
