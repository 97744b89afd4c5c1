"""SentencePiece vocabularies (core/spm.py, formats/spm_import.py) on models trained here with
sentencepiece's own trainer, read as a GGUF's fields, as a tokenizer.model and as a tokenizer.json:
each gives the ids of llama.cpp's SPM tokenizer, written out naively below (llm_tokenizer_spm and
tokenizer_st_partition), of sentencepiece itself on plain text, and of Hugging Face's tokenizers on
the tokenizer.json. The real Gemma 3 GGUF adds checks when present (against llama.cpp's own
tokenizer when llama-cpp-python is installed)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from tinygen.core.spm import SentencePieceTokenizer, model_proto
from tinygen.core.template import with_chat_template
from tinygen.core.tokenizer import StreamDecoder, Tokenizer
from tinygen.errors import TinygenError
from tinygen.formats.gguf_file import open_gguf
from tinygen.formats.spm_import import spm_from_model_proto
from tinygen.formats.tokenizer_import import tokenizer_from_gguf, tokenizer_from_hf

spm = pytest.importorskip("sentencepiece")

GEMMA3 = Path("/work/models/gemma-3-270m-q4_k_m.gguf")
LINES = ["The quick brown fox jumps over the lazy dog.", "Hello world! héllo wörld, ça va? Straße",
         "def f(x):\n    return [i**2 for i in range(10)]", "日本語のテキストです。", "  two  spaces\n\nnewline\ttab",
         "<start_of_turn>user hi<end_of_turn>", "1234567890 3.14159"] * 30
TEXTS = ["Hello world", "hello  world", " leading", "trailing ", "   ", "", "a\n\nb\n\n\nc", "\ttabbed\n",
         "héllo wörld ça va", "Grüße aus Köln", "日本語のテキスト", "中文文本", "مرحبا بالعالم", "emoji 😀🦙 ok",
         "x = [i**2 for i in range(10)]\n    return x", "12345 67890", "zebra quokka xylophone",
         "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "a<end_of_turn>b", "<s>", "</s>text",
         "<unk>", "<start_of_turn><start_of_turn>", "q\n\n\n\nq", "ça<start_of_turn> va"]


def train(model_type="bpe", add_dummy_prefix=True, byte_fallback=True, vocab_size=420) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES), model_writer=out, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=byte_fallback, user_defined_symbols=["<start_of_turn>", "\n\n"],
        control_symbols=["<end_of_turn>"], character_coverage=0.98, add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    return out.getvalue()


def gguf_fields(proto: bytes, add_space_prefix: bool) -> dict:
    """The tokenizer.* keys llama.cpp's converter writes for this model (types as the proto has them)."""
    tok = spm_from_model_proto(proto)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": list(tok.pieces),
            "tokenizer.ggml.scores": list(tok.scores), "tokenizer.ggml.token_type": list(tok.types),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_space_prefix": add_space_prefix, "tokenizer.ggml.add_bos_token": True}


def llama_cpp_spm(fields: dict, text: str, special: bool) -> list[int]:
    """llama.cpp's tokenize for an SPM vocabulary, naively: cut out special pieces (longest first,
    control and unknown ones only with special), then for each stretch merge the neighbouring
    symbols whose join is a piece of the highest score (leftmost on ties), bytes for the rest."""
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    # llama.cpp makes the tokens it ends a generation at control tokens, whatever the file says.
    types = [3 if t in ("</s>", "<eos>", "<end_of_turn>", "<|endoftext|>", "<|im_end|>") else k
             for t, k in zip(tokens, types)]
    index = {t: i for i, t in enumerate(tokens)}
    cache = sorted((i for i, t in enumerate(types) if t in (2, 3, 4)), key=lambda i: -len(tokens[i]))
    parts: list = [text] if text else []
    for i in cache:
        if not special and types[i] in (2, 3):
            continue
        cut = []
        for part in parts:
            if isinstance(part, int):
                cut.append(part)
                continue
            pieces = part.split(tokens[i])
            for k, piece in enumerate(pieces):
                if k:
                    cut.append(i)
                if piece:
                    cut.append(piece)
        parts = cut
    out, prev_special = [], True
    for part in parts:
        if isinstance(part, int):
            out.append(part)
            prev_special = True
            continue
        symbols = list(((" " if fields["tokenizer.ggml.add_space_prefix"] and prev_special else "") + part)
                       .replace(" ", "▁"))
        prev_special = False
        while True:
            best = None
            for k in range(len(symbols) - 1):
                joined = symbols[k] + symbols[k + 1]
                if joined in index and (best is None or scores[index[joined]] > best[0]):
                    best = (scores[index[joined]], k)
            if best is None:
                break
            k = best[1]
            symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
        for s in symbols:
            out += [index[s]] if s in index else [index[f"<0x{b:02X}>"] for b in s.encode()]
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["space-prefix", "no-space-prefix"])
def trained(request):
    proto = train(add_dummy_prefix=request.param)
    fields = gguf_fields(proto, request.param)
    return proto, fields, tokenizer_from_gguf(fields)


