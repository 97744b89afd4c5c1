"""Gemma 3's chat template through from_jinja: the system text inside the first user turn, "model"
for the assistant, <end_of_turn> closing each turn, message text trimmed. Taken apart, it renders
what jinja2 and transformers render from the template itself, as ids too, on a SentencePiece
vocabulary shaped like Gemma's (trained here); a small Gemma 3 GGUF chats in it through ChatSession
and `tinygen chat`; a model without a template gets it only when its name says it is tuned. The
real Gemma 3 270M GGUF (a base model, without a template) adds checks when present."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import gemma_files
import pytest
from conftest import assert_ok
from gemma_files import gemma3_model, write_gemma3_gguf

from tinygen.core.template import (
    PLAIN,
    ChatTemplate,
    Renderer,
    markers,
    special_parts,
    template_for,
)
from tinygen.errors import TinygenError
from tinygen.formats.chat_templates import GEMMA3, known_template
from tinygen.formats.jinja import JinjaChatTemplate, from_jinja

spm = pytest.importorskip("sentencepiece")

REAL = Path("/work/models/gemma-3-270m-q4_k_m.gguf")
QUESTION = "What is the capital of France?"
LINES = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris, of course.",
         "Hello world! héllo wörld, ça va?\n\nNew paragraph.", "Be brief. Answer in French.\nTell me a story.",
         "user model system: 2+2 is 4.", "日本語のテキストです。"] * 30
CONVERSATIONS = {
    "user": [{"role": "user", "content": QUESTION}],
    "system": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."},
                   {"role": "assistant", "content": "Once upon a time..."},
                   {"role": "user", "content": "Go on, with émojis 😀\nand\tnewlines."}],
    "multi-turn-no-system": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "Who are you?"}],
    "whitespace": [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "\n hi  "},
                   {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "again\t"}],
}


@pytest.fixture(scope="module")
def vocab():
    """(GGUF tokenizer fields, tokenizer) of a SentencePiece vocabulary shaped like Gemma's: <pad>,
    <eos>, <bos>, <unk> first, <start_of_turn> and <end_of_turn> control tokens, newlines as
    user-defined pieces, no space prefix."""
    from tinygen.formats.spm_import import spm_from_model_proto
    from tinygen.formats.tokenizer_import import tokenizer_from_gguf

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES), model_writer=out, vocab_size=420, model_type="bpe", byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", control_symbols=["<start_of_turn>", "<end_of_turn>"], user_defined_symbols=["\n", "\n\n"],
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        character_coverage=0.98, minloglevel=2)
    proto = spm_from_model_proto(out.getvalue())
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": list(proto.pieces),
              "tokenizer.ggml.scores": list(proto.scores), "tokenizer.ggml.token_type": list(proto.types),
              "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
              "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
              "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": True}
    return fields, tokenizer_from_gguf({**fields, "tokenizer.chat_template": GEMMA3}), out.getvalue()


@pytest.fixture(scope="module")
def gemma(vocab):
    return from_jinja(vocab[1])


def rendered(messages: list[dict], add_generation_prompt: bool = True) -> str:
    return JinjaChatTemplate(GEMMA3, bos_token="<bos>", eos_token="<eos>").render(messages, add_generation_prompt)


# -- the template, taken apart ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers_and_message_by_message(gemma, name, add_generation_prompt):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    conversation = CONVERSATIONS[name]
    (expected,), _ = chat_template_utils.render_jinja_template(
        conversations=[conversation], chat_template=GEMMA3, add_generation_prompt=add_generation_prompt,
        bos_token="<bos>", eos_token="<eos>")
    assert rendered(conversation, add_generation_prompt) == expected
    assert gemma.text(conversation, add_generation_prompt) == expected
    listed = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in conversation]
    (as_parts,), _ = chat_template_utils.render_jinja_template(
        conversations=[listed], chat_template=GEMMA3, add_generation_prompt=add_generation_prompt,
        bos_token="<bos>", eos_token="<eos>")
    assert rendered(listed, add_generation_prompt) == as_parts == expected


def test_the_shape_gemma_3_writes(vocab, gemma):
    _, tok, _ = vocab
    assert gemma.roles == {"system": ("<start_of_turn>user\n", "\n\n"),
                           "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
                           "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n")}
    assert (gemma.lead, gemma.generation_prompt, gemma.stop) == ("<bos>", "<start_of_turn>model\n", ("<end_of_turn>",))
    assert gemma.system_in_user and gemma.trim == ("user", "assistant")
    assert (gemma.name, gemma.default_system) == ("Gemma", None)
    renderer = Renderer(tok, gemma)
    assert renderer.stop_ids == (tok.special["<end_of_turn>"],) and renderer.stop_strings == ()
    assert special_parts(gemma, tok.special) == {"<bos>", "<start_of_turn>", "<end_of_turn>"}
    assert special_parts(gemma) == set()  # nothing written like <|...|>


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_ids_are_the_rendered_texts(vocab, gemma, name):
    """Message by message, the ids are those of the whole rendered prompt: its markers by id, the
    system text's "\n\n" and the user's text apart as the tokenizer cuts them anyway."""
    _, tok, _ = vocab
    renderer = Renderer(tok, gemma)
    conversation = CONVERSATIONS[name]
    ids = renderer.fixed(gemma.lead) + renderer.conversation(conversation)[0] + renderer.generation_prompt()
    assert ids == tok.encode(rendered(conversation), special=True)
    assert ids[:2] == [tok.bos_id, tok.special["<start_of_turn>"]]


def test_a_fine_tune_learns_the_replies_and_their_end(vocab, gemma):
    _, tok, _ = vocab
    conversation = CONVERSATIONS["multi-turn"]
    ids, mask = Renderer(tok, gemma).conversation(conversation, train=True)
    learned = [i for i, k in zip(ids, mask) if k]
    assert learned == tok.encode("Once upon a time...", special=False) + tok.encode("<end_of_turn>\n", special=True)


def test_stored_taken_apart_and_read_back(gemma):
    d = gemma.to_dict()
    assert d["system_in_user"] is True and d["trim"] == ["user", "assistant"]
    assert ChatTemplate.from_dict(json.loads(json.dumps(d))) == gemma
    older = {k: v for k, v in d.items() if k not in ("system_in_user", "trim")}  # as stored before them
    assert ChatTemplate.from_dict(older) == ChatTemplate(**{**gemma.__dict__, "system_in_user": False, "trim": ()})
    assert "system_in_user" not in PLAIN.to_dict() and "trim" not in PLAIN.to_dict()
    for bad in ({"system_in_user": "yes"}, {"trim": ["user", "tool"]}, {"trim": "user"}):
        with pytest.raises(TinygenError, match="malformed"):
            ChatTemplate.from_dict({**d, **bad})


def test_markers_are_special_tokens_in_order_of_place():
    special = {"<eos>": 1, "<end_of_turn>": 106, "\n": 107, "\n\n": 108, "<end": 9}
    assert markers("x<end_of_turn>\n\n<eos>", special) == ["<end_of_turn>", "<end", "<eos>"]
    assert markers("\n\n", special) == []  # whitespace tokens mark nothing


@pytest.mark.parametrize("body,trim", [
    ("{{ m.content | trim }}", ("system", "user", "assistant")),
    ("{{ m.content }}", ()),
    ("{% if m.role == 'user' %}{{ m.content | trim }}{% else %}{{ m.content }}{% endif %}", ("user",)),
], ids=["trims", "keeps", "trims-user"])
def test_trimming_is_read_from_the_template(vocab, body, trim):
    """A template with a turn of its own for the system message (not folded), trimming as it says."""
    _, tok, _ = vocab
    source = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n" + body + "<end_of_turn>\n"
              "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")
    template = from_jinja(tok.__class__.from_dict({**tok.to_dict(), "jinja_template": source}))
    assert template.trim == trim and not template.system_in_user
    assert template.roles["system"] == ("<start_of_turn>system\n", "<end_of_turn>\n") and template.lead == "<bos>"


def test_templates_it_cannot_take_apart_are_refused(vocab):
    _, tok, _ = vocab
    stripped_right = ("{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content.rstrip() }}<end_of_turn>\n"
                      "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")
    no_marker = GEMMA3.replace("<end_of_turn>", "</turn>")
    for source, why in ((stripped_right, "differs"), (no_marker, "no special token ends")):
        with pytest.raises(TinygenError, match=why):
            from_jinja(tok.__class__.from_dict({**tok.to_dict(), "jinja_template": source}))


def test_gemma_refuses_turns_out_of_order():
    with pytest.raises(TinygenError, match="must alternate"):
        rendered([{"role": "assistant", "content": "hi"}])


# -- a small Gemma 3 that chats in it ---------------------------------------------------------------------

def write_gemma(path: Path, vocab, monkeypatch, template: str | None = GEMMA3) -> Path:
    """A small random Gemma 3 as a GGUF, with the vocabulary's tokenizer fields and `template`."""
    fields, tok, _ = vocab
    more = {**fields, "tokenizer.chat_template": template}
    monkeypatch.setattr(gemma_files, "gguf_tokenizer_fields", lambda ranks, special: more)
    return write_gemma3_gguf(path, gemma3_model(tok.n_vocab), [])


