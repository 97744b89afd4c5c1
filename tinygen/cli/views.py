"""Pictures of the model's insides for the terminal: attention bars, grids and heatmaps, next-token
distributions, surprisal-coloured text and embedding neighbours.

Every view is built from block and shade characters, so it reads the same in a pipe, under
NO_COLOR and in a test snapshot; colour only adds to it on a terminal. Views take the console
to print on and plain numbers, never the model.
"""

from __future__ import annotations

import math

import torch
from rich.cells import cell_len, set_cell_size
from rich.console import Console
from rich.table import Table
from rich.text import Text

EIGHTHS = " ▏▎▍▌▋▊▉"
SPARKS = "▁▂▃▄▅▆▇█"
# Heatmap shades and the weights at which they start: a reader sees a 50% cell from across the room
# and can still tell 3% from 0, which a linear ramp of five shades would lump together.
SHADES = ((0.5, "█"), (0.25, "▓"), (0.1, "▒"), (0.03, "░"), (0.0, "·"))
HEAT_STYLES = {"█": "bold yellow", "▓": "yellow", "▒": "dark_orange3", "░": "red3", "·": "grey42"}
LABEL_WIDTH = 12


def visible(label: str, width: int = LABEL_WIDTH) -> str:
    """A token's text made visible: spaces as ·, newlines as ↵, clipped with … to width cells
    (a CJK character or an emoji takes two)."""
    shown = label.replace(" ", "·").replace("\n", "↵").replace("\r", "␍").replace("\t", "⇥") or "∅"
    return shown if cell_len(shown) <= width else set_cell_size(shown, width - 1) + "…"


def column(label: str, width: int = LABEL_WIDTH) -> str:
    """visible(label), padded to exactly width cells so that the columns after it line up."""
    return set_cell_size(visible(label, width), width)


def pct(p: float) -> str:
    """A probability in six cells; tiny but nonzero ones say so rather than round to 0.0%."""
    return f"{'<0.1%':>6}" if 0 < p < 0.0005 else f"{p:>6.1%}"


