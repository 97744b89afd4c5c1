"""Byte-level BPE tokenizers: tiktoken encodes and decodes, rustbpe trains.

A tokenizer is fully described by its mergeable ranks, split pattern and special tokens; that
description is what a checkpoint stores, so a model always travels with its own tokenizer.
Tokenizers imported from other tools (tokenizer_import.py) add what their models expect: special
tokens among the ordinary ids, BOS/EOS/stop ids, NFC normalization, their Jinja chat template.
Free of torch on purpose: `tinygen tokenize` must start fast.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import copy
import json
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import regex
import tiktoken

from tinygen.core.spm import SentencePieceTokenizer
from tinygen.errors import TinygenError

EOT = "<|endoftext|>"
# Reserved now so that the chat template never has to renumber a trained vocabulary.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (EOT, *CHAT_TOKENS)

# GPT-4's split pattern (rustbpe's default), written out so a checkpoint records exactly what it used.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# GPT-2's pattern, as Hugging Face's byte-level pre-tokenizer applies it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Text a split pattern must cut into non-empty pieces that cover it all (see _check).
PATTERN_PROBE = "Once upon a time, Tom's 3 cats said: \"héllo 😀 日本語!\"\n\n\tThe end.  \r\n"


class Tokenizer:
    """A tiktoken Encoding plus the data needed to rebuild it anywhere."""

    kind = "byte-level BPE"  # what every tinygen tokenizer is; `name` tells them apart

    def __init__(self, ranks: list[bytes | None], pattern: str, special: dict[str, int], name: str = "tinygen",
                 chat_template: dict | None = None, *, bos_id: int | None = None, eos_id: int | None = None,
                 stop_ids: Iterable[int] | None = None, add_bos: bool = False, normalization: str | None = None,
                 drop_unknown_bytes: bool = False, jinja_template: str | None = None):
        # ranks[i] is the byte string of token i; order is merge priority. None marks an id held by a
        # special token, as imported vocabularies put them among the ordinary ids (SmolLM2's 0..16).
        self.ranks = ranks
        self.pattern = pattern
        self.special = special
        self.name = name
        self.chat_template = chat_template  # set by chat fine-tuning; see template.py
        # An imported model's own conventions; None means tinygen's defaults (see the properties).
        self.bos_id = bos_id
        self._eos_id = eos_id
        self._stop_ids = None if stop_ids is None else tuple(stop_ids)
        self.add_bos = add_bos  # whether the model expects bos_id before a plain prompt (Llama 3 does)
        self.normalization = normalization  # "NFC" for Qwen2, whose Hugging Face tokenizer normalizes first
        self.drop_unknown_bytes = drop_unknown_bytes
        self.jinja_template = jinja_template  # the model's own chat template source; see formats/jinja.py
        _check(ranks, pattern, special, name, drop_unknown_bytes)
        self._n_ids = len(ranks) + sum(1 for i in special.values() if i >= len(ranks))
        self._check_settings()
        mergeable = dict(zip(ranks, range(len(ranks))))
        mergeable.pop(None, None)
        # tiktoken panics on a byte without a rank. Some vocabularies lack a few (SmolLM2 has no 0x04),
        # and llama.cpp leaves such bytes out after merging (Hugging Face before, so neighbours across
        # them may merge there); ranks past every real id let encode() do as llama.cpp does.
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in mergeable]
        mergeable.update((b, self._n_ids + k) for k, b in enumerate(missing))
        try:
            self.enc = tiktoken.Encoding(
                name=name,
                pat_str=pattern,
                mergeable_ranks=mergeable,
                special_tokens=special,
            )
        except (ValueError, TypeError, OverflowError) as e:  # e.g. a pattern `regex` takes and tiktoken does not
            raise TinygenError(f"invalid tokenizer data: {e}") from e
        self.special_ids = frozenset(special.values())
        self._special_split = None  # the special tokens as one regex, to normalize only the text between them
        if normalization and special:
            names = sorted(special, key=len, reverse=True)  # longest first, as Hugging Face matches added tokens
            self._special_split = regex.compile("(" + "|".join(map(regex.escape, names)) + ")")

    def _check_settings(self) -> None:
        """Refuse imported-model settings that would fail later, mid-generation, instead of now."""
        def is_id(i) -> bool:
            return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_vocab

        ids = [i for i in (self.bos_id, self._eos_id) if i is not None] + list(self._stop_ids or ())
        if not all(is_id(i) for i in ids):
            raise TinygenError(f"invalid tokenizer data: BOS, EOS and stop ids must be token ids "
                               f"(0..{self.n_vocab - 1})")
        if self.normalization not in (None, "NFC"):
            raise TinygenError(f"invalid tokenizer data: normalization {self.normalization!r} is not supported "
                               "(only NFC)")
        if not isinstance(self.add_bos, bool) or not isinstance(self.drop_unknown_bytes, bool):
            raise TinygenError("invalid tokenizer data: add_bos and drop_unknown_bytes must be true or false")
        if not isinstance(self.jinja_template, (str, type(None))):
            raise TinygenError("invalid tokenizer data: jinja_template must be a string")

    @property
    def n_vocab(self) -> int:
        return self._n_ids

    @property
    def eot_id(self) -> int | None:
        return self.special.get(EOT)

    @property
    def eos_id(self) -> int | None:
        return self._eos_id if self._eos_id is not None else self.eot_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a generation: an imported model's EOS, EOT and end-of-turn tokens, or
        tinygen's end of text and end of chat turn."""
        if self._stop_ids is not None:
            return self._stop_ids
        return tuple(t for t in (self.eot_id, self.special.get("<|end|>")) if t is not None)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Encode text. With special=True, special-token text (`<|endoftext|>`) becomes its id."""
        if self.normalization:
            ids = self._encode_normalized(text, special)
        elif special:
            ids = self.enc.encode(text, allowed_special="all")
        else:
            ids = self.enc.encode_ordinary(text)
        if self.drop_unknown_bytes:
            ids = [i for i in ids if i < self._n_ids]
        return ids

    def _encode_normalized(self, text: str, special: bool) -> list[int]:
        # Hugging Face normalizes the text between special tokens, never across them: NFC would
        # otherwise join a combining mark to the `>` that ends `<|im_end|>`.
        pieces = self._special_split.split(text) if special and self._special_split else [text]
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self.special[piece])
            elif piece:
                ids += self.enc.encode_ordinary(unicodedata.normalize(self.normalization, piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def label(self, token_id: int) -> str:
        """How one token reads on its own: its text, or its bytes when they are not whole characters
        (a byte-level BPE splits some characters across tokens)."""
        for name, sid in self.special.items():
            if sid == token_id:
                return name
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<0x{b:02X}>" for b in raw)

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        # Settings at their defaults are left out, so a tinygen tokenizer's data stays what it always was.
        settings = {"bos_id": self.bos_id, "eos_id": self._eos_id,
                    "stop_ids": None if self._stop_ids is None else list(self._stop_ids), "add_bos": self.add_bos,
                    "normalization": self.normalization, "drop_unknown_bytes": self.drop_unknown_bytes,
                    "jinja_template": self.jinja_template}
        return {
            "type": "tiktoken-bpe",
            "name": self.name,
            "pattern": self.pattern,
            "ranks": [None if b is None else base64.b64encode(b).decode("ascii") for b in self.ranks],
            "special": dict(self.special),  # copies: a caller may change the dict it gets
            **({"chat_template": copy.deepcopy(self.chat_template)} if self.chat_template else {}),
            **{k: v for k, v in settings.items() if v is not None and v is not False},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer | SentencePieceTokenizer:
        """The tokenizer to_dict describes: this kind, or a SentencePiece one (core/spm.py)."""
        if isinstance(d, dict) and d.get("type") == "sentencepiece":
            return SentencePieceTokenizer.from_dict(d)
        try:
            if not isinstance(d, dict) or not isinstance(d["ranks"], list) or not isinstance(d["special"], dict):
                raise TypeError("want an object with a list of ranks and an object of special tokens")
            if not isinstance(d.get("chat_template"), (dict, type(None))):
                raise TypeError("chat_template must be a JSON object")
            ranks = [None if s is None else base64.b64decode(s, validate=True) for s in d["ranks"]]
            stop_ids = d.get("stop_ids")
            if not isinstance(stop_ids, (list, type(None))):
                raise TypeError("stop_ids must be a list")
            return cls(ranks, d["pattern"], d["special"], d.get("name", "tinygen"),
                       chat_template=d.get("chat_template"), bos_id=d.get("bos_id"), eos_id=d.get("eos_id"),
                       stop_ids=stop_ids, add_bos=d.get("add_bos", False), normalization=d.get("normalization"),
                       drop_unknown_bytes=d.get("drop_unknown_bytes", False), jinja_template=d.get("jinja_template"))
        except KeyError as e:
            raise TinygenError(f"checkpoint tokenizer metadata is malformed (no {e.args[0]!r})") from e
        except (TypeError, binascii.Error) as e:
            raise TinygenError(f"checkpoint tokenizer metadata is malformed ({e})") from e

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def from_gpt2_files(cls, vocab_path: Path, merges_path: Path) -> Tokenizer:
        """Build from Hugging Face GPT-2 `vocab.json` + `merges.txt` (with or without a #version line)."""
        try:
            vocab: dict[str, int] = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
            merge_lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError, RecursionError) as e:
            raise TinygenError(f"cannot read GPT-2 tokenizer files: {e}") from e
        if (not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values())
                or sorted(vocab.values()) != list(range(len(vocab)))):
            raise TinygenError(f"{vocab_path} is not a GPT-2 vocabulary: want a JSON object of tokens to ids 0..N-1")
        decoder = unicode_to_byte()

        def to_bytes(token: str) -> bytes:
            return bytes(decoder[ch] for ch in token)

        mergeable = {bytes([b]) for b in range(256)}
        last_id = -1
        for line in merge_lines:
            if not line or line.startswith("#version"):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise TinygenError(f"{merges_path}: {line[:40]!r} is not a merge (two tokens and a space)")
            merged = pair[0] + pair[1]
            token_id = vocab.get(merged)
            # tiktoken merges by the rank of the merged token, so ids must follow merge order.
            if token_id is None or token_id <= last_id:
                raise TinygenError(f"unsupported BPE vocabulary in {vocab_path}: ids do not follow merge order")
            last_id = token_id
            mergeable.add(to_bytes(merged))
        ranks: list[bytes | None] = [None] * len(vocab)
        special: dict[str, int] = {}
        for token, token_id in vocab.items():
            raw = to_bytes(token) if all(ch in decoder for ch in token) else None
            if raw is not None and raw in mergeable:
                ranks[token_id] = raw
            else:
                special[token] = token_id
        n_ranks = len(vocab) - len(special)
        if any(r is None for r in ranks[:n_ranks]) or any(i < n_ranks for i in special.values()):
            raise TinygenError(f"unsupported BPE vocabulary in {vocab_path}: special tokens must come last")
        return cls(ranks[:n_ranks], GPT2_PATTERN, special, name="gpt2")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> Tokenizer:
        """Train a byte-level BPE with rustbpe; vocab_size counts the special tokens too."""
        import rustbpe

        n_merged = vocab_size - len(special_tokens)
        if n_merged < 256 + 1:
            raise TinygenError(f"vocab size {vocab_size} is too small: need at least {256 + 1 + len(special_tokens)}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), vocab_size=n_merged, pattern=GPT4_PATTERN)
        pairs = sorted(bpe.get_mergeable_ranks(), key=lambda p: p[1])
        ranks = [bytes(b) for b, _ in pairs]
        special = {tok: len(ranks) + i for i, tok in enumerate(special_tokens)}
        return cls(ranks, GPT4_PATTERN, special)


def _check(ranks: list[bytes | None], pattern: str, special: dict[str, int], name: str,
           drop_unknown_bytes: bool = False) -> None:
    """Refuse data that tiktoken would turn into a hang, a Rust panic or lost text (it checks little
    itself): every byte has a token (unless the vocabulary drops bytes it lacks), tokens are
    distinct, special ids fill the holes in the ranks and follow them without a gap, and the split
    pattern cuts text into non-empty pieces that cover all of it."""
    if not isinstance(name, str) or not isinstance(pattern, str):
        raise TinygenError("invalid tokenizer data: name and pattern must be strings")
    holes = [i for i, r in enumerate(ranks) if r is None]
    distinct = set(ranks)
    distinct.discard(None)
    if set(map(type, distinct)) - {bytes} or b"" in distinct or len(distinct) != len(ranks) - len(holes):
        raise TinygenError("invalid tokenizer data: tokens must be distinct, non-empty byte strings")
    if not drop_unknown_bytes and not {bytes([b]) for b in range(256)} <= distinct:
        raise TinygenError("invalid tokenizer data: a byte-level BPE needs a token for each of the 256 bytes")
    if (not all(isinstance(k, str) and k for k in special)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in special.values())
            or sorted(special.values()) != holes + list(range(len(ranks), len(ranks) + len(special) - len(holes)))):
        raise TinygenError(f"invalid tokenizer data: special tokens need names and ids that fill the {len(holes)} "
                           f"holes in the {len(ranks)} ranks and then follow them, one each")
    try:
        pieces = [m.group() for m in regex.finditer(pattern, PATTERN_PROBE, timeout=1.0)]
    except (regex.error, RecursionError) as e:
        raise TinygenError(f"invalid tokenizer data: the split pattern is not a valid regular expression ({e})") from e
    except TimeoutError:
        raise TinygenError("invalid tokenizer data: the split pattern backtracks without end") from None
    if "".join(pieces) != PATTERN_PROBE or not all(pieces):
        raise TinygenError("invalid tokenizer data: the split pattern does not cut text into pieces that cover it")


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-ins it uses for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class StreamDecoder:
    """Turns token ids into text as they arrive, never splitting a multi-byte UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class StopMatcher:
    """Holds back streamed text that could still become a stop string.

    feed() returns the text that is safe to show; `stopped` turns true once a stop string has
    appeared, and the text before it is the last thing returned.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return buf[:cut]
        hold = max((_overlap(buf, s) for s in self.stops), default=0)
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