@pytest.fixture()
def gemma_gguf(tmp_path, vocab, monkeypatch):
    return write_gemma(tmp_path / "tiny-gemma.gguf", vocab, monkeypatch)


def test_chat_session_prompts_as_the_template_does(gemma_gguf):
    from tinygen.core.checkpoint import load_model
    from tinygen.generate.chat import ChatSession
    from tinygen.generate.sampling import SamplingParams

    net, tok, _ = load_model(gemma_gguf)
    session = ChatSession(net, tok, SamplingParams(temperature=0), max_tokens=6)
    assert session.template.name == "Gemma" and session.template.system_in_user
    assert tok.special["<end_of_turn>"] in session._stop_ids
    reply = "".join(session.reply(QUESTION + "  "))
    assert session.last.completion.n_tokens > 0 and "<end_of_turn>" not in reply
    session.messages.append(session._message("user", "Thanks!"))
    assert session.prompt_ids() == tok.encode(rendered(session.transcript()), special=True)


def test_chat_session_with_a_system_prompt(gemma_gguf):
    from tinygen.core.checkpoint import load_model
    from tinygen.generate.chat import ChatSession
    from tinygen.generate.sampling import SamplingParams

    net, tok, _ = load_model(gemma_gguf)
    session = ChatSession(net, tok, SamplingParams(temperature=0), max_tokens=6, system="Be brief.\n")
    assert session.fixed_ids() == tok.encode("<bos><start_of_turn>user\nBe brief.\n\n\n", special=True)
    session.messages.append(session._message("user", QUESTION))
    assert session.prompt_ids() == tok.encode(rendered(session.transcript()), special=True)
    session.messages.pop()
    "".join(session.reply(QUESTION))
    session.messages.append(session._message("user", "Thanks!"))
    assert session.prompt_ids() == tok.encode(rendered(session.transcript()), special=True)


