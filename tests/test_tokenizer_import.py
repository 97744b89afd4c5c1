"""Imported tokenizers (Hugging Face tokenizer.json, GGUF metadata) give the ids their models were
trained on: the GPT-2, SmolLM2, Llama 3 and Qwen2 pre-tokenizers over a GPT-2-sized vocabulary built
in conftest (and over GPT-2's own, from ../shared); SmolLM2's real tokenizer from its GGUF and from
the tokenizer.json transformers writes for it (from ../shared, skipped when absent); special tokens
sit among the ordinary ids; and what tinygen cannot reproduce is refused in one line."""

import json
import shutil
from pathlib import Path

import pytest
import regex
from conftest import GPT2_TOKENIZER
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygen.core.tokenizer import EOT, Tokenizer, unicode_to_byte
from tinygen.errors import TinygenError
from tinygen.formats.tokenizer_import import tokenizer_from_gguf, tokenizer_from_hf

SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct"
SMOLLM2_GGUF = SMOLLM2 / "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's own pre-tokenizer (its tokenizer.json on the Hub; llama.cpp's "smollm"): digits one by
# one, then GPT-2's split.
SMOLLM2_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
# The split regexes as Llama 3's and Qwen2's tokenizer.json spell them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Bytes SmolLM2's vocabulary has no token for (in text: these control characters). Hugging Face
# drops them before merging, llama.cpp and tinygen after, so their neighbours may differ.
SMOLLM2_LACKS = "\x04\x06\x13\x14\x16\x1d"

TEXTS = [
    "Hello world! How are you?",
    "héllo naïve café Ελληνικά русский e\u0301 combining",
    "😀👍🏽 👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag",
    "日本語のテキスト、中文，한국어",
    "12345 3.14159 1,000,000 2024-01-01 ٣٤٥ ½ x²",
    "123456789012345678901234567890",
    "def f(x):\n    if x:\n        return x**2  # ok\n\treturn None\n",
    "a  b   c\t\td\n\n\ne \r\n\r\nf    \n  1  22\n\n3. item",
    "I'm he'll we've they'd it's DON'T You'RE",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    f"{EOT}x<repo_name> <|im_start <|im_end|>",
    "   leading and trailing   ",
    "<html><body class=\"x\">&amp;</body></html>",
    "",
]


def _text_strategy(lacks: str = "") -> st.SearchStrategy[str]:
    """Any assigned Unicode (newer code points than Python's tables know can differ between regex
    engines), mixed with special-token text."""
    chars = st.characters(codec="utf-8", exclude_categories=("Cn",), exclude_characters=lacks)
    pieces = st.one_of(st.text(chars, max_size=40), st.sampled_from(["<|im_start|>", "<|im_end|>", EOT, " 12", "\n\n"]))
    return st.lists(pieces, max_size=5).map("".join)


def _hf(tokenizer_json: dict):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json))


def _assert_same_ids(ours: Tokenizer, hf, texts) -> None:
    for text in texts:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


# -- SmolLM2 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_fields() -> dict:
    if not SMOLLM2_GGUF.exists():
        pytest.skip("../shared/models/smollm2-135m-instruct is absent")
    gguf = pytest.importorskip("gguf")
    return {key: field.contents() for key, field in gguf.GGUFReader(SMOLLM2_GGUF).fields.items()}


@pytest.fixture(scope="module")
def smollm2(gguf_fields) -> Tokenizer:
    return tokenizer_from_gguf(gguf_fields)


@pytest.fixture(scope="module")
def transformers_smollm2(gguf_fields, tmp_path_factory):
    """(transformers' tokenizer from the GGUF, the tokenizer.json and tokenizer_config.json it saves)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(SMOLLM2, gguf_file=SMOLLM2_GGUF.name)
    out = tmp_path_factory.mktemp("smollm2-hf")
    hf.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    if (out / "chat_template.jinja").exists():  # newer transformers save the template beside the config
        config["chat_template"] = (out / "chat_template.jinja").read_text()
    return hf, json.loads((out / "tokenizer.json").read_text()), config


@pytest.fixture(scope="module")
def smollm2_reference(transformers_smollm2):
    """SmolLM2's real tokenizer: transformers' saved tokenizer.json with SmolLM2's own pre-tokenizer.
    transformers' GGUF loader leaves the Digits step out (its "smollm" gets plain GPT-2 splitting)."""
    _, tokenizer_json, _ = transformers_smollm2
    return _hf({**tokenizer_json, "pre_tokenizer": SMOLLM2_PRE})


