"""`tinygen sample`: one prompt streamed to stdout, or batch mode (`--input`, `--jsonl`)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from tinygen.cli import ui
from tinygen.cli.common import load_model, read_stdin, text_arg
from tinygen.cli.options import (
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    QuantOpt,
    Sampling,
    StopOpt,
    constraint_flags,
    sampling_flags,
)
from tinygen.errors import TinygenError


@sampling_flags()
@constraint_flags
def sample(
    prompt: Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="Prompt text; `-` or piped stdin reads it "
                                                    "from stdin. Empty starts a fresh document.", show_default=False)] = None,
    model: ModelOpt = None,
    sampling: Sampling = None,
    stop: StopOpt = None,
    constraint=None,
    num_samples: Annotated[int, typer.Option(metavar="N", min=1, help="How many samples of each prompt: the prompt "
                                             "is read once and the samples decode together; sample j of a --seed S "
                                             "run uses seed S + j.")] = 1,
    echo: Annotated[Optional[bool], typer.Option("--echo/--no-echo", metavar="", help="Print the prompt before the "
                                                 "completion. Default: on a terminal only.", show_default=False)] = None,
    input: Annotated[Optional[str], typer.Option("--input", "-i", metavar="FILE", help="Batch mode: a file of prompts, "
                                                 "one per line (`-` for stdin). Prints one completion per line (an "
                                                 "empty line is an empty prompt), newlines folded.",
                                                 show_default=False)] = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", metavar="", help="JSON lines out: {\"prompt\", \"completion\", "
                                        "\"tokens\", \"finish_reason\"} per completion (and \"complete\" under a "
                                        "constraint). Without a PROMPT, JSON lines in too, from --input or stdin: "
                                        "{\"prompt\": ..., any sampling field, \"max_new_tokens\", \"stop\", "
                                        "\"seed\", and one of \"json_schema\", \"regex\", \"choice\", \"grammar\" "
                                        "or \"response_format\"}.")] = False,
    batch_size: Annotated[int, typer.Option(metavar="N", min=1, help="Most rows generated at once in batch mode; "
                                            "a finished row's slot goes to the next prompt.")] = 16,
    explain: Annotated[bool, typer.Option("--explain", metavar="", help="Show each step's likeliest next tokens: the "
                                          "model's probabilities beside those left after the sampling flags, and the "
                                          "token drawn. With --jsonl: one JSON object per step.")] = False,
    show_probs: Annotated[int, typer.Option("--show-probs", metavar="N", min=0, help="Like --explain, with this many "
                                            "candidates per step (--explain shows 5).", show_default=False)] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantOpt = None,
    compile: CompileOpt = False,
) -> None:
    """Generate text from a prompt, streaming it to stdout."""
    from tinygen.generate.requests import expand, parse_requests
    from tinygen.generate.textgen import Request, TextGenerator

    explain_k = show_probs or (5 if explain else 0)
    if explain_k and (input is not None or num_samples > 1):
        raise TinygenError("--explain follows one sample of one prompt; drop --input/--num-samples")
    if input is not None and prompt is not None:
        raise TinygenError("give a PROMPT or --input FILE, not both")
    base = Request("", sampling.params(), sampling.max_new_tokens, tuple(stop or ()), sampling.seed, constraint)
    if input is not None or (jsonl and prompt is None and not explain_k):
        requests = parse_requests(_input_lines(input, jsonl), base, jsonl=jsonl, num_samples=num_samples)
        textgen = TextGenerator(*load_model(model, device, dtype, quantize)[:2])
        _print_batch(textgen, requests, batch_size, jsonl, num_samples)
        return
    text = text_arg(prompt)
    # --explain shows probabilities: in float32 unless --dtype says otherwise
    net, tokenizer, _, decoder = load_model(model, device, dtype, quantize, compile and num_samples == 1,
                                            float32_scores=bool(explain_k))
    textgen = TextGenerator(net, tokenizer, compiled=decoder)
    n_prompt = len(textgen.encode_prompt(text))
    if n_prompt > textgen.block_size:
        ui.warn(f"prompt has {n_prompt} tokens, more than the model's context of {textgen.block_size}; "
                f"keeping the last {textgen.block_size}")
    request = replace(base, prompt=text)
    if explain_k:
        _explain(textgen, request, explain_k, jsonl)
    elif jsonl:
        _print_batch(textgen, expand([request], None, num_samples), batch_size, jsonl, num_samples)
    else:
        _stream(textgen, expand([request], None, num_samples), batch_size, echo)


def _stream(textgen, requests, batch_size: int, echo: Optional[bool]) -> None:
    """Samples of one prompt to stdout, one after another, each streaming as it is made; on a
    terminal (or with TINYGEN_STATS) a stats line on stderr after each."""
    from tinygen.generate.textgen import Done

    sink = ui.TextSink()
    show_prompt = sink.tty if echo is None else echo
    stats = sink.tty or os.environ.get("TINYGEN_STATS")
    opened = -1
    for event in textgen.samples(requests, batch_size):
        if event.index != opened:
            if event.index:
                sink.end()  # a blank line between samples
            if show_prompt:
                sink.prompt(requests[event.index].prompt)
            opened = event.index
        if not isinstance(event, Done):
            sink.text(event.text)
            continue
        sink.end()
        warn_incomplete(event.completion, requests[event.index],
                        f"sample {event.index + 1}" if len(requests) > 1 else "the output")
        if stats:
            c = event.completion
            ui.stats_line(c.n_tokens, c.seconds, c.first_token_seconds)


def _explain(textgen, request, k: int, jsonl: bool) -> None:
    from tinygen.cli import views
    from tinygen.generate.textgen import Completion
    from tinygen.inspect.explain import explain

    label = textgen.tokenizer.label
    if jsonl:
        for step in explain(textgen, request, k):
            ui.write(json.dumps(step.to_dict(label), ensure_ascii=False) + "\n")
        return
    console = ui.out()
    width = views.next_token_header(console, views.flags_summary(request.params))
    result = Completion()
    for step in explain(textgen, request, k, result):
        views.next_token_step(console, step, label, width)
    sink = ui.TextSink()  # the text the steps made, as plain sampling shows it
    sink.prompt(request.prompt)
    sink.text(result.text)
    sink.end()


def _input_lines(path: Optional[str], jsonl: bool) -> list[str]:
    """Batch mode's input lines, from a file or stdin (`-` or none)."""
    if path not in (None, "-"):
        try:
            return Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise TinygenError(f"no such input file: {path}") from None
        except IsADirectoryError:
            raise TinygenError(f"{path} is a folder; --input takes a file of prompts") from None
        except UnicodeDecodeError:
            raise TinygenError(f"{path} is not valid UTF-8") from None
    if sys.stdin.isatty():
        kind = "JSON requests" if jsonl else "prompts"
        ui.note(f"reading {kind} from the terminal, one per line; end with Ctrl-D (or give a PROMPT argument)")
    return read_stdin().splitlines()


def _print_batch(textgen, requests, batch_size: int, jsonl: bool, num_samples: int) -> None:
    """One line per completion, in input order: JSON, or the text with its newlines folded."""
    for index, result in textgen.batch(requests, batch_size):
        if jsonl:
            record = {"prompt": requests[index].prompt, "completion": result.text, "tokens": result.n_tokens,
                      "finish_reason": result.finish_reason}
            if result.complete is not None:
                record["complete"] = result.complete
            if num_samples > 1:
                record["sample"] = index % num_samples
            line = json.dumps(record, ensure_ascii=False)
        else:
            line = result.text.replace("\r", " ").replace("\n", " ")
            warn_incomplete(result, requests[index], f"output {index + 1}")
        ui.write(line + "\n")


def warn_incomplete(result, request, which: str) -> None:
    """One line on stderr for an output that stopped before its constraint was met, so that nobody
    takes it for a valid one."""
    if result.complete is not False:
        return
    why = (f"ran out of tokens (--max-new-tokens {request.max_new_tokens})" if result.finish_reason == "length"
           else "could not go on")
    ui.warn(f"{which} {why} before its {request.constraint.label} was complete")
