"""Single-file checkpoints: one .safetensors file with the weights, config, tokenizer and provenance.

Metadata keys (all strings, as safetensors requires): format="tinygen", format_version, config
(JSON of ModelConfig), tokenizer (JSON of Tokenizer.to_dict), provenance (JSON: steps, tokens,
losses, data). A Hugging Face GPT-2 folder (config.json, model.safetensors, vocab.json,
merges.txt) loads too. Reading the header needs no torch, so `info` and `tokenize` stay fast;
only load_model imports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tinygen.atomic import atomic_path
from tinygen.core.config import ModelConfig
from tinygen.core.tokenizer import Tokenizer
from tinygen.errors import TinygenError

FORMAT = "tinygen"
FORMAT_VERSION = 1
DEFAULT_MODEL = "stories.safetensors"
DEFAULT_CHAT_MODEL = "chat.safetensors"
HF_WEIGHTS = "model.safetensors"
# GPT-2 stores these as Conv1D, whose weight is (in, out): the transpose of nn.Linear's.
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class ModelInfo:
    """What the header says about a model, read without loading any weights."""

    path: Path
    kind: str  # "tinygen" or "gpt2" (a Hugging Face GPT-2 folder)
    config: ModelConfig
    tokenizer_data: dict | None  # None for GPT-2 folders: their tokenizer lives in vocab.json/merges.txt
    provenance: dict = field(default_factory=dict)
    format_version: int | None = None
    n_params: int = 0
    file_size: int = 0
    dtypes: tuple[str, ...] = ()

    @property
    def weights_path(self) -> Path:
        return self.path / HF_WEIGHTS if self.kind == "gpt2" else self.path


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


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
    """(metadata, {name: (shape, dtype)}) from a safetensors file, validated by safetensors itself."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except SafetensorError as e:
        raise TinygenError(f"{path} is not a valid safetensors file (corrupt or truncated?): {e}") from e
    except OSError as e:
        raise TinygenError(f"cannot read {path}: {e.strerror or e}") from e
    return meta, tensors


def _json_field(meta: dict, key: str, path: Path):
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError) as e:
        raise TinygenError(f"{path}: checkpoint metadata field {key!r} is missing or not JSON") from e


def read_info(model: str | os.PathLike | None) -> ModelInfo:
    """Read a model's header: a tinygen .safetensors file or a Hugging Face GPT-2 folder."""
    path = resolve_model_path(model)
    if not path.exists():
        hint = "pass --model or set TINYGEN_MODEL" if model is None else "check the path"
        raise TinygenError(f"no model at {path}; train one with `tinygen train` or {hint}")
    if path.is_dir():
        return _read_hf_info(path)
    meta, tensors = _read_header(path)
    if meta.get("format") != FORMAT:
        raise TinygenError(
            f"{path} is a safetensors file but not a tinygen checkpoint (no tinygen metadata); "
            "for GPT-2 weights, pass the Hugging Face folder that holds config.json"
        )
    version = int(meta.get("format_version", "0") or 0)
    if version > FORMAT_VERSION:
        raise TinygenError(f"{path} uses checkpoint format {version}; this tinygen reads up to {FORMAT_VERSION}, upgrade it")
    config = ModelConfig.from_dict(_json_field(meta, "config", path))
    return ModelInfo(
        path=path,
        kind="tinygen",
        config=config,
        tokenizer_data=_json_field(meta, "tokenizer", path),
        provenance=_json_field(meta, "provenance", path) if "provenance" in meta else {},
        format_version=version,
        n_params=sum(_numel(shape) for shape, _ in tensors.values()),
        file_size=path.stat().st_size,
        dtypes=tuple(sorted({dt for _, dt in tensors.values()})),
    )