def test_smollm2_gguf_matches_its_tokenizer(smollm2, smollm2_reference):
    _assert_same_ids(smollm2, smollm2_reference, TEXTS + ["a  1", "x\n\n1. y"])
    for text in TEXTS:
        assert smollm2.decode(smollm2.encode(text)) == text


def test_smollm2_gguf_matches_transformers_gguf_loader(smollm2, transformers_smollm2):
    """Where a digit follows whitespace, transformers' loader splits as GPT-2 ("a  1" is "a", " ",
    " 1"); SmolLM2 and llama.cpp split the digit off first ("a", "  ", "1"). Elsewhere: same ids."""
    hf, _, _ = transformers_smollm2
    for text in TEXTS:
        if not regex.search(r"\s\p{N}", text):
            assert smollm2.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert smollm2.encode("a  1") == [81, 256, 33]  # transformers' loader: [81, 216, 216, 33]


@settings(max_examples=150, deadline=None)
@given(text=_text_strategy(lacks=SMOLLM2_LACKS))
def test_smollm2_any_text(smollm2, smollm2_reference, text):
    ids = smollm2.encode(text)
    assert ids == smollm2_reference.encode(text, add_special_tokens=False).ids
    assert smollm2.decode(ids) == text


def test_smollm2_layout(smollm2, gguf_fields):
    """Special tokens hold ids 0..16 among the ordinary ones; token ids follow the merge order
    exactly (merge k makes id 252 + k), which is what lets tiktoken merge by id."""
    tokens, merges = gguf_fields["tokenizer.ggml.tokens"], gguf_fields["tokenizer.ggml.merges"]
    ids = {t: i for i, t in enumerate(tokens)}
    assert [ids[m.replace(" ", "")] for m in merges] == list(range(252, 49152))
    assert smollm2.n_vocab == 49152 and smollm2.ranks[:17] == [None] * 17
    assert smollm2.special["<|endoftext|>"] == 0 and smollm2.special["<|im_end|>"] == 2
    assert len(smollm2.special) == 17 and set(smollm2.special.values()) == set(range(17))
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.stop_ids, smollm2.add_bos) == (1, 2, (2, 0), False)
    assert f"{smollm2.kind} ({smollm2.name})" == "byte-level BPE (smollm)"
    assert smollm2.jinja_template == gguf_fields["tokenizer.chat_template"]
    assert smollm2.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert not smollm2.special_ids & set(smollm2.encode("<|im_start|>user\nhi<|im_end|>", special=False))


def test_smollm2_lacking_bytes_are_left_out(smollm2, smollm2_reference):
    assert smollm2.drop_unknown_bytes
    for text in ["a\x04b", "x \x1d\n", "\U00050000"]:  # U+50000's UTF-8 lead byte 0xF1 has no token
        assert smollm2.encode(text) == smollm2_reference.encode(text, add_special_tokens=False).ids
    assert smollm2.decode(smollm2.encode("a\x04b")) == "ab"


def test_smollm2_checkpoint_round_trip(smollm2):
    data = json.loads(json.dumps(smollm2.to_dict()))  # through JSON, as a checkpoint stores it
    assert data["ranks"][:17] == [None] * 17
    again = Tokenizer.from_dict(data)
    assert (again.bos_id, again.eos_id, again.stop_ids, again.add_bos, again.name, again.jinja_template) == (
        smollm2.bos_id, smollm2.eos_id, smollm2.stop_ids, smollm2.add_bos, smollm2.name, smollm2.jinja_template)
    for text in TEXTS + ["a\x04b"]:
        assert again.encode(text) == smollm2.encode(text)


