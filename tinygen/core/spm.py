"""SentencePiece vocabularies (Llama 2, Mistral, TinyLlama, Phi-3, Gemma): pieces with scores and
types, tokenized as llama.cpp tokenizes a GGUF whose tokenizer.ggml.model is "llama".

The `sentencepiece` library does the merging: it loads a model proto built here from the pieces,
in which every piece but the unknown and byte ones is a plain piece, so that merges reach any
piece as llama.cpp's llm_tokenizer_spm lets them (highest score first, leftmost on a tie; bytes
for what no piece covers). What llama.cpp does around the merges is done here: special pieces
are cut out of the text first, the longest first (user-defined ones always, control and unknown
ones only when special text is read), each remaining stretch gets a space in front when the
vocabulary asks for it (add_space_prefix) and has its spaces written as `▁`.
The same object offers what tinygen's byte-level BPE Tokenizer offers, so the rest of the code
need not know which kind it holds. Free of torch; sentencepiece is imported on the first encode.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

from tinygen.core.memory import return_freed_memory
from tinygen.errors import TinygenError

# GGUF token types, as llama.cpp and SentencePiece number them.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "▁"  # how SentencePiece writes a space inside a piece
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
INSTALL = "pip install 'tinygen[sentencepiece]'"


class SentencePieceTokenizer:
    """Pieces, scores and types, plus the model's conventions (BOS, EOS, stops, chat template)."""

    kind = "SentencePiece"
    normalization = None  # the text reaches the merges as it is, but for its spaces

    def __init__(self, pieces: list[str], scores: list[float], types: list[int], name: str = "llama", *,
                 model: str = "bpe", add_space_prefix: bool = True, chat_template: dict | None = None,
                 bos_id: int | None = None, eos_id: int | None = None, stop_ids: Iterable[int] | None = None,
                 add_bos: bool = False, jinja_template: str | None = None):
        self.pieces, self.scores, self.types = pieces, scores, types
        self.name = name
        self.model = model  # "bpe" (llama.cpp's SPM merges) or "unigram" (a Hugging Face Unigram model)
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template  # set by chat fine-tuning; see template.py
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids = tuple(stop_ids) if stop_ids is not None else tuple(i for i in (eos_id,) if i is not None)
        self.add_bos = add_bos
        self.jinja_template = jinja_template
        _check(self)
        self.special = special_pieces(pieces, types)
        self.special_ids = frozenset(self.special.values())
        self._lock = threading.Lock()
        self._processor = None
        self._finders: dict[bool, tuple] = {}

    # -- the interface tinygen's Tokenizer has -------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return len(self.pieces)

    @property
    def eot_id(self) -> int | None:
        return self.special.get("<|endoftext|>")

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Encode text. With special=True, the text of control pieces (`<start_of_turn>`) becomes their
        ids; user-defined pieces become theirs either way, as in llama.cpp and Hugging Face."""
        processor = self.processor()
        ids: list[int] = []
        after_special = True  # llama.cpp puts the space prefix before every stretch after a special piece
        for part in self._partition(text, special):
            if isinstance(part, int):
                ids.append(part)
                after_special = True
                continue
            if self.add_space_prefix and after_special:
                part = " " + part
            ids += processor.encode(part.replace(" ", SPACE))
            after_special = False
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, without the space that add_space_prefix put before the first piece."""
        ids = list(ids)
        text = b"".join(map(self.token_bytes, ids)).decode("utf-8", errors="replace")
        if self.add_space_prefix and ids and ids[0] not in self.special_ids and text.startswith(" "):
            text = text[1:]
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """What one token stands for in text: a byte piece its byte, a plain piece its text with `▁` as
        spaces, a special piece its text."""
        if not 0 <= token_id < len(self.pieces):
            raise KeyError(f"token id {token_id} is not in the vocabulary of {self.n_vocab:,}")
        piece, kind = self.pieces[token_id], self.types[token_id]
        if kind == BYTE:
            return bytes([int(piece[3:5], 16)])
        if kind in (NORMAL, UNUSED):
            piece = piece.replace(SPACE, " ")
        return piece.encode("utf-8", errors="surrogatepass")

    def label(self, token_id: int) -> str:
        """How one token reads on its own: a byte piece as `<0xNN>`, a special piece as its text, any
        other with its `▁` as spaces."""
        if self.types[token_id] == BYTE or token_id in self.special_ids:
            return self.pieces[token_id]
        return self.pieces[token_id].replace(SPACE, " ")

    # -- serialisation ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        settings = {"bos_id": self.bos_id, "eos_id": self.eos_id, "stop_ids": list(self.stop_ids),
                    "add_bos": self.add_bos, "jinja_template": self.jinja_template,
                    "chat_template": self.chat_template}
        return {"type": "sentencepiece", "name": self.name, "model": self.model,
                "add_space_prefix": self.add_space_prefix, "pieces": list(self.pieces),
                "scores": list(self.scores), "types": list(self.types),
                **{k: v for k, v in settings.items() if v is not None and v is not False}}

    @classmethod
    def from_dict(cls, d: dict) -> SentencePieceTokenizer:
        """The tokenizer to_dict describes. A "special" object may name tokens past the pieces (chat
        fine-tuning adds its markers so); they become control pieces."""
        try:
            pieces, scores, types = list(d["pieces"]), list(d["scores"]), list(d["types"])
            for name, token_id in sorted((d.get("special") or {}).items(), key=lambda item: item[1]):
                if isinstance(token_id, int) and token_id >= len(pieces):
                    if token_id != len(pieces):
                        raise TypeError(f"special token {name!r} has id {token_id}, past the next one")
                    pieces.append(name)
                    scores.append(0.0)
                    types.append(CONTROL)
                elif not (isinstance(token_id, int) and pieces[token_id] == name):
                    raise TypeError(f"special token {name!r} is not piece {token_id}")
            return cls(pieces, scores, types, d.get("name", "llama"), model=d.get("model", "bpe"),
                       add_space_prefix=d.get("add_space_prefix", True), chat_template=d.get("chat_template"),
                       bos_id=d.get("bos_id"), eos_id=d.get("eos_id"), stop_ids=d.get("stop_ids"),
                       add_bos=d.get("add_bos", False), jinja_template=d.get("jinja_template"))
        except KeyError as e:
            raise TinygenError(f"checkpoint tokenizer metadata is malformed (no {e.args[0]!r})") from e
        except (TypeError, IndexError, ValueError) as e:
            raise TinygenError(f"checkpoint tokenizer metadata is malformed ({e})") from e

    # -- encoding ----------------------------------------------------------------------------------------

    def processor(self):
        """The sentencepiece processor of these pieces, built once (threads may encode at once)."""
        with self._lock:
            if self._processor is None:
                try:
                    import sentencepiece
                except ImportError:
                    raise TinygenError(f"this model's SentencePiece vocabulary needs the sentencepiece package: "
                                       f"{INSTALL}") from None
                processor = sentencepiece.SentencePieceProcessor()
                try:
                    processor.LoadFromSerializedProto(model_proto(self))
                except (RuntimeError, OSError) as e:
                    raise TinygenError(f"invalid SentencePiece vocabulary: {e}") from None
                self._processor = processor
                return_freed_memory()  # the load's parse of a large vocabulary
            return self._processor

    def _partition(self, text: str, special: bool) -> list[str | int]:
        """llama.cpp's tokenizer_st_partition: for each special piece, longest first, cut every stretch
        of plain text at each of its occurrences, leftmost first. A regex over all of them finds
        which occur at all, so that only those are searched for."""
        finder, prefixes = self._special_finder(special)
        if finder is None:
            return [text] if text else []
        found = {p for m in finder.finditer(text) for p in prefixes[m.group(1)]}
        parts: list[str | int] = [text] if text else []
        for piece in sorted(found, key=lambda p: (-len(p), self.special[p])):
            token_id = self.special[piece]
            cut: list[str | int] = []
            for part in parts:
                if isinstance(part, int) or piece not in part:
                    cut.append(part)
                    continue
                for k, stretch in enumerate(part.split(piece)):
                    if k:
                        cut.append(token_id)
                    if stretch:
                        cut.append(stretch)
            parts = cut
        return parts

    def _special_finder(self, special: bool):
        """A regex whose lookahead names, at each place in a text, the longest special piece that
        starts there, and for each such piece the special pieces it starts with (a shorter one at
        the same place may be the one cut, once a longer piece has taken part of the text)."""
        if special not in self._finders:
            self._finders[special] = self._build_finder(special)
        return self._finders[special]

    def _build_finder(self, special: bool):
        kinds = (UNKNOWN, CONTROL, USER_DEFINED) if special else (USER_DEFINED,)
        names = sorted((p for p, i in self.special.items() if self.types[i] in kinds and p), key=len, reverse=True)
        if not names:
            return None, {}
        known = set(names)
        prefixes = {p: [p[:k] for k in range(1, len(p) + 1) if p[:k] in known] for p in names}
        try:
            finder = re.compile("(?=(" + _trie_pattern(names) + "))", re.DOTALL)
        except (RecursionError, re.error):  # pieces nested too deep for a trie: the slow alternation
            finder = re.compile("(?=(" + "|".join(map(re.escape, names)) + "))", re.DOTALL)
        return finder, prefixes


