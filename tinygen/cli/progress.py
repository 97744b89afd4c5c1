"""What `tinygen train` shows on stderr while it works.

On a terminal: a live bar (step, loss, val loss, tokens/s, MFU on GPU, ETA), an eval line with a
short sample at each evaluation, and a loss chart at the end. In a pipe or log file: one plain
line per step interval instead of the live bar. The training loop itself writes the metrics file
(training/metrics.py); the display only reads it back for the chart of a resumed run.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from tinygen.core.tokenizer import Tokenizer
from tinygen.training.events import Eval, Kept, Overfit, Saved, Start, Step
from tinygen.training.metrics import metrics_path, read_metrics

# An early sample can hold any byte, a terminal's escape among them: shown as U+FFFD instead.
CONTROLS = dict.fromkeys([*range(32), 127, *range(128, 160)], "\N{REPLACEMENT CHARACTER}")


class TrainDisplay:
    def __init__(self, console: Console, tokenizer: Tokenizer, out: Path, log_every: int = 10):
        self.console = console
        self.tokenizer = tokenizer
        self.out = out
        self.interrupted = False
        self.metrics_path = metrics_path(out)
        self.log_every = log_every
        self.val_loss: float | None = None
        self.losses: list[tuple[int, float]] = []
        self.val_losses: list[tuple[int, float]] = []
        self.progress: Progress | None = None
        self.task = None

    def __enter__(self):
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]step {task.fields[step]}"), BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("loss [cyan]{task.fields[loss]}[/] val [magenta]{task.fields[val]}[/] "
                           "{task.fields[tps]} tok/s{task.fields[mfu]}"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=1.0, step=0, loss="-", val="-", tps="-", mfu="")
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def _start(self, ev: Start) -> None:
        if ev.resumed_step:  # the chart goes back to the start of the run
            rows = read_metrics(self.metrics_path)
            self.losses = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
            self.val_losses = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        self.console.print(
            f"[dim]{ev.params / 1e6:.2f}M parameters · {ev.tokens_per_step:,} tokens/step "
            f"({ev.accum_steps} accumulation step{'s' if ev.accum_steps > 1 else ''}, {ev.world_size} process"
            f"{'es' if ev.world_size > 1 else ''}) · {ev.train_tokens:,} train / {ev.val_tokens:,} val tokens · "
            f"{ev.device}{' · bf16 mixed precision' if ev.dtype == 'bfloat16' else ''}"
            f"{f' · resuming at step {ev.resumed_step}' if ev.resumed_step else ''}[/dim]"
        )

    def handle(self, ev) -> None:
        if isinstance(ev, Start):
            self._start(ev)
        elif isinstance(ev, Step):
            self._step(ev)
        elif isinstance(ev, Eval):
            self._eval(ev)
        elif isinstance(ev, Overfit):
            self._overfit(ev)
        elif isinstance(ev, Kept):
            self._kept(ev)
        elif isinstance(ev, Saved) and ev.reason == "interrupted":  # Kept, next, says what was saved
            self.interrupted = True

    def _step(self, ev: Step) -> None:
        self.losses.append((ev.step, ev.loss))
        val = f"{self.val_loss:.3f}" if self.val_loss is not None else "-"
        mfu = f" · MFU {ev.mfu:.0%}" if ev.mfu is not None else ""
        if self.progress is not None:
            self.progress.update(self.task, completed=ev.progress, step=ev.step, loss=f"{ev.loss:.3f}", val=val,
                                 tps=f"{ev.tokens_per_s:,.0f}", mfu=mfu)
        elif ev.step % self.log_every == 0:
            self.console.print(f"step {ev.step} · loss {ev.loss:.4f} · val {val} · lr {ev.lr:.2e} · "
                               f"{ev.tokens_per_s:,.0f} tok/s{mfu} · {ev.progress:.0%}", highlight=False)

    def _eval(self, ev: Eval) -> None:
        self.val_loss = ev.val_loss
        if ev.val_loss is None and not ev.sample:
            return
        line = Text(f"eval @ {ev.step}", style="bold magenta")
        if ev.val_loss is not None:
            self.val_losses.append((ev.step, ev.val_loss))
            line.append(f": val loss {ev.val_loss:.4f}" + (f", {ev.val_bpb:.3f} bits/byte" if ev.val_bpb else ""))
        if ev.sample:
            text = self.tokenizer.decode(ev.sample).strip().replace("\n", " ").translate(CONTROLS)
            line.append("\n  ")
            line.append(text[:200] + ("…" if len(text) > 200 else ""), style="italic")
        self.console.print(line)

    def _overfit(self, ev: Overfit) -> None:
        self.console.print(
            f"[yellow]warning:[/yellow] overfitting: validation loss has risen {ev.val - ev.best_val:.3f} since step "
            f"{ev.since} ({ev.best_val:.3f} → {ev.val:.3f}) while the training loss fell to {ev.train_loss:.3f}: the "
            f"model is memorising its {ev.train_tokens:,} training tokens. Try more text, a smaller model (--preset, "
            f"--n-layer, --n-embd) or --dropout 0.1–0.2" + ("; stopping (--early-stop)" if ev.stopping else ""),
            highlight=False)

    def _kept(self, ev: Kept) -> None:
        """Which step the checkpoint holds, and why: the run's last line before the chart."""
        val = f", validation loss {ev.val_loss:.4f}" if ev.val_loss is not None else ""
        end = "interrupted" if self.interrupted else "final"
        if ev.step == ev.last_step:
            line = f"[green]saved[/green] {self.out} at step {ev.step} ({end}){val}"
        else:
            last = f" (validation loss {ev.last_val:.4f})" if ev.last_val is not None and not self.interrupted else ""
            line = (f"[green]saved[/green] {self.out} at step {ev.step}{val}, the lowest of {ev.evaluations} "
                    f"evaluations; the last step, {ev.last_step}{last} ({end}), is in its training state for "
                    f"--resume (--keep last keeps the last)")
        if ev.halted:
            line += " · stopped early: " + ("validation stopped improving (--patience)" if ev.halted == "patience"
                                            else "overfitting (--early-stop)")
        self.console.print(line, highlight=False)

    def finish(self) -> None:
        if len(self.losses) >= 2:
            self.console.print(loss_chart(self.losses, self.val_losses))
        self.console.print(f"[dim]metrics: {self.metrics_path}[/dim]")


def loss_chart(train: list[tuple[int, float]], val: list[tuple[int, float]], width: int = 60, height: int = 12) -> Text:
    """A terminal plot of loss against step: train as dots, validation (when there is any) as diamonds."""
    points = train + val
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    last_step = max(s for s, _ in points)
    span = (hi - lo) or 1.0
    grid = [[" "] * width for _ in range(height)]

    def place(step: int, value: float, mark: str) -> None:
        col = min(width - 1, int((step / max(last_step, 1)) * (width - 1)))
        row = min(height - 1, int((hi - value) / span * (height - 1)))
        grid[row][col] = mark

    for s, v in train:
        place(s, v, "·")
    for s, v in val:
        place(s, v, "◆")
    out = Text("loss (· train, ◆ val)\n" if val else "loss (· train)\n", style="bold")
    for i, row in enumerate(grid):
        label = hi - span * i / (height - 1)
        out.append(f"{label:7.3f} │", style="dim")
        for ch in row:
            out.append(ch, style="magenta" if ch == "◆" else "cyan")
        out.append("\n")
    out.append(" " * 8 + "└" + "─" * width + "\n", style="dim")
    out.append(" " * 9 + "step 0" + f"step {last_step}".rjust(width - 6), style="dim")
    return out
