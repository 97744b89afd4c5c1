"""A sliding-window layer's KV cache is a ring of its window's slots, and reading it computes what a
full-length cache did: the logits of one full pass (and of transformers' Gemma 3) for a prompt and
a generation far longer than the window, at batch 1 and for rows of different lengths, through a
prefill longer than the window, a pass after cached positions, a conversation's reused cache, a
context that slides, and the static decoder's steps, compiled or not."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from test_engine import _can_build_cpu_kernels
from test_keep import recomputed

from tinygen.core.config import ModelConfig
from tinygen.core.kvcache import CacheSlots, KVCache
from tinygen.generate.context import Context
from tinygen.generate.engine import (
    decode,
    extend,
    generate_batch,
    naive_generate,
    prefill,
    stream,
)
from tinygen.generate.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
WINDOW, SEQ = 8, 40
# A small Gemma 3: three sliding layers around a global one, grouped-query attention, heads of 16.
CONFIG = ModelConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=48, head_size=16, block_size=64, vocab_size=97,
                     qk_norm=True, mlp="geglu", post_norms=True, embed_scale=True, rope_theta=1e5,
                     sliding_window=WINDOW, sliding_layers=(0, 1, 3), rope_local_theta=1e3)


@pytest.fixture(scope="module")
def model():
    return make_model(CONFIG, scale=2.0)


def tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, CONFIG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full(model, seq: list[int]) -> torch.Tensor:
    """Logits (T, V) of one pass without a cache: every sliding layer masked to its window."""
    with torch.no_grad():
        return model(torch.tensor([seq]))[0]


def close(got, want) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_sliding_layer_keeps_a_ring_of_its_window():
    cache = KVCache(CONFIG, 2, "cpu", torch.float32, SEQ)
    assert [k.size(2) for k in cache.ks] == [v.size(2) for v in cache.vs] == [WINDOW, WINDOW, SEQ, WINDOW]
    slot = 2 * 2 * 2 * 16 * 4  # keys and values, 2 rows, 2 kv heads of 16 float32
    assert cache.nbytes == (3 * WINDOW + SEQ) * slot
    assert [k.size(2) for k in KVCache(CONFIG, 1, "cpu", torch.float32, 5).ks] == [5] * 4  # shorter than the window
    assert cache.max_len == SEQ and cache.ring_len == WINDOW


@pytest.mark.parametrize("prompt", [3, WINDOW, WINDOW + 1, 20])
def test_decoding_past_the_window_gives_one_full_passs_logits(model, prompt):
    seq = tokens(SEQ)
    with torch.inference_mode():
        cache, logits = prefill(model, [seq[:prompt]], max_len=SEQ)
        steps = [logits[0]]
        for p in range(prompt, SEQ):
            steps.append(decode(model, cache, torch.tensor([seq[p]]), [p])[0])
    close(torch.stack(steps), full(model, seq)[prompt - 1:])


@pytest.mark.parametrize("lengths", [(3, 19), (19, 3), (12, 12)])
def test_rows_of_different_lengths_keep_their_own_windows(model, lengths):
    """Right-padded into one prefill longer than the window, then decoded each at its own position
    (in step when the lengths are equal): every row's logits are those of the row alone."""
    rows = [tokens(n, seed=i) for i, n in enumerate(lengths)]
    more = [tokens(SEQ - max(lengths), seed=5 + i) for i in range(2)]
    with torch.inference_mode():
        cache, logits = prefill(model, rows, max_len=SEQ)
        got, cached = [[row] for row in logits], list(lengths)
        for step in range(len(more[0])):
            logits = decode(model, cache, torch.tensor([m[step] for m in more]), cached)
            for i, row in enumerate(logits):
                got[i].append(row)
            cached = [n + 1 for n in cached]
    for i, row in enumerate(rows):
        close(torch.stack(got[i]), full(model, row + more[i])[len(row) - 1:])


@pytest.mark.parametrize("start, n", [(12, 10), (20, 1), (5, 3), (3, 20), (WINDOW, WINDOW)])
def test_a_pass_after_cached_positions_sees_the_window_before_it(model, start, n):
    """As a conversation's next turn prefills after the tokens it reuses (engine.extend): its
    queries read the ring's earlier positions and their own, then the ring keeps the newest."""
    seq = tokens(SEQ, seed=3)
    S = start + n
    with torch.inference_mode():
        cache, _ = prefill(model, [seq[:start]], max_len=SEQ)
        mask = torch.ones(n, S, dtype=torch.bool).tril(start)[None, None]
        h, _ = model.hidden(torch.tensor([seq[start:S]]), CacheSlots(cache, torch.arange(start, S), S, mask))
        close(model.head(h)[0], full(model, seq[:S])[start:])
        close(extend(model, cache, seq[S:SEQ], S)[0], full(model, seq)[-1])  # the ring kept what comes next needs


def test_the_engine_generates_past_the_window_as_recompute_does(model):
    """Continuous batching admits a row into a finished one's slot: its cache, prefilled alone,
    is copied in from a ring of its own length."""
    prompts = [tokens(3, seed=1), tokens(17, seed=2), tokens(6, seed=3)]
    limits = [30, 20, 25]
    want = [naive_generate(model, p, n) for p, n in zip(prompts, limits)]
    assert generate_batch(model, prompts, GREEDY, limits) == want
    assert generate_batch(model, prompts, GREEDY, limits, batch_size=2) == want


