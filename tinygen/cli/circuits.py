"""`tinygen lens`, `trace`, `patch`, `ablate` and `heads`: experiments on a model's activations,
each a terminal picture, JSON rows (--json, one object a line) or a tab of the HTML explorer."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NamedTuple, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.common import load_model, text_arg
from tinygen.cli.options import DeviceOpt, Dtype, ModelOpt, RunDtypeOpt
from tinygen.errors import TinygenError

TextArg = Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="The prompt; `-` or piped stdin reads stdin.",
                                                  show_default=False)]
TargetOpt = Annotated[Optional[str], typer.Option("--target", metavar="TEXT", help="The next token to follow, e.g. "
                                                  "' Paris' (its first token, if several). Default: the model's own "
                                                  "prediction.", show_default=False)]
KindOpt = Annotated[Optional[list[str]], typer.Option("--kind", metavar="KIND", help="What to restore: resid (the "
                                                      "residual stream entering a layer), mlp or attn (what a layer's "
                                                      "MLP or attention adds to it); repeatable. Default: all three.",
                                                      show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="One JSON object per line, for scripts.")]
WindowOpt = Annotated[int, typer.Option(metavar="N", min=1, help="Restore an MLP or attention output over N layers "
                                        "centred on each (ROME used 10): one layer's alone often moves little.")]
HtmlOpt = Annotated[Optional[Path], typer.Option("--html", metavar="FILE", help="Write a standalone explorer page "
                                                 "(one file, works offline) to open in a browser.",
                                                 show_default=False)]


def lens(
    text: TextArg = None,
    model: ModelOpt = None,
    target: Annotated[Optional[str], typer.Option("--target", metavar="TEXT", help="A token to follow through the "
                                                  "layers, e.g. ' Paris': its probability and rank at each.",
                                                  show_default=False)] = None,
    position: Annotated[int, typer.Option(metavar="N", help="The position --target is followed at (negative counts "
                                          "from the end).")] = -1,
    top: Annotated[int, typer.Option("--top", "-k", metavar="N", min=1, help="Likeliest tokens kept per cell "
                                     "(--json, --html).")] = 5,
    as_json: JsonOpt = False,
    html: HtmlOpt = None,
    device: DeviceOpt = "auto",
    dtype: RunDtypeOpt = Dtype.auto,
) -> None:
    """The logit lens: what the model would predict from each layer's residual stream."""
    from tinygen.cli import grids
    from tinygen.inspect.lens import logit_lens

    net, tok, meta, text, ids, labels = _prompt(model, device, dtype, text)
    if not -len(ids) <= position < len(ids):
        raise TinygenError(f"--position {position} is out of range: the prompt has {len(ids)} tokens")
    goal = _target(tok, target) if target is not None else None
    result = logit_lens(net, ids, labels, goal, top)
    if as_json:
        _json_rows(result.rows(tok.label))
        return
    if html is not None:
        from tinygen.cli.explorer import write_page
        from tinygen.inspect.attention import attention_map

        amap = attention_map(net, tok, ids)
        attention = {**amap.to_dict(meta.path.name, text, len(ids) - 1, decimals=None), "layer": 0,
                     "head": None}
        write_page(html, meta.path.name, {"lens": lens_view(result, result.rows(tok.label)), "attention": attention})
        ui.note(f"wrote {html}: open it in a browser")
        return
    console = ui.out()
    L = result.n_layer
    texts = [[tok.label(int(result.top_ids[layer, pos, 0])) for pos in range(len(ids))] for layer in range(L + 1)]
    grids.lens(console, labels, texts, result.top_p[..., 0].tolist(),
               f"logit lens: the likeliest next token from each layer, {meta.path.name}")
    if goal is not None:
        pos = position % len(ids)
        console.print()
        grids.target_curve(console, result.target_p[:, pos].tolist(), result.target_rank[:, pos].tolist(),
                           f"{goal.text!r} after {labels[pos]!r} (token {pos}), layer by layer")


def lens_view(result, rows: list[dict]) -> dict:
    """The explorer's lens tab."""
    L, T = result.n_layer, len(result.labels)
    view = {"tokens": result.labels, "n_layer": L,
            "top": [[rows[layer * T + pos]["top"] for pos in range(T)] for layer in range(L + 1)], "target": None}
    if result.target is not None:
        view["target"] = {"text": result.target.text, "p": result.target_p.tolist(),
                          "rank": result.target_rank.tolist()}
    return view


