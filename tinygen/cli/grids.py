"""Terminal pictures of experiments on a model: the logit lens as a layer x position grid of
predicted tokens, tracing and patching grids (token x layer, as in the ROME paper), head scores
(layer x head) and an ablation's before and after.

Like views.py, every grid is built from shade characters that read the same in a pipe and under
NO_COLOR; colour only adds to them on a terminal. Views take plain numbers, never the model.
"""

from __future__ import annotations

from rich.cells import set_cell_size
from rich.console import Console
from rich.text import Text

from tinygen.cli.views import (
    HEAT_STYLES,
    LABEL_WIDTH,
    SHADES,
    bar,
    column,
    column_numbers,
    first_fitting,
    pct,
    shade,
    visible,
)

LEGEND = "  ".join(f"{ch} ≥{at:.0%}" for at, ch in SHADES[:-1])


def lens(console: Console, labels: list[str], top: list[list[str]], probs: list[list[float]], title: str) -> None:
    """The likeliest token at each layer (rows, the embeddings first and the output last) and
    position (columns), shaded by its probability."""
    L, T = len(top), len(labels)
    width = max(6, min(10, (console.width - 5) // max(1, T)))
    first = first_fitting(console, T, 5, width)
    console.print(Text(title, style="bold"))
    if first:
        console.print(Text(f"showing tokens {first}–{T - 1} of {T}, the last that fit in {console.width} columns "
                           "(--json has them all)", style="dim"))
    header = Text("     ")
    for pos in range(first, T):
        header.append(set_cell_size(" " + visible(labels[pos], width - 2), width), style="bold")
    console.print(header, no_wrap=True, overflow="crop")
    for layer in range(L):
        name = "out" if layer == L - 1 else f"L{layer}"
        line = Text(f"{name:>4} ", style="dim")
        for pos in range(first, T):
            ch = shade(probs[layer][pos])
            line.append(set_cell_size(ch + visible(top[layer][pos], width - 2), width), style=HEAT_STYLES[ch])
        console.print(line, no_wrap=True, overflow="crop")
    console.print(Text(f"each cell: the likeliest next token, shaded by its probability: {LEGEND}  · less; "
                       f"L0 reads the embeddings alone, out is the model's output", style="dim"))


def target_curve(console: Console, p: list[float], rank: list[int], title: str) -> None:
    """A target token's probability and rank at each layer of the lens."""
    console.print(Text(title, style="bold"))
    width = max(8, min(40, console.width - 5 - 8 - 16))
    for layer, (q, r) in enumerate(zip(p, rank)):
        name = "out" if layer == len(p) - 1 else f"L{layer}"
        console.print(Text.assemble((f"{name:>4} ", "dim"), (f"{bar(q, width):<{width}}", "cyan"), f" {pct(q)}",
                                    (f"  rank {r}", "bold" if r == 1 else "dim")), no_wrap=True, overflow="crop")


def restore_grid(console: Console, labels: list[str], recovered: list[list[float]], marked: set[int],
                 title: str) -> None:
    """A tracing or patching grid: a row per token (marked ones with *), a column per layer, each
    cell shaded by the share of the clean run's score that restoring it brought back."""
    L, T = len(recovered), len(labels)
    used = 4 + LABEL_WIDTH + 2
    first = first_fitting(console, L, used, 2)
    console.print(Text(title, style="bold"))
    if first:
        console.print(Text(f"showing layers {first}–{L - 1} of {L}, the last that fit in {console.width} columns "
                           "(--json has them all)", style="dim"))
    column_numbers(console, used, first, L)
    for pos in range(T):
        line = Text.assemble((f"{pos:>3} ", "dim"), column(labels[pos]), ("* " if pos in marked else "  ", "bold"))
        for layer in range(first, L):
            ch = shade(max(0.0, recovered[layer][pos]))  # a restoration can also make things worse
            line.append(ch * 2, style=HEAT_STYLES[ch])
        console.print(line, no_wrap=True, overflow="crop")


def restore_legend(console: Console, marked: str) -> None:
    console.print(Text(f"columns: layers; share of the clean score brought back: {LEGEND}  · less; * {marked}",
                       style="dim"))


def head_grid(console: Console, scores: list[list[float]], best: list[tuple[int, int, float]], title: str) -> None:
    """The best heads, then the scores of every head: a row per layer, a column per head."""
    H = len(scores[0])
    console.print(Text(title, style="bold"))
    console.print(Text("  " + "  ".join(f"{layer}.{head} {score:.2f}" for layer, head, score in best), style="bold"),
                  no_wrap=True, overflow="crop")
    header = "".join(f"{h:<3}" if H <= 16 or h % 4 == 0 else "   " for h in range(H))
    console.print(Text("      " + header.rstrip(), style="dim"), no_wrap=True, overflow="crop")
    for layer, row in enumerate(scores):
        line = Text(f"{f'L{layer}':>5} ", style="dim")
        for s in row:
            ch = shade(s)
            line.append(ch * 2 + " ", style=HEAT_STYLES[ch])
        console.print(line, no_wrap=True, overflow="crop")


def ablation(console: Console, rows: list[tuple[str, float, float]], title: str) -> None:
    """Next tokens with their probability before and after an ablation."""
    console.print(Text(title, style="bold"))
    width = max(6, min(20, (console.width - 4 - LABEL_WIDTH - 1 - 2 * 8 - 4) // 2))
    head = " " * (4 + LABEL_WIDTH + 1) + f"{'with every head':<{width + 9}}ablated"
    console.print(Text(head, style="dim"), no_wrap=True, overflow="ellipsis")
    for label, before, after in rows:
        console.print(Text.assemble("    " + column(label) + " ", (f"{bar(before, width):<{width}}", "blue"),
                                    f" {pct(before)}  ", (f"{bar(after, width):<{width}}", "green"), f" {pct(after)}"),
                      no_wrap=True, overflow="crop")