@pytest.mark.parametrize("keep", [0, 3])
def test_a_context_that_slides_keeps_its_start(model, keep):
    prompt = tokens(10, seed=4)
    n = 2 * CONFIG.block_size
    assert list(stream(model, prompt, GREEDY, n, keep=keep)) == recomputed(model, prompt, n, keep)


def test_a_conversation_reuses_its_cache_only_where_the_ring_holds_the_window(model):
    context = Context()
    first = tokens(14, seed=5)
    reply = list(stream(model, first, GREEDY, 6, context=context))
    held = len(context.ids)
    assert held == len(first) + len(reply) - 1 > WINDOW
    assert context.cache.resumes(held, held - 1) and not context.cache.resumes(held, held - 2)
    # The next prompt leaves the cached ids three before their end: the ring has lost the window there.
    second = first + reply[:-3] + tokens(5, seed=6)
    answer = list(stream(model, second, GREEDY, 6, context=context))
    assert answer == naive_generate(model, second, 6) and context.reused == 0
    third = second + answer + tokens(4, seed=7)  # the whole history again: its cache goes on
    assert list(stream(model, third, GREEDY, 6, context=context)) == naive_generate(model, third, 6)
    assert context.reused == len(second) + len(answer) - 1


def test_a_short_cache_grows_into_a_ring():
    """A conversation's cache grows (Context doubles it) from fewer slots than the window to a
    ring: positions keep their keys across the copy."""
    small = KVCache(CONFIG, 1, "cpu", torch.float32, 6)
    for t in small.tensors():
        t.copy_(torch.randn(t.shape))
    grown = KVCache(CONFIG, 1, "cpu", torch.float32, SEQ)
    grown.copy_from(small, 5)
    for layer in range(CONFIG.n_layer):
        assert torch.equal(grown.ks[layer][:, :, :5], small.ks[layer][:, :, :5])
        assert torch.equal(grown.vs[layer][:, :, :5], small.vs[layer][:, :, :5])


@pytest.fixture
def sized(monkeypatch):
    """A CPU decoder's request-sized cache from 4 slots up: its rings start shorter than the window."""
    from tinygen.generate import compiled

    monkeypatch.setattr(compiled, "SIZED_ABOVE", 16)
    monkeypatch.setattr(compiled, "FIRST_SLOTS", 4)
    return compiled


@pytest.mark.parametrize("kind", ["cpu", "sized", "whole-cache"])
def test_the_static_decoder_reads_the_ring(model, kind, sized, monkeypatch):
    """On a CPU a step reads the filled slots; on a GPU (here its eager step) it reads every slot
    under a mask built from its position."""
    if kind != "sized":
        monkeypatch.setattr(sized, "SIZED_ABOVE", 1024)
    decoder = sized.StaticDecoder(model, compile=False)
    if kind == "whole-cache":
        decoder.on_cpu = False
    prompt = tokens(3, seed=8)
    assert list(stream(model, prompt, GREEDY, 50, decoder=decoder)) == naive_generate(model, prompt, 50)
    assert decoder.cache.ring_len == WINDOW


@pytest.mark.skipif(not _can_build_cpu_kernels(), reason="torch.compile on a CPU needs a C++ compiler and Python's headers")
def test_a_compiled_step_reads_the_ring_without_recompiling(model, sized, tmp_path, monkeypatch):
    """One compiled step for a short request, whose rings are shorter than the window, and for a
    long one, whose cache grows to rings of the window and wraps them."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    with torch.inference_mode():  # as its grown caches are: a first cache made outside it recompiles once
        decoder = sized.StaticDecoder(model, compile=True)
    short, long = tokens(2, seed=9), tokens(3, seed=10)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert list(stream(model, short, GREEDY, 2, decoder=decoder)) == naive_generate(model, short, 2)
        assert decoder.cache.ring_len == 5  # 4 slots and the CPU decoder's spare one
        assert list(stream(model, long, GREEDY, 40, decoder=decoder)) == naive_generate(model, long, 40)
    assert decoder.cache.ring_len == WINDOW


def test_transformers_gemma3_gives_the_ring_cached_logits(tokenizer, tmp_path):
    """Against transformers' own sliding window: a prompt of 5, then steps to 40, window 8."""
    pytest.importorskip("transformers")
    from gemma_files import gemma3_model, write_hf_folder

    from tinygen.core.checkpoint import load_model

    vocab = len(tokenizer.ranks) + 1
    hf = gemma3_model(vocab, seed=3, sliding_window=WINDOW, max_position_embeddings=64)
    net, _, _ = load_model(write_hf_folder(tmp_path / "gemma", hf, tokenizer.ranks), device="cpu",
                           dtype=torch.float32)
    seq = torch.randint(0, vocab, (1, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = hf(seq).logits[0]
        cache, logits = prefill(net, [seq[0, :5].tolist()], max_len=SEQ)
        steps = [logits[0]] + [decode(net, cache, seq[0, p:p + 1], [p])[0] for p in range(5, SEQ)]
    assert cache.ring_len == WINDOW
    close(torch.stack(steps), want[4:])