def special_pieces(pieces: list[str], types: list[int]) -> dict[str, int]:
    """What tinygen's BPE calls special tokens: the pieces the text is cut at before merging."""
    import numpy as np

    ids = np.flatnonzero(np.isin(np.array(types, np.int64), (UNKNOWN, CONTROL, USER_DEFINED))).tolist()
    return {pieces[i]: i for i in ids}


def _trie_pattern(names: list[str]) -> str:
    """One regex for many literal strings that matches the longest at a place, with each character
    tried once: the strings as a trie (thousands of alternatives tried in turn would be slow)."""
    trie: dict = {}
    for name in names:
        node = trie
        for ch in name:
            node = node.setdefault(ch, {})
        node[""] = True

    def pattern(node: dict) -> str:
        chain = ""  # characters that only lead on, written without recursing
        while len(node) == 1 and "" not in node:
            (ch, node), = node.items()
            chain += re.escape(ch)
        branches = [re.escape(ch) + pattern(child) for ch, child in node.items() if ch]
        if not branches:
            return chain
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:  # a string ends here: the longer ones are tried first
            body = f"(?:{body})?"
        return chain + body

    return pattern(trie)


def _check(tok: SentencePieceTokenizer) -> None:
    """Refuse what would fail later, or tokenize differently from llama.cpp, instead of now."""
    pieces, scores, types = tok.pieces, tok.scores, tok.types
    if not (isinstance(pieces, list) and isinstance(scores, list) and isinstance(types, list)):
        raise TinygenError("invalid SentencePiece vocabulary: pieces, scores and types must be lists")
    if not (len(pieces) == len(scores) == len(types)) or not pieces:
        raise TinygenError("invalid SentencePiece vocabulary: want one score and one type per piece")
    if set(map(type, pieces)) - {str} or set(map(type, types)) - {int} or set(map(type, scores)) - {float, int}:
        raise TinygenError("invalid SentencePiece vocabulary: pieces are strings, types integers, scores numbers")
    if not set(types) <= {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE}:
        raise TinygenError(f"invalid SentencePiece vocabulary: token types are 1..6, not {sorted(set(types))}")
    if len(set(pieces)) != len(pieces) or "" in pieces:
        raise TinygenError("invalid SentencePiece vocabulary: pieces must be distinct and non-empty")
    byte_pieces = [pieces[i] for i, t in enumerate(types) if t == BYTE] if BYTE in types else []
    if not all(BYTE_PIECE.fullmatch(p) for p in byte_pieces) or len(byte_pieces) not in (0, 256):
        raise TinygenError("invalid SentencePiece vocabulary: byte pieces must be <0x00> .. <0xFF>, all 256")
    if not byte_pieces and UNKNOWN not in types:
        raise TinygenError("invalid SentencePiece vocabulary: with no byte pieces it needs an unknown piece for "
                           "the characters it lacks")
    if tok.model not in ("bpe", "unigram") or not isinstance(tok.name, str):
        raise TinygenError(f"invalid SentencePiece vocabulary: model {tok.model!r} is not bpe or unigram")
    ids = [i for i in (tok.bos_id, tok.eos_id) if i is not None] + list(tok.stop_ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(pieces) for i in ids):
        raise TinygenError(f"invalid tokenizer data: BOS, EOS and stop ids must be token ids (0..{len(pieces) - 1})")
    if not all(isinstance(v, bool) for v in (tok.add_bos, tok.add_space_prefix)):
        raise TinygenError("invalid tokenizer data: add_bos and add_space_prefix must be true or false")
    if not isinstance(tok.jinja_template, (str, type(None))) or not isinstance(tok.chat_template, (dict, type(None))):
        raise TinygenError("invalid tokenizer data: jinja_template must be a string, chat_template an object")