def test_gguf_vocabulary_matches_llama_cpp_tokenization(trained):
    _, fields, tok = trained
    assert isinstance(tok, SentencePieceTokenizer)
    for text in TEXTS:
        for special in (True, False):
            assert tok.encode(text, special=special) == llama_cpp_spm(fields, text, special), (text, special)


def test_special_pieces_and_conventions(trained):
    _, fields, tok = trained
    start, end = fields["tokenizer.ggml.tokens"].index("<start_of_turn>"), tok.special["<end_of_turn>"]
    assert tok.encode("<end_of_turn>", special=True) == [end]
    assert end not in tok.encode("<end_of_turn>", special=False)
    assert start in tok.encode("<start_of_turn>", special=False)  # user-defined: cut out either way
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True) and 2 in tok.stop_ids
    assert tok.n_vocab == 420 and tok.kind == "SentencePiece" and {"<s>", "</s>", "<unk>"} <= set(tok.special)


def test_plain_text_matches_sentencepiece_itself(trained):
    proto, _, tok = trained
    native = spm.SentencePieceProcessor(model_proto=proto)
    for text in TEXTS:
        if any(s in text for s in ("<start_of_turn>", "<end_of_turn>", "\n\n", "<s>", "</s>", "<unk>")):
            continue  # sentencepiece puts no space after a user-defined piece; llama.cpp does
        assert tok.encode(text) == native.encode(text), text


def test_tokenizer_model_file_reads_as_the_gguf_does(trained):
    proto, fields, tok = trained
    from_file = spm_from_model_proto(proto, {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ x }}"})
    assert from_file.add_space_prefix is fields["tokenizer.ggml.add_space_prefix"]
    assert (from_file.bos_id, from_file.eos_id, from_file.add_bos, from_file.jinja_template) == (1, 2, True, "{{ x }}")
    for text in TEXTS:
        assert from_file.encode(text) == tok.encode(text), text


def test_hugging_face_folder_with_only_a_tokenizer_model(trained, tmp_path):
    from tinygen.formats.hf import hf_tokenizer

    proto, _, tok = trained
    with pytest.raises(TinygenError, match="neither tokenizer.json nor tokenizer.model"):
        hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(proto)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    folder = hf_tokenizer(tmp_path)
    assert isinstance(folder, SentencePieceTokenizer) and (folder.bos_id, folder.eos_id) == (1, 2)
    for text in TEXTS:
        assert folder.encode(text) == tok.encode(text), text


def test_decode_token_bytes_labels_and_streaming(trained):
    tok = trained[2]
    for text in TEXTS:
        # llama.cpp puts a space after each special piece when it puts one first, and it stays in the text
        if not tok.add_space_prefix or not any(p in text for p in tok.special):
            assert tok.decode(tok.encode(text)) == text, text
    ids = tok.encode("emoji 😀🦙 ok")
    byte_labels = [tok.label(i) for i in ids if tok.label(i).startswith("<0x")]
    assert bytes(int(label[3:5], 16) for label in byte_labels) == "😀🦙".encode()  # pieces the model lacks
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) if not tok.add_space_prefix else " " + tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert tok.token_bytes(tok.special["<end_of_turn>"]) == b"<end_of_turn>"
    with pytest.raises(KeyError):
        tok.token_bytes(tok.n_vocab)


def test_checkpoint_round_trip_and_chat_tokens(trained):
    _, _, tok = trained
    data = json.loads(json.dumps(tok.to_dict()))  # what a safetensors header holds
    back = Tokenizer.from_dict(data)
    assert isinstance(back, SentencePieceTokenizer) and back.to_dict() == tok.to_dict()
    assert all(back.encode(t) == tok.encode(t) for t in TEXTS)
    chat, added = with_chat_template(tok)
    assert added == 4 and chat.n_vocab == tok.n_vocab + 4
    assert chat.encode("<|user|>hi<|end|>") == [tok.n_vocab + 1, *tok.encode("hi"), tok.n_vocab + 3]
    assert Tokenizer.from_dict(chat.to_dict()).to_dict() == chat.to_dict()