def test_smollm2_tokenizer_json_as_transformers_saves_it(transformers_smollm2, smollm2):
    """transformers' tokenizer.json has plain ByteLevel (GPT-2's split): matched exactly, and named for it."""
    _, tokenizer_json, config = transformers_smollm2
    ours = tokenizer_from_hf(tokenizer_json, config)
    assert ours.name == "gpt-2" and ours.ranks == smollm2.ranks and ours.special == smollm2.special
    assert (ours.bos_id, ours.eos_id, ours.stop_ids) == (1, 2, (2, 0))
    assert ours.jinja_template == smollm2.jinja_template
    _assert_same_ids(ours, _hf(tokenizer_json), TEXTS)


def test_smollm2_tokenizer_json_with_its_own_pre_tokenizer(transformers_smollm2, smollm2, smollm2_reference):
    _, tokenizer_json, config = transformers_smollm2
    ours = tokenizer_from_hf({**tokenizer_json, "pre_tokenizer": SMOLLM2_PRE}, config)
    assert (ours.name, ours.pattern, ours.ranks, ours.special) == (
        "smollm", smollm2.pattern, smollm2.ranks, smollm2.special)
    _assert_same_ids(ours, smollm2_reference, TEXTS)


# -- GPT-2, SmolLM2, Llama 3 and Qwen2 pre-tokenizers over a GPT-2-sized vocabulary ------------------

@pytest.fixture(scope="module", params=["built", "gpt2"])
def gpt2_source(request, gpt2_files) -> Path:
    """vocab.json + merges.txt: conftest's GPT-2-sized vocabulary (any two neighbouring ASCII
    characters merge, so a split in the wrong place changes the ids), and GPT-2's own from ../shared
    (skipped when absent)."""
    if request.param == "built":
        return gpt2_files
    if not GPT2_TOKENIZER.exists():
        pytest.skip("../shared/data/gpt2-tokenizer is absent")
    return GPT2_TOKENIZER


@pytest.fixture(scope="module")
def gpt2_json(gpt2_source, tmp_path_factory) -> dict:
    """The tokenizer.json transformers writes for gpt2_source's vocab.json + merges.txt."""
    transformers = pytest.importorskip("transformers")
    src, out = tmp_path_factory.mktemp("gpt2-src"), tmp_path_factory.mktemp("gpt2-hf")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_source / name, src / name)
    transformers.GPT2TokenizerFast.from_pretrained(src).save_pretrained(out)
    return json.loads((out / "tokenizer.json").read_text())


def _split_then_byte_level(split: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}


def _gpt2_gguf_fields(source: Path, pre: str) -> dict:
    vocab = json.loads((source / "vocab.json").read_text())
    tokens = sorted(vocab, key=vocab.get)
    merges = [m for m in (source / "merges.txt").read_text().splitlines() if m and not m.startswith("#version")]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": [3 if t == EOT else 1 for t in tokens],
            "tokenizer.ggml.bos_token_id": 50256, "tokenizer.ggml.eos_token_id": 50256}


def test_gpt2_tokenizer_json(gpt2_source, gpt2_json):
    ours = tokenizer_from_hf(gpt2_json)
    files = Tokenizer.from_gpt2_files(gpt2_source / "vocab.json", gpt2_source / "merges.txt")
    assert (ours.name, ours.ranks, ours.special, ours.pattern) == ("gpt-2", files.ranks, files.special, files.pattern)
    assert ours.stop_ids == (50256,) and ours.eos_id == 50256 and not ours.drop_unknown_bytes
    _assert_same_ids(ours, _hf(gpt2_json), TEXTS)
    gguf = tokenizer_from_gguf(_gpt2_gguf_fields(gpt2_source, "gpt-2"))
    assert (gguf.ranks, gguf.special, gguf.pattern) == (ours.ranks, ours.special, ours.pattern)