def bar(fraction: float, width: int) -> str:
    """A horizontal bar of fraction * width cells, in eighths of a cell."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (EIGHTHS[rest] if rest else "")


def _bar_width(console: Console, used: int, most: int = 40) -> int:
    return max(8, min(most, console.width - used))


def attention_bars(console: Console, labels: list[str], row: torch.Tensor, query: int, title: str,
                   max_rows: int = 40) -> None:
    """How much the query token attends to each token up to itself (one row of a map)."""
    weights = row[: query + 1].tolist()
    shown = list(range(query + 1))
    if len(shown) > max_rows:  # keep the strongest, in text order, and account for the rest
        shown = sorted(sorted(shown, key=lambda j: -weights[j])[:max_rows])
    console.print(Text(title, style="bold"))
    width = _bar_width(console, used=4 + LABEL_WIDTH + 2 + 7 + 9)
    top = max(weights) or 1.0
    for j in shown:
        line = Text.assemble((f"{j:>3} ", "dim"), column(labels[j]) + " ",
                             (f"{bar(weights[j] / top, width):<{width}} ", "cyan"),
                             (pct(weights[j]), "bold" if weights[j] == top else ""))
        if j == query:
            line.append("  ◀ itself", style="dim")
        console.print(line, no_wrap=True, overflow="crop")
    hidden = query + 1 - len(shown)
    if hidden:
        kept = set(shown)
        rest = sum(w for j, w in enumerate(weights) if j not in kept)
        console.print(Text(f"… and {hidden} weaker tokens with {rest:.1%} in all (--json has every weight)", style="dim"))


def _sparkline(weights: list[float]) -> str:
    top = max(weights) or 1.0
    return "".join(SPARKS[min(7, int(w / top * 8))] for w in weights)


def attention_grid(console: Console, labels: list[str], weights: torch.Tensor, query: int, title: str,
                   max_keys: int = 24) -> None:
    """Every layer x head at once for one query: a sparkline over the keys (scaled to that head's
    strongest weight) and the token it attends to most."""
    first = max(0, query + 1 - max_keys)
    keys = list(range(first, query + 1))
    console.print(Text(title, style="bold"))
    if first:
        console.print(Text(f"sparklines show tokens {first}–{query}; the strongest token is over all of them", style="dim"))
    cell = max(len(keys), 11)
    n_layer, n_head = weights.shape[:2]
    per_block = max(1, (console.width - 4) // (cell + 1))
    for start in range(0, n_head, per_block):
        table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
        table.add_column("", justify="right", style="dim", no_wrap=True)
        for h in range(start, min(n_head, start + per_block)):
            table.add_column(f"head {h}", no_wrap=True, width=cell, header_style="dim")
        for layer in range(n_layer):
            cells = []
            for h in range(start, min(n_head, start + per_block)):
                row = weights[layer, h, query, : query + 1].tolist()
                j = max(range(len(row)), key=row.__getitem__)
                strength = f" {row[j]:.0%}"
                name = visible(labels[j], cell - len(strength))
                cells.append(Text.assemble((_sparkline(row[first:]), "cyan"), ("\n" + name + strength, "dim")))
            table.add_row(f"L{layer}", *cells)
        console.print(table)


def shade(w: float) -> str:
    return next(ch for at, ch in SHADES if w >= at)


def first_fitting(console: Console, n: int, used: int, cell: int) -> int:
    """The first of n columns, `cell` cells wide, beside `used` cells: the last ones that fit are kept."""
    return max(0, n - max(1, (console.width - used) // cell))


def column_numbers(console: Console, used: int, first: int, n: int) -> None:
    """The numbers of columns first..n-1, two cells each, after `used` cells: every column for
    short grids, else every fifth, where they fit."""
    header = [" "] * (used + 2 * (n - first))
    free = 0
    for j in range(first, n):
        at = used + 2 * (j - first)
        if (n <= 10 or j % 5 == 0) and at >= free:
            header[at : at + len(str(j))] = str(j)
            free = at + len(str(j)) + 1
    console.print(Text("".join(header).rstrip(), style="dim"), no_wrap=True, overflow="crop")


def attention_matrix(console: Console, labels: list[str], matrix: torch.Tensor, title: str) -> None:
    """The (T, T) causal map as a heatmap: a row per query, a column per key, blank above the
    diagonal where the mask hides the future."""
    T = matrix.size(0)
    row_label = 4 + LABEL_WIDTH + 1
    first = first_fitting(console, T, row_label, 2)
    console.print(Text(title, style="bold"))
    if first:
        console.print(Text(f"showing tokens {first}–{T - 1} of {T}, the last {T - first} that fit in {console.width} "
                           f"columns (--json has every weight)", style="dim"))
    column_numbers(console, row_label, first, T)
    weights = matrix.tolist()
    for i in range(first, T):
        line = Text.assemble((f"{i:>3} ", "dim"), column(labels[i]) + " ")
        for j in range(first, T):
            if j > i:
                line.append("  ")
            else:
                ch = shade(weights[i][j])
                line.append(ch * 2, style=HEAT_STYLES[ch])
        console.print(line, no_wrap=True, overflow="crop")
    legend = "  ".join(f"{ch} ≥{at:.0%}" for at, ch in SHADES[:-1])
    console.print(Text(legend + "  · less  (blank: the future, masked)", style="dim"))


def flags_summary(params) -> str:
    """The sampling flags that change the distribution, as a user would type them."""
    if params.greedy:
        return "greedy (temperature 0)"
    parts = [f"temperature {params.temperature:g}"]
    for name, value, off in (("top-k", params.top_k, 0), ("top-p", params.top_p, 1.0), ("min-p", params.min_p, 0.0),
                             ("repetition penalty", params.repetition_penalty, 1.0)):
        if value != off:
            parts.append(f"{name} {value:g}")
    return ", ".join(parts)


def next_token_header(console: Console, flags: str) -> int:
    """The column heads of the explain view; returns the bar width the steps use."""
    width = max(6, min(20, (console.width - 4 - LABEL_WIDTH - 1 - 2 * 8 - 12) // 2))
    head = " " * (4 + LABEL_WIDTH + 1) + f"{'model':<{width + 9}}after {flags}"
    console.print(Text(head, style="bold"), no_wrap=True, overflow="ellipsis")
    return width


def next_token_step(console: Console, step, label, width: int) -> None:
    """One generated token: the candidates' probabilities before and after the flags, the chosen one marked."""
    title = Text.assemble((f"#{step.index} → ", "dim"), (repr(visible(label(step.chosen), 30)), "bold"),
                          (f"  {step.p_sampled:.1%} to draw · {step.kept} tokens kept · "
                           f"model entropy {step.entropy_bits:.1f} bits", "dim"))
    console.print(title, no_wrap=True, overflow="ellipsis")
    for c in step.candidates:
        line = Text.assemble("    " + column(label(c.token)) + " ",
                             (f"{bar(c.p_model, width):<{width}}", "blue"), f" {pct(c.p_model)}  ")
        if c.p_sampled > 0:
            line.append_tokens([(f"{bar(c.p_sampled, width):<{width}}", "green"), (f" {pct(c.p_sampled)}", "")])
        else:
            line.append(f"{'':<{width}} {'cut':>6}", style="dim")
        if c.token == step.chosen:
            line.append("  ◀ drawn", style="bold")
        console.print(line, no_wrap=True, overflow="crop")


