"""Tokenizers: trained ones round-trip, GPT-2's matches Hugging Face id for id, and streamed
decoding never splits a character."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygen.core.tokenizer import CHAT_TOKENS, EOT, StopMatcher, StreamDecoder, Tokenizer
from tinygen.errors import TinygenError

from conftest import GPT2_TOKENIZER, STORY_LINES

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


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=200))
def test_trained_tokenizer_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, special=False)) == text


def test_trained_tokenizer_layout(tokenizer):
    assert tokenizer.n_vocab == 400
    assert tokenizer.eot_id == 400 - 5
    assert [tokenizer.special[t] for t in CHAT_TOKENS] == [396, 397, 398, 399]
    assert tokenizer.encode(f"hi{EOT}") [-1] == tokenizer.eot_id
    assert tokenizer.eot_id not in tokenizer.encode(f"hi{EOT}", special=False)
    # Training learned merges: common words are single tokens.
    assert len(tokenizer.encode(" little")) == 1


def test_serialisation_round_trip(tokenizer):
    again = Tokenizer.from_dict(tokenizer.to_dict())
    for text in VARIED + STORY_LINES:
        assert again.encode(text) == tokenizer.encode(text)


def test_vocab_too_small_is_an_error():
    with pytest.raises(TinygenError):
        Tokenizer.train(["abc"], vocab_size=200)


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


@pytest.mark.skipif(not GPT2_TOKENIZER.exists(), reason="../shared/data/gpt2-tokenizer is absent")
def test_gpt2_parity_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    import shutil

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(GPT2_TOKENIZER / name, tmp_path / name)
    hf = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    ours = Tokenizer.from_gpt2_files(GPT2_TOKENIZER / "vocab.json", GPT2_TOKENIZER / "merges.txt")
    assert ours.n_vocab == 50257 and ours.eot_id == 50256
    for text in VARIED + STORY_LINES:
        assert ours.encode(text, special=False) == hf.encode(text), text
        assert ours.decode(hf.encode(text)) == text
    assert ours.encode(EOT) == [50256]
