"""Training data: documents from files, split for validation, tokenized once into cached memmaps.

Inputs are text files, folders or globs, of plain text or JSONL with a "text" field. Plain text
is cut into documents at a separator (`<|endoftext|>` by default). Each document is stored as
its tokens after the tokenizer's document start (<|endoftext|> for tinygen's own, BOS for a model
that expects one first), so a model learns that this token starts a new document.
Token files are keyed by a hash of the inputs' bytes and the tokenizer, so a second run with the
same data and tokenizer reads them back instead of tokenizing again.

Validation holds out whole documents when there are enough of them; a corpus of a few long
texts (one Shakespeare file) holds out the end of its text instead, as nanoGPT does.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from tinygen import atomic
from tinygen.core.evaluate import document_start
from tinygen.core.tokenizer import EOT, Tokenizer
from tinygen.errors import TinygenError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".jsonl"}
# Part of the token cache's key, raised whenever encode_documents changes what it writes for the
# same text and tokenizer, so that no cache of an older rule is ever read back.
ENCODING_VERSION = 2


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
    _check_fraction(val_fraction)
    if val_fraction == 0 or len(docs) < 2:
        return docs, []
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def split_tail(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """The last val_fraction of the text held out, as nanoGPT splits one long text. The cut moves
    back to the start of its line (or word) when one is near, and the document it falls in becomes
    two pieces: the tokenizer and the model never see the held-out text."""
    _check_fraction(val_fraction)
    want = round(sum(len(d) for d in docs) * val_fraction)
    train, val = list(docs), []
    while train and want > 0:
        doc = train.pop()
        if len(doc) <= want:
            val.insert(0, doc)
            want -= len(doc)
            continue
        cut = _near_boundary(doc, len(doc) - want)
        head, tail = doc[:cut].strip(), doc[cut:].strip()
        train += [head] if head else []
        val[:0] = [tail] if tail else []
        break
    return train, val


def _near_boundary(text: str, pos: int) -> int:
    """pos, or the start of its line or word when that holds out at most twice as much."""
    limit = max(0, 2 * pos - len(text))
    for sep in ("\n", " "):
        i = text.rfind(sep, limit, pos)
        if i >= 0:
            return i + 1
    return pos


def _check_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction < 1:
        raise TinygenError(f"--val-fraction must be in [0, 1), got {val_fraction}")


@dataclass
class Split:
    train: list[str]
    val: list[str]
    method: str  # "documents": whole documents held out; "tail": the end of the text

    def describe(self, val_fraction: float, seed: int) -> str:
        """How the validation text was chosen, in the words `tinygen eval --val-split` reproduces it by."""
        if not self.val:
            return "none"
        if self.method == "tail":
            return f"the last {val_fraction * 100:g}% of the text"
        return f"{len(self.val):,} of {len(self.train) + len(self.val):,} documents (fraction {val_fraction}, seed {seed})"


def split_for_validation(docs: list[str], val_fraction: float, seed: int) -> Split:
    """Whole documents when the share asked for holds at least one of them; else the end of the text.
    `train` and `tinygen eval --val-split` both split through here, so they hold out the same text."""
    if val_fraction == 0 or len(docs) * val_fraction >= 1:
        return Split(*split_documents(docs, val_fraction, seed), "documents")
    return Split(*split_tail(docs, val_fraction), "tail")


@dataclass
class TokenData:
    train: np.ndarray  # token ids, memory-mapped
    val: np.ndarray
    val_bytes: int  # UTF-8 bytes of the validation text, for bits per byte
    n_docs: tuple[int, int]  # train, val (pieces, for a tail split)
    split: str  # Split.method
    description: str  # Split.describe
    cached: bool  # True when read back from the cache


def token_dtype(tokenizer: Tokenizer):
    return np.uint16 if tokenizer.n_vocab <= 2**16 else np.uint32


def encode_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """The documents as one token stream, each after the tokenizer's own document start
    (evaluate.document_start): what a model is trained on and scored by. Each goes through
    Tokenizer.encode, with special-token text read as text, so imported vocabularies keep their
    normalization and their rules for bytes they lack."""
    start = document_start(tokenizer)
    if start is None:
        raise TinygenError("the tokenizer has no BOS, EOS or <|endoftext|> token to start documents with")
    # Threads, as tiktoken's own batch encoding uses: its encoder releases the GIL.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        encoded = list(pool.map(partial(tokenizer.encode, special=False), docs, chunksize=64))
    out = np.empty(sum(len(e) + 1 for e in encoded), dtype=token_dtype(tokenizer))
    i = 0
    for ids in encoded:
        out[i] = start
        out[i + 1 : i + 1 + len(ids)] = ids
        i += len(ids) + 1
    return out


def files_digest(files: list[Path]) -> str:
    """A hash of the files' bytes: what a resumed run checks its data against, and what cache keys start from."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def cache_key(digest: str, *settings) -> str:
    """A short name for what is derived from data with this digest under these settings."""
    return hashlib.sha256(json.dumps([digest, *settings], sort_keys=True).encode()).hexdigest()[:20]


def load_tokens(files: list[Path], tokenizer: Tokenizer, cache_dir: Path, *, separator: str = EOT,
                val_fraction: float = 0.05, seed: int = 0, digest: str | None = None) -> TokenData:
    key = cache_key(digest or files_digest(files), ENCODING_VERSION, tokenizer.to_dict(), separator, val_fraction,
                    seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path = cache_dir / f"{key}.json"
    cached = meta_path.exists()
    if not cached:
        split = split_for_validation(read_documents(files, separator), val_fraction, seed)
        for name, docs in (("train", split.train), ("val", split.val)):
            atomic.write_bytes(cache_dir / f"{key}.{name}.bin", encode_documents(docs, tokenizer).tobytes() if docs else b"")
        meta = {"val_bytes": sum(len(d.encode()) for d in split.val), "n_docs": [len(split.train), len(split.val)],
                "split": split.method, "description": split.describe(val_fraction, seed),
                "files": [str(f) for f in files]}
        atomic.write_bytes(meta_path, json.dumps(meta).encode())  # written last: its presence means the cache is whole
    meta = json.loads(meta_path.read_text())
    dtype = token_dtype(tokenizer)
    return TokenData(_memmap(cache_dir / f"{key}.train.bin", dtype), _memmap(cache_dir / f"{key}.val.bin", dtype),
                     meta["val_bytes"], tuple(meta["n_docs"]), meta["split"], meta["description"], cached=cached)


def _memmap(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
