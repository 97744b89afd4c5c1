"""Options that several commands share, defined once so their flags and help read the same everywhere.

Conventions for every command's options: a value option names what it takes in its metavar (FILE,
TEXT, N, X); a flag that takes no value has an empty one (Typer would show `<bool>`); a fixed set of
values is an Enum, so Typer lists and checks them; closed numeric ranges are `min=`/`max=`, and
bounds Typer cannot state (open ones) are checked where the values are used.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from tinygen.errors import TinygenError


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


# The short names people type for the dtypes above. float16's are listed only to be refused with a
# pointer to bf16: no command runs in float16.
DTYPE_ALIASES = {"fp32": Dtype.float32, "f32": Dtype.float32, "bf16": Dtype.bfloat16}
FLOAT16_NAMES = ("float16", "fp16", "f16", "half")


def parse_dtype(value: Dtype | str) -> Dtype:
    """A --dtype value: a Dtype by its name or a short one (bf16, fp32), so that nothing below the
    CLI sees an alias. Pass it as a --dtype option's `parser`, beside the Dtype annotation that
    lists the canonical choices in the help."""
    if isinstance(value, Dtype):
        return value
    name = value.strip().lower()
    if name in DTYPE_ALIASES:
        return DTYPE_ALIASES[name]
    if name in FLOAT16_NAMES:
        raise typer.BadParameter(f"{value!r}: float16 is not supported; use bfloat16 (bf16) for half-size "
                                 "weights, or auto or float32 (fp32)")
    try:
        return Dtype(name)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a dtype; use auto, float32 (fp32) or bfloat16 (bf16)") from None


class Quantize(str, Enum):
    int8 = "int8"
    int4 = "int4"
    int4_g64 = "int4-g64"
    int4_g128 = "int4-g128"
    int4_g256 = "int4-g256"


# Every kind of model that loads, for each --model help to name.
MODEL_KINDS = ("a tinygen .safetensors file, a Hugging Face folder (GPT-2 or the Llama family: Llama, Mistral, "
               "Qwen2, Qwen3, SmolLM2, ...) or a llama-family GGUF file")
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", metavar="MODEL", envvar="TINYGEN_MODEL", show_envvar=False,
                 help=f"Model: {MODEL_KINDS}. Default: $TINYGEN_MODEL, else the bundled model.", show_default=False),
]
DeviceOpt = Annotated[str, typer.Option(metavar="DEVICE", envvar="TINYGEN_DEVICE", show_envvar=False,
                                        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps. Default: "
                                        "$TINYGEN_DEVICE, else auto.")]
DtypeOpt = Annotated[Dtype, typer.Option(parser=parse_dtype, help="Weights for generation: auto (bf16 on CUDA, "
                                         "float32 elsewhere; on a CPU a quantized GGUF runs as it stores its weights), "
                                         "float32 (or fp32) or bfloat16 (or bf16), which dequantize a GGUF. On a CPU, "
                                         "bfloat16 decodes faster but prefills slower.")]
ScoreDtypeOpt = Annotated[Dtype, typer.Option("--dtype", parser=parse_dtype, help="Weights to score and inspect "
                                              "with: float32 (or fp32; the default on every device: the "
                                              "probabilities and losses training reports), bfloat16 (or bf16), or "
                                              "auto (bf16 on CUDA).")]
RunDtypeOpt = Annotated[Dtype, typer.Option("--dtype", parser=parse_dtype, help="Weights the experiment's passes "
                                            "run in: auto (as stored on a CPU, so a Q4 GGUF runs its 4-bit "
                                            "products; bf16 on CUDA), float32 (or fp32) or bfloat16 (or bf16). "
                                            "Probabilities are taken in float32 either way.")]
QuantOpt = Annotated[Optional[Quantize], typer.Option("--quantize", help="Weight-only quantised linear layers "
                                                      "(CPU) of float weights. int8: a quarter of float32's bytes per "
                                                      "token; int4: an eighth, in groups of 32 inputs (-g64 ... -g256: "
                                                      "larger groups). A quantized GGUF's matrices already run as "
                                                      "stored. The loss each costs is in the README.",
                                                      show_default=False)]
CompileOpt = Annotated[bool, typer.Option("--compile", metavar="", help="torch.compile the decode step and replay it "
                                          "as a CUDA graph: several times faster at batch 1 on a GPU. The first run "
                                          "compiles (about a minute); later runs load it from the cache.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", metavar="N", min=1,
                                        help="Most tokens to generate per sample.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", metavar="X", min=0.0,
                                        help="Sampling temperature; 0 is greedy.")]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", metavar="N", min=0,
                                      help="Keep the k most likely tokens; 0 is off.")]
TopPOpt = Annotated[float, typer.Option("--top-p", "-p", metavar="X", max=1.0,
                                        help="Keep the smallest set of tokens with this much probability; 1 is off.")]
MinPOpt = Annotated[float, typer.Option("--min-p", metavar="X", min=0.0,
                                        help="Drop tokens below this fraction of the top token's probability; 0 is "
                                        "off.")]
RepPenOpt = Annotated[float, typer.Option("--repetition-penalty", metavar="X",
                                          help="Above 1 discourages tokens already present; 1 is off.")]
SeedOpt = Annotated[Optional[int], typer.Option(metavar="N", help="Random seed: same seed and flags give the same "
                                                "output on the same device.")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", metavar="TEXT",
                                                      help="Stop when this text appears (repeatable).")]


@dataclass(frozen=True)
class Sampling:
    """The sampling flags, as a command decorated with sampling_flags receives them."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: Optional[int]

    def params(self):
        from tinygen.generate.sampling import (
            SamplingParams,  # torch: only once a command runs
        )

        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)