def test_malformed_checkpoint_data_is_one_error(trained):
    _, _, tok = trained
    for change in ({"pieces": None}, {"types": [9] * tok.n_vocab}, {"scores": [0.0]}, {"special": {"x": 10**6}},
                   {"bos_id": tok.n_vocab}, {"pieces": ["a"] * tok.n_vocab}):
        with pytest.raises(TinygenError) as e:
            Tokenizer.from_dict({**tok.to_dict(), **change})
        assert "\n" not in str(e.value)


def test_missing_sentencepiece_is_one_line_with_the_install_command(trained, monkeypatch):
    _, fields, _ = trained
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    tok = tokenizer_from_gguf(fields)
    assert tok.decode([5, 6]) is not None  # decoding needs no library
    with pytest.raises(TinygenError, match=r"needs the sentencepiece package: pip install 'tinygen\[sentencepiece\]'"):
        tok.encode("hi")


def test_unigram_and_vocabularies_without_bytes():
    proto = train(model_type="unigram", byte_fallback=False, vocab_size=80)
    tok = spm_from_model_proto(proto)
    native = spm.SentencePieceProcessor(model_proto=proto)
    assert tok.model == "unigram"
    for text in ("Hello world", "the lazy dog jumps", "zebra 😀", "日本"):
        assert tok.encode(text) == native.encode(text), text


def test_model_proto_loads_every_piece():
    tok = spm_from_model_proto(train())
    native = spm.SentencePieceProcessor()
    native.LoadFromSerializedProto(model_proto(tok))
    assert native.vocab_size() == tok.n_vocab
    assert [native.id_to_piece(i) for i in range(tok.n_vocab)] == tok.pieces
    assert [native.get_score(i) for i in range(tok.n_vocab)] == pytest.approx(tok.scores)


# --- tokenizer.json: Llama 2 / Gemma style, against Hugging Face's tokenizers -------------------------------


def hf_json(tok: SentencePieceTokenizer, prepend: bool) -> dict:
    """A tokenizer.json as transformers' LlamaConverter writes one: every split of every piece into two
    pieces is a merge, in the order of the piece's score."""
    vocab = {p: i for i, p in enumerate(tok.pieces)}
    ordinary = [i for i, t in enumerate(tok.types) if t == 1]
    merges = sorted(((p[:k], p[k:], -tok.scores[i]) for i in ordinary for p in [tok.pieces[i]]
                     for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab
                     and tok.types[vocab[p[:k]]] == 1 and tok.types[vocab[p[k:]]] == 1),
                    key=lambda m: (m[2], vocab[m[0]], vocab[m[1]]))
    steps = ([{"type": "Prepend", "prepend": "▁"}] if prepend else []) + \
        [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    return {
        "model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>", "fuse_unk": True,
                  "vocab": vocab, "merges": [[a, b] for a, b, _ in merges]},
        "normalizer": {"type": "Sequence", "normalizers": steps},
        "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prepend else [])},
        "added_tokens": [{"id": i, "content": tok.pieces[i], "special": tok.types[i] != 4, "lstrip": False,
                          "rstrip": False, "normalized": False, "single_word": False}
                         for i, t in enumerate(tok.types) if t in (2, 3, 4)],
    }