@pytest.fixture(scope="module")
def smollm(gpt2_json):
    """(ours, Hugging Face's) for SmolLM2's pre-tokenizer over the vocabulary: digits one by one,
    then GPT-2's split."""
    tokenizer_json = {**gpt2_json, "pre_tokenizer": SMOLLM2_PRE}
    return tokenizer_from_hf(tokenizer_json), _hf(tokenizer_json)


def test_smollm_pre_tokenizer(gpt2_source, smollm):
    ours, hf = smollm
    assert ours.name == "smollm"
    _assert_same_ids(ours, hf, TEXTS + ["a  1", "x\n\n1. y"])
    gguf = tokenizer_from_gguf(_gpt2_gguf_fields(gpt2_source, "smollm"))
    assert (gguf.ranks, gguf.pattern) == (ours.ranks, ours.pattern)


@pytest.fixture(scope="module")
def llama3(gpt2_json):
    """(ours, Hugging Face's) for Llama 3's Split over GPT-2's vocabulary, with Llama 3's
    post-processor that puts BOS first (GPT-2's <|endoftext|> standing in for it)."""
    bos_first = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": EOT, "type_id": 0}},
                                                          {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [], "special_tokens": {EOT: {"id": EOT, "ids": [50256], "tokens": [EOT]}}}
    tokenizer_json = {**gpt2_json, "pre_tokenizer": _split_then_byte_level(LLAMA3_SPLIT), "post_processor": bos_first}
    return tokenizer_from_hf(tokenizer_json), _hf(tokenizer_json)


def test_llama3_pre_tokenizer(gpt2_source, llama3):
    ours, hf = llama3
    assert (ours.name, ours.pattern, ours.add_bos, ours.bos_id) == ("llama-bpe", LLAMA3_SPLIT, True, 50256)
    _assert_same_ids(ours, hf, TEXTS)
    gguf = tokenizer_from_gguf(_gpt2_gguf_fields(gpt2_source, "llama-bpe"))
    assert (gguf.ranks, gguf.pattern, gguf.add_bos) == (ours.ranks, LLAMA3_SPLIT, True)


@settings(max_examples=100, deadline=None)
@given(text=_text_strategy())
def test_smollm_and_llama3_splits_any_text(smollm, llama3, text):
    for ours, hf in (smollm, llama3):
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, ours.name
        assert ours.decode(ours.encode(text)) == text


def test_qwen2_pre_tokenizer_and_nfc(gpt2_source, gpt2_json):
    """Qwen2 normalizes to NFC, between special tokens only: a combining mark after `>` must not
    join it (NFC would make `>` + U+0338 one character, `≯`)."""
    tokenizer_json = {**gpt2_json, "pre_tokenizer": _split_then_byte_level(QWEN2_SPLIT), "normalizer": {"type": "NFC"}}
    ours = tokenizer_from_hf(tokenizer_json)
    assert (ours.name, ours.normalization) == ("qwen2", "NFC")
    nfc = ["e\u0301t\u00e9 A\u030a \u212b", f"{EOT}\u0338 a>\u0338", "\u1e9b\u0323 12345"]
    _assert_same_ids(ours, _hf(tokenizer_json), TEXTS + nfc)
    assert ours.encode("e\u0301") == ours.encode("\u00e9")
    gguf = tokenizer_from_gguf(_gpt2_gguf_fields(gpt2_source, "qwen2"))
    assert (gguf.pattern, gguf.normalization, gguf.encode(nfc[1])) == (QWEN2_SPLIT, "NFC", ours.encode(nfc[1]))


# -- hermetic: holes, old data, refusals -----------------------------------------------------------

