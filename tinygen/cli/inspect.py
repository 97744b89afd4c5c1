"""`tinygen attention` and `tinygen embed`: what a model attends to, and where it puts words."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.common import load_model, text_arg
from tinygen.cli.options import DeviceOpt, Dtype, ModelOpt, ScoreDtypeOpt
from tinygen.errors import TinygenError


def attention(
    text: Annotated[Optional[str], typer.Argument(metavar="TEXT", help="Text to look at; `-` or piped stdin reads "
                                                  "stdin.", show_default=False)] = None,
    model: ModelOpt = None,
    token: Annotated[Optional[str], typer.Option("--token", "-w", metavar="WORD", help="The query: a word of the "
                                                 "text (its last token, if it has several). Default: the last "
                                                 "token.", show_default=False)] = None,
    position: Annotated[Optional[int], typer.Option(metavar="N", help="The query by token index (negative counts "
                                                    "from the end).", show_default=False)] = None,
    layer: Annotated[Optional[int], typer.Option("--layer", "-l", metavar="N", help="Layer, from 0 (negative counts "
                                                 "from the end). Default: the last.", show_default=False)] = None,
    head: Annotated[Optional[int], typer.Option("--head", metavar="N", help="One head, from 0. Default: the mean of "
                                                "the layer's heads.", show_default=False)] = None,
    all_heads: Annotated[bool, typer.Option("--all", metavar="", help="Every layer x head at once, as a grid of "
                                            "small bars.")] = False,
    matrix: Annotated[bool, typer.Option("--matrix", metavar="", help="The whole token x token map of one "
                                         "layer/head as a heatmap.")] = False,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Every weight (layers x heads x tokens x "
                                          "tokens) and the tokens, as JSON.")] = False,
    html: Annotated[Optional[Path], typer.Option("--html", metavar="FILE", help="Write a standalone explorer page "
                                                 "(one file, works offline) to open in a browser.",
                                                 show_default=False)] = None,
    device: DeviceOpt = "auto",
    dtype: ScoreDtypeOpt = Dtype.float32,
) -> None:
    """Show which earlier tokens a token attends to, in each layer and head."""
    from tinygen.generate.textgen import prompt_ids
    from tinygen.inspect.attention import attention_map, find_word, query_at

    _check_views(token, position, layer, head, all_heads, matrix, as_json, html)
    text = text_arg(text)
    net, tok, meta, _ = load_model(model, device, dtype)
    amap = attention_map(net, tok, prompt_ids(tok, text) if text else [])  # as the model reads a prompt
    if amap.dropped:
        ui.warn(f"the text has {len(amap.ids) + amap.dropped} tokens, more than the model's context; "
                f"looking at the last {len(amap.ids)}")
    query = find_word(amap, tok, token) if token is not None else query_at(amap, position)
    if query.note:
        ui.note(query.note)
    layer_i = amap.layer_index(layer)
    head_i = None if head is None else amap.head_index(head)
    if as_json:
        ui.write(json.dumps(amap.to_dict(meta.path.name, text, query.position), ensure_ascii=False) + "\n")
    elif html is not None:
        from tinygen.cli.explorer import write_html

        # The page opens on the view the flags name; every layer and head is in it either way.
        page = {**amap.to_dict(meta.path.name, text, query.position, decimals=None), "layer": layer_i, "head": head_i}
        write_html(html, page)
        ui.note(f"wrote {html}: open it in a browser")
    else:
        _draw(amap, query.position, layer_i, head_i, all_heads, matrix)


def _check_views(token, position, layer, head, all_heads: bool, matrix: bool, as_json: bool, html) -> None:
    """Refuse flags that ask for two queries or two views at once."""
    if token is not None and position is not None:
        raise TinygenError("give --token or --position, not both")
    if sum((all_heads, matrix, as_json, html is not None)) > 1:
        raise TinygenError("pick one of --all, --matrix, --json and --html")
    if all_heads and (layer is not None or head is not None):
        raise TinygenError("--all shows every layer and head; drop --layer/--head")


def _draw(amap, q: int, layer_i: int, head_i: int | None, all_heads: bool, matrix: bool) -> None:
    """The view the flags ask for, on stdout: every layer and head, one map, or one query's bars."""
    from tinygen.cli import views

    where = f"layer {layer_i} of 0–{amap.n_layer - 1}, " + (f"head {head_i}" if head_i is not None
                                                        else f"mean of its {amap.n_head} heads")
    console = ui.out()
    if all_heads:
        views.attention_grid(console, amap.labels, amap.weights, q,
                             f"attention from {views.visible(amap.labels[q])!r} (token {q}), every layer and head")
    elif matrix:
        views.attention_matrix(console, amap.labels, amap.matrix(layer_i, head_i), f"attention map, {where}")
    else:
        views.attention_bars(console, amap.labels, amap.matrix(layer_i, head_i)[q], q,
                             f"attention from {views.visible(amap.labels[q])!r} (token {q}), {where}")


def embed(
    words: Annotated[list[str], typer.Argument(metavar="WORD", help="Words to look up; with --analogy, three: "
                                               "A B C for A - B + C.", show_default=False)],
    model: ModelOpt = None,
    analogy: Annotated[bool, typer.Option("--analogy", metavar="", help="Nearest tokens to A - B + C (king man "
                                          "woman: king - man + woman).")] = False,
    top: Annotated[int, typer.Option("--top", "-k", metavar="N", min=1, help="How many neighbours to list.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Machine-readable output.")] = False,
) -> None:
    """Nearest tokens to a word in the model's token embedding space, by cosine similarity."""
    from tinygen.cli import views
    from tinygen.inspect.embedding import neighbours

    if analogy and len(words) != 3:
        raise TinygenError(f"--analogy takes three words, A B C for A - B + C; got {len(words)}")
    net, tok = load_model(model, "cpu")[:2]
    results, notes = neighbours(net, tok, words, top, as_analogy=analogy)
    for note in notes:
        ui.note(note)
    if as_json:
        ui.write(json.dumps(results if len(results) > 1 else results[0], indent=2, ensure_ascii=False) + "\n")
        return
    console = ui.out()
    for n, r in enumerate(results):
        if n:
            console.print()
        views.neighbours(console, f"nearest to {r['query']} (cosine similarity of token embeddings)",
                         [(x["text"], x["cosine"]) for x in r["nearest"]])