def test_tokenizer_json_matches_hugging_face_and_the_gguf(trained):
    tokenizers = pytest.importorskip("tokenizers")
    _, fields, gguf_tok = trained
    prepend = fields["tokenizer.ggml.add_space_prefix"]
    data = hf_json(gguf_tok, prepend)
    theirs = tokenizers.Tokenizer.from_str(json.dumps(data))
    ours = tokenizer_from_hf(data, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    assert isinstance(ours, SentencePieceTokenizer) and ours.add_space_prefix is prepend
    for text in TEXTS:
        if prepend and any(s in text for s in ("<start_of_turn>", "<end_of_turn>", "\n\n", "<s>", "</s>", "<unk>")):
            continue  # Hugging Face's Prepend skips the text after an added token when there is none before it
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids, text
        assert ours.encode(text) == gguf_tok.encode(text), text


@pytest.mark.parametrize("change,needle", [
    ({"normalizer": {"type": "NFKC"}}, "'NFKC' in the normalizer"),
    ({"normalizer": None}, "needs spaces written as '▁'"),
    ({"pre_tokenizer": {"type": "Split", "pattern": {"String": " "}}}, "'Split' in the normalizer or pre-tokenizer"),
    ({"added_tokens": [{"id": 3, "content": "<end_of_turn>", "rstrip": True}]}, "rstrip"),
    ({"added_tokens": [{"id": 3, "content": "nope"}]}, "which the vocabulary gives another piece"),
], ids=["nfkc", "no-spaces", "split", "rstrip", "wrong-id"])
def test_unsupported_sentencepiece_json_is_refused(trained, change, needle):
    data = {**hf_json(trained[2], True), **change}
    with pytest.raises(TinygenError, match=needle) as e:
        tokenizer_from_hf(data)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scheme,prefix", [("first", True), ("always", True), ("never", False)])
def test_metaspace_pre_tokenizer(trained, scheme, prefix):
    _, _, tok = trained
    data = {**hf_json(tok, False), "normalizer": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": False}}
    ours = tokenizer_from_hf(data)
    assert ours.add_space_prefix is prefix
    if prefix is tok.add_space_prefix:
        assert all(ours.encode(t) == tok.encode(t) for t in TEXTS)


def test_damaged_tokenizer_model_is_refused():
    with pytest.raises(TinygenError, match="tokenizer.model is not a SentencePiece model"):
        spm_from_model_proto(train()[:1001])
    with pytest.raises(TinygenError, match="not a SentencePiece model"):
        spm_from_model_proto(b"\x0f\x00garbage")


# --- through tinygen's loaders and CLI --------------------------------------------------------------------


def test_gguf_model_file_tokenizes_in_the_cli(trained, tmp_path, cli):
    from conftest import assert_ok
    from modelfiles import tiny_llama, write_gguf

    _, fields, tok = trained
    config, state = tiny_llama(vocab=tok.n_vocab)
    path = write_gguf(tmp_path / "spm.gguf", config, state, meta={"tokenizer.ggml.merges": None, "tokenizer.chat_template": None, **fields})
    text = "<end_of_turn>Grüße, 日本 😀"
    r = cli("tokenize", "-m", str(path), "--ids", text)
    assert_ok(r)
    assert r.out.split() == [str(i) for i in tok.encode(text)]
    r = cli("tokenize", "-m", str(path), "--decode", " ".join(map(str, tok.encode("Grüße, 日本 😀"))))
    assert_ok(r)
    assert r.out == "Grüße, 日本 😀\n"
    r = cli("info", str(path))
    assert_ok(r)
    assert "SentencePiece (llama), 420 tokens" in r.out
    r = cli("export", str(path), "--format", "gguf", "--out", str(tmp_path / "out.gguf"))
    assert r.rc == 1 and "SentencePiece vocabulary" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "out.gguf").exists()


# --- the real Gemma 3 GGUF --------------------------------------------------------------------------------

needs_gemma = pytest.mark.skipif(not GEMMA3.exists(), reason=f"{GEMMA3} is absent")
VARIED = TEXTS + ["The Eiffel Tower is in Paris.", "Ich möchte gern ein Stück Kuchen, bitte.",
                  "L'été dernier, nous sommes allés à la plage.", "東京は日本の首都です。", "北京欢迎你",
                  "مرحبا، كيف حالك؟", "Привет, мир!", "🙂👍🏽 family: 👨‍👩‍👧", "for (int i = 0; i < n; ++i) { s += a[i]; }",
                  "    indented\n\t\ttabs\r\nwindows", "3.14159265358979 and 1,000,000", "<start_of_image>look",
                  "<bos>not special<eos>", "[multimodal]", "ÅÄÖ åäö ÆØ"]


@pytest.fixture(scope="module")
def gemma():
    fields = {k: v for k, v in open_gguf(GEMMA3).fields.items() if k.startswith("tokenizer.")}
    return fields, tokenizer_from_gguf(fields)


@needs_gemma
def test_gemma3_vocabulary(gemma):
    fields, tok = gemma
    assert tok.n_vocab == 262144 and (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_space_prefix) == (2, 1, True, False)
    assert tok.encode("<start_of_turn>user\nHi<end_of_turn>\n") == [105, 2364, 107, 10979, 106, 107]
    assert {1, 106} <= set(tok.stop_ids)  # <eos>, and <end_of_turn>, which ends a chat turn
    for text in VARIED:
        assert tok.decode(tok.encode(text)) == text, text
        for special in (True, False):
            assert tok.encode(text, special=special) == llama_cpp_spm(
                {**fields, "tokenizer.ggml.add_space_prefix": False}, text, special), (text, special)


@needs_gemma
def test_gemma3_against_llama_cpp(gemma):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, tok = gemma
    ref = llama_cpp.Llama(str(GEMMA3), vocab_only=True, verbose=False)
    for text in VARIED:
        for special in (True, False):
            assert [tok.bos_id, *tok.encode(text, special=special)] == \
                ref.tokenize(text.encode(), add_bos=True, special=special), (text, special)
