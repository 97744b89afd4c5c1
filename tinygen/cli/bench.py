"""`tinygen bench`: speed against references run in the same process, as a table or JSON."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.options import DeviceOpt, Dtype, ModelOpt, QuantOpt, parse_dtype
from tinygen.core.config import PRESETS
from tinygen.errors import TinygenError

Shape = Enum("Shape", {name: name for name in PRESETS}, type=str)


def bench(
    model: ModelOpt = None,
    shape: Annotated[Optional[Shape], typer.Option(metavar="SHAPE", help="Benchmark a training preset's shape with "
                                                   "random weights instead of a model: tiny, mini, small (~15M), "
                                                   "medium or gpt2 (124M).", show_default=False)] = None,
    only: Annotated[Optional[str], typer.Option("--only", metavar="SECTIONS", help="Comma-separated sections to run: "
                                                "decode (batch-1 decode, prefill, bandwidth), batch (batched "
                                                "generation), chat (time to first token over five turns, the KV "
                                                "cache kept between them or not), train; and only when named, structured (decode under a "
                                                "JSON schema against the same rows without it, and the mask's time "
                                                "a step, at each --batch-sizes; needs llguidance). Default: decode, "
                                                "batch, chat and train (training only when asked for on an "
                                                "imported Llama-family model).", show_default=False)] = None,
    prompt_tokens: Annotated[int, typer.Option(metavar="N", min=1, help="Prompt length (structured: at most; its "
                                               "prompt is one sentence asking for JSON).")] = 128,
    new_tokens: Annotated[int, typer.Option(metavar="N", min=2, help="Tokens to decode per batch-1 "
                                            "measurement, and per row under a JSON schema.")] = 64,
    repeats: Annotated[int, typer.Option(metavar="N", min=1, help="Timed repeats of every measurement, ours and the "
                                         "reference in turn (training: at least this many timed steps). The median "
                                         "is reported, and the range of the per-repeat ratios.")] = 3,
    batch_sizes: Annotated[str, typer.Option(metavar="N,N,...", help="Batch sizes for batched generation "
                                             "and structured output, comma-separated.")] = "1,8,32,64",
    batch_new_tokens: Annotated[int, typer.Option(metavar="N", min=1, help="Tokens generated per row in batched "
                                                  "generation.")] = 32,
    steps: Annotated[int, typer.Option(metavar="N", min=3, help="Training steps (the first two are warm-up, and at "
                                       "least --repeats are timed).")] = 6,
    train_batch: Annotated[int, typer.Option(metavar="N", min=1, help="Sequences per training step.")] = 8,
    compare: Annotated[bool, typer.Option("--compare", metavar="", help="Also run transformers' generate() on the "
                                          "same weights, and a bare PyTorch training loop, and report the ratios "
                                          "(needs transformers).")] = False,
    threads: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="CPU threads for torch (default: "
                                                   "tinygen's choice).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Machine-readable output.")] = False,
    device: DeviceOpt = "auto",
    dtype: Annotated[Dtype, typer.Option(parser=parse_dtype, help="Weights for generation, and what training "
                                         "computes in: auto (bf16 on CUDA, float32 elsewhere), float32 (or fp32), "
                                         "or bfloat16 (or bf16): bf16 weights to generate, bf16 autocast over "
                                         "float32 weights to train.")] = Dtype.auto,
    quantize: QuantOpt = None,
    compile: Annotated[bool, typer.Option("--compile", metavar="", help="Compile the batch-1 decode step (CUDA "
                                          "graphs on a GPU), and both training loops.")] = False,
) -> None:
    """Measure generation and training speed against references run in the same process."""
    from tinygen.bench import bench as bench_lib

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise TinygenError(f"--batch-sizes takes positive integers separated by commas, got {batch_sizes!r}")
    sections = tuple(s.strip() for s in only.split(",")) if only else None
    result = bench_lib.run(model=model, shape=shape and shape.value, sections=sections, prompt_tokens=prompt_tokens,
                           new_tokens=new_tokens, repeats=repeats, batch_sizes=sizes, batch_new_tokens=batch_new_tokens,
                           steps=steps, train_batch=train_batch, compare=compare, threads=threads, device=device,
                           dtype=dtype.value, quantize=quantize and quantize.value, compile=compile,
                           say=(lambda message: None) if as_json else ui.note)
    if as_json:
        ui.write(json.dumps(result, indent=2) + "\n")
    else:
        print_table(result, ui.out())
    if wide := bench_lib.wide_spreads(result):
        ranges = ", ".join(f"{name} {lo:.2f}–{hi:.2f}x" for name, (lo, hi) in wide)
        ui.warn(f"the ratios moved between repeats ({ranges}): the machine is busy, so they are not trustworthy; "
                "run again when it is idle, or with more --repeats")


def print_table(result: dict, console) -> None:
    """The figures as one table (ours, the reference, their ratio and, with --compare or the JSON
    schema's rows, its range), then notes on how to read them."""
    from rich.table import Table

    compared = "transformers_version" in result
    ranged = compared or "structured" in result  # the JSON schema's rows have their own reference
    table = Table(title=_title(result), title_justify="left")
    table.add_column("metric")
    table.add_column("tinygen", justify="right")
    table.add_column("reference", justify="right")  # the roofline is one even without --compare
    table.add_column("ratio", justify="right", style="bold")
    if ranged:
        table.add_column("range", justify="right")
    for section_rows in (_decode_rows, _batch_rows, _chat_rows, _structured_rows, _train_rows):
        for label, ours, ref, ratio, spread in section_rows(result):
            cells = [label, ours, ref or "", f"{ratio:.2f}x" if isinstance(ratio, float) else ratio or ""]
            if ranged:
                cells.append(f"{spread[0]:.2f}–{spread[1]:.2f}" if spread and spread[0] != spread[1] else "")
            table.add_row(*cells)
    console.print(table)
    for note in _notes(result, compared):
        console.print(f"[dim]{note}[/dim]")


def _title(result: dict) -> str:
    quant = f" · --quantize {result['quantize']}" if result["quantize"] else ""
    quant += " · --compile" if result.get("compile") else ""
    quant += f" · {result['stored']}" if result.get("stored") else ""
    return (f"{result['model']} · {result['params'] / 1e6:.1f}M params · {result['config']['arch']} · "
            f"{result['device']} {result['dtype']}{quant} · {result['threads']} threads\n{result['device_name']}")


# Each section's rows: (metric, ours, reference, ratio, range), the last three None where there is none.

def _decode_rows(result: dict) -> list[tuple]:
    if not (d := result.get("decode")):
        return []
    t, r, q, s = d["tinygen"], d.get("transformers"), d.get("ratio", {}), d.get("spread", {})
    n = f"prompt {d['prompt_tokens']}, {d['new_tokens']} new"
    rows = [
        (f"decode tok/s, batch 1 ({n})", f"{t['decode_tok_s']:.1f}", r and f"{r['decode_tok_s']:.1f}",
         q.get("decode"), s.get("decode")),
        ("time to first token, ms", f"{t['first_token_ms']:.1f}", r and f"{r['first_token_ms']:.1f}",
         q.get("first_token"), s.get("first_token")),
        ("prefill tok/s", f"{t['prefill_tok_s']:.0f}", r and f"{r['prefill_tok_s']:.0f}", q.get("prefill"),
         s.get("prefill")),
    ]
    if lc := d.get("llama_cpp"):
        lq, ls = lc["ratio"], lc["spread"]
        rows += [
            ("llama.cpp, same file: decode tok/s", f"{t['decode_tok_s']:.1f}", f"{lc['decode_tok_s']:.1f} llama.cpp",
             lq["decode"], ls["decode"]),
            ("llama.cpp, same file: time to first token, ms", f"{t['first_token_ms']:.1f}",
             f"{lc['first_token_ms']:.1f} llama.cpp", lq["first_token"], ls["first_token"]),
            ("llama.cpp, same file: prefill tok/s", f"{t['prefill_tok_s']:.0f}",
             f"{lc['prefill_tok_s']:.0f} llama.cpp", lq["prefill"], ls["prefill"]),
        ]
    rl = d["roofline"]
    rows.append((f"decode read bandwidth, GB/s ({rl['bytes_per_token'] / 1e6:.1f} MB/token)",
                 f"{rl['achieved_bytes_s'] / 1e9:.1f}", f"{rl['measured_bytes_s'] / 1e9:.1f} measured",
                 f"{rl['of_measured']:.0%}", None))
    if "peak_bytes_s" in rl:
        rows.append(("", "", f"{rl['peak_bytes_s'] / 1e9:.0f} datasheet", f"{rl['of_peak']:.0%}", None))
    return rows


def _batch_rows(result: dict) -> list[tuple]:
    if not (b := result.get("batch")):
        return []
    return [(f"generation tok/s, batch {r['batch']} ({b['new_tokens']} new)", f"{r['tinygen_tok_s']:.0f}",
             f"{r['transformers_tok_s']:.0f}" if "transformers_tok_s" in r else None, r.get("ratio"), r.get("spread"))
            for r in b["rows"]]


def _chat_rows(result: dict) -> list[tuple]:
    if not (c := result.get("chat")):
        return []
    # The reference here is tinygen itself, re-prefilling the history each turn (how chat ran before).
    first, last = c["tinygen"]["first_token_ms"], c["reprefill"]["first_token_ms"]
    return [
        (f"chat: first token of turn 1, ms ({c['message_tokens']}-token turns)", f"{first[0]:.1f}",
         f"{last[0]:.1f} re-prefill", None, None),
        (f"chat: first token of turn {c['turns']}, ms", f"{first[-1]:.1f}", f"{last[-1]:.1f} re-prefill",
         c["ratio"], c["spread"]),
        (f"chat: turn {c['turns']} over turn 1", f"{c['last_over_first']:.2f}x", f"{last[-1] / last[0]:.2f}x",
         None, None),
    ]


def _structured_rows(result: dict) -> list[tuple]:
    if not (st := result.get("structured")):
        return []
    rows = []
    for r in st["rows"]:
        b = r["batch"]
        rows += [
            (f"JSON schema: decode tok/s, batch {b} ({st['new_tokens']} new)", f"{r['constrained_tok_s']:.1f}",
             f"{r['plain_tok_s']:.1f} unconstrained", r["ratio"], r["spread"]),
            (f"JSON schema: step ms, batch {b}", f"{r['constrained_step_ms']:.2f}",
             f"{r['plain_step_ms']:.2f} unconstrained", f"{r['overhead']:+.1%}", None),
            (f"JSON schema: mask ms a step (a token), batch {b}",
             f"{r['mask_ms_per_step']:.2f} ({r['mask_ms_per_token']:.3f})", None,
             f"{r['mask_ms_per_step'] / r['constrained_step_ms']:.0%} of step", None),
        ]
    return rows


def _train_rows(result: dict) -> list[tuple]:
    if not (tr := result.get("train")):
        return []
    t, r = tr["tinygen"], tr.get("reference")
    bf16 = ", bf16 autocast" if tr.get("dtype") == "bfloat16" else ""
    return [
        (f"training tok/s (batch {tr['batch'][0]} x {tr['batch'][1]}{bf16})", f"{t['tok_s']:,.0f}",
         r and f"{r['tok_s']:,.0f}", tr.get("ratio"), tr.get("spread")),
        (f"MFU (of {tr['peak_kind']} peak {tr['peak_flops'] / 1e12:.2f} TFLOP/s)", f"{t['mfu']:.1%}",
         r and f"{r['mfu']:.1%}", None, None),
    ]


def _notes(result: dict, compared: bool) -> list[str]:
    """What the table needs said beside it: the references, the compile time, what looks odd, what was skipped."""
    d, notes = result.get("decode"), []
    if compared:
        notes.append("reference: transformers generate() on the same weights; for training, a bare PyTorch loop "
                     "around the same transformers model")
        if result["repeats"] > 1:
            notes.append(f"ratio: the median over {result['repeats']} repeats (training: over its timed steps), ours "
                         "and the reference timed in turn; range: the smallest and largest of those ratios")
        else:
            notes.append("ratio: from one repeat, so no range (training: one per timed step); --repeats 3 gives "
                         "each ratio a range")
    if "compile_seconds" in result:
        notes.append(f"compiling the decode step took {result['compile_seconds']:.1f} s (not in the figures)")
    if (c := result.get("chat")) and not c["same_replies"]:
        notes.append("chat: the kept cache's replies differ from the re-prefilled ones (float rounding near a tie)")
    if d and "greedy_agreement" in d:
        notes.append(f"greedy agreement with transformers: {d['greedy_agreement']}")
    if d and "llama_cpp" in d:
        notes.append(f"llama.cpp: llama-cpp-python {d['llama_cpp']['version']}, the same threads; greedy agreement "
                     f"{d['llama_cpp']['greedy_agreement']}")
    if d and d["roofline"]["of_measured"] > 1:
        notes.append("above 100% of the measured bandwidth: the weights fit in the CPU's caches")
    if d and (slots := result.get("compile_cache_slots", 0)) > 4 * (d["prompt_tokens"] + d["new_tokens"]):
        notes.append(f"the compiled step reads its whole {slots:,}-token cache every token, masked: "
                     "with a short reply, it can be slower than the eager step")
    if st := result.get("structured"):
        notes.append(f"JSON schema: the same {st['prompt_tokens']}-token prompt in every row, seeded sampling at "
                     f"temperature {st['temperature']}, with the schema and without a step at a time in turn; "
                     "tok/s counts the tokens after each run's first; ratio: the median of the per-repeat ratios, "
                     "range: their smallest and largest; the step-time ratio is the overhead; mask: time in "
                     "constrain.masked, and its share of the step")
        short = [f"batch {r['batch']}: {r['tokens_per_row']:.0f}" for r in st["rows"]
                 if r["tokens_per_row"] < r["plain_tokens_per_row"]]
        if short:
            notes.append(f"JSON schema: rows ended before --new-tokens (tokens a row, {', '.join(short)}), so fewer "
                         "rows decoded in the later steps than unconstrained")
    if (tr := result.get("train")) and tr["batch"][1] < result["config"]["block_size"]:
        notes.append(f"training windows: {tr['batch'][1]:,} of the model's {result['config']['block_size']:,} tokens "
                     "of context")
    for name, why in result.get("skipped", {}).items():
        notes.append(f"skipped {name}: {why}")
    return notes
