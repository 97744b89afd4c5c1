"""What several commands do the same way: read text from an argument or stdin, and load a model
onto the device and dtype the flags name, prepared as --quantize and --compile ask. On a CPU a
quantized file runs as it stores its weights unless a --dtype asks for them dequantized, as
llama.cpp and ollama run such files."""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional

from tinygen.cli import ui
from tinygen.cli.options import Dtype, Quantize
from tinygen.errors import TinygenError


def read_stdin() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TinygenError(f"stdin is not valid UTF-8 (byte {e.start}); convert it first, e.g. with iconv") from e


def text_arg(text: Optional[str]) -> str:
    """TEXT from the argument, or from stdin when it is `-` or omitted and stdin is piped."""
    if text is not None and text != "-":
        return text
    if text == "-" or not sys.stdin.isatty():
        return read_stdin().rstrip("\r\n")
    return ""


class Loaded(NamedTuple):
    model: object  # a GPT prepared to decode (generate/plan.py)
    tokenizer: object
    info: object
    decoder: object  # the compiled decode step with --compile, warmed up; else None


def load_model(model: Optional[str], device: str, dtype: Dtype | str = "auto", quantize: Quantize | str | None = None,
               compile: bool = False, float32_scores: bool = False) -> Loaded:
    """The model the flags name, on their device and dtype, prepared to decode as they ask.
    float32_scores: with dtype auto, activations in float32 on every device (probabilities shown to
    people): float32 weights on a GPU, a quantized file as stored on a CPU."""
    from tinygen.core import checkpoint
    from tinygen.core.device import inference_dtype, resolve_device
    from tinygen.generate import plan

    quantize = quantize and Quantize(quantize).value
    cpu_only = plan.cpu_only(quantize)
    dev = resolve_device(device, cpu_only)
    if cpu_only and device == "auto" and resolve_device("auto").type != "cpu":
        ui.note(f"{cpu_only} runs on the CPU, so the model runs there rather than on the GPU")
    dtype = Dtype(dtype)
    as_stored = dev.type == "cpu" and dtype == Dtype.auto
    if float32_scores and dtype == Dtype.auto:
        dtype = Dtype.float32
    net, tokenizer, info = checkpoint.load_model(model, device=dev, dtype=inference_dtype(dev, dtype.value),
                                                 as_stored=as_stored)
    for note in info.notes:  # what loading adapted or converted (a GGUF's dequantization, a shorter context)
        ui.note(note)
    prepared = plan.prepare(net, quantize, compile, info.stored, info.embedding_rows)
    if prepared.decoder is not None:
        from tinygen.generate.compiled import cache_dir

        ui.note(f"compiling the decode step (cached in {cache_dir()})…")
        ui.note(f"ready in {prepared.decoder.warm_up():.1f} s")
    return Loaded(prepared.model, tokenizer, info, prepared.decoder)