def _read_hf_info(path: Path) -> ModelInfo:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise TinygenError(f"{path} is a folder without config.json: not a tinygen file or a Hugging Face GPT-2 folder")
    if not (path / HF_WEIGHTS).exists():
        raise TinygenError(f"{path} has no {HF_WEIGHTS}; tinygen loads safetensors weights only (never pickle)")
    try:
        hf = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise TinygenError(f"{cfg_path} is not valid JSON: {e}") from e
    if hf.get("model_type") != "gpt2":
        raise TinygenError(f"{path} holds a {hf.get('model_type')!r} model; tinygen loads GPT-2 folders only")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise TinygenError(f"{path}: activation {hf['activation_function']!r} is not supported (GPT-2 uses gelu_new)")
    config = ModelConfig(
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf["vocab_size"],
        arch="gpt2",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )
    _, tensors = _read_header(path / HF_WEIGHTS)
    weights = {k: v for k, v in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return ModelInfo(
        path=path,
        kind="gpt2",
        config=config,
        tokenizer_data=None,
        provenance={"source": "Hugging Face GPT-2 folder"},
        n_params=sum(_numel(shape) for shape, _ in weights.values()),
        file_size=size,
        dtypes=tuple(sorted({dt for _, dt in weights.values()})),
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load_tokenizer(model: str | os.PathLike | None = None, info: ModelInfo | None = None) -> Tokenizer:
    """The tokenizer of a model (checkpoint or GPT-2 folder), without importing torch."""
    info = info or read_info(model)
    if info.kind == "gpt2":
        vocab, merges = info.path / "vocab.json", info.path / "merges.txt"
        if not (vocab.exists() and merges.exists()):
            raise TinygenError(f"{info.path} has no vocab.json + merges.txt, so its tokenizer is unknown")
        return Tokenizer.from_gpt2_files(vocab, merges)
    return Tokenizer.from_dict(info.tokenizer_data)


def load_tokenizer_source(source: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a checkpoint, a GPT-2 model folder, a bare vocab.json + merges.txt folder, or a
    tokenizer file written by `tinygen tokenize --train`."""
    path = Path(source)
    if path.suffix == ".json" and path.is_file():
        try:
            return Tokenizer.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as e:
            raise TinygenError(f"{path} is not a tokenizer file: {e}") from e
    if path.is_dir() and not (path / "config.json").exists():
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            return Tokenizer.from_gpt2_files(path / "vocab.json", path / "merges.txt")
        raise TinygenError(f"{path} holds neither a model nor vocab.json + merges.txt")
    return load_tokenizer(path)


def load_model(model: str | os.PathLike | None = None, device="cpu", dtype=None):
    """(GPT in eval mode on device, Tokenizer, ModelInfo) from a checkpoint or GPT-2 folder."""
    import torch
    from safetensors.torch import load_file

    from tinygen.core.model import GPT

    info = read_info(model)
    tokenizer = load_tokenizer(info=info)
    try:
        state = load_file(str(info.weights_path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for bad data
        raise TinygenError(f"cannot load weights from {info.weights_path}: {e}") from e
    if info.kind == "gpt2":
        state = _from_hf_gpt2(state)
    # Built straight on the target device (a meta-device model would cost a second of imports).
    with torch.device(device):
        net = GPT(info.config, init=False)
    expected = {k: v for k, v in net.state_dict().items() if k != "lm_head.weight"}
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
    net.load_state_dict(state, strict=False)  # lm_head is tied to wte, so it is never stored
    if tokenizer.n_vocab > info.config.vocab_size:
        raise TinygenError(f"{info.path}: tokenizer has {tokenizer.n_vocab} tokens but the model only {info.config.vocab_size}")
    net = net.to(dtype=dtype or state["transformer.wte.weight"].dtype)
    return net.eval(), tokenizer, info


def _from_hf_gpt2(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        name = key.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers and the tied head
        if name.endswith(HF_CONV1D):
            value = value.t().contiguous()
        out["transformer." + name] = value
    return out


def update_provenance(path: str | os.PathLike, extra: dict) -> None:
    """Merge extra into a tinygen checkpoint's provenance, rewriting the file atomically."""
    from safetensors.torch import load_file, save_file

    info = read_info(path)
    if info.kind != "tinygen":
        raise TinygenError(f"{info.path} is not a tinygen checkpoint, so it has no provenance to update")
    meta, _ = _read_header(info.path)
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
        if k != "lm_head.weight"  # tied to wte; safetensors refuses shared storage anyway
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
