"""What several commands do the same way: read text from an argument or stdin, and load a model
onto the device and dtype the flags name."""

from __future__ import annotations

import sys
from typing import Optional

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


def load_model(model: Optional[str], device: str, dtype: Dtype | str = "auto", quantize: Quantize | str | None = None):
    """(model, tokenizer, info) on the device and in the dtype the flags name, quantised if asked."""
    from tinygen.core import checkpoint
    from tinygen.core.device import inference_dtype, resolve_device

    quantize = quantize and Quantize(quantize).value
    cpu_only = quantize and f"--quantize {quantize}"
    dev = resolve_device(device, cpu_only)
    if cpu_only and device == "auto" and resolve_device("auto").type != "cpu":
        ui.note(f"{cpu_only} runs on the CPU, so the model runs there rather than on the GPU")
    from tinygen.generate.fastlinear import decoding_layers
    from tinygen.generate.quantize import takes_gguf_q4

    net, tokenizer, info = checkpoint.load_model(model, device=dev, dtype=inference_dtype(dev, Dtype(dtype).value),
                                                 keep_q4=takes_gguf_q4(quantize))
    for note in info.notes:  # what loading adapted or converted (a GGUF's dequantization, a shorter context)
        ui.note(note)

    return decoding_layers(net, quantize), tokenizer, info


def compiled_decoder(net, compile: bool):
    """The compiled batch-1 decode step, compiled now so that its cost shows up front, or None."""
    if not compile:
        return None
    from tinygen.generate.compiled import StaticDecoder, cache_dir

    decoder = StaticDecoder(net)
    ui.note(f"compiling the decode step (cached in {cache_dir()})…")
    ui.note(f"ready in {decoder.warm_up():.1f} s")
    return decoder
