"""Chat: the template, loss masking, chat fine-tuning, the session's history, and the CLI in pipes.

The REPL on a real terminal (line editing, Ctrl-C) is in test_chat_tty.py.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinygen.core.checkpoint import load_model, save_checkpoint
from tinygen.core.config import ModelConfig
from tinygen.core.evaluate import score_tokens
from tinygen.core.template import PLAIN, SPECIAL, Renderer, template_for, with_chat_template
from tinygen.core.tokenizer import EOT, Tokenizer
from tinygen.errors import TinygenError
from tinygen.generate.chat import ChatSession
from tinygen.generate.sampling import SamplingParams
from tinygen.training.batches import get_batch
from tinygen.training.chatdata import (
    dolly,
    encode_conversations,
    mixed,
    read_conversations,
    story_request,
    to_jsonl,
    topical_chat,
)

from conftest import STORY_LINES, assert_ok, assert_one_line_error, clean_env, make_model, run_real

CONV = [
    {"role": "system", "content": "You are kind."},
    {"role": "user", "content": "Hi! Say <|end|> please."},
    {"role": "assistant", "content": "Hello, Tom."},
    {"role": "user", "content": "Tell me a story."},
    {"role": "assistant", "content": "Once upon a time, there was a dog."},
]


# -- the template ---------------------------------------------------------------------------------

def test_template_renders_special_tokens_and_keeps_user_text_plain(chat_tokenizer):
    r = Renderer(chat_tokenizer, template_for(chat_tokenizer))
    ids, mask = r.conversation(CONV, train=True)
    sp = chat_tokenizer.special
    assert chat_tokenizer.decode(ids) == ("<|system|>You are kind.<|end|><|user|>Hi! Say <|end|> please.<|end|>"
                                          "<|assistant|>Hello, Tom.<|end|><|user|>Tell me a story.<|end|>"
                                          "<|assistant|>Once upon a time, there was a dog.<|end|>")
    # The "<|end|>" a user typed is ordinary text, not the turn marker: only 5 real <|end|> ids.
    assert ids.count(sp["<|end|>"]) == 5
    assert [i for i in ids if i in chat_tokenizer.special_ids][:3] == [sp["<|system|>"], sp["<|end|>"], sp["<|user|>"]]
    # The mask is exactly the assistant's words plus the <|end|> that closes each reply.
    learned = [i for i, m in zip(ids, mask) if m]
    expected = []
    for text in ("Hello, Tom.", "Once upon a time, there was a dog."):
        expected += chat_tokenizer.encode(text, special=False) + [sp["<|end|>"]]
    assert learned == expected


def test_template_travels_in_the_checkpoint(chat_model_path, tokenizer):
    _, tok, _ = load_model(chat_model_path)
    assert template_for(tok) == SPECIAL
    assert template_for(tokenizer) is PLAIN  # a base model's tokenizer has no template


def test_plain_template_for_base_models(tokenizer):
    r = Renderer(tokenizer, PLAIN)
    ids, _ = r.conversation(CONV[1:3])
    assert tokenizer.decode(ids + r.generation_prompt()) == "User: Hi! Say <|end|> please.\nAssistant: Hello, Tom.\nAssistant:"
    assert r.stop_ids == () and "\n" in r.stop_strings


def test_tokenizer_without_chat_tokens_is_extended():
    base = Tokenizer.train(STORY_LINES * 10, vocab_size=300, special_tokens=(EOT,))
    tok, added = with_chat_template(base)
    assert added == 4 and tok.n_vocab == base.n_vocab + 4
    assert sorted(tok.special.values())[-4:] == list(range(base.n_vocab, base.n_vocab + 4))
    text = "Once upon a time"
    assert tok.encode(text) == base.encode(text)  # ordinary ids never move


# -- loss masking ---------------------------------------------------------------------------------

def test_loss_counts_only_assistant_tokens(chat_tokenizer, chat_model_path):
    model, _, _ = load_model(chat_model_path)
    r = Renderer(chat_tokenizer, SPECIAL)
    data, dropped = encode_conversations([CONV, CONV[1:3]], chat_tokenizer, r, block_size=64)
    assert dropped == 0 and list(data.starts) == [0, 1 + len(r.conversation(CONV)[0])]
    tokens = np.concatenate([data.tokens, np.zeros(80, dtype=data.tokens.dtype)])
    mask = np.concatenate([data.mask, np.zeros(80, dtype=np.uint8)])
    rows = torch.tensor([0, int(data.starts[1])])
    x, y = get_batch(tokens, rows, 40, torch.device("cpu"), mask)
    # Targets survive exactly where the mask says the token is the assistant's.
    for b, start in enumerate(rows.tolist()):
        for t in range(40):
            want = int(tokens[start + t + 1]) if mask[start + t + 1] else -1
            assert y[b, t].item() == want
    with torch.no_grad():
        logits = model(x)
        keep = y >= 0
        manual = F.cross_entropy(logits[keep], y[keep])
        assert torch.allclose(model(x, y), manual, atol=1e-6)
        # The user's words have no say in the loss: changing their targets changes nothing.
        y_plain = torch.where(keep, y, torch.randint_like(y, 0, chat_tokenizer.n_vocab))
        assert not torch.allclose(F.cross_entropy(logits.flatten(0, 1), y_plain.flatten()), manual)
    score = score_tokens(model, tokens[:60], mask=mask[:60], stride=64)
    assert score.tokens == int(mask[1:60].sum())


def test_conversations_without_a_reply_in_the_context_are_dropped(chat_tokenizer):
    r = Renderer(chat_tokenizer, SPECIAL)
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    data, dropped = encode_conversations([long, CONV], chat_tokenizer, r, block_size=64)
    assert dropped == 1 and len(data.starts) == 1


# -- converters -----------------------------------------------------------------------------------

def test_topical_chat_converter_takes_both_sides(tmp_path):
    content = [{"message": m, "agent": a} for m, a in
               [("Hi, how are you?", "agent_1"), ("Good!", "agent_2"), ("Do you like dogs?", "agent_2"),
                ("Yes, I do.", "agent_1"), ("Me too.", "agent_2")]]
    (tmp_path / "valid.json").write_text(json.dumps({"c1": {"content": content}}))
    convs = list(topical_chat([str(tmp_path)]))
    assert convs[0] == [{"role": "user", "content": "Hi, how are you?"},
                        {"role": "assistant", "content": "Good! Do you like dogs?"},  # one agent's run, joined
                        {"role": "user", "content": "Yes, I do."}, {"role": "assistant", "content": "Me too."}]
    assert convs[1] == [{"role": "user", "content": "Good! Do you like dogs?"},
                        {"role": "assistant", "content": "Yes, I do."}]


def test_dolly_converter_drops_rows_that_need_a_passage(tmp_path):
    rows = [{"instruction": "Why is the sky blue?", "response": "Because of Rayleigh scattering."},
            {"instruction": "Summarise the passage.", "response": "It is about cats."},
            {"instruction": "Name a fruit.", "response": ""}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert list(dolly([str(tmp_path / "d.jsonl")])) == [[{"role": "user", "content": "Why is the sky blue?"},
                                                         {"role": "assistant", "content": "Because of Rayleigh scattering."}]]


def test_story_request_names_the_character_and_what_happens():
    story = ("Once upon a time, there was a little dog named Max. One day, Max found a red ball in the park. "
             "He played with the ball all day. The ball was his best friend.")
    requests = {story_request(story, random.Random(seed)) for seed in range(40)}
    assert any("a dog who finds a ball" in r for r in requests), requests
    assert all("story" in r.lower() for r in requests)
    assert any("Max" in r for r in requests)


def test_mix_joins_first_exchanges_from_different_files(tmp_path):
    def write(name, n):
        convs = [[{"role": "user", "content": f"{name} q{i}"}, {"role": "assistant", "content": f"{name} a{i}"},
                  {"role": "user", "content": f"{name} later"}, {"role": "assistant", "content": "x"}] for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(to_jsonl(convs)))
        return str(tmp_path / f"{name}.jsonl")

    sources = [write("chat", 20), write("story", 8), write("quiz", 12)]
    convs = list(mixed(sources, seed=1))
    assert len(convs) == 10  # a quarter of all the conversations
    for conv in convs:
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2) and len(conv) in (4, 6)
        files = [m["content"].split()[0] for m in conv[::2]]
        assert len(set(files)) == len(files)  # each exchange from a different file
        assert all(q["content"].split()[1][1:] == a["content"].split()[1][1:] for q, a in zip(conv[::2], conv[1::2]))
        assert "later" not in str(conv)  # first exchanges only
    assert convs == list(mixed(sources, seed=1)) != list(mixed(sources, seed=2))
    with pytest.raises(TinygenError, match="two or more files"):
        list(mixed(sources[:1]))


def test_bad_chat_data_is_one_clear_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(TinygenError, match="no assistant message"):
        read_conversations([str(path)])
    path.write_text('{"text": "hi"}\n')
    with pytest.raises(TinygenError, match="c.jsonl:1"):
        read_conversations([str(path)])


# -- chat fine-tuning end to end -------------------------------------------------------------------

def test_train_chat_extends_the_vocabulary_and_learns_to_reply(tmp_path):
    base_tok = Tokenizer.train(STORY_LINES * 10, vocab_size=300, special_tokens=(EOT,))
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=base_tok.n_vocab)
    base = tmp_path / "base.safetensors"
    save_checkpoint(base, make_model(config), base_tok)
    convs = [[{"role": "user", "content": f"Hi {i}!"}, {"role": "assistant", "content": "Hello friend."}]
             for i in range(40)]
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    out = tmp_path / "chat.safetensors"
    r = run_real("train", "--chat", data, "--init", base, "--out", out, "--max-steps", "300", "--lr", "1e-2",
                 "--batch-size", "8", "--eval-every", "300", "--warmup-steps", "10")
    assert_ok(r)
    model, tok, info = load_model(out)
    assert tok.n_vocab == base_tok.n_vocab + 4 and model.config.vocab_size == tok.n_vocab
    assert template_for(tok) == SPECIAL and info.provenance["chat"] is True
    # 300 steps on one reply: the model says it, then closes its turn.
    session = ChatSession(model, tok, SamplingParams(temperature=0))
    assert "".join(session.reply("Hi 7!")) == "Hello friend."
    assert session.last.completion.finish_reason == "stop"


def test_train_chat_needs_a_base_model(tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": CONV}) + "\n")
    r = run_real("train", "--chat", data, "--out", tmp_path / "x.safetensors", "--max-steps", "1")
    assert r.rc == 1 and "--init" in r.err and "Traceback" not in r.err


# -- the session ----------------------------------------------------------------------------------

def test_history_is_trimmed_from_the_oldest_turn_and_keeps_the_system_prompt(chat_model_path):
    model, tok, _ = load_model(chat_model_path)
    session = ChatSession(model, tok, SamplingParams(temperature=0), max_tokens=8, system="Be brief.")
    trimmed = 0
    for i in range(6):
        "".join(session.reply(f"Tell me about the dog and the cat, number {i}."))
        assert len(session.prompt_ids()) <= model.config.block_size
        trimmed += session.last.trimmed
    assert trimmed > 0
    assert session.system.content == "Be brief." and session.prompt_ids()[1] == tok.special["<|system|>"]
    assert session.messages[0].role == "user"  # never opens on an orphaned reply
    assert session.messages[-2].content == "Tell me about the dog and the cat, number 5."


def test_session_undo_reset_save_load(chat_model_path, tmp_path):
    model, tok, _ = load_model(chat_model_path)
    session = ChatSession(model, tok, SamplingParams(temperature=0), max_tokens=4, system="Hi.")
    for text in ("one", "two"):
        "".join(session.reply(text))
    assert [m.role for m in session.messages] == ["user", "assistant"] * 2
    assert session.undo() == 2 and [m.content for m in session.messages][:1] == ["one"]
    session.save(tmp_path / "t.json")
    saved = json.loads((tmp_path / "t.json").read_text())["messages"]
    assert saved[0] == {"role": "system", "content": "Hi."} and saved[1] == {"role": "user", "content": "one"}
    session.reset()
    assert session.messages == [] and session.system is not None
    assert session.load(tmp_path / "t.json") == 3 and session.transcript() == saved
    with pytest.raises(TinygenError):
        session.set("temperature", "-1")
    with pytest.raises(TinygenError, match="integer"):
        session.set("top_k", "x")


def test_interrupted_reply_stays_in_the_history(chat_model_path):
    model, tok, _ = load_model(chat_model_path)
    session = ChatSession(model, tok, SamplingParams(temperature=0), max_tokens=50)
    replies = session.reply("hello")
    first = next(replies)
    replies.close()  # what the REPL does on Ctrl-C
    assert session.messages[-1].role == "assistant" and session.messages[-1].content == first.strip()
    assert session.last.interrupted


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_cache_kept_across_turns_gives_the_tokens_of_a_full_prefill(chat_model_path, temperature):
    """Each turn prefills only what the cache does not hold, and the replies are the very ones of a
    session that prefills the whole history every turn: through trimming (the 64-token context
    fills within a few turns), /undo, an interrupted reply and /reset."""
    model, tok, _ = load_model(chat_model_path)

    def conversation(keep: bool):
        session = ChatSession(model, tok, SamplingParams(temperature=temperature), max_tokens=10, seed=5,
                              system="Be brief.", keep_cache=keep)
        replies, reused, trimmed = [], [], 0
        for i, text in enumerate(["hello", "Tell me a story.", "about a dog", "and a cat?", "thanks", "more",
                                  "bye", "again"]):
            if i == 3:
                cut = session.reply(text)
                replies.append(next(cut))
                cut.close()  # Ctrl-C: the next turn cannot trust the cache, and prefills afresh
            else:
                replies.append("".join(session.reply(text)))
            reused.append(session.last.reused)
            trimmed += session.last.trimmed
            if i == 4:
                session.undo()
            if i == 6:
                session.reset()
        return replies, reused, trimmed

    kept, reused, trimmed = conversation(True)
    fresh, none, _ = conversation(False)
    assert kept == fresh and trimmed > 0
    assert set(none) == {0} and reused[0] == 0
    # Turn 2 reuses turn 1's prompt at least; after the interrupted turn nothing is reused; after
    # /undo and /reset the system prompt still is (its ids still lead the prompt).
    assert reused[1] > 10 and reused[4] == 0 and reused[5] > 0 and reused[7] > 0


# -- the CLI in pipes -----------------------------------------------------------------------------

def test_chat_in_a_pipe_prints_one_reply_per_line_of_input(chat_model_path, tmp_path):
    script = "/set max_tokens 6\nhello\n/set temperature 0\n/bogus\nhow are you?\n/save {}\n".format(tmp_path / "s.json")
    r = run_real("chat", "-m", chat_model_path, "--device", "cpu", "--seed", "1", input=script)
    assert_ok(r)
    saved = json.loads((tmp_path / "s.json").read_text())["messages"]
    replies = [m["content"] for m in saved if m["role"] == "assistant"]
    assert [m["content"] for m in saved if m["role"] == "user"] == ["hello", "how are you?"]
    assert r.out == "".join(reply + "\n" for reply in replies)  # only the replies are on stdout
    assert "unknown command /bogus" in r.err and "temperature = 0.0" in r.err


def test_chat_jsonl_and_prompt(chat_model_path):
    r = run_real("chat", "-m", chat_model_path, "--device", "cpu", "--jsonl", "-t", "0", "-n", "5",
                 input='{"role": "system", "content": "Be kind."}\n{"role": "user", "content": "two\\nlines"}\nhi\n')
    assert_ok(r)
    lines = [json.loads(line) for line in r.out.splitlines()]
    assert len(lines) == 2 and all(m["role"] == "assistant" for m in lines)
    one = run_real("chat", "-m", chat_model_path, "--device", "cpu", "--prompt", "hi", "-t", "0", "-n", "5")
    assert_ok(one)
    model, tok, _ = load_model(chat_model_path)
    session = ChatSession(model, tok, SamplingParams(temperature=0, repetition_penalty=1.1), max_tokens=5)
    assert one.out == "".join(session.reply("hi")).strip() + "\n"  # the CLI's defaults, greedy


def test_base_model_chats_in_plain_format(model_path):
    r = run_real("chat", "-m", model_path, "--device", "cpu", "--prompt", "hello", "-n", "20", "--seed", "0")
    assert_ok(r)
    assert "not chat-tuned" in r.err
    assert r.out.count("\n") == 1  # one line: the transcript format ends a reply at the newline


def test_chat_errors_are_one_line(tmp_path):
    r = run_real("chat", "-m", tmp_path / "missing.safetensors", "--prompt", "hi", env=clean_env())
    assert r.rc == 1 and r.err.startswith("error: ") and len(r.err.splitlines()) == 1


def test_chat_commands_in_a_pipe_clear_bye_counts_and_a_save_into_a_missing_folder(cli, chat_model_path, tmp_path):
    missing = tmp_path / "no" / "such" / "t.json"
    script = (f"hello\n/undo\nagain\n/save {missing}\n/save {tmp_path / 'two.json'}\n/clear\n"
              f"/save {tmp_path / 'one.json'}\n/load {tmp_path / 'two.json'}\n/help\n/bye\n"
              f"never\n/save {tmp_path / 'after.json'}\n")
    r = cli("chat", "-m", chat_model_path, "--device", "cpu", "-n", "4", "--system", "Be kind.", input=script)
    assert r.rc == 0 and "Traceback" not in r.err, r.err
    # A folder that does not exist is one error line, not a folder made behind the user's back; the session goes on.
    errors = [line for line in r.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(missing.parent) in errors[0], r.err
    assert not (tmp_path / "no").exists()
    # Counts in words: "1 message", "3 messages", never "message(s)".
    assert "(took back 2 messages)" in r.err and f"(saved 3 messages to {tmp_path / 'two.json'})" in r.err
    assert f"(saved 1 message to {tmp_path / 'one.json'})" in r.err  # /clear kept only the system prompt
    assert json.loads((tmp_path / "one.json").read_text())["messages"] == [{"role": "system", "content": "Be kind."}]
    assert "(loaded 3 messages" in r.err and "(s)" not in r.err
    assert "/clear" in r.err and "/bye" in r.err  # /help lists both
    assert not (tmp_path / "after.json").exists()  # /bye left before the lines after it
    assert len(r.out.splitlines()) >= 2  # the replies to hello and again


def test_chat_refuses_an_empty_prompt(cli, chat_model_path):
    for empty in ("", "  "):
        assert_one_line_error(cli("chat", "-m", chat_model_path, "--device", "cpu", "--prompt", empty),
                              "--prompt is empty")


def test_chat_in_a_pipe_rejects_invalid_utf8_by_line(cli, chat_model_path):
    r = cli("chat", "-m", chat_model_path, "--device", "cpu", "-n", "3", input=b"hello\ncaf\xe9 au lait\nagain\n")
    assert r.rc == 1 and "Traceback" not in r.err
    assert r.err.splitlines() == [r.err.strip()] and r.err.startswith("error: line 2 of stdin is not valid UTF-8")
    assert r.out.endswith("\n")  # line 1 was answered before line 2 was read
    assert_one_line_error(cli("chat", "-m", chat_model_path, "--device", "cpu", input=b"\xff\n"), "line 1")
