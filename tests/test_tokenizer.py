"""Tokenizers: trained ones round-trip, GPT-2's matches Hugging Face id for id, streamed
decoding equals whole decoding however the bytes are split, and broken tokenizer data is a
clear error (never a hang or a Rust panic)."""

import functools
import itertools
import json
from pathlib import Path

import pytest
from conftest import GPT2_TOKENIZER, STORY_LINES
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygen.core.tokenizer import (
    CHAT_TOKENS,
    EOT,
    GPT4_PATTERN,
    StopMatcher,
    StreamDecoder,
    Tokenizer,
)
from tinygen.errors import TinygenError

# Any Unicode text that UTF-8 can hold: lone surrogates cannot be encoded, so no tokenizer can
# return them (test_lone_surrogates_encode_as_replacement_characters pins what they become).
# Special-token text is mixed in, since encode(special=True) turns it into ids.
UNICODE = st.text(st.characters(codec="utf-8"), max_size=120)
WITH_SPECIALS = st.lists(st.one_of(UNICODE, st.sampled_from((EOT, *CHAT_TOKENS))), max_size=6).map("".join)

VARIED = [
    "Hello world!",
    "héllo 😀 naïve café   spaces\n\n\ttabs  ",
    "def f(x):\n    return x**2  # ok\n",
    "日本語のテキストと한국어 and Ελληνικά",
    "I'm he'll we've 12345 3.14159 1,000,000",
    "   leading and trailing   ",
    "a\r\nb\r\n\r\n",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, e\u0301 combining",
    "<html><body class=\"x\">&amp;</body></html>",
    "",
]


@functools.cache
def _from_gpt2_files(folder: Path) -> Tokenizer:
    return Tokenizer.from_gpt2_files(folder / "vocab.json", folder / "merges.txt")


def _gpt2_folder(request) -> Path:
    """vocab.json + merges.txt: conftest's GPT-2-sized vocabulary for a "built" param, GPT-2's own
    from ../shared for "gpt2" (skipped when absent)."""
    if request.param.endswith("built"):
        return request.getfixturevalue("gpt2_files")
    if not GPT2_TOKENIZER.exists():
        pytest.skip("../shared/data/gpt2-tokenizer is absent")
    return GPT2_TOKENIZER


@pytest.fixture(scope="session", params=["built", "gpt2"])
def gpt2_folder(request) -> Path:
    return _gpt2_folder(request)


@pytest.fixture(scope="session", params=["trained", "gpt2-built", "gpt2"])
def any_tokenizer(request, tokenizer):
    return tokenizer if request.param == "trained" else _from_gpt2_files(_gpt2_folder(request))


@settings(max_examples=150, deadline=None)
@given(text=WITH_SPECIALS)
def test_round_trips_any_text(any_tokenizer, text):
    assert any_tokenizer.decode(any_tokenizer.encode(text)) == text
    ordinary = any_tokenizer.encode(text, special=False)
    assert any_tokenizer.decode(ordinary) == text
    assert not any_tokenizer.special_ids & set(ordinary)  # typed special-token text stays text


def _streamed(tokenizer, ids) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@settings(max_examples=150, deadline=None)
@given(text=WITH_SPECIALS)
def test_streaming_an_encoding_gives_the_text(any_tokenizer, text):
    pieces = _streamed(any_tokenizer, any_tokenizer.encode(text))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text  # never half a character


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_streaming_any_ids_equals_whole_decoding(any_tokenizer, data):
    """Ids in any order, so the byte stream breaks inside characters and holds invalid UTF-8."""
    ids = data.draw(st.lists(st.integers(0, any_tokenizer.n_vocab - 1), max_size=40))
    assert "".join(_streamed(any_tokenizer, ids)) == any_tokenizer.decode(ids)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=60) | UNICODE.map(str.encode), cuts=st.lists(st.integers(0, 60), max_size=12))
def test_streaming_any_split_of_the_bytes_equals_whole_decoding(data, cuts):
    """A tokenizer whose tokens are exactly the pieces of one split of the bytes: the decoder sees
    that split, whatever it is (mid-character, invalid bytes, empty stream)."""
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    singles = [bytes([b]) for b in range(256)]
    ranks = singles + sorted({p for p in pieces if len(p) > 1})
    tok = Tokenizer(ranks, GPT4_PATTERN, {})
    ids = [ranks.index(p) for p in pieces]
    assert b"".join(tok.token_bytes(i) for i in ids) == data
    assert "".join(_streamed(tok, ids)) == data.decode("utf-8", errors="replace") == tok.decode(ids)


def test_lone_surrogates_encode_as_replacement_characters(tokenizer):
    """Undecodable argv bytes reach Python as lone surrogates; they encode as U+FFFD, not an error."""
    assert tokenizer.encode("a\udcffb") == tokenizer.encode("a\ufffdb")


def test_trained_tokenizer_layout(tokenizer):
    assert tokenizer.n_vocab == 400
    assert tokenizer.eot_id == 400 - 5
    assert [tokenizer.special[t] for t in CHAT_TOKENS] == [396, 397, 398, 399]
    assert tokenizer.encode(f"hi{EOT}") [-1] == tokenizer.eot_id
    assert tokenizer.eot_id not in tokenizer.encode(f"hi{EOT}", special=False)
    # Training learned merges: common words are single tokens.
    assert len(tokenizer.encode(" little")) == 1


