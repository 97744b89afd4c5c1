"""Exports of a tinygen model for other tools: a Hugging Face folder (export_hf.py) or a llama GGUF
(export_gguf.py), written whole or not at all.

Both formats spell the tokenizer the same way, so that is here too: a byte-level BPE in GPT-2's
byte alphabet, with merges derived from the ranks, and tinygen's chat template as Jinja. Torch and
the writers' packages are imported only by the format being written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tinygen.atomic import _remove_stale as remove_stale
from tinygen.core.template import ROLES, template_for
from tinygen.core.tokenizer import EOT, Tokenizer, _unicode_to_byte
from tinygen.errors import TinygenError

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0")


@dataclass
class Exported:
    """What export() wrote, for the summary line."""

    path: Path
    size: int  # bytes on disk
    what: str  # e.g. "LlamaForCausalLM, float32" or "llama, q8_0"
    notes: list[str] = field(default_factory=list)


def export(model: str | os.PathLike, fmt: str, out: str | os.PathLike, gguf_type: str | None = None,
           force: bool = False) -> Exported:
    """Write `model` (anything load_model reads) to `out` as a Hugging Face folder or a GGUF file.
    An existing `out` is replaced only with `force`, and only once the new one is complete."""
    from tinygen.core.checkpoint import load_model

    if fmt not in FORMATS:
        raise TinygenError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if gguf_type is not None and fmt != "gguf":
        raise TinygenError("--type is the GGUF tensor type; a Hugging Face export keeps the weights' own dtype")
    gguf_type = gguf_type or "f16"
    if gguf_type not in GGUF_TYPES:
        raise TinygenError(f"unknown GGUF type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise TinygenError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise TinygenError(f"cannot write {out}: there is no folder {out.parent}; create it first")
    net, tokenizer, info = load_model(model, device="cpu")
    if fmt == "hf":
        from tinygen.core.export_hf import write_hf

        what = _replace(out, lambda tmp: write_hf(net, tokenizer, tmp))
    else:
        from tinygen.core.export_gguf import write_gguf

        what = _replace(out, lambda tmp: write_gguf(net, tokenizer, tmp, gguf_type, name=info.path.stem))
    size = sum(p.stat().st_size for p in out.iterdir()) if out.is_dir() else out.stat().st_size
    return Exported(out, size, what, list(info.notes))


def _replace(out: Path, write) -> str:
    """Run write(tmp) on a path in a hidden folder beside `out`, then rename the result over `out`,
    so that an interrupted export never leaves a half-written one under its name. A file replaces a
    file atomically; an old folder can only be moved aside (into the hidden folder) just before."""
    remove_stale(out)
    work = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # atomic.py's name, so its clean-up finds ours
    shutil.rmtree(work, ignore_errors=True)
    try:
        os.mkdir(work)
        # The files get the modes a plain open() would give them (safetensors makes its files 0600).
        mode = work.stat().st_mode & 0o666
        tmp = work / out.name
        what = write(tmp)
        for f in tmp.iterdir() if tmp.is_dir() else [tmp]:
            os.chmod(f, mode)
        if out.is_dir() or (tmp.is_dir() and out.exists()):  # nothing renames over a folder, or a folder over a file
            os.replace(out, work / f"{out.name}.old")
        os.replace(tmp, out)
    except OSError as e:
        raise TinygenError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return what


# -- the tokenizer as a byte-level BPE ---------------------------------------------------------------

@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    return {b: ch for ch, b in _unicode_to_byte().items()}


def token_text(raw: bytes) -> str:
    """A token's bytes in GPT-2's byte alphabet, as tokenizer.json and GGUF files spell tokens."""
    alphabet = _byte_to_unicode()
    return "".join(alphabet[b] for b in raw)


def merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """The BPE merges that reproduce tiktoken's encoding, in priority order.

    tiktoken merges any two neighbours whose concatenation is a token, the lowest-ranked result
    first. A merge list applies only the pairs it names, so every way of cutting a token into two
    tokens is listed, at the token's rank (as transformers' tiktoken converter does); listing only
    the pair that built the token would miss merges tiktoken makes."""
    rank = {raw: i for i, raw in enumerate(tokenizer.ranks) if raw is not None}
    out = []
    for raw in tokenizer.ranks:
        if raw is None or len(raw) == 1:
            continue
        pairs = [(raw[:k], raw[k:]) for k in range(1, len(raw)) if raw[:k] in rank and raw[k:] in rank]
        if not pairs:
            raise TinygenError(f"token {raw!r} is not two tokens joined, so no BPE merge makes it; this "
                               "tokenizer cannot be written as a byte-level BPE")
        pairs.sort(key=lambda p: (rank[p[0]], rank[p[1]]))
        out += [(token_text(a), token_text(b)) for a, b in pairs]
    return out


def special_name(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    return next((name for name, i in tokenizer.special.items() if i == token_id), None)


def bos_name(tokenizer: Tokenizer) -> str | None:
    """The token that starts a text: the model's own BOS, else tinygen's <|endoftext|>, which opens
    every document and conversation in training (GPT-2's BOS too)."""
    return special_name(tokenizer, tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id)


def jinja_chat_template(tokenizer: Tokenizer) -> str | None:
    """The model's chat template as Jinja for tokenizer_config.json and GGUF: an imported model's own
    template as it came, tinygen's rendered as ChatSession does (<|endoftext|>, then each message
    between its role's prefix and suffix, then the generation prompt). None for a base model."""
    if tokenizer.jinja_template is not None:
        return tokenizer.jinja_template
    if tokenizer.chat_template is None:
        return None
    template = template_for(tokenizer)

    def text(s: str) -> str:
        # A Jinja string literal: Jinja unescapes as Python does, and JSON escapes are a subset.
        return json.dumps(s, ensure_ascii=False)

    roles = "".join(
        f"{{%- {'if' if i == 0 else 'elif'} message['role'] == {text(role)} -%}}"
        f"{{{{- {text(template.roles[role][0])} + message['content'] + {text(template.roles[role][1])} -}}}}"
        for i, role in enumerate(ROLES))
    lead = EOT if tokenizer.eot_id is not None else ""
    return (f"{{{{- {text(lead)} -}}}}"
            "{%- for message in messages -%}" + roles +
            "{%- else -%}{{- raise_exception('unknown chat role: ' + message['role']) -}}{%- endif -%}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{- {text(template.generation_prompt)} -}}}}{{%- endif -%}}")
