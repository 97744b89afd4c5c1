"""`tinygen sample`: one prompt streamed to stdout, or batch mode (`--input`, `--jsonl`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.common import compiled_decoder, load_model, read_stdin, text_arg
from tinygen.cli.options import (
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    MaxNewOpt,
    MinPOpt,
    ModelOpt,
    QuantOpt,
    RepPenOpt,
    SeedOpt,
    StopOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
)
from tinygen.errors import TinygenError


def sample(
    prompt: Annotated[Optional[str], typer.Argument(help="Prompt text; `-` or piped stdin reads it from stdin. "
                                                    "Empty starts a fresh document.", show_default=False)] = None,
    model: ModelOpt = None,
    max_new_tokens: MaxNewOpt = 200,
    temperature: TempOpt = 0.8,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    min_p: MinPOpt = 0.0,
    repetition_penalty: RepPenOpt = 1.0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    num_samples: Annotated[int, typer.Option(help="How many samples of the prompt.")] = 1,
    echo: Annotated[Optional[bool], typer.Option("--echo/--no-echo", help="Print the prompt before the completion. "
                                                  "Default: on a terminal only.", show_default=False)] = None,
    input: Annotated[Optional[str], typer.Option("--input", "-i", help="Batch mode: a file of prompts, one per line "
                                                 "(`-` for stdin). Prints one completion per line, newlines folded.")] = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Batch mode with JSON lines in and out: reads "
                                        '{"prompt": ..., optional sampling fields}, writes {"prompt", "completion", '
                                        '"tokens", "finish_reason"}. Reads --input or stdin.')] = False,
    batch_size: Annotated[int, typer.Option(help="Prompts generated together in batch mode.")] = 16,
    explain: Annotated[bool, typer.Option("--explain", help="Show each step's likeliest next tokens: the model's "
                                          "probabilities beside those left after the sampling flags, and the token "
                                          "drawn. With --jsonl: one JSON object per step.")] = False,
    show_probs: Annotated[int, typer.Option("--show-probs", help="Like --explain, with this many candidates per step "
                                            "(--explain shows 5).", show_default=False)] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantOpt = None,
    compile: CompileOpt = False,
) -> None:
    """Generate text from a prompt, streaming it to stdout."""
    from tinygen.generate.sampling import SamplingParams
    from tinygen.generate.textgen import Completion, Request, TextGenerator

    if max_new_tokens < 1:
        raise TinygenError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if num_samples < 1 or batch_size < 1:
        raise TinygenError("--num-samples and --batch-size must be at least 1")
    if show_probs < 0:
        raise TinygenError(f"--show-probs must be at least 1, got {show_probs}")
    explain_k = show_probs or (5 if explain else 0)
    if explain_k and (input is not None or num_samples > 1):
        raise TinygenError("--explain follows one sample of one prompt; drop --input/--num-samples")
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    base = Request("", params, max_new_tokens, tuple(stop or ()), seed)
    if input is not None or (jsonl and not explain_k):
        requests = _batch_requests(input, jsonl, base)
        gen = TextGenerator(*load_model(model, device, dtype, quantize)[:2])
        _run_batch(gen, requests, batch_size, jsonl)
        return
    text = text_arg(prompt)
    net, tokenizer, _ = load_model(model, device, dtype, quantize)
    gen = TextGenerator(net, tokenizer, compiled=compiled_decoder(net, compile))
    n_prompt = len(gen.encode_prompt(text))
    if n_prompt > gen.block_size:
        ui.warn(f"prompt has {n_prompt} tokens, more than the model's context of {gen.block_size}; "
                f"keeping the last {gen.block_size}")
    if explain_k:
        _explain(gen, Request(text, params, max_new_tokens, base.stop, seed), explain_k, jsonl)
        return
    sink = ui.TextSink()
    show_prompt = sink.tty if echo is None else echo
    for i in range(num_samples):
        if i:
            sink.end()
        if show_prompt:
            sink.prompt(text)
        result = Completion()
        # One generator per sample run keeps a seed reproducible; later samples get seed + i.
        request = Request(text, params, max_new_tokens, base.stop, None if seed is None else seed + i)
        for piece in gen.stream(request, result):
            sink.text(piece)
        sink.end()
        if sink.tty or os.environ.get("TINYGEN_STATS"):
            ui.stats_line(result.tokens, result.seconds, result.first_token_seconds)


def _explain(gen, request, k: int, jsonl: bool) -> None:
    from tinygen.cli import views
    from tinygen.generate.textgen import Completion
    from tinygen.inspect.explain import explain

    label = gen.tokenizer.label
    if jsonl:
        for step in explain(gen, request, k):
            ui.write(json.dumps(step.to_dict(label), ensure_ascii=False) + "\n")
        return
    console = ui.out()
    width = views.next_token_header(console, views.flags_summary(request.params))
    result = Completion()
    for step in explain(gen, request, k, result):
        views.next_token_step(console, step, label, width)
    sink = ui.TextSink()  # the text the steps made, as plain sampling shows it
    sink.prompt(request.prompt)
    sink.text(result.text)
    sink.end()


def _batch_requests(path: Optional[str], jsonl: bool, base):
    from dataclasses import replace

    from tinygen.generate.sampling import SamplingParams
    from tinygen.generate.textgen import Request

    if path in (None, "-"):
        lines = read_stdin().splitlines()
    else:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise TinygenError(f"no such input file: {path}") from None
        except UnicodeDecodeError:
            raise TinygenError(f"{path} is not valid UTF-8") from None
    requests = []
    fields = set(SamplingParams.__dataclass_fields__)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            requests.append(replace(base, prompt=line))
            continue
        try:
            obj = json.loads(line)
            prompt = obj.pop("prompt")
        except (ValueError, KeyError, AttributeError, TypeError):
            raise TinygenError(f"line {n} of the input is not a JSON object with a \"prompt\"") from None
        if not isinstance(prompt, str):
            raise TinygenError(f"line {n}: \"prompt\" must be a string")
        unknown = set(obj) - fields - {"max_new_tokens", "stop", "seed"}
        if unknown:
            raise TinygenError(f"line {n}: unknown fields {', '.join(sorted(unknown))}")
        try:
            params = replace(base.params, **{k: _number(v, k) for k, v in obj.items() if k in fields})
        except TinygenError as e:
            raise TinygenError(f"line {n}: {e}") from None
        stop = obj.get("stop", base.stop)
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
            raise TinygenError(f"line {n}: \"stop\" must be a string or a list of strings")
        max_new = obj.get("max_new_tokens", base.max_new_tokens)
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise TinygenError(f"line {n}: \"max_new_tokens\" must be a positive integer")
        seed = obj.get("seed", base.seed)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TinygenError(f"line {n}: \"seed\" must be an integer")
        requests.append(Request(prompt, params, max_new, tuple(stop), seed))
    if not requests:
        raise TinygenError("batch mode got no prompts")
    return requests


def _number(value, name: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TinygenError(f"\"{name}\" must be a number, got {json.dumps(value)}")
    return int(value) if name == "top_k" else float(value)


def _run_batch(gen, requests, batch_size: int, jsonl: bool) -> None:
    for index, result in gen.batch(requests, batch_size):
        if jsonl:
            line = json.dumps({"prompt": requests[index].prompt, "completion": result.text,
                               "tokens": result.tokens, "finish_reason": result.finish_reason}, ensure_ascii=False)
        else:
            line = result.text.replace("\r", " ").replace("\n", " ")
        ui.write(line + "\n")
