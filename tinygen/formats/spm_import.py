"""SentencePiece vocabularies of models made elsewhere (Llama 2, Mistral, TinyLlama, Phi-3, Gemma),
rebuilt as tinygen SentencePieceTokenizers (core/spm.py) that give llama.cpp's ids.

Three sources: a GGUF whose tokenizer.ggml.model is "llama" (pieces, scores and types as llama.cpp
reads them); a Hugging Face `tokenizer.model` (SentencePiece's own model proto, as llama.cpp's
converter reads it); and a Hugging Face `tokenizer.json` whose model is a BPE with byte fallback
over `▁` pieces, or a Unigram. A tokenizer.json BPE has merge ranks instead of scores: a piece
scores minus the rank of the first merge that makes it, which orders merges as the ranks do.
Where Hugging Face and llama.cpp differ, llama.cpp is followed, so that a folder and its GGUF
give the same ids: after a special token in the text the next stretch gets its space prefix
too (Hugging Face's Prepend and Metaspace put it only at the start). What would change text in
a way not reproduced (other normalizers, whitespace collapsing) is refused by name.
"""

from __future__ import annotations

import struct

from tinygen.core.spm import (
    BYTE,
    BYTE_PIECE,
    CONTROL,
    NORMAL,
    SPACE,
    UNKNOWN,
    USER_DEFINED,
    SentencePieceTokenizer,
    special_pieces,
)
from tinygen.errors import TinygenError
from tinygen.formats.tokenizer_config import (
    END_TOKENS,
    hf_chat_template,
    hf_token_id,
    leading_special,
    stop_ids,
)

# llama.cpp also ends a generation at these, which SentencePiece vocabularies use (Llama 2's EOS, Gemma's).
SPM_END_TOKENS = (*END_TOKENS, "</s>", "<eos>")


def spm_from_gguf(fields: dict) -> SentencePieceTokenizer:
    """The SentencePiece vocabulary of a GGUF (tokenizer.ggml.model "llama"), with llama.cpp's defaults
    for what the file leaves out: BOS 1, EOS 2, a space before the text, BOS added."""
    where = "GGUF"
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise TinygenError(f"{where}: tokenizer metadata is malformed: want a list of tokens")
    scores = fields.get("tokenizer.ggml.scores", [0.0] * len(tokens))
    types = fields.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    if not isinstance(scores, list) or not isinstance(types, list) or not len(tokens) == len(scores) == len(types):
        raise TinygenError(f"{where}: tokenizer metadata is malformed: want one score and one type per token")
    types = _ends_as_control(tokens, types)

    def token_id(key: str, default: int | None) -> int | None:
        value = fields.get(f"tokenizer.ggml.{key}", default)
        return value if isinstance(value, int) and 0 <= value < len(tokens) else default

    eos = token_id("eos_token_id", 2)
    stops = (eos, token_id("eot_token_id", None), token_id("eom_token_id", None))
    add_bos = fields.get("tokenizer.ggml.add_bos_token", True)
    pre = fields.get("tokenizer.ggml.pre", "default")
    return SentencePieceTokenizer(
        tokens, scores, types, "llama" if pre == "default" else str(pre),
        add_space_prefix=fields.get("tokenizer.ggml.add_space_prefix", True), bos_id=token_id("bos_token_id", 1),
        eos_id=eos, stop_ids=stop_ids(stops, special_pieces(tokens, types), SPM_END_TOKENS), add_bos=add_bos,
        jinja_template=fields.get("tokenizer.chat_template"))