def trace(
    text: TextArg = None,
    subject: Annotated[str, typer.Option("--subject", metavar="TEXT", help="The words whose embeddings get the "
                                         "noise, e.g. 'The Eiffel Tower'.", show_default=False)] = ...,
    target: TargetOpt = None,
    kind: KindOpt = None,
    samples: Annotated[int, typer.Option(metavar="N", min=1, help="Noise draws averaged per cell (ROME used 10); "
                                         "each costs a pass.")] = 1,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the noise.")] = 0,
    window: WindowOpt = 1,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
    html: HtmlOpt = None,
    device: DeviceOpt = "auto",
    dtype: RunDtypeOpt = Dtype.auto,
) -> None:
    """Causal tracing (ROME): blur the subject with noise, then restore one clean hidden state at a
    time and see which bring the prediction back."""
    from tinygen.inspect.attention import token_span
    from tinygen.inspect.patching import KINDS, NOISE_SCALE, check_kinds
    from tinygen.inspect.patching import trace as run_trace

    kinds = check_kinds(tuple(kind) if kind else KINDS)
    net, tok, meta, _, ids, labels = _prompt(model, device, dtype, text)
    span = token_span(tok, ids, subject, "--subject")
    if span is None:
        raise TinygenError(f"--subject {subject!r} is not in the prompt")
    first, last, found = span
    if found > 1:
        ui.note(f"--subject {subject!r} appears {found} times; the noise goes on the last")
    goal = _target(tok, target) if target is not None else _predicted(net, tok, ids)
    with _passes("tracing") as progress:
        result = run_trace(net, ids, range(first, last + 1), goal, kinds, samples, seed, window, progress)
    ui.note(f"{result.metric}: {result.clean:.4f} clean, {result.broken:.4f} with noise "
            f"({NOISE_SCALE:g}x the embeddings' std) on {subject!r} (tokens {first}–{last}); {result.passes} passes")
    if abs(result.clean - result.broken) < 0.1 * max(result.clean, 1e-9):
        ui.warn("the noise barely moves the target's probability, so the grid shows little; try a longer --subject "
                "or a --target the model is surer of")
    _report(result, labels, as_json, html, meta, set(range(first, last + 1)),
            "the subject, whose embeddings got the noise", {"subject": [first, last], "samples": samples})


def patch(
    clean: Annotated[str, typer.Option("--clean", metavar="TEXT", help="The prompt the model gets right.",
                                       show_default=False)] = ...,
    corrupt: Annotated[str, typer.Option("--corrupt", metavar="TEXT", help="A prompt of as many tokens that "
                                         "differs in a few, e.g. another subject.", show_default=False)] = ...,
    target: TargetOpt = None,
    foil: Annotated[Optional[str], typer.Option("--foil", metavar="TEXT", help="The competing answer, e.g. ' Rome'. "
                                                "Default: the corrupted prompt's own prediction.",
                                                show_default=False)] = None,
    kind: KindOpt = None,
    window: WindowOpt = 1,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
    html: HtmlOpt = None,
    device: DeviceOpt = "auto",
    dtype: RunDtypeOpt = Dtype.auto,
) -> None:
    """Activation patching: run the corrupted prompt with one activation of the clean one patched in
    at a time, and measure the logit difference it brings back."""
    from tinygen.generate.textgen import prompt_ids
    from tinygen.inspect.patching import KINDS, check_kinds
    from tinygen.inspect.patching import patch as run_patch

    kinds = check_kinds(tuple(kind) if kind else KINDS)
    net, tok, meta, _, clean_ids, clean_labels = _prompt(model, device, dtype, clean, "--clean")
    broken_ids = prompt_ids(tok, corrupt)
    if len(broken_ids) != len(clean_ids) or broken_ids == clean_ids:
        said = "the same tokens" if broken_ids == clean_ids else f"{len(clean_ids)} and {len(broken_ids)} tokens"
        raise TinygenError(f"--clean and --corrupt are {said}; patching needs prompts of one length that differ: "
                           f"{[tok.label(i) for i in clean_ids]} vs {[tok.label(i) for i in broken_ids]}")
    goal = _target(tok, target) if target is not None else _predicted(net, tok, clean_ids)
    other = _target(tok, foil, "--foil") if foil is not None else _predicted(net, tok, broken_ids, avoid=goal.token)
    if other.token == goal.token:
        raise TinygenError(f"--foil is the same token as --target ({goal.text!r})")
    with _passes("patching") as progress:
        result = run_patch(net, clean_ids, broken_ids, goal, other, kinds, window, progress)
    ui.note(f"{result.metric}: {result.clean:.3f} on the clean prompt, {result.broken:.3f} on the corrupted one; "
            f"{result.passes} passes")
    changed = {i for i, (a, b) in enumerate(zip(clean_ids, broken_ids)) if a != b}
    _report(result, [tok.label(i) for i in broken_ids], as_json, html, meta, changed,
            "a token that differs between the prompts",
            {"clean_tokens": clean_labels})


