"""Single-file checkpoints: one .safetensors file with the weights, config, tokenizer and provenance.

Metadata keys (all strings, as safetensors requires): format="tinygen", format_version, config
(JSON of ModelConfig), tokenizer (JSON of Tokenizer.to_dict), provenance (JSON: steps, tokens,
losses, data). Models made elsewhere (Hugging Face folders, GGUF files) load through the same
functions: formats/ registers a ModelFormat for each (register_format), and read_info, load_tokenizer
and load_model hand such a file to it, so this module never imports formats/. Reading the header
needs no torch, so `info` and `tokenize` stay fast; only load_model imports it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tinygen.atomic import atomic_path
from tinygen.core.config import ModelConfig
from tinygen.core.quantized import StoredMatrix
from tinygen.core.template import template_for
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError, one_line

FORMAT = "tinygen"
FORMAT_VERSION = 1
DEFAULT_MODEL = "stories.safetensors"
DEFAULT_CHAT_MODEL = "chat.safetensors"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# A block's tensors: transformer.h.3.attn... (h.3... in GPT-2 files, model.layers.3... in Llama ones).
LAYER_NAME = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")


@dataclass
class ModelInfo:
    """What the header says about a model, read without loading any weights."""

    path: Path
    kind: str  # "tinygen", "gpt2" (a Hugging Face GPT-2 folder), "llama" (a Llama-family folder) or "gguf"
    config: ModelConfig
    tokenizer_data: dict | None  # None for GPT-2 folders: their tokenizer lives in vocab.json/merges.txt
    provenance: dict = field(default_factory=dict)
    format_version: int | None = None
    file_size: int = 0
    tensors: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name -> (shape, dtype) of each weight
    weight_files: tuple[Path, ...] = ()  # the safetensors files that hold the weights; () means path itself
    notes: tuple[str, ...] = ()  # what loading adapted, for stderr (a context limited to what tinygen allows)
    # Matrices the file stores in a form that runs as stored (core/quantized.StoredMatrix), by module
    # name: the decode plan (generate/plan.py) alone reads them. Loaded as stored, the model's own
    # weights for these are on the meta device; else they are float too.
    stored: dict[str, StoredMatrix] = field(default_factory=dict)
    # Loaded as stored: the embedding's rows for token ids (float32), read from the file as looked up.
    embedding_rows: Callable | None = None

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for shape, _ in self.tensors.values())

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(sorted({dtype for _, dtype in self.tensors.values()}))

    def summary(self, tokenizer: Tokenizer) -> dict:
        """Everything `tinygen info` reports, JSON-ready and at full precision."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "format_version": self.format_version,
            "config": json.loads(self.config.to_json()),
            "parameters": self.n_params,
            "file_size": self.file_size,
            "dtypes": list(self.dtypes),
            "tokenizer": {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab, "special_tokens": tokenizer.special},
            "chat_template": tokenizer.chat_template,
            "provenance": self.provenance,
        }


def default_model_path(name: str = DEFAULT_MODEL) -> Path:
    """A bundled model: inside the installed package (wheel) or in the repo's weights/ folder."""
    package = Path(__file__).resolve().parents[1]  # tinygen/, where a wheel puts weights/
    for candidate in (package / "weights" / name, package.parent / "weights" / name):
        if candidate.exists():
            return candidate
    return package.parent / "weights" / name


def resolve_model_path(model: str | os.PathLike | None, default: str = DEFAULT_MODEL) -> Path:
    """The model named, else the bundled one (`default` names which). The CLI fills an unnamed
    model from $TINYGEN_MODEL before it gets here."""
    return Path(model) if model else default_model_path(default)


@dataclass(frozen=True)
class ModelFormat:
    """A kind of model file made elsewhere, read by formats/ (which registers it with register_format)."""

    kinds: tuple[str, ...]  # the ModelInfo.kind values it reads
    claims: Callable[[Path], bool]  # whether an existing path is such a file or folder, from a cheap look
    read_info: Callable[[Path], ModelInfo]
    load_tokenizer: Callable[[ModelInfo], Tokenizer]
    load: Callable[..., tuple]  # (path, device, dtype) -> (model, tokenizer, info), as load_model
    # The same, with the matrices the file stores quantized left as stored (ModelInfo.stored), for
    # a format that has such matrices; None: load serves.
    load_stored: Callable[..., tuple] | None = None


FORMATS: list[ModelFormat] = []


def register_format(fmt: ModelFormat) -> None:
    if fmt not in FORMATS:
        FORMATS.append(fmt)


def _claimed(path: Path) -> ModelFormat | None:
    return next((fmt for fmt in FORMATS if fmt.claims(path)), None)