def spm_from_model_proto(data: bytes, config: dict | None = None, where: str = "tokenizer.model") -> SentencePieceTokenizer:
    """A Hugging Face folder's `tokenizer.model` (a serialized SentencePiece ModelProto), with BOS,
    EOS and the chat template from its tokenizer_config.json."""
    try:
        proto = _fields(data)
        pieces, scores, types = [], [], []
        for record in proto.get(1, []):
            piece = _fields(record)
            pieces.append(piece.get(1, [b""])[0].decode("utf-8"))
            scores.append(_float(piece.get(2, [0])[0]))
            types.append(piece.get(3, [NORMAL])[0])
        trainer = _fields(proto.get(2, [b""])[0])
        normalizer = _fields(proto.get(3, [b""])[0])
    except (ValueError, IndexError, UnicodeDecodeError, TypeError) as e:
        raise TinygenError(f"{where} is not a SentencePiece model ({e})") from None
    model = {1: "unigram", 2: "bpe"}.get(trainer.get(3, [1])[0])
    if model is None:
        raise TinygenError(f"{where}: SentencePiece model type {trainer.get(3)[0]} is not supported (BPE or Unigram)")
    if normalizer.get(2, [b""])[0] or normalizer.get(4, [1])[0]:
        name = normalizer.get(1, [b"?"])[0].decode("utf-8", "replace")
        raise TinygenError(f"{where}: its normalizer ({name}, with a character map or whitespace collapsing) changes "
                           "text in a way tinygen does not reproduce")
    return _with_config(pieces, scores, types, model, bool(normalizer.get(3, [1])[0]), config or {}, where)


def spm_from_hf_json(tokenizer_json: dict, config: dict | None = None) -> SentencePieceTokenizer:
    """A tokenizer.json over `▁` pieces: a BPE with byte fallback, or a Unigram."""
    where = "tokenizer.json"
    model = tokenizer_json["model"]
    add_space_prefix = _hf_space_prefix(tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer"), where)
    if model.get("type") == "Unigram":
        vocab = model.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                                                  and isinstance(v[1], (int, float)) for v in vocab):
            raise TinygenError(f"{where} is malformed: a Unigram vocab is a list of [piece, score] pairs")
        pieces, scores = [p for p, _ in vocab], [float(s) for _, s in vocab]
        kind, unk = "unigram", model.get("unk_id")
    else:
        pieces, scores = _bpe_scores(model, where)
        kind, unk = "bpe", pieces.index(model["unk_token"]) if model.get("unk_token") in pieces else None
    types = [BYTE if model.get("byte_fallback") and BYTE_PIECE.fullmatch(p) else NORMAL for p in pieces]
    if isinstance(unk, int) and 0 <= unk < len(pieces):
        types[unk] = UNKNOWN
    for token in tokenizer_json.get("added_tokens") or []:
        if not isinstance(token, dict) or not isinstance(token.get("content"), str) or not isinstance(token.get("id"), int):
            raise TinygenError(f"{where} is malformed: an added token is not an object with content and id")
        flags = [f for f in ("lstrip", "rstrip", "single_word") if token.get(f)]
        if flags:
            raise TinygenError(f"{where}: added token {token['content']!r} sets {', '.join(flags)}, "
                               "which tinygen does not reproduce")
        i = token["id"]
        if i == len(pieces):
            pieces.append(token["content"])
            scores.append(0.0)
            types.append(NORMAL)
        if not 0 <= i < len(pieces) or pieces[i] != token["content"]:
            raise TinygenError(f"{where}: added token {token['content']!r} has id {i}, which the vocabulary gives "
                               "another piece")
        if types[i] != UNKNOWN:
            types[i] = CONTROL if token.get("special") else USER_DEFINED
    return _with_config(pieces, scores, types, kind, add_space_prefix, config or {}, where,
                        post=tokenizer_json.get("post_processor"))


def is_sentencepiece_json(tokenizer_json: dict) -> bool:
    """Whether a tokenizer.json is SentencePiece-style (`▁` pieces) rather than a byte-level BPE."""
    model = tokenizer_json.get("model") if isinstance(tokenizer_json, dict) else None
    return isinstance(model, dict) and (model.get("type") == "Unigram"
                                        or (model.get("type") == "BPE" and bool(model.get("byte_fallback"))))


def _bpe_scores(model: dict, where: str) -> tuple[list[str], list[float]]:
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise TinygenError(f"{where} is malformed: want a vocab object and a list of merges")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise TinygenError(f"{where}: token ids must run 0..{len(vocab) - 1} without gaps or repeats")
    if model.get("dropout"):
        raise TinygenError(f"{where}: BPE dropout makes encoding random; tinygen does not support it")
    if model.get("ignore_merges"):
        raise TinygenError(f"{where}: a BPE with byte fallback and ignore_merges looks whole texts up before merging, "
                           "which tinygen does not reproduce")
    pieces = sorted(vocab, key=vocab.get)
    first = {}
    for rank, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise TinygenError(f"{where}: merge {merge!r} is not two tokens")
        first.setdefault(pair[0] + pair[1], rank)
    # Pieces no merge makes score below every merge, so they win no tie against one.
    return pieces, [float(-first[p]) if p in first else float(-len(merges) - i) for i, p in enumerate(pieces)]