# Surprisal colours by probability: likely tokens green, surprising ones red.
SURPRISE = ((0.5, "on dark_green"), (0.1, "on green4"), (0.02, "on dark_orange3"), (0.0, "on red3"))


def surprisal(console: Console, labels: list[str], probs, context: str) -> None:
    """A text with each token coloured by the probability the model gave it, then a row per token."""
    line = Text()
    for label, p in zip(labels, probs):
        style = "on grey23" if math.isnan(p) else next(s for at, s in SURPRISE if p >= at)
        line.append(label.replace("\n", "↵\n"), style=style)
    if not console.no_color:
        console.print(line)
        console.print(Text.assemble(("probability:", "dim"), *((f" {'≥' if at else '<'}{at or SURPRISE[-2][0]:.0%} ",
                                                                 style) for at, style in SURPRISE)))
    width = _bar_width(console, used=4 + LABEL_WIDTH + 1 + 8 + 10 + 2, most=30)
    for i, (label, p) in enumerate(zip(labels, probs)):
        row = Text.assemble((f"{i:>3} ", "dim"), column(label) + " ")
        if math.isnan(p):
            row.append(f"{'—':>6}  (nothing before it to predict it from)", style="dim")
        else:
            bits = -math.log2(max(p, 1e-30))
            style = next(s for at, s in SURPRISE if p >= at).removeprefix("on ")
            row.append_tokens([(pct(p), ""), (f" {-math.log(max(p, 1e-30)):>5.2f} nats ", "dim"),
                               (bar(bits / 16, width), style)])
        console.print(row, no_wrap=True, overflow="crop")
    console.print(Text(f"bars: surprisal in bits, full at 16; the first token is predicted from {context}",
                       style="dim"))


def neighbours(console: Console, title: str, rows: list[tuple[str, float]]) -> None:
    """Tokens with their cosine similarity to a vector, bars scaled to the closest."""
    console.print(Text(title, style="bold"))
    width = _bar_width(console, used=4 + LABEL_WIDTH + 1 + 7, most=40)
    top = max((c for _, c in rows), default=1.0)
    for label, cos in rows:
        console.print(Text.assemble("    " + column(label) + " ",
                                    (f"{bar(max(cos, 0) / top if top > 0 else 0, width):<{width}}", "magenta"),
                                    f" {cos:>6.3f}"), no_wrap=True, overflow="crop")