def _report(result, labels: list[str], as_json: bool, html: Path | None, meta, marked: set[int], mark: str,
            extra: dict) -> None:
    """A tracing or patching experiment as JSON rows, an explorer page or grids; labels: the tokens
    of the prompt the restorations went into."""
    from tinygen.cli import grids

    if as_json:
        _json_rows(result.rows(labels))
        return
    if html is not None:
        from tinygen.cli.explorer import write_page

        view = {"tokens": labels, "metric": result.metric, "clean": result.clean, "broken": result.broken,
                "grids": {k: {"recovered": g.recovered.tolist(), "score": g.scores.tolist()}
                          for k, g in result.grids.items()}, **extra}
        write_page(html, meta.path.name, {"trace" if "subject" in extra else "patch": view})
        ui.note(f"wrote {html}: open it in a browser")
        return
    console = ui.out()
    names = {"resid": "the residual stream entering each layer", "mlp": "each layer's MLP output",
             "attn": "each layer's attention output"}
    for n, (kind, grid) in enumerate(result.grids.items()):
        if n:
            console.print()
        layer, pos = grid.peak()
        grids.restore_grid(console, labels, grid.recovered.tolist(), marked,
                           f"restoring {names[kind]}: peak {float(grid.recovered[layer, pos]):.0%} at layer {layer}, "
                           f"{labels[pos]!r} (token {pos})")
    grids.restore_legend(console, mark)


def ablate(
    text: TextArg = None,
    head: Annotated[list[str], typer.Option("--head", metavar="L.H", help="A head to ablate, as LAYER.HEAD from 0 "
                                            "(repeatable).", show_default=False)] = ...,
    mode: Annotated[str, typer.Option(metavar="MODE", help="zero: the head's output set to zeros; mean: to its mean "
                                      "over the prompt's positions.")] = "zero",
    top: Annotated[int, typer.Option("--top", "-k", metavar="N", min=1, help="Likeliest next tokens to list.")] = 10,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
    html: HtmlOpt = None,
    device: DeviceOpt = "auto",
    dtype: RunDtypeOpt = Dtype.auto,
) -> None:
    """Next-token probabilities with and without some attention heads."""
    from tinygen.cli import grids
    from tinygen.inspect.heads import ablate as run_ablate
    from tinygen.inspect.heads import parse_head

    net, tok, meta, _, ids, labels = _prompt(model, device, dtype, text)
    heads = list(dict.fromkeys(parse_head(h, net.config.n_layer, net.config.n_head) for h in head))
    result = run_ablate(net, ids, heads, mode)
    before, after = result.top(top)
    names = [f"{layer}.{h}" for layer, h in heads]
    if as_json:
        _json_rows([{"heads": names, "mode": mode,
                     "top_before": [[tok.label(i), round(b, 6)] for i, b, _ in before],
                     "top_after": [[tok.label(i), round(a, 6)] for i, _, a in after]}])
        return
    seen = list(dict.fromkeys(i for i, _, _ in before + after))
    rows = sorted(((tok.label(i), float(result.before[i]), float(result.after[i])) for i in seen),
                  key=lambda r: -max(r[1], r[2]))
    if html is not None:
        from tinygen.cli.explorer import write_page

        write_page(html, meta.path.name, {"ablate": {"tokens": labels, "heads": names, "mode": mode,
                                                     "rows": [list(r) for r in rows]}})
        ui.note(f"wrote {html}: open it in a browser")
        return
    grids.ablation(ui.out(), rows, f"next token after {labels[-1]!r}, with heads {', '.join(names)} {mode}-ablated")


