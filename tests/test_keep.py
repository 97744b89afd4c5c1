"""The context window keeps its start (llama.cpp's n_keep): when a generation or a chat slides past
the model's context, BOS and the system prompt stay and the newest tokens fill the rest. Each
cached decode equals a full recompute over the window the cache holds."""

from __future__ import annotations

import pytest
import torch
from conftest import STORY_LINES, make_model
from test_imported import write_llama3_gguf

from tinygen.core.checkpoint import load_model
from tinygen.core.config import ModelConfig
from tinygen.core.tokenizer import Tokenizer
from tinygen.generate import engine
from tinygen.generate.chat import ChatSession
from tinygen.generate.engine import naive_generate, stream, window_keep, window_of
from tinygen.generate.sampling import SamplingParams
from tinygen.generate.textgen import Completion, Request, TextGenerator

GREEDY = SamplingParams(temperature=0)


def recomputed(model, prompt: list[int], n: int, keep: int) -> list[int]:
    """Greedy decoding by full recompute over exactly the window the engine's cache holds: the
    kept first tokens and the newest, dropping a quarter of the context at each slide."""
    block = model.config.block_size
    keep = min(keep, block // 2)
    held, out = window_of(prompt, keep, block), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([held]))[0, -1].argmax())
            out.append(t)
            if len(held) == block:
                held = held[:keep] + held[len(held) - (window_keep(block) - keep):]
            held.append(t)
    return out


@pytest.fixture
def model():
    return make_model(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=97), scale=3.0)


@pytest.fixture
def refills(monkeypatch):
    """The token windows every slide rebuilds a cache from, in order."""
    seen = []
    original = engine.Batch.refill

    def record(self, slot, tokens):
        seen.append(list(tokens))
        return original(self, slot, tokens)

    monkeypatch.setattr(engine.Batch, "refill", record)
    return seen


@pytest.mark.parametrize("keep", [0, 1, 5, 40])
def test_a_long_generation_keeps_its_start_and_decodes_as_recompute_does(model, refills, keep):
    prompt = list(range(1, 11))
    n = 3 * model.config.block_size
    out = list(stream(model, prompt, GREEDY, n, keep=keep))
    assert out == recomputed(model, prompt, n, keep)
    block = model.config.block_size
    kept = min(keep, block // 2)  # at most half the context: here the prompt and the first tokens made
    assert len(refills) >= 3
    assert all(w[:kept] == (prompt + out)[:kept] and len(w) == window_keep(block) for w in refills)
    assert out[: block - len(prompt)] == naive_generate(model, prompt, block - len(prompt))  # until the first slide


def test_a_prompt_longer_than_the_context_keeps_its_first_tokens(model):
    block = model.config.block_size
    prompt = torch.randint(1, 97, (block + 20,)).tolist()
    cut = prompt[:3] + prompt[-(block - 3):]
    assert list(stream(model, prompt, GREEDY, 5, keep=3)) == list(stream(model, cut, GREEDY, 5))
    assert list(stream(model, prompt, GREEDY, 5)) == list(stream(model, prompt[-block:], GREEDY, 5))


def test_rows_of_a_batch_keep_their_own_start(model):
    prompts = [list(range(1, 20)), [5, 6, 7]]
    n = 2 * model.config.block_size
    batched = engine.generate_batch(model, prompts, GREEDY, n, keep=[4, 1])
    assert batched == [recomputed(model, p, n, k) for p, k in zip(prompts, (4, 1))]


# -- a model with BOS: generation and chat ----------------------------------------------------------


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A GGUF of a tiny Llama 3 style model (BOS before every text, a chat template that opens with
    it) with a context of 128 tokens; the special tokens' head rows are zero, so replies never end
    early and run past the context."""
    tok = Tokenizer.train(STORY_LINES * 20, vocab_size=400)
    path = write_llama3_gguf(tmp_path_factory.mktemp("keep") / "llama3.gguf", tok, block=128)
    net, tok, _ = load_model(path)
    return net, tok


def test_a_long_generation_from_a_bos_model_keeps_bos(llama3, refills):
    net, tok = llama3
    textgen = TextGenerator(net, tok)
    request = Request("Once upon a time", GREEDY, 3 * net.config.block_size)
    result = Completion()
    "".join(textgen.stream(request, result))
    assert textgen.encode_prompt(request.prompt)[0] == tok.bos_id
    assert result.n_tokens == 3 * net.config.block_size  # nothing ended it: it slid several times
    assert len(refills) >= 3 and all(w[0] == tok.bos_id and tok.bos_id not in w[1:] for w in refills)


def test_a_chat_keeps_bos_and_the_system_prompt_as_it_slides(llama3, refills):
    net, tok = llama3
    session = ChatSession(net, tok, GREEDY, max_tokens=80, system="Be kind.")
    fixed = session.fixed_ids()
    assert fixed[0] == tok.bos_id and tok.decode(fixed).endswith("Be kind.<|eot_id|>")
    for i in range(4):
        "".join(session.reply(f"Tell me about Spot, number {i}."))
        assert session.prompt_ids()[:len(fixed)] == fixed
        assert session.kv.ids[:len(fixed)] == fixed  # what the cache holds after the reply, slid or not
    assert session.last.trimmed > 0 and refills  # history was trimmed, and replies slid past the context
    assert all(w[:len(fixed)] == fixed for w in refills)


def test_a_chat_after_a_slide_reuses_the_kept_start_and_answers_as_without_a_cache(llama3):
    net, tok = llama3
    cached = ChatSession(net, tok, GREEDY, max_tokens=80, system="Be kind.")
    fresh = ChatSession(net, tok, GREEDY, max_tokens=80, system="Be kind.", keep_cache=False)
    for i in range(3):
        a = "".join(cached.reply(f"Where is the ball, {i}?"))
        b = "".join(fresh.reply(f"Where is the ball, {i}?"))
        assert a == b
        assert cached.last.context > net.config.block_size  # each reply ran past the context
    assert cached.last.reused >= len(cached.fixed_ids())  # the kept start came back from the cache