_SAMPLING_FLAGS = {"max_new_tokens": (MaxNewOpt, 200), "temperature": (TempOpt, 0.8), "top_k": (TopKOpt, 0),
                   "top_p": (TopPOpt, 1.0), "min_p": (MinPOpt, 0.0), "repetition_penalty": (RepPenOpt, 1.0),
                   "seed": (SeedOpt, None)}


def sampling_flags(**defaults):
    """Give a command the sampling flags, with these defaults, in place of its `sampling` parameter;
    it receives their values as one Sampling. Each flag is written once, here, for every command."""
    return _flags_in_place_of("sampling", _SAMPLING_FLAGS, defaults, lambda values: Sampling(**values))


JsonSchemaOpt = Annotated[Optional[str], typer.Option("--json-schema", metavar="FILE|TEXT", show_default=False,
                                                      rich_help_panel="Structured output",
                                                      help="The output is JSON that this JSON schema (a file, or "
                                                      "the schema itself) validates, enforced token by token.")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", rich_help_panel="Structured output",
                                       help="The output is a JSON object (any object).")]
RegexOpt = Annotated[Optional[str], typer.Option("--regex", metavar="PATTERN", show_default=False,
                                                 rich_help_panel="Structured output",
                                                 help="The output matches this regular expression, whole.")]
ChoiceOpt = Annotated[Optional[list[str]], typer.Option("--choice", metavar="TEXT", show_default=False,
                                                        rich_help_panel="Structured output",
                                                        help="The output is one of these texts (repeatable).")]
GrammarOpt = Annotated[Optional[str], typer.Option("--grammar", metavar="FILE", show_default=False,
                                                   rich_help_panel="Structured output",
                                                   help="The output follows this grammar: Lark, or llama.cpp's "
                                                   "GBNF.")]
_CONSTRAINT_FLAGS = {"json_schema": (JsonSchemaOpt, None), "json": (JsonOpt, False), "regex": (RegexOpt, None),
                     "choice": (ChoiceOpt, None), "grammar": (GrammarOpt, None)}


def constraint_flags(command):
    """Give a command the structured-output flags in place of its `constraint` parameter; it receives
    the one constraint they name (a generate.constrain.Constraint), or None."""
    return _flags_in_place_of("constraint", _CONSTRAINT_FLAGS, {}, constraint_of)(command)


def constraint_of(values: dict):
    from tinygen.generate.constrain import ANY_OBJECT, Constraint  # torch: only once a command runs

    given = [name for name, value in values.items() if value is not None and value is not False]
    if len(given) > 1:
        raise TinygenError(f"give one of --json-schema, --json, --regex, --choice and --grammar, not "
                           f"{' and '.join('--' + n.replace('_', '-') for n in given)}")
    if not given:
        return None
    name, value = given[0], values[given[0]]
    if name == "json":
        return Constraint.json_schema(ANY_OBJECT)
    if name == "json_schema" and not (value.lstrip().startswith(("{", "[")) and not Path(value).is_file()):
        value = _read(value, "--json-schema")
    elif name == "grammar":
        value = _read(value, "--grammar")
    return Constraint.of(name, value)


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TinygenError(f"{flag}: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TinygenError(f"{flag}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _flags_in_place_of(name: str, flags: dict, defaults: dict, build):
    """A decorator that swaps a command's `name` parameter for these Typer flags, and hands the
    command build(their values) under that name."""

    def add(command):
        signature = inspect.signature(command, eval_str=True)  # Typer reads the annotations as objects
        new = [inspect.Parameter(flag, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=option,
                                 default=defaults.get(flag, default))
               for flag, (option, default) in flags.items()]
        parameters = []
        for parameter in signature.parameters.values():
            parameters += new if parameter.name == name else [parameter]

        @functools.wraps(command)
        def with_flags(**values):
            built = build({flag: values.pop(flag) for flag in flags})
            return command(**{name: built}, **values)

        with_flags.__signature__ = signature.replace(parameters=parameters)
        return with_flags

    return add