def read_safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """(metadata, {name: (shape, dtype)}) from a safetensors file, validated by safetensors itself."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {}
            for k in f.keys():
                piece = f.get_slice(k)
                tensors[k] = (tuple(piece.get_shape()), piece.get_dtype())
    except SafetensorError as e:
        raise TinygenError(f"{path} is not a valid safetensors file (corrupt or truncated?): {one_line(e)}") from e
    except OSError as e:
        raise TinygenError(f"cannot read {path}: {e.strerror or e}") from e
    return meta, tensors


def _json_field(meta: dict, key: str, path: Path) -> dict:
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError, RecursionError) as e:
        raise TinygenError(f"{path}: checkpoint metadata field {key!r} is missing or not JSON; the file is corrupt") from e
    if not isinstance(value, dict):
        raise TinygenError(f"{path}: checkpoint metadata field {key!r} is not a JSON object; the file is corrupt")
    return value


def read_info(model: str | os.PathLike | None) -> ModelInfo:
    """Read a model's header: a tinygen .safetensors file, or a file or folder a ModelFormat reads."""
    path = resolve_model_path(model)
    if not path.exists():
        hint = "pass --model or set TINYGEN_MODEL" if model is None else "check the path"
        raise TinygenError(f"no model at {path}; train one with `tinygen train` or {hint}")
    if (fmt := _claimed(path)) is not None:
        return fmt.read_info(path)
    if path.is_dir():
        raise TinygenError(f"{path} is a folder, not a model file")
    meta, tensors = read_safetensors_header(path)
    if meta.get("format") != FORMAT:
        raise TinygenError(
            f"{path} is a safetensors file but not a tinygen checkpoint (no tinygen metadata); "
            "for GPT-2 weights, pass the Hugging Face folder that holds config.json"
        )
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        raise TinygenError(f"{path}: format_version {meta['format_version'][:20]!r} is not a number; the file is corrupt") from None
    if version > FORMAT_VERSION:
        raise TinygenError(f"{path} uses checkpoint format {version}; this tinygen reads up to {FORMAT_VERSION}, upgrade it")
    return ModelInfo(
        path=path,
        kind="tinygen",
        config=config_from_fields(_json_field(meta, "config", path), path),
        tokenizer_data=_json_field(meta, "tokenizer", path),
        provenance=_json_field(meta, "provenance", path) if "provenance" in meta else {},
        format_version=version,
        file_size=path.stat().st_size,
        tensors=tensors,
    )