def _tiny_json(**change) -> dict:
    """A byte-level BPE over all 256 bytes plus "ab", with <s> and </s> at ids 0 and 1."""
    stand_ins = sorted(unicode_to_byte(), key=unicode_to_byte().get)  # GPT-2's printable byte stand-ins
    vocab = {"<s>": 0, "</s>": 1} | {c: 2 + i for i, c in enumerate(stand_ins)} | {"ab": 258}
    added = [{"id": i, "content": t, "special": True} for t, i in (("<s>", 0), ("</s>", 1))]
    data = {"added_tokens": added, "normalizer": None, "post_processor": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"]], "byte_fallback": False}}
    for key, value in change.items():
        if key in data["model"] or key == "type":
            data["model"][key] = value
        else:
            data[key] = value
    return data


def test_special_tokens_among_ordinary_ids():
    tok = tokenizer_from_hf(_tiny_json(), {"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    assert tok.ranks[:2] == [None, None] and tok.n_vocab == 259
    assert tok.encode("<s>ab</s>") == [0, 258, 1] and tok.decode([0, 258, 1]) == "<s>ab</s>"
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.name) == (0, 1, (1,), "gpt-2")
    again = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode("<s>ab</s> x") == tok.encode("<s>ab</s> x") and again.ranks == tok.ranks
    assert (again.bos_id, again.eos_id, again.stop_ids) == (0, 1, (1,))  # id 0 is kept, not taken for unset
    data = tok.to_dict()
    del data["special"]["<s>"]  # a hole no special token fills
    with pytest.raises(TinygenError, match="holes"):
        Tokenizer.from_dict(data)


def test_tinygen_tokenizer_data_is_unchanged(tokenizer):
    assert set(tokenizer.to_dict()) == {"type", "name", "pattern", "ranks", "special"}
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (None, tokenizer.eot_id, False)
    assert tokenizer.stop_ids == (tokenizer.eot_id, tokenizer.special["<|end|>"])
    assert tokenizer.kind == "byte-level BPE"


@pytest.mark.parametrize("change,needle", [
    ({"type": "Unigram", "vocab": [["a", 0.0]]}, "'ByteLevel' in the normalizer or pre-tokenizer"),
    ({"byte_fallback": True}, "'ByteLevel' in the normalizer or pre-tokenizer changes text"),
    ({"normalizer": {"type": "Lowercase"}}, "normalizer Lowercase"),
    ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Replace"}]}}, "NFC then Replace"),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, "pre-tokenizer Metaspace"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, {"type": "ByteLevel"}]}},
     "Whitespace then ByteLevel"),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}, "add_prefix_space"),
    ({"decoder": {"type": "Metaspace"}}, "decoder"),
    ({"vocab": {**_tiny_json()["model"]["vocab"], "▁hello": 259}}, "byte alphabet"),
    ({"vocab": {**_tiny_json()["model"]["vocab"], "abc": 259}}, "neither a byte nor made by a merge"),
    ({"vocab": {**_tiny_json()["model"]["vocab"], "ba": 259}, "merges": [["b", "a"], ["a", "b"]]}, "merge order"),
    ({"merges": ["a b c"]}, "not two tokens"),
    ({"added_tokens": [{"id": 0, "content": "<s>", "rstrip": True}]}, "rstrip"),
], ids=["unigram", "byte-fallback", "lowercase", "nfc-replace", "metaspace", "whitespace", "prefix-space",
        "decoder", "not-byte-level", "stray-token", "merge-order", "three-token-merge", "rstrip"])
def test_unsupported_tokenizer_json_is_refused(change, needle):
    with pytest.raises(TinygenError, match=needle) as e:
        tokenizer_from_hf(_tiny_json(**change))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change,needle", [
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.token_type": [3]}, "one score and one type per token"),
    ({"tokenizer.ggml.model": "t5"}, "'t5' tokenizer is not supported; tinygen reads byte-level BPE"),
    ({"tokenizer.ggml.pre": "deepseek-llm"}, "pre-tokenizer 'deepseek-llm'"),
    ({"tokenizer.ggml.pre": None}, "pre-tokenizer None"),
], ids=["sentencepiece-types", "unigram", "unknown-pre", "no-pre"])
def test_unsupported_gguf_is_refused(change, needle):
    vocab = _tiny_json()["model"]["vocab"]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": list(vocab),
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [3, 3] + [1] * 257}
    assert tokenizer_from_gguf(fields).encode("<s>ab") == [0, 258]
    fields.update(change)
    with pytest.raises(TinygenError, match=needle) as e:
        tokenizer_from_gguf(fields)
    assert "\n" not in str(e.value)
