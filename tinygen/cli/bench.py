"""`tinygen bench`: speed against references run in the same process."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.options import DeviceOpt, DtypeOpt, ModelOpt, QuantOpt
from tinygen.errors import TinygenError


def bench(
    model: ModelOpt = None,
    shape: Annotated[Optional[str], typer.Option(help="Benchmark a training preset's shape with random weights instead "
                                                 "of a model: tiny, mini, small (~15M), medium or gpt2 (124M).")] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Comma-separated sections to run: decode (batch-1 "
                                                "decode, prefill, bandwidth), batch (batched generation), train. "
                                                "Default: all.", show_default=False)] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length.")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Tokens to decode per batch-1 measurement.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed repeats of batch-1 decode and prefill; the median is reported.")] = 3,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes for batched generation, comma-separated.")] = "1,8,32,64",
    batch_new_tokens: Annotated[int, typer.Option(help="Tokens generated per row in batched generation.")] = 32,
    steps: Annotated[int, typer.Option(help="Training steps to time (the first two are warm-up).")] = 6,
    train_batch: Annotated[int, typer.Option(help="Sequences per training step.")] = 8,
    compare: Annotated[bool, typer.Option("--compare", help="Also run transformers' generate() on the same weights, "
                                          "and a bare PyTorch training loop, and report the ratios (needs transformers).")] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: tinygen's choice).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantOpt = None,
    compile: Annotated[bool, typer.Option("--compile", help="Compile the batch-1 decode step (CUDA graphs on a GPU), "
                                          "and both training loops.")] = False,
) -> None:
    """Measure generation and training speed against references run in the same process."""
    from tinygen.bench import bench as bench_lib

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise TinygenError(f"--batch-sizes takes integers separated by commas, got {batch_sizes!r}") from None
    sections = tuple(s.strip() for s in only.split(",")) if only else bench_lib.SECTIONS
    result = bench_lib.run(model=model, shape=shape, sections=sections, prompt_tokens=prompt_tokens,
                           new_tokens=new_tokens, repeats=repeats, batch_sizes=sizes, batch_new_tokens=batch_new_tokens,
                           steps=steps, train_batch=train_batch, compare=compare, threads=threads, device=device,
                           dtype=dtype.value, quantize=quantize and quantize.value, compile=compile, progress=None if as_json else ui.err())
    if as_json:
        ui.write(json.dumps(result, indent=2) + "\n")
    else:
        bench_lib.print_table(result, ui.out())