def test_serialisation_round_trip(tokenizer):
    again = Tokenizer.from_dict(_tokenizer_data(tokenizer))
    for text in VARIED + STORY_LINES:
        assert again.encode(text) == tokenizer.encode(text)


def test_vocab_too_small_is_an_error():
    with pytest.raises(TinygenError):
        Tokenizer.train(["abc"], vocab_size=200)


def _tokenizer_data(tokenizer, **change) -> dict:
    data = tokenizer.to_dict()
    data.update(change)
    return data


@pytest.mark.parametrize("change,needle", [
    (lambda d: d["ranks"].pop(65), "256 bytes"),  # no token for "A": tiktoken would panic on it
    (lambda d: d["ranks"].append(d["ranks"][300]), "distinct"),
    (lambda d: d["ranks"].__setitem__(1, "!!"), "malformed"),  # not base64
    (lambda d: d["special"].__setitem__("", 400), "special"),  # an empty special token hangs tiktoken
    (lambda d: d["special"].__setitem__(EOT, 4000), "special"),  # a gap in the ids
    (lambda d: d["special"].__setitem__(EOT, -1), "special"),
    (lambda d: d["special"].__setitem__(EOT, "395"), "special"),
    (lambda d: d.__setitem__("pattern", ""), "pattern"),  # empty pieces: a Rust panic
    (lambda d: d.__setitem__("pattern", "a*"), "pattern"),
    (lambda d: d.__setitem__("pattern", r"\p{L}+"), "pattern"),  # drops spaces and digits silently
    (lambda d: d.__setitem__("pattern", "("), "regular expression"),
    (lambda d: d.__setitem__("ranks", "QUJD"), "malformed"),
    (lambda d: d.pop("special"), "no 'special'"),
    (lambda d: d.__setitem__("chat_template", ["x"]), "chat_template"),
], ids=["missing-byte", "duplicate-rank", "bad-base64", "empty-special", "gap", "negative-id", "string-id",
        "empty-pattern", "empty-match", "lossy-pattern", "bad-regex", "ranks-string", "no-special", "template-list"])
def test_broken_tokenizer_data_is_a_clear_error(tokenizer, capfd, change, needle):
    data = _tokenizer_data(tokenizer)
    change(data)
    with pytest.raises(TinygenError, match=needle) as e:
        Tokenizer.from_dict(data)
    assert "\n" not in str(e.value)
    assert capfd.readouterr().err == ""  # no Rust panic message on stderr either


def test_stream_decoder_emits_whole_characters(tokenizer):
    text = "Café 😀 日本語 naïve"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte tokens
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_matcher_across_pieces():
    m = StopMatcher(["THE END"])
    shown = [m.feed(p) for p in ["and so ", "they lived. TH", "E E", "ND and more"]]
    assert "".join(shown) == "and so they lived. "
    assert m.stopped
    m2 = StopMatcher(["\n\n"])
    assert m2.feed("abc\n") == "abc" and m2.feed("def") == "\ndef" and not m2.stopped
    assert m2.flush() == ""


def test_gpt2_parity_with_transformers(tmp_path, gpt2_folder):
    transformers = pytest.importorskip("transformers")
    import shutil

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_folder / name, tmp_path / name)
    hf = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    ours = _from_gpt2_files(gpt2_folder)
    assert ours.n_vocab == 50257 and ours.eot_id == 50256
    for text in VARIED + STORY_LINES:
        assert ours.encode(text, special=False) == hf.encode(text), text
        assert ours.decode(hf.encode(text)) == text
    assert ours.encode(EOT) == [50256]


@pytest.mark.parametrize("vocab_change,merges,needle", [
    (None, "#version: 0.2\na b\n", None),
    (None, "a b c\n", "not a merge"),
    ("list", "a b\n", "not a GPT-2 vocabulary"),
    ("gap", "a b\n", "not a GPT-2 vocabulary"),
], ids=["valid", "three-token-merge", "vocab-list", "id-gap"])
def test_gpt2_files_are_checked(tmp_path, vocab_change, merges, needle):
    """The files behind `--tokenizer FOLDER`: a tiny GPT-2 vocabulary (256 bytes, one merge, EOT)."""
    from tinygen.core.tokenizer import unicode_to_byte

    stand_ins = sorted(unicode_to_byte(), key=unicode_to_byte().get)  # GPT-2's printable byte stand-ins
    vocab = {c: i for i, c in enumerate(stand_ins)} | {"ab": 256, EOT: 257}
    if vocab_change == "list":
        vocab = list(vocab)
    elif vocab_change == "gap":
        vocab[EOT] = 300
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(merges)
    if needle is None:
        tok = Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
        assert tok.encode("ab") == [256] and tok.eot_id == 257
        assert tok.decode(tok.encode("ab cab")) == "ab cab"
        return
    with pytest.raises(TinygenError, match=needle):
        Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