# -- the model proto sentencepiece loads (sentencepiece_model.proto, written by hand: the pb2
#    module it ships needs protobuf, and a quarter of a million pieces write faster this way) -----


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _flag(number: int, value: int) -> bytes:
    """A varint field (bool, enum or int32; negative int32 as protobuf writes it, in ten bytes)."""
    return _varint(number << 3) + _varint(value & 0xFFFFFFFFFFFFFFFF)


def model_proto(tok: SentencePieceTokenizer) -> bytes:
    """A serialized ModelProto: the pieces (all plain but unknown and byte ones), a trainer spec
    with the model type and byte fallback, and an identity normalizer that changes nothing (spaces
    are written as `▁`, and the space prefix put, before the text reaches it)."""
    import numpy as np

    types = np.array(tok.types, np.uint8)
    pieces, scores = tok.pieces, tok.scores
    unk = np.flatnonzero(types == UNKNOWN)
    if len(unk):
        unk = int(unk[0])
    else:  # sentencepiece needs an unknown piece: one past the vocabulary, never produced with bytes
        pieces, scores, unk = [*pieces, "\u2047unk\u2047"], [*scores, 0.0], len(pieces)
        types = np.append(types, UNKNOWN)
    kinds = np.where((types == UNKNOWN) | (types == BYTE), types, NORMAL).astype(np.uint8)
    has_bytes = bool((types == BYTE).any())
    trainer = (_flag(3, 2 if tok.model == "bpe" else 1) + _flag(4, len(pieces)) + _flag(35, has_bytes)
               + _flag(40, unk) + _flag(41, -1) + _flag(42, -1) + _flag(43, -1))
    normalizer = _field(1, b"identity") + _flag(3, 0) + _flag(4, 0) + _flag(5, 0)
    return _piece_records(pieces, np.array(scores, "<f4"), kinds) + _field(2, trainer) + _field(3, normalizer)


