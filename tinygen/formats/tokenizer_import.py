"""Tokenizers of models made elsewhere, a Hugging Face `tokenizer.json` or a GGUF file's metadata,
rebuilt as tinygen Tokenizers that give the same ids.

Byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2 ...) is read here. Its pre-tokenizer becomes one
tiktoken split pattern: derived from the tokenizer.json structure, or looked up by llama.cpp's
pre-tokenizer name for GGUF. SentencePiece vocabularies (`▁` pieces with scores) go to
spm_import.py. What neither can reproduce exactly (normalizers other than NFC, other
pre-tokenizers) is refused by name, never approximated.
"""
from __future__ import annotations

import functools
import itertools

from tinygen.core.spm import SentencePieceTokenizer
from tinygen.core.tokenizer import GPT2_PATTERN, Tokenizer, unicode_to_byte
from tinygen.errors import TinygenError
from tinygen.formats.spm_import import (
    is_sentencepiece_json,
    spm_from_gguf,
    spm_from_hf_json,
)
from tinygen.formats.tokenizer_config import (
    hf_chat_template,
    hf_token_id,
    leading_special,
    stop_ids,
)


def _digits_then_gpt2(individual: bool) -> str:
    """GPT-2's pattern run on the pieces Hugging Face's Digits pre-tokenizer leaves. Digits stand
    alone, so ` ?\\p{N}+` goes, and a whitespace run ends before a digit as at the end of a piece:
    "a  1" is "a", "  ", "1" (GPT-2's pattern alone gives "a", " ", " 1")."""
    digits = r"\p{N}" if individual else r"\p{N}+"
    return digits + r"""|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


# Written as these models' tokenizer.json spell them, so a Hugging Face folder and a GGUF of the
# same model split text alike.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's `tokenizer.ggml.pre` name -> (split pattern, normalization, BOS added by default).
# Qwen2's Hugging Face tokenizer applies NFC first (llama.cpp does not); the model learned from that.
GGUF_PRE = {
    "gpt-2": (GPT2_PATTERN, None, False),
    "smollm": (_digits_then_gpt2(individual=True), None, False),
    "llama-bpe": (LLAMA3_PATTERN, None, True),
    "llama3": (LLAMA3_PATTERN, None, True),
    "llama-v3": (LLAMA3_PATTERN, None, True),
    "qwen2": (QWEN2_PATTERN, "NFC", False),
}
# A tokenizer.json whose split is one of these is named after it, so `tinygen info` reads the same
# for a model's Hugging Face folder and its GGUF.
_PATTERN_NAMES = {pattern: name for name, (pattern, _, _) in reversed(GGUF_PRE.items())}

# GGUF token types (llama.cpp's llama_token_type); every other type is a special token here.
GGUF_NORMAL = 1


def tokenizer_from_hf(tokenizer_json: dict, tokenizer_config: dict | None = None) -> Tokenizer | SentencePieceTokenizer:
    """The tokenizer of a Hugging Face `tokenizer.json` (a byte-level BPE, or SentencePiece-style `▁`
    pieces), with BOS, EOS and the chat template from `tokenizer_config.json` when given."""
    where = "tokenizer.json"
    if not isinstance(tokenizer_json, dict) or not isinstance(tokenizer_json.get("model"), dict):
        raise TinygenError(f"{where} is malformed: want an object with a model")
    if is_sentencepiece_json(tokenizer_json):
        return spm_from_hf_json(tokenizer_json, tokenizer_config)
    model = tokenizer_json["model"]
    kind = model.get("type")
    if kind != "BPE":
        what = "SentencePiece Unigram" if kind == "Unigram" else repr(kind)
        raise TinygenError(f"{where}: the {what} tokenizer model is not supported; tinygen reads byte-level BPE only")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TinygenError(f"{where}: a BPE with byte fallback or subword affixes (SentencePiece or WordPiece "
                           "style) is not supported; tinygen reads byte-level BPE only")
    if model.get("dropout"):
        raise TinygenError(f"{where}: BPE dropout makes encoding random; tinygen does not support it")
    decoder = tokenizer_json.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise TinygenError(f"{where}: the {decoder.get('type')!r} decoder is not supported; a byte-level BPE "
                           "decodes with ByteLevel")
    pattern = _hf_pattern(tokenizer_json.get("pre_tokenizer"), where)
    normalization = _hf_normalization(tokenizer_json.get("normalizer"), where)
    vocab, merges, added = model.get("vocab"), model.get("merges"), tokenizer_json.get("added_tokens") or []
    if not isinstance(vocab, dict) or not isinstance(merges, list) or not isinstance(added, list):
        raise TinygenError(f"{where} is malformed: want a vocab object and lists of merges and added tokens")
    special = {}
    for token in added:
        if not isinstance(token, dict) or not isinstance(token.get("content"), str):
            raise TinygenError(f"{where} is malformed: an added token is not an object with a content string")
        flags = [f for f in ("lstrip", "rstrip", "single_word") if token.get(f)]
        if flags:
            raise TinygenError(f"{where}: added token {token['content']!r} sets {', '.join(flags)}, "
                               "which tinygen does not reproduce")
        special[token["content"]] = token.get("id")
    special_ids = set(special.values())
    ordinary = {text: i for text, i in vocab.items() if i not in special_ids}
    ranks = _ranks(ordinary, merges, special, where)
    if model.get("unk_token") and _lacks_bytes(ranks):
        raise TinygenError(f"{where}: the vocabulary lacks some bytes and maps them to unk_token, "
                           "which tinygen does not reproduce")

    config = tokenizer_config or {}
    bos = hf_token_id(config.get("bos_token"), special, vocab, "bos_token")
    eos = hf_token_id(config.get("eos_token"), special, vocab, "eos_token")
    leading = leading_special(tokenizer_json.get("post_processor"), special)
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = leading is not None
    return Tokenizer(ranks, pattern, special, _PATTERN_NAMES.get(pattern, "hf-bpe"),
                     bos_id=bos if bos is not None else leading, eos_id=eos,
                     stop_ids=stop_ids((eos,), special), add_bos=add_bos, normalization=normalization,
                     drop_unknown_bytes=_lacks_bytes(ranks), jinja_template=hf_chat_template(config))


def tokenizer_from_gguf(fields: dict) -> Tokenizer | SentencePieceTokenizer:
    """The tokenizer a GGUF file describes; `fields` maps its metadata keys to plain Python values."""
    where = "GGUF"
    model = fields.get("tokenizer.ggml.model")
    if model == "llama":
        return spm_from_gguf(fields)
    if model != "gpt2":
        raise TinygenError(f"{where}: the {model!r} tokenizer is not supported; tinygen reads byte-level BPE "
                           "('gpt2') and SentencePiece ('llama') vocabularies")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE:
        raise TinygenError(f"{where}: pre-tokenizer {pre!r} is not supported; tinygen knows {', '.join(GGUF_PRE)}")
    pattern, normalization, add_bos_default = GGUF_PRE[pre]
    tokens = fields.get("tokenizer.ggml.tokens")
    merges = fields.get("tokenizer.ggml.merges")
    types = fields.get("tokenizer.ggml.token_type")
    if types is None and isinstance(tokens, list):  # older files mark no types: every token is ordinary
        types = [GGUF_NORMAL] * len(tokens)
    if (not isinstance(tokens, list) or not isinstance(merges, list) or not isinstance(types, list)
            or len(types) != len(tokens) or set(map(type, tokens + merges)) - {str}):
        raise TinygenError(f"{where}: tokenizer metadata is malformed: want lists of tokens, merges and token "
                           "types, one type per token")
    special = {tokens[i]: i for i, kind in enumerate(types) if kind != GGUF_NORMAL}
    ordinary = dict(zip(tokens, range(len(tokens))))
    if len(ordinary) != len(tokens) or len(special) != sum(kind != GGUF_NORMAL for kind in types):
        raise TinygenError(f"{where}: the vocabulary spells some tokens the same way twice")
    for text in special:
        del ordinary[text]
    ranks = _ranks(ordinary, merges, special, where)

    def token_id(key: str) -> int | None:
        return fields.get(f"tokenizer.ggml.{key}")

    eos = token_id("eos_token_id")
    add_bos = fields.get("tokenizer.ggml.add_bos_token", add_bos_default)
    return Tokenizer(ranks, pattern, special, pre, bos_id=token_id("bos_token_id"), eos_id=eos,
                     stop_ids=stop_ids((eos, token_id("eot_token_id"), token_id("eom_token_id")), special),
                     add_bos=add_bos, normalization=normalization, drop_unknown_bytes=_lacks_bytes(ranks),
                     jinja_template=fields.get("tokenizer.chat_template"))


def _ranks(ordinary: dict[str, int], merges: list, special: dict[str, int], where: str) -> list[bytes | None]:
    """Token bytes by id, None where a special token sits. Merges are "a b" strings or [a, b] pairs.
    tiktoken merges the pair whose result has the lowest id, which is the merge order only if ids
    follow it: checked, not assumed. Each step is one pass in C where it can be (a vocabulary has
    tens of thousands of entries and this runs on every start)."""
    ids = list(ordinary.values()) + list(special.values())
    if set(map(type, ids)) - {int} or sorted(ids) != list(range(len(ids))):
        raise TinygenError(f"{where}: token ids must run 0..{len(ids) - 1} without gaps or repeats")
    made = _merged_ids(ordinary, merges, where)
    texts = list(ordinary)
    try:
        joined = "".join(texts).translate(_gpt2_table()).encode("latin-1")
    except UnicodeEncodeError:
        bad = next(t for t in texts if not set(t) <= unicode_to_byte().keys())
        raise TinygenError(f"{where}: token {bad!r} is not written in GPT-2's byte alphabet, "
                           "so this is not a byte-level BPE") from None
    ends = list(itertools.accumulate(map(len, texts)))  # one byte per character of the alphabet
    ranks: list[bytes | None] = [None] * (max(ordinary.values(), default=-1) + 1)
    stray = []
    for text, token_id, start, end in zip(texts, ordinary.values(), [0, *ends], ends):
        if end - start == 1 or token_id in made:
            ranks[token_id] = joined[start:end]
        else:
            stray.append(text)
    if stray:
        raise TinygenError(f"{where}: {len(stray)} tokens (e.g. {stray[0]!r}) are neither a byte nor made by a "
                           "merge; tinygen's BPE cannot reproduce them")
    return ranks


def _merged_ids(ordinary: dict[str, int], merges: list, where: str) -> set[int]:
    """The ids the merges make, refusing a merge that is not two tokens or makes an unknown token,
    and merges whose results do not follow id order."""
    if not set(map(type, merges)) - {str} and set(map(str.count, merges, itertools.repeat(" "))) <= {1}:
        made = list(map(ordinary.get, map(str.replace, merges, itertools.repeat(" "), itertools.repeat(""))))
    else:
        made = []
        for merge in merges:
            pair = merge.split(" ") if isinstance(merge, str) else merge
            if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise TinygenError(f"{where}: merge {merge!r} is not two tokens")
            made.append(ordinary.get(pair[0] + pair[1]))
    if None in made:
        merge = merges[made.index(None)]
        raise TinygenError(f"{where}: merge {merge if isinstance(merge, str) else ' '.join(merge)!r} makes a "
                           "token that is not in the vocabulary")
    # Equal ids are fine: tiktoken-born vocabularies (Llama 3, Qwen2) list several merges per token.
    back = next((i for i in range(1, len(made)) if made[i] < made[i - 1]), None) if made != sorted(made) else None
    if back is not None:
        merge = merges[back]
        raise TinygenError(f"{where}: token ids do not follow merge order, which tinygen's BPE needs "
                           f"(merge {merge if isinstance(merge, str) else ' '.join(merge)!r} makes id {made[back]} "
                           f"after id {made[back - 1]})")
    return set(made)


@functools.lru_cache(maxsize=1)
def _gpt2_table() -> dict[int, str]:
    """str.translate's table from GPT-2's byte alphabet to Latin-1 characters that encode to those
    bytes; the other characters below 256 become one that Latin-1 cannot encode, so they fail."""
    table = {c: "\uffff" for c in range(256)}
    table.update((ord(ch), chr(b)) for ch, b in unicode_to_byte().items())
    return table


def _lacks_bytes(ranks: list[bytes | None]) -> bool:
    return len({r for r in ranks if r is not None and len(r) == 1}) < 256


def _hf_pattern(pre: dict | None, where: str) -> str:
    """The tiktoken pattern that splits text as this pre-tokenizer does. Supported: ByteLevel with its
    own regex (GPT-2), Digits then ByteLevel (SmolLM2), one regex Split then ByteLevel (Llama 3, Qwen2)."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps) or not steps:
        raise TinygenError(f"{where}: a byte-level BPE needs a pre-tokenizer ending in ByteLevel; this has none")
    names = " then ".join(str(s.get("type")) for s in steps)
    *first, last = steps
    if last.get("type") != "ByteLevel":
        raise TinygenError(f"{where}: pre-tokenizer {names} is not supported: a byte-level BPE ends in ByteLevel")
    if last.get("add_prefix_space"):
        raise TinygenError(f"{where}: ByteLevel with add_prefix_space is not supported")
    own_regex = last.get("use_regex", True)
    if not first and own_regex:
        return GPT2_PATTERN
    if len(first) == 1 and first[0].get("type") == "Digits" and own_regex:
        return _digits_then_gpt2(bool(first[0].get("individual_digits")))
    if len(first) == 1 and first[0].get("type") == "Split" and not own_regex:
        split = first[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if isinstance(regex, str) and split.get("behavior") == "Isolated" and not split.get("invert"):
            return regex
        names = f"Split (behavior {split.get('behavior')}, invert {split.get('invert')}, {split.get('pattern')})"
    raise TinygenError(f"{where}: pre-tokenizer {names} is not supported; tinygen reproduces ByteLevel, "
                       "Digits then ByteLevel, and one regex Split then ByteLevel")


def _hf_normalization(normalizer: dict | None, where: str) -> str | None:
    """None, or "NFC" (Qwen2's): the one normalizer tinygen reproduces."""
    if not normalizer:
        return None
    steps = (normalizer.get("normalizers") or []) if normalizer.get("type") == "Sequence" else [normalizer]
    kinds = [s.get("type") if isinstance(s, dict) else s for s in steps]
    if not kinds:
        return None
    if kinds == ["NFC"]:
        return "NFC"
    raise TinygenError(f"{where}: normalizer {' then '.join(map(str, kinds))} changes text in a way tinygen "
                       "does not reproduce (only NFC)")