def _hf_space_prefix(normalizer, pre_tokenizer, where: str) -> bool:
    """Whether a space goes before the text: Llama 2's Prepend("▁") normalizer or a Metaspace
    pre-tokenizer that prepends. Spaces must become `▁`, by a Replace normalizer or by Metaspace."""
    steps = []
    for part in (normalizer, pre_tokenizer):
        if isinstance(part, dict) and part.get("type") == "Sequence":
            steps += part.get("normalizers") or part.get("pretokenizers") or []
        elif part is not None:
            steps.append(part)
    prefix, spaces = False, False
    for step in steps:
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "Prepend" and step.get("prepend") == SPACE:
            prefix = True
        elif kind == "Replace" and (step.get("pattern") or {}).get("String") == " " and step.get("content") == SPACE:
            spaces = True
        elif kind == "Metaspace" and step.get("replacement", SPACE) == SPACE:
            spaces = True
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            prefix = prefix or scheme in ("always", "first")
        else:
            raise TinygenError(f"{where}: {kind!r} in the normalizer or pre-tokenizer changes text in a way tinygen "
                               "does not reproduce for a SentencePiece vocabulary")
    if not spaces:
        raise TinygenError(f"{where}: a SentencePiece vocabulary needs spaces written as {SPACE!r}; this one has no "
                           "Replace or Metaspace step that does it")
    return prefix


def _with_config(pieces, scores, types, model: str, add_space_prefix: bool, config: dict, where: str,
                 post=None) -> SentencePieceTokenizer:
    """The tokenizer, with tokenizer_config.json's BOS, EOS, add_bos_token and chat template."""
    types = _ends_as_control(pieces, types)
    special = special_pieces(pieces, types)
    vocab = {p: i for i, p in enumerate(pieces)}
    bos = hf_token_id(config.get("bos_token"), special, vocab, "bos_token")
    eos = hf_token_id(config.get("eos_token"), special, vocab, "eos_token")
    leading = leading_special(post, special)
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):  # a post-processor says; a tokenizer.model alone adds BOS, as llama.cpp does
        add_bos = leading is not None if post is not None else bos is not None
    return SentencePieceTokenizer(pieces, scores, types, "hf-" + model, model=model, add_space_prefix=add_space_prefix,
                                  bos_id=bos if bos is not None else leading, eos_id=eos,
                                  stop_ids=stop_ids((eos,), special, SPM_END_TOKENS), add_bos=add_bos,
                                  jinja_template=hf_chat_template(config))


def _ends_as_control(pieces: list[str], types: list[int]) -> list[int]:
    """The types with the pieces named like an end of turn or text made control pieces, as llama.cpp
    does on loading: so Gemma's user-defined `</s>` is text unless special text is read."""
    named = set(SPM_END_TOKENS).intersection(pieces)
    if not named:
        return types
    types = list(types)
    for name in named:
        types[pieces.index(name)] = CONTROL
    return types


# -- protobuf's wire format, read just far enough for a ModelProto -----------------------------------


def _fields(data: bytes) -> dict[int, list]:
    """A message's fields by number: varints as ints, 32-bit values as their 4 bytes, length-delimited
    ones as bytes (each repeated field in order)."""
    out: dict[int, list] = {}
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _read_varint(data, at)
        elif wire == 2:
            n, at = _read_varint(data, at)
            value, at = data[at:at + n], at + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, at = data[at:at + n], at + n
        else:
            raise ValueError(f"wire type {wire}")
        if at > len(data):
            raise ValueError("it ends inside a field")
        out.setdefault(number, []).append(value)
    return out


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def _float(raw) -> float:
    return struct.unpack("<f", raw)[0] if isinstance(raw, bytes) else float(raw)
