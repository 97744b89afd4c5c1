"""The attention explorer: one standalone HTML page that works offline, for `attention --html`.

explorer.html holds the page (plain JS, CSS and SVG); this module inlines the attention data into
it. Weights travel as the causal lower triangle of each head, in integer 1/100000 units: the upper
triangle is all zeros, and a short integer takes far less text than a float.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import numpy as np

from tinygen.atomic import write_bytes

# 0.001% steps, ten times finer than the page shows: at 0.01% steps the page rounded twice
# (35.548% -> 35.55% -> "35.6%") and disagreed with the terminal's 35.5%.
SCALE = 100_000
PLACEHOLDER = "__TINYGEN_EXPLORER_DATA__"


def render_html(data: dict) -> str:
    """The page for an attention dict (AttentionMap.to_dict's keys; "attention" is L x H x T x T)."""
    T = len(data["tokens"])
    weights = np.asarray(data["attention"], dtype=np.float64)
    if weights.shape != (data["n_layer"], data["n_head"], T, T):
        raise ValueError(f"attention has shape {weights.shape}; expected (n_layer, n_head, T, T) = "
                         f"{(data['n_layer'], data['n_head'], T, T)} for {T} tokens")
    if not 0 <= data["query"] < T:
        raise ValueError(f"query {data['query']} is not a token index (0..{T - 1})")
    rows, cols = np.tril_indices(T)  # row-major: row i is entries i*(i+1)/2 .. +i
    units = np.rint(weights[..., rows, cols] * SCALE).astype(np.int32)
    payload = {**data, "attention": units.tolist(), "attention_scale": SCALE}
    # ASCII-only JSON with every `<` escaped: token text can then neither end the <script> element
    # (`</script>`) nor open an HTML comment in it, and `\u003c` still parses back to `<`.
    blob = json.dumps(payload, separators=(",", ":")).replace("<", "\\u003c")
    template = files("tinygen.cli").joinpath("explorer.html").read_text(encoding="utf-8")
    return template.replace(PLACEHOLDER, blob)


def write_html(path: Path, data: dict) -> None:
    write_bytes(Path(path), render_html(data).encode("utf-8"))