def test_chat_cli(cli, gemma_gguf):
    r = cli("chat", "-m", gemma_gguf, "--prompt", QUESTION, "-n", "6", "-t", "0")
    assert_ok(r)
    assert "<end_of_turn>" not in r.out and "<start_of_turn>" not in r.out
    assert "not chat-tuned" not in r.err and "no chat template" not in r.err


def test_without_a_template_only_a_tuned_name_gets_gemmas(cli, tmp_path, vocab, monkeypatch):
    """llama.cpp would chat in ChatML; a base model keeps tinygen's plain transcript."""
    tuned = write_gemma(tmp_path / "tiny-gemma-3-it.gguf", vocab, monkeypatch, template=None)
    base = tmp_path / "tiny-gemma-3.gguf"
    shutil.copy(tuned, base)
    r = cli("chat", "-m", tuned, "--prompt", QUESTION, "-n", "4", "-t", "0")
    assert_ok(r)
    assert "no chat template came with the model: using Gemma 3's" in r.err and "not chat-tuned" not in r.err
    r = cli("chat", "-m", base, "--prompt", QUESTION, "-n", "4", "-t", "0")
    assert_ok(r)
    assert "not chat-tuned" in r.err and "Gemma 3's" not in r.err


def test_a_hugging_face_folder_without_a_template(tmp_path, vocab):
    from tinygen.core.checkpoint import load_tokenizer, read_info

    _, tok, proto = vocab
    for name, expected in (("gemma-3-tiny-it", "Gemma"), ("gemma-3-tiny", None)):
        folder = tmp_path / name
        gemma3_model(tok.n_vocab).save_pretrained(folder, safe_serialization=True)
        (folder / "tokenizer.model").write_bytes(proto)
        (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
        info = read_info(folder)
        template = template_for(load_tokenizer(info=info))
        assert (template.name if template.tuned else None) == expected
        assert any("Gemma 3's" in note for note in info.notes) == (expected is not None)


def test_known_templates_need_family_markers_and_a_tuned_name():
    markers_ = ["<start_of_turn>", "<end_of_turn>"]
    assert known_template("gemma3", markers_, ["Gemma 3 270m It"]).source == GEMMA3
    assert known_template("gemma3", markers_, [None, "Gemma 3 270m", "gemma-3-270m-it-Q4_K_M.gguf"]) is not None
    assert known_template("gemma3", markers_, ["Gemma 3 270m", "gemma-3-270m-q4_k_m.gguf"]) is None
    assert known_template("llama", markers_, ["it"]) is None
    assert known_template("gemma3", markers_[:1], ["it"]) is None


# -- the real Gemma 3 270M ----------------------------------------------------------------------------------

needs_real = pytest.mark.skipif(not REAL.exists(), reason="no Gemma 3 270M GGUF in /work/models")


@needs_real
def test_the_real_base_model_answers_in_a_plain_transcript(cli):
    """The file holds the pretrained model and no template: under Gemma's it repeats the question
    (llama.cpp alike); in the plain transcript it answers."""
    r = cli("chat", "-m", REAL, "--prompt", QUESTION, "-n", "24", "-t", "0", timeout=300)
    assert_ok(r)
    assert "Paris" in r.out and "not chat-tuned" in r.err, (r.out, r.err)


@needs_real
def test_the_real_vocabulary_under_gemmas_template():
    """Gemma's template on the real vocabulary: ChatSession's prompt is the rendered text's ids (and
    llama.cpp's, where installed); greedy replies match llama.cpp's token for token."""
    from tinygen.core.checkpoint import load_model
    from tinygen.generate.chat import ChatSession
    from tinygen.generate.sampling import SamplingParams

    net, tok, _ = load_model(REAL)
    assert tok.jinja_template is None
    tok.jinja_template = GEMMA3
    session = ChatSession(net, tok, SamplingParams(temperature=0), max_tokens=12)
    session.messages.append(session._message("user", QUESTION))
    text = rendered(session.transcript())
    prompt = session.prompt_ids()
    assert prompt == tok.encode(text, special=True)
    session.messages.pop()
    reply = "".join(session.reply(QUESTION))
    try:
        import llama_cpp
    except ImportError:
        return
    ref = llama_cpp.Llama(str(REAL), n_ctx=256, n_threads=2, verbose=False)
    assert ref.tokenize(text.encode(), add_bos=False, special=True) == prompt
    ref.eval(prompt)
    out = []
    for _ in range(12):
        out.append(ref.sample(temp=0.0))
        if out[-1] in session._stop_ids:
            break
        ref.eval(out[-1:])
    assert reply.strip() == ref.detokenize([t for t in out if t not in session._stop_ids]).decode().strip()