def config_from_fields(fields: dict, path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(fields)
    except TinygenError as e:
        raise TinygenError(f"{path}: {e}") from None


def load_tokenizer(model: str | os.PathLike | None = None, info: ModelInfo | None = None) -> Tokenizer:
    """The tokenizer of a model, without importing torch."""
    info = info or read_info(model)
    if info.kind == "tinygen":
        try:
            tokenizer = Tokenizer.from_dict(info.tokenizer_data)
            template_for(tokenizer)  # a broken chat template is a broken checkpoint: say so now, not mid-chat
        except TinygenError as e:
            raise TinygenError(f"{info.path}: {e}") from None
    else:
        tokenizer = next(fmt for fmt in FORMATS if info.kind in fmt.kinds).load_tokenizer(info)
    if tokenizer.n_vocab > info.config.vocab_size:
        raise TinygenError(f"{info.path}: tokenizer has {tokenizer.n_vocab} tokens but the model only {info.config.vocab_size}")
    return tokenizer


def load_tokenizer_source(source: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a checkpoint, a GPT-2 model folder, a bare vocab.json + merges.txt folder, or a
    tokenizer file written by `tinygen tokenize --train`."""
    path = Path(source)
    if path.suffix == ".json" and path.is_file():
        try:
            return Tokenizer.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, RecursionError) as e:
            raise TinygenError(f"{path} is not a tokenizer file: {e}") from e
    if path.is_dir() and not (path / "config.json").exists():
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            return Tokenizer.from_gpt2_files(path / "vocab.json", path / "merges.txt")
        raise TinygenError(f"{path} holds neither a model nor vocab.json + merges.txt")
    return load_tokenizer(path)


def load_model(model: str | os.PathLike | None = None, device="cpu", dtype=None, as_stored: bool = False):
    """(GPT in eval mode on device, Tokenizer, ModelInfo) from a tinygen checkpoint, or from a file
    or folder a ModelFormat reads (Hugging Face folders, GGUF files). as_stored: a quantized file's
    matrices stay as the file stores them, for the decode plan (ModelInfo.stored); the model holds
    them on the meta device, so it runs only as prepared (generate/plan.py)."""
    path = resolve_model_path(model)
    if path.exists() and (fmt := _claimed(path)) is not None:
        return (fmt.load_stored if as_stored and fmt.load_stored else fmt.load)(path, device, dtype)
    info = read_info(model)
    tokenizer = load_tokenizer(info=info)
    return build_model(info, load_weights(info, device), device, dtype), tokenizer, info


def load_weights(info: ModelInfo, device) -> dict:
    """Every tensor of the model's safetensors files, by its stored name, on device; refuses first a
    header whose config the stored weights cannot fill (check_fits)."""
    from safetensors.torch import load_file

    check_fits(info)
    state = {}
    for weights in info.weight_files or (info.path,):
        try:
            state.update(load_file(str(weights), device=str(device)))
        except Exception as e:  # safetensors raises its own error types for bad data
            raise TinygenError(f"cannot load weights from {weights}: {one_line(e)}") from e
    return state


def build_model(info: ModelInfo, state: dict, device, dtype):
    """The model of this config holding these weights (tinygen names), on device in dtype. The
    tensors become the parameters themselves (no initialisation, no copy unless dtype or device
    differ); a tensor on the meta device stays there (a matrix left as stored, ModelInfo.stored)."""
    import torch

    from tinygen.core.model import GPT

    broken = next((k for k, v in state.items() if not v.is_meta and not torch.isfinite(v).all()), None)
    if broken is not None:  # a flipped exponent bit; sampling would fail on NaN probabilities later
        raise TinygenError(f"{info.path}: tensor {broken} holds NaN or infinite values; the file is corrupt")
    with torch.device(device), _parameters_on_meta():
        net = GPT(info.config, init=False)
    expected = {k: v for k, v in net.state_dict().items() if k != "lm_head.weight" or not info.config.tie_embeddings}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise TinygenError(
            f"{info.path}: weights do not match the config "
            f"(missing: {', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise TinygenError(f"{info.path}: tensor {k} has shape {tuple(v.shape)}, config says {tuple(expected[k].shape)}")
    dtype = dtype or state["transformer.wte.weight"].dtype
    state = {k: v.to(dtype=dtype) if v.is_meta else v.to(device=device, dtype=dtype) for k, v in state.items()}
    net.load_state_dict(state, strict=False, assign=True)
    if info.config.tie_embeddings:  # a tied lm_head is wte, so it is never stored; assigning wte untied them
        net.lm_head.weight = net.transformer.wte.weight
    return net.to(dtype=dtype).eval()  # the buffers: parameters are in dtype already


@contextmanager
def _parameters_on_meta():
    """Parameters made inside go to the meta device as they are registered, while buffers (rotary
    tables, derived from the config) are made on the device as usual: a model built so holds no
    weight memory, and no initialisation runs over it, until load_state_dict(assign=True) gives it
    the loaded tensors. (accelerate's init_empty_weights(include_buffers=False) works the same way.)"""
    from torch import nn

    register, normal = nn.Module.register_parameter, nn.init.normal_

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    # An embedding's initialisation draws normal_ on its (meta) weight, whose meta kernel imports
    # Dynamo: a second and 60 MB for numbers nobody reads.
    nn.Module.register_parameter = on_meta
    nn.init.normal_ = lambda tensor, *args, **kwargs: tensor if tensor.is_meta else normal(tensor, *args, **kwargs)
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.init.normal_ = register, normal


def check_fits(info: ModelInfo) -> None:
    """Refuse, from the header alone, a config that the stored weights cannot fill. The model is
    sized by the config and the weights by the file, so without this a corrupt header could make
    load_model build a model of gigabytes (or of a million blocks) before the shapes are compared.
    Every block holds at least its query and output matrices, n_embd x n_embd each, so a true
    checkpoint always passes."""
    cfg = info.config
    if any(dtype not in FLOAT_DTYPES for dtype in info.dtypes):
        raise TinygenError(f"{info.path}: weights of type {', '.join(info.dtypes)}; tinygen loads {', '.join(FLOAT_DTYPES)}")
    wte = next((shape for name, (shape, _) in info.tensors.items() if name.endswith(("wte.weight", "embed_tokens.weight"))),
               None)
    if wte != (cfg.vocab_size, cfg.n_embd):
        found = f"has shape {wte}" if wte else "is missing"
        raise TinygenError(f"{info.path}: tensor wte.weight {found}, config says {(cfg.vocab_size, cfg.n_embd)}")
    blocks = {int(m.group(1)) for name in info.tensors if (m := LAYER_NAME.search(name))}
    if len(blocks) != cfg.n_layer or blocks != set(range(cfg.n_layer)):
        raise TinygenError(f"{info.path}: the config has n_layer={cfg.n_layer} but the file stores {len(blocks)} blocks")
    if cfg.vocab_size * cfg.n_embd + 2 * cfg.n_layer * cfg.n_embd ** 2 > info.n_params:
        raise TinygenError(f"{info.path}: the config (n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, "
                           f"vocab_size={cfg.vocab_size}) needs more weights than the file's {info.n_params:,}")


def update_provenance(path: str | os.PathLike, extra: dict) -> None:
    """Merge extra into a tinygen checkpoint's provenance, rewriting the file atomically."""
    from safetensors.torch import load_file, save_file

    info = read_info(path)
    if info.kind != "tinygen":
        raise TinygenError(f"{info.path} is not a tinygen checkpoint, so it has no provenance to update")
    meta, _ = read_safetensors_header(info.path)
    tensors = load_file(str(info.path))
    meta["provenance"] = json.dumps({**info.provenance, **extra})
    with atomic_path(info.path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def save_checkpoint(path: str | os.PathLike, model, tokenizer: Tokenizer, provenance: dict | None = None) -> Path:
    """Write model + tokenizer + provenance to one .safetensors file, atomically (temp, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not model.config.tie_embeddings  # a tied head is wte; safetensors refuses shared storage
    }
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": model.config.to_json(),
        "tokenizer": json.dumps(tokenizer.to_dict()),
        "provenance": json.dumps(provenance or {}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
