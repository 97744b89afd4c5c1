"""`tinygen train` and `tinygen chat-data`: models from your own text, and chat data to fine-tune on."""

from __future__ import annotations

import os
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.options import MODEL_KINDS, DeviceOpt, Dtype, parse_dtype
from tinygen.core.config import ARCHES, PRESETS
from tinygen.errors import TinygenError

Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)
Arch = Enum("Arch", {name: name for name in ARCHES}, type=str)


class Optimizer(str, Enum):  # training.settings.OPTIMIZERS, which --help must not wait for torch to import
    adamw = "adamw"
    muon = "muon"


class Keep(str, Enum):  # training.settings.KEEPS
    best = "best"
    last = "last"


class Schedule(str, Enum):  # training.settings.SCHEDULES
    cosine = "cosine"
    wsd = "wsd"


class Mlp(str, Enum):  # core.config.MLPS
    swiglu = "swiglu"
    relu2 = "relu2"
    geglu = "geglu"


class ChatKind(str, Enum):  # the keys of training.chatdata.CONVERTERS, which --help must not wait to import
    topical_chat = "topical-chat"
    dolly = "dolly"
    stories = "stories"
    mix = "mix"


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


def _flag(help: str, *names: str):
    return typer.Option(*names, metavar="", help=help)


def train(
    ctx: typer.Context,
    data: Annotated[list[str], typer.Argument(metavar="DATA", help="Training text: files, folders or globs; plain "
                                              "text or JSONL with a \"text\" field. With --chat: conversations.",
                                              show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="Checkpoint to write (.safetensors).",
                                      show_default=False)],
    preset: Annotated[Optional[Preset], typer.Option(help="Model size: tiny (~1M), mini, small (~15M), medium, "
                                                     "gpt2 (124M). Default: planned from the text and budget.",
                                                     show_default=False)] = None,
    n_layer: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Override the preset's number of "
                                                   "blocks.", show_default=False)] = None,
    n_head: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Override the preset's attention heads.",
                                                  show_default=False)] = None,
    n_embd: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Override the preset's width.",
                                                  show_default=False)] = None,
    block_size: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Override the preset's context "
                                                      "length; with --init, lengthens a rope model's.",
                                                      show_default=False)] = None,
    arch: Annotated[Arch, typer.Option(help="rope (rotary, RMSNorm, SwiGLU) or gpt2.")] = Arch.rope,
    dropout: Annotated[float, typer.Option(metavar="X", min=0.0, max=1.0, help="Dropout; 0.1-0.2 helps on small "
                                           "data. Default: planned (0 to 0.2, by passes over the text).",
                                           show_default=False)] = 0.0,
    qk_norm: Annotated[Optional[bool], typer.Option("--qk-norm/--no-qk-norm", help="RMSNorm on each query and key "
                                                    "head. Default: on for the rope arch.",
                                                    show_default=False)] = None,
    mlp: Annotated[Optional[Mlp], typer.Option(help="The rope arch's MLP: swiglu, relu2 (ReLU squared) or geglu "
                                               "(Gemma's: SwiGLU with a tanh-GELU gate).",
                                               show_default=False)] = None,
    untied_head: Annotated[bool, _flag("An output head of its own instead of the token embedding's.",
                                       "--untied-head")] = False,
    logit_softcap: Annotated[Optional[float], typer.Option(metavar="X", min=0.0, help="Soft-cap "
                                                           "the logits at X: X * tanh(logits / X) (rope arch).",
                                                           show_default=False)] = None,
    value_embeds: Annotated[int, typer.Option(metavar="N", min=0, help="Token embeddings added to the attention "
                                              "values of the first N and last N blocks (rope arch).")] = 0,
    vocab_size: Annotated[int, typer.Option(metavar="N", help="Size of the BPE vocabulary to train, special tokens "
                                            "included. Default: planned from the text's size, at most 4096.",
                                            show_default=False)] = 4096,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", metavar="MODEL", help="Reuse this model's "
                                                      f"tokenizer instead of training one: {MODEL_KINDS}; or a folder "
                                                      "of vocab.json and merges.txt, or a tokenizer file from "
                                                      "`tinygen tokenize --train`.", show_default=False)] = None,
    init: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Start from this checkpoint's weights "
                                                 "(fine-tuning).", show_default=False)] = None,
    resume: Annotated[bool, _flag("Continue the interrupted run saved at --out.", "--resume")] = False,
    force: Annotated[bool, _flag("Replace the model at --out (and its training state and metrics) with a new run.",
                                 "--force")] = False,
    chat: Annotated[bool, _flag("Chat fine-tuning of --init: DATA is messages-format JSONL (see `tinygen "
                                "chat-data`); only the assistant's tokens are learned.", "--chat")] = False,
    max_steps: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Stop after this many optimizer steps.",
                                                     show_default=False)] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--tokens", metavar="N", min=1, help="Stop after this many "
                                                      "training tokens.", show_default=False)] = None,
    max_time: Annotated[Optional[str], typer.Option("--time", metavar="DURATION", help="Stop after this long: 90s, "
                                                    "45m, 2h.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(metavar="N", min=1, help="Sequences per micro-batch on each "
                                            "process.")] = 32,
    batch_tokens: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Tokens per optimizer step; "
                                                        "gradient accumulation makes up the difference.",
                                                        show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(metavar="X", help="Peak learning rate. Default: 1.2e-2 with muon, "
                                                "1e-3 with adamw.", show_default=False)] = None,
    warmup_steps: Annotated[int, typer.Option(metavar="N", min=0, help="Linear warmup steps.")] = 20,
    schedule: Annotated[Schedule, typer.Option(help="After warmup: wsd (hold --lr, then decay linearly to 0 over "
                                               "the last --cooldown of the budget), or cosine decay to a tenth of "
                                               "--lr.")] = Schedule.wsd,
    cooldown: Annotated[float, typer.Option(metavar="X", min=0.0, max=1.0, help="With --schedule "
                                            "wsd: the share of the budget spent decaying.")] = 0.2,
    weight_decay: Annotated[float, typer.Option(metavar="X", min=0.0, help="Weight decay (matrices only, "
                                                "Muon's too). Default: planned (0.1).", show_default=False)] = 0.1,
    optimizer: Annotated[Optional[Optimizer], typer.Option(help="muon: Muon for the matrices inside the blocks and "
                                                           "AdamW for the embeddings, head, norms and biases, both "
                                                           "at --lr; or adamw for all. Default: muon (adamw on "
                                                           "torch older than 2.9).", show_default=False)] = None,
    grad_clip: Annotated[float, typer.Option(metavar="X", min=0.0, help="Clip the gradient norm to this; 0 is "
                                             "off.")] = 1.0,
    eval_every: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Evaluate, sample and save every "
                                                      "this many steps. Default: four times per pass over the "
                                                      "training text, at most every 250 steps.",
                                                      show_default=False)] = None,
    keep: Annotated[Keep, typer.Option(help="The checkpoint at --out: best (the weights of the lowest validation "
                                       "loss; the last ones stay in the training state for --resume) or last.")
                    ] = Keep.best,
    patience: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Stop after N evaluations without a "
                                                    "new lowest validation loss. Default: 3 when no --max-steps, "
                                                    "--tokens or --time is given, else off.",
                                                    show_default=False)] = None,
    early_stop: Annotated[bool, _flag("Stop when validation loss has risen at two evaluations in a row while the "
                                      "training loss fell (overfitting).", "--early-stop")] = False,
    eval_tokens: Annotated[int, typer.Option(metavar="N", min=1, help="Validation tokens scored per "
                                             "evaluation.")] = 200_000,
    val_fraction: Annotated[float, typer.Option(metavar="X", min=0.0, help="Share held out for validation: whole "
                                                "documents, or the end of the text when there are too few.")] = 0.05,
    separator: Annotated[str, typer.Option(metavar="TEXT", help="Text that separates documents in plain-text "
                                           "files.")] = "<|endoftext|>",
    seed: Annotated[int, typer.Option(metavar="N", help="Seed for initialisation, batches, dropout and the "
                                      "validation split.")] = 1337,
    compile: Annotated[bool, _flag("torch.compile the model (GPU).", "--compile")] = False,
    device: DeviceOpt = "auto",
    dtype: Annotated[Dtype, typer.Option(parser=parse_dtype, help="What training computes in: auto (bf16 on CUDA "
                                         "and on CPUs with bf16 instructions, float32 elsewhere), float32 (or fp32), "
                                         "or bfloat16 (or bf16): mixed precision, where the weights, optimizer and "
                                         "checkpoint stay float32. On a CPU, bfloat16 pays only with bf16 "
                                         "instructions (AVX512-BF16, AMX); without them it is many times "
                                         "slower.")] = Dtype.auto,
) -> None:
    """Train a model (and its tokenizer) on your own text."""
    from tinygen.training.settings import Recipe

    # What the user typed, as click saw it: on --resume only these are checked against the saved run.
    typed = frozenset("tie_embeddings" if name == "untied_head" else name for name in ctx.params
                      if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP"))
    recipe = Recipe(
        data=data, out=out, preset=preset and preset.value, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
        block_size=block_size, arch=arch.value, dropout=dropout, vocab_size=vocab_size, qk_norm=qk_norm,
        mlp=mlp and Mlp(mlp).value, tie_embeddings=not untied_head, logit_softcap=logit_softcap,
        value_embeds=value_embeds,
        tokenizer=tokenizer and str(tokenizer), init=init and str(init), chat=chat, val_fraction=val_fraction,
        separator=separator, resume=resume, force=force, given=typed,
        train=dict(max_steps=max_steps, max_tokens=max_tokens, max_time=_parse_duration(max_time),
                   batch_size=batch_size, batch_tokens=batch_tokens, lr=lr, warmup_steps=warmup_steps,
                   schedule=Schedule(schedule).value, cooldown=cooldown,
                   weight_decay=weight_decay, optimizer=optimizer and Optimizer(optimizer).value, grad_clip=grad_clip,
                   eval_every=eval_every, eval_tokens=eval_tokens, seed=seed, compile=compile,
                   dtype=Dtype(dtype).value, keep=Keep(keep).value, patience=patience, early_stop=early_stop),
    )
    _run(recipe, device, dtype)


def _run(recipe, device: str, dtype: Dtype) -> None:
    """Train the recipe on this process's share of the devices, rank 0 showing the progress; after
    a stop request, say how to continue."""
    from tinygen.bench.hardware import peak_bf16_flops
    from tinygen.core.device import resolve_device
    from tinygen.training.distributed import init_distributed, shutdown_distributed
    from tinygen.training.events import TrainingFailed
    from tinygen.training.loop import train as train_loop
    from tinygen.training.recipe import prepare
    from tinygen.training.stopping import PeerFailed, StopFlag

    dist, dev = init_distributed(resolve_device(device))
    if dist.master and dtype == Dtype.bfloat16 and dev.type == "cpu":
        _warn_if_bf16_is_emulated()
    console = ui.err()
    stop = StopFlag(on_request=(lambda: ui.warn("stopping: saving a checkpoint (Ctrl-C again to abort)"))
                    if dist.master else None)
    try:
        run = prepare(recipe, dist=dist, device=dev)
        events = train_loop(run.model, run.tokenizer, run.train_data, run.val_data, recipe.out, run.settings,
                            device=dev, dist=dist, resume=recipe.resume, val_bytes=run.val_bytes,
                            provenance=run.provenance, recipe=run.recipe, chat=run.chat, should_stop=stop,
                            peak_flops=peak_bf16_flops(dev))
        if not dist.master:
            with stop.installed():
                for _ in events:
                    pass
            return
        interrupted = _show(events, run, stop, console, recipe.out)
    except TrainingFailed as e:
        raise TinygenError(f"{e}; continue with: {_resume_command(dist)}" if e.saved_step >= 0 else str(e)) from e
    except PeerFailed:
        raise typer.Exit(1) from None  # rank 0 says why
    finally:
        shutdown_distributed(dist)
    if interrupted:
        # Printed after the live display has stopped, so the command stands on a line of its own.
        console.print("to continue:", style="dim")
        console.print(_resume_command(dist), highlight=False, soft_wrap=True)
        # As `sample` and `eval` do on Ctrl-C, so that `train && eval` stops here. torchrun's workers
        # stopped together and exit 0: torchrun would report anything else as a crash.
        raise typer.Exit(0 if dist.torchrun else 130)


def _show(events, run, stop, console, out: Path) -> bool:
    """Rank 0's display of the run's notes and events; whether the run was interrupted."""
    from tinygen.cli.progress import TrainDisplay
    from tinygen.training.events import Saved

    if run.plan is not None:
        console.print(f"plan: {run.plan.line()}", highlight=False)
    for note in run.notes:
        console.print(f"[dim]{note}[/dim]", highlight=False)
    interrupted = False
    with stop.installed(), TrainDisplay(console, run.tokenizer, out) as display:
        for event in events:
            display.handle(event)
            interrupted |= isinstance(event, Saved) and event.reason == "interrupted"
    display.finish()
    return interrupted


def _warn_if_bf16_is_emulated() -> None:
    from tinygen.core.device import cpu_has_bf16

    if cpu_has_bf16() is False:
        ui.warn("this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 training runs many times "
                "slower than float32 here; drop --dtype bfloat16")


def _resume_command(dist) -> str:
    """This very command with --resume (and without --force)."""
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--force")]
    launcher = ["tinygen"]
    if dist.torchrun:
        launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', dist.world)}", "-m", "tinygen"]
    return shlex.join([*launcher, *args, "--resume"])


def chat_data(
    kind: Annotated[ChatKind, typer.Argument(metavar="KIND", help="topical-chat (Topical-Chat .json files), dolly (Dolly JSONL), "
                                             "stories (story text: \"Tell me a story about ...\" requests) or mix "
                                             "(conversations that change subject, joined from files of the others).",
                                             show_default=False)],
    sources: Annotated[list[str], typer.Argument(metavar="SOURCE", help="Files or folders to convert.",
                                                 show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE", help="Write here instead of stdout.",
                                                show_default=False)] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed for the wording of story requests and the choices of "
                                      "mix.")] = 0,
) -> None:
    """Convert conversation datasets into the JSONL that `tinygen train --chat` reads."""
    from tinygen import atomic
    from tinygen.training.chatdata import CONVERTERS, SEEDED, to_jsonl

    kind = ChatKind(kind).value
    convs = CONVERTERS[kind](sources, **({"seed": seed} if kind in SEEDED else {}))
    if out is None:
        for line in to_jsonl(convs):
            ui.write(line)
        return
    lines = list(to_jsonl(convs))
    atomic.write_bytes(out, "".join(lines).encode())
    ui.err().print(f"wrote {len(lines)} conversations to {out}")
