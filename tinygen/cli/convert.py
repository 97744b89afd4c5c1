"""`tinygen convert`: any model tinygen runs (a GGUF, a Hugging Face folder) as a tinygen checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinygen.cli import ui
from tinygen.cli.options import Dtype, parse_dtype
from tinygen.errors import TinygenError


def convert(
    source: Annotated[str, typer.Argument(metavar="MODEL", help="A GGUF file, a Hugging Face folder, or a tinygen "
                                          "checkpoint.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="The tinygen checkpoint to write "
                                      "(.safetensors).", show_default=False)],
    dtype: Annotated[Dtype, typer.Option(parser=parse_dtype, help="Weights to store: float32 (fp32), or bfloat16 "
                                         "(bf16, half the size). auto keeps float32.")] = Dtype.auto,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace FILE if it exists.")] = False,
) -> None:
    """Save a model as one tinygen .safetensors file: it then loads in a moment, without gguf or jinja2."""
    import time

    import torch

    from tinygen.core.checkpoint import load_model, save_checkpoint

    if out.exists() and not force:
        raise TinygenError(f"{out} exists; pass --force to replace it")
    start = time.perf_counter()
    net, tokenizer, info = load_model(source, device="cpu", dtype=torch.bfloat16 if dtype == Dtype.bfloat16 else None)
    for note in info.notes:
        ui.note(note)
    net = net.float() if dtype != Dtype.bfloat16 else net
    if tokenizer.chat_template is None and tokenizer.jinja_template is not None:
        from tinygen.core.template import template_for

        # Stored taken apart, the model's template renders without jinja2 (the source stays, for export).
        tokenizer.chat_template = template_for(tokenizer).to_dict()
    provenance = {**info.provenance, "converted_from": info.path.name}
    save_checkpoint(out, net, tokenizer, provenance)
    ui.err().print(f"wrote {out}: {net.num_params() / 1e6:.1f}M parameters in {str(net.dtype).removeprefix('torch.')}, "
                   f"{out.stat().st_size / 1e6:.1f} MB, in {time.perf_counter() - start:.1f} s", highlight=False)
