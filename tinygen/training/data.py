"""Training data: documents from files, tokenized once into cached memmaps, split by document.

Inputs are text files, folders or globs, of plain text or JSONL with a "text" field. Plain text
is cut into documents at a separator (`<|endoftext|>` by default). Each document is stored as
<|endoftext|> followed by its tokens, so a model learns that end-of-text starts a new document.
Token files are keyed by a hash of the inputs' bytes and the tokenizer, so a second run with the
same data and tokenizer reads them back instead of tokenizing again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinygen import atomic
from tinygen.core.tokenizer import EOT, Tokenizer
from tinygen.errors import TinygenError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".jsonl"}


def expand_sources(sources: list[str]) -> list[Path]:
    """Files named directly, found in folders (recursively), or matched by globs; sorted, unique."""
    files: list[Path] = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise TinygenError(f"folder {src} has no .txt, .md or .jsonl files")
            files += found
        elif path.is_file():
            files.append(path)
        elif any(ch in src for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(src, recursive=True) if Path(p).is_file())
            if not found:
                raise TinygenError(f"no files match {src}")
            files += found
        else:
            raise TinygenError(f"no such file or folder: {src}")
    return list(dict.fromkeys(files))


def read_documents(files: list[Path], separator: str = EOT) -> list[str]:
    docs: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TinygenError(f"{path} is not UTF-8 text") from None
        except OSError as e:
            raise TinygenError(f"cannot read {path}: {e.strerror}") from None
        if path.suffix.lower() == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise TinygenError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
                if isinstance(doc, str) and doc.strip():
                    docs.append(doc.strip())
        else:
            docs += [d.strip() for d in (text.split(separator) if separator else [text]) if d.strip()]
    if not docs:
        raise TinygenError("the training data is empty: no documents found")
    return docs


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A held-out set of whole documents (never a document cut in two), chosen by a seeded shuffle."""
    if not 0 <= val_fraction < 1:
        raise TinygenError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or len(docs) < 2:
        return docs, []
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


@dataclass
class TokenData:
    train: np.ndarray  # token ids, memory-mapped
    val: np.ndarray
    val_bytes: int  # UTF-8 bytes of the validation text, for bits per byte
    n_docs: tuple[int, int]  # train, val
    cached: bool  # True when read back from the cache


def token_dtype(tokenizer: Tokenizer):
    return np.uint16 if tokenizer.n_vocab <= 2**16 else np.uint32


def encode_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    eot = tokenizer.eot_id
    if eot is None:
        raise TinygenError("the tokenizer has no <|endoftext|> token to separate documents")
    encoded = tokenizer.enc.encode_ordinary_batch(docs)  # tiktoken spreads the batch over threads
    out = np.empty(sum(len(e) + 1 for e in encoded), dtype=token_dtype(tokenizer))
    i = 0
    for ids in encoded:
        out[i] = eot
        out[i + 1 : i + 1 + len(ids)] = ids
        i += len(ids) + 1
    return out


def files_digest(files: list[Path], *settings) -> str:
    """A short hash of the files' bytes plus any settings that change what is derived from them."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.read_bytes())
        h.update(b"\0")
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:20]


def load_tokens(files: list[Path], tokenizer: Tokenizer, cache_dir: Path, *, separator: str = EOT,
                val_fraction: float = 0.05, seed: int = 0) -> TokenData:
    key = files_digest(files, tokenizer.to_dict(), separator, val_fraction, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path = cache_dir / f"{key}.json"
    cached = meta_path.exists()
    if not cached:
        train_docs, val_docs = split_documents(read_documents(files, separator), val_fraction, seed)
        for split, docs in (("train", train_docs), ("val", val_docs)):
            atomic.write_bytes(cache_dir / f"{key}.{split}.bin", encode_documents(docs, tokenizer).tobytes() if docs else b"")
        meta = {"val_bytes": sum(len(d.encode()) for d in val_docs), "n_docs": [len(train_docs), len(val_docs)],
                "files": [str(f) for f in files]}
        atomic.write_bytes(meta_path, json.dumps(meta).encode())  # written last: its presence means the cache is whole
    meta = json.loads(meta_path.read_text())
    dtype = token_dtype(tokenizer)
    return TokenData(_memmap(cache_dir / f"{key}.train.bin", dtype), _memmap(cache_dir / f"{key}.val.bin", dtype),
                     meta["val_bytes"], tuple(meta["n_docs"]), cached=cached)


def _memmap(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


