"""`tinygen train` and `tinygen chat-data`: models from your own text, and chat data to fine-tune on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.options import DeviceOpt
from tinygen.errors import TinygenError


def _parse_duration(text: Optional[str]) -> Optional[float]:
    """Seconds from `90`, `90s`, `45m`, `2h` or `1h30m`."""
    if text is None:
        return None
    import re

    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not parts or not any(parts.groups()) or not text.strip():
        raise TinygenError(f"--time expects a duration like 90s, 45m, 2h or 1h30m, got {text!r}")
    h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
    seconds = 3600 * h + 60 * m + sec
    if seconds <= 0:
        raise TinygenError("--time must be positive")
    return seconds


def train(
    data: Annotated[list[str], typer.Argument(help="Training text: files, folders or globs; plain text or JSONL "
                                              "with a \"text\" field. With --chat: conversations.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors).", show_default=False)],
    preset: Annotated[Optional[str], typer.Option(help="Model size: tiny (~1M), mini, small (~15M), medium, "
                                                  "gpt2 (124M). Default tiny.", show_default=False)] = None,
    n_layer: Annotated[Optional[int], typer.Option(help="Override the preset's number of blocks.")] = None,
    n_head: Annotated[Optional[int], typer.Option(help="Override the preset's attention heads.")] = None,
    n_embd: Annotated[Optional[int], typer.Option(help="Override the preset's width.")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="Override the preset's context length.")] = None,
    arch: Annotated[str, typer.Option(help="rope (default: rotary, RMSNorm, SwiGLU) or gpt2.")] = "rope",
    dropout: Annotated[float, typer.Option(help="Dropout; 0.1-0.2 helps on small data.")] = 0.0,
    vocab_size: Annotated[int, typer.Option(help="Size of the BPE vocabulary to train, special tokens included.")] = 4096,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Reuse this checkpoint's (or GPT-2 folder's) "
                                                     "tokenizer instead of training one.")] = None,
    init: Annotated[Optional[str], typer.Option(help="Start from this checkpoint's weights (fine-tuning).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run saved at --out.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Chat fine-tuning of --init: DATA is messages-format JSONL "
                                       "(see `tinygen chat-data`); only the assistant's tokens are learned.")] = False,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    tokens: Annotated[Optional[int], typer.Option("--tokens", help="Stop after this many training tokens.")] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time", help="Stop after this long: 90s, 45m, 2h.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch on each process.")] = 16,
    batch_tokens: Annotated[Optional[int], typer.Option(help="Tokens per optimizer step; gradient accumulation "
                                                        "makes up the difference.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 100,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm to this; 0 is off.")] = 1.0,
    eval_every: Annotated[int, typer.Option(help="Evaluate, sample and save every this many steps.")] = 250,
    eval_tokens: Annotated[int, typer.Option(help="Validation tokens scored per evaluation.")] = 200_000,
    val_fraction: Annotated[float, typer.Option(help="Share of documents held out for validation.")] = 0.05,
    separator: Annotated[str, typer.Option(help="Text that separates documents in plain-text files.")] = "<|endoftext|>",
    seed: Annotated[int, typer.Option(help="Seed for initialisation, batches and dropout.")] = 1337,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (GPU).")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Train a model (and its tokenizer) on your own text."""
    from tinygen.cli.progress import TrainDisplay
    from tinygen.core.device import resolve_device
    from tinygen.training.distributed import init_distributed, shutdown_distributed
    from tinygen.training.loop import TrainSettings
    from tinygen.training.loop import train as train_loop
    from tinygen.training.recipe import prepare

    stops = dict(max_steps=max_steps, max_tokens=tokens, max_time=_parse_duration(time_limit))
    settings = None  # a resumed run takes its settings from its state file
    default_steps = not resume and not any(stops.values())
    if not resume:
        if default_steps:
            stops["max_steps"] = 1000
        settings = TrainSettings(**stops, batch_size=batch_size, batch_tokens=batch_tokens, lr=lr,
                                 warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip,
                                 eval_every=eval_every, eval_tokens=eval_tokens, seed=seed, compile=compile)
    dist, dev = init_distributed(resolve_device(device))
    console = ui.err()
    try:
        run = prepare(data, out, settings, stops, dist=dist, preset=preset,
                      shape=dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size), arch=arch,
                      dropout=dropout, vocab_size=vocab_size, tokenizer_from=tokenizer, init=init, resume=resume,
                      separator=separator, val_fraction=val_fraction, chat=chat)
        if default_steps and dist.master:
            console.print("[dim]no --max-steps, --tokens or --time given: training for 1000 steps[/dim]")
        stop = _StopFlag()
        events = train_loop(run.model, run.tokenizer, run.train_data, run.val_data, out, run.settings, device=dev,
                            dist=dist, resume=resume, val_bytes=run.val_bytes, provenance=run.provenance,
                            chat=run.chat, should_stop=stop)
        if not dist.master:
            for _ in events:
                pass
            return
        with stop.installed(), TrainDisplay(console, run.tokenizer, out) as display:
            for ev in events:
                display.handle(ev)
        display.finish()
    finally:
        shutdown_distributed(dist)


class _StopFlag:
    """Ctrl-C or SIGTERM asks the training loop to save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def installed(self):
        import contextlib
        import signal

        @contextlib.contextmanager
        def handlers():
            def on_signal(signum, frame):
                if self.requested:  # a second Ctrl-C means now
                    raise KeyboardInterrupt
                self.requested = True
                ui.warn("stopping: saving a checkpoint at the end of this step (Ctrl-C again to abort)")

            old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

        return handlers()


def chat_data(
    kind: Annotated[str, typer.Argument(help="topical-chat (Topical-Chat .json files), dolly (Dolly JSONL), "
                                        "stories (story text: \"Tell me a story about ...\" requests) or mix "
                                        "(conversations that change subject, joined from files of the others).",
                                        show_default=False)],
    sources: Annotated[list[str], typer.Argument(help="Files or folders to convert.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the wording of story requests and the choices of mix.")] = 0,
) -> None:
    """Convert conversation datasets into the JSONL that `tinygen train --chat` reads."""
    from tinygen import atomic
    from tinygen.training.chatdata import CONVERTERS, SEEDED, to_jsonl

    if kind not in CONVERTERS:
        raise TinygenError(f"unknown kind {kind!r}; choose from {', '.join(CONVERTERS)}")
    convs = CONVERTERS[kind](sources, **({"seed": seed} if kind in SEEDED else {}))
    if out is None:
        for line in to_jsonl(convs):
            ui.write(line)
        return
    lines = list(to_jsonl(convs))
    atomic.write_bytes(out, "".join(lines).encode())
    ui.err().print(f"wrote {len(lines)} conversations to {out}")