def _piece_records(pieces: list[str], scores, kinds) -> bytes:
    """`pieces` as repeated ModelProto.pieces fields, {piece, score, type} each, laid out with numpy:
    a Python loop over a quarter of a million pieces would take longer than sentencepiece's load."""
    import numpy as np

    joined = "".join(pieces)
    codes = np.frombuffer(joined.encode("utf-32-le", errors="surrogatepass"), np.uint32)
    widths = 1 + (codes >= 0x80) + (codes >= 0x800) + (codes >= 0x10000)  # UTF-8 bytes of each character
    chars = np.fromiter(map(len, pieces), np.int64, len(pieces))
    lengths = np.add.reduceat(widths, np.concatenate(([0], np.cumsum(chars)[:-1]))).astype(np.int64)
    if lengths.max(initial=0) >= 1 << 21:
        raise TinygenError("invalid SentencePiece vocabulary: a piece is longer than 2 MB")
    body = lengths + _varint_size(lengths) + 8  # tag, length, text, score tag and 4 bytes, type tag and byte
    size = 1 + _varint_size(body) + body
    start = np.concatenate(([0], np.cumsum(size)[:-1]))
    out = np.zeros(int(size.sum()), np.uint8)
    out[start] = 0x0A
    at = _put_varint(out, start + 1, body)
    out[at] = 0x0A
    at = _put_varint(out, at + 1, lengths)
    text_at = np.repeat(at - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths) + np.arange(lengths.sum())
    out[text_at] = np.frombuffer(joined.encode("utf-8", errors="surrogatepass"), np.uint8)
    at = at + lengths
    out[at] = 0x15
    out[(at + 1)[:, None] + np.arange(4)] = scores.view(np.uint8).reshape(-1, 4)
    out[at + 5] = 0x18
    out[at + 6] = kinds
    return out.tobytes()


def _varint_size(n):
    return 1 + (n >= 1 << 7) + (n >= 1 << 14)


def _put_varint(out, at, n):
    """Write each n (below 2**21) as a varint at `at`; returns where each ends."""
    size = _varint_size(n)
    for k in range(3):
        rows = size > k
        more = (size > k + 1)[rows]
        out[at[rows] + k] = ((n[rows] >> (7 * k)) & 0x7F) | (more * 0x80)
    return at + size
