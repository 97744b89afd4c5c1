"""Options that several commands share, defined once so their flags and help read the same everywhere."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

# Options shared by several commands, defined once.
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model: a tinygen .safetensors file or a Hugging Face GPT-2 folder. "
                 "Default: $TINYGEN_MODEL, else the bundled model.", show_default=False),
]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="Weights for generation: auto (bf16 on CUDA, float32 elsewhere), "
                                       "float32 or bfloat16. On a CPU, bfloat16 decodes faster but prefills slower.")]
QuantOpt = Annotated[Optional[str], typer.Option("--quantize", help="int8: int8 weight-only linear layers (CPU), "
                                                "a quarter of float32's bytes per token; the loss it costs is in "
                                                "the README.", show_default=False)]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the decode step and replay it as a CUDA "
                                           "graph: several times faster at batch 1 on a GPU. The first run "
                                           "compiles (about a minute); later runs load it from the cache.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate per sample.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 is greedy.")]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", help="Keep the k most likely tokens; 0 is off.")]
TopPOpt = Annotated[float, typer.Option("--top-p", "-p", help="Keep the smallest set of tokens with this much probability; 1 is off.")]
MinPOpt = Annotated[float, typer.Option("--min-p", help="Drop tokens below this fraction of the top token's probability; 0 is off.")]
RepPenOpt = Annotated[float, typer.Option("--repetition-penalty", help="Above 1 discourages tokens already present; 1 is off.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed: same seed and flags give the same output on the same device.")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this text appears (repeatable).")]