def heads(
    text: Annotated[Optional[str], typer.Option("--text", metavar="TEXT", help="Score the heads on this text "
                                                "instead of random tokens repeated.", show_default=False)] = None,
    length: Annotated[int, typer.Option(metavar="N", min=2, help="Random tokens before they repeat.")] = 40,
    batch: Annotated[int, typer.Option(metavar="N", min=1, help="Random sequences scored.")] = 4,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the random tokens.")] = 0,
    top: Annotated[int, typer.Option("--top", "-k", metavar="N", min=1, help="Best heads listed of each kind.")] = 5,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
    html: HtmlOpt = None,
    device: DeviceOpt = "auto",
    dtype: RunDtypeOpt = Dtype.auto,
) -> None:
    """Find previous-token, duplicate-token and induction heads, by where each head attends."""
    from tinygen.cli import grids
    from tinygen.inspect.heads import DETECTORS, detect, repeated_random

    if text is not None:
        net, tok, meta, _, ids, _ = _prompt(model, device, dtype, text, "--text")
        sequences = [ids]
    else:
        net, tok, meta, _ = load_model(model, device, dtype)
        sequences = repeated_random(tok, net.config.vocab_size, length, batch, seed)
        _fits(net, len(sequences[0]), "--length")
    scores = detect(net, sequences)
    if as_json:
        _json_rows(scores.rows())
        return
    if html is not None:
        from tinygen.cli.explorer import write_page

        L, H = scores.scores.shape[1:]
        write_page(html, meta.path.name, {"heads": {"n_layer": L, "n_head": H, "scores": {
            kind: scores.scores[k].tolist() for k, kind in enumerate(DETECTORS)}}})
        ui.note(f"wrote {html}: open it in a browser")
        return
    console = ui.out()
    on = "the text" if text is not None else f"{batch} sequences of {length} random tokens, each repeated"
    for k, kind in enumerate(DETECTORS):
        if k:
            console.print()
        grids.head_grid(console, scores.scores[k].tolist(), scores.top(kind, top),
                        f"{kind} heads on {on}; the best as LAYER.HEAD score, then a row per layer, a column per head")


class Prompt(NamedTuple):
    net: object
    tok: object
    meta: object
    text: str
    ids: list[int]
    labels: list[str]  # each token's own text


def _prompt(model, device, dtype, text, flag: str = "PROMPT") -> Prompt:
    """The model, and a prompt (from stdin for PROMPT `-` or a pipe) as the model reads it."""
    from tinygen.generate.textgen import prompt_ids

    text = text_arg(text) if flag == "PROMPT" else text
    if not text:
        raise TinygenError(f"give a prompt: {flag}" + (" or stdin" if flag == "PROMPT" else " TEXT"))
    net, tok, meta, _ = load_model(model, device, dtype)
    ids = prompt_ids(tok, text)
    _fits(net, len(ids), flag)
    return Prompt(net, tok, meta, text, ids, [tok.label(i) for i in ids])


def _fits(net, n: int, flag: str) -> None:
    if n > net.config.block_size:
        raise TinygenError(f"{flag} is {n} tokens; this model reads at most {net.config.block_size}")


def _target(tok, text: str, flag: str = "--target"):
    from tinygen.inspect.activations import target_token

    goal = target_token(tok, text, flag)
    if goal.note:
        ui.note(goal.note)
    return goal


def _predicted(net, tok, ids: list[int], avoid: int | None = None):
    """The model's own likeliest next token (other than `avoid`), as a target."""
    import torch

    from tinygen.inspect.activations import Target, run

    logits = run(net, torch.tensor([ids]))[0][0].clone()  # out of inference mode, to be changed
    if avoid is not None:
        logits[avoid] = float("-inf")
    token = int(logits.argmax())
    ui.note(f"following the model's prediction {tok.label(token)!r}")
    return Target(token, tok.label(token))


@contextmanager
def _passes(what: str):
    """A progress bar over an experiment's passes on a terminal's stderr; a closing line anywhere."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    start = time.perf_counter()
    console = ui.err()
    if console.is_terminal:
        with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task(what, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
    else:
        yield None
    ui.note(f"{what} took {time.perf_counter() - start:.1f} s")


def _json_rows(rows: list[dict]) -> None:
    ui.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
