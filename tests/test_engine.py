"""Generation: the KV-cache path equals full recompute, batching equals single prompts, and the
context window slides instead of crashing."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, q8_0_like

from tinygen.core.config import ModelConfig
from tinygen.generate.engine import (
    generate,
    generate_batch,
    naive_generate,
    stream,
    window_keep,
)
from tinygen.generate.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(params=["rope", "gpt2"])
def model(request):
    config = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=48, vocab_size=97, arch=request.param)
    return make_model(config, scale=3.0)


def test_cached_greedy_equals_full_recompute(model):
    torch.manual_seed(1)
    for length in (1, 5, 17):
        prompt = torch.randint(0, 97, (length,)).tolist()
        n = model.config.block_size - length  # stays within the context
        assert list(stream(model, prompt, GREEDY, n)) == naive_generate(model, prompt, n)


def test_batched_equals_unbatched(model):
    torch.manual_seed(2)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 1, 7, 20)]
    batched = generate_batch(model, prompts, GREEDY, 20)
    assert batched == [list(stream(model, p, GREEDY, 20)) for p in prompts]
    assert batched == [naive_generate(model, p, 20) for p in prompts]


def test_generation_past_the_context_slides(model):
    block = model.config.block_size
    prompt = list(range(10))
    out = list(stream(model, prompt, GREEDY, 3 * block))
    assert len(out) == 3 * block
    # Until the context first fills, nothing differs from full recompute.
    assert out[: block - len(prompt)] == naive_generate(model, prompt, block - len(prompt))


def test_prompt_longer_than_context_keeps_the_tail(model):
    block = model.config.block_size
    long_prompt = torch.randint(0, 97, (block + 30,)).tolist()
    tail = long_prompt[-block:]
    assert list(stream(model, long_prompt, GREEDY, 5)) == list(stream(model, tail, GREEDY, 5))
    assert window_keep(block) < block


def test_stop_ids_end_rows_independently(model):
    prompts = [[1, 2, 3], [4, 5]]
    free = generate_batch(model, prompts, GREEDY, 12)
    stop = free[0][4]
    stopped = generate_batch(model, prompts, GREEDY, 12, stop_ids={stop})
    first = free[0].index(stop)
    assert stopped[0] == free[0][:first]
    if stop in free[1]:
        assert stopped[1] == free[1][: free[1].index(stop)]
    else:
        assert stopped[1] == free[1]


def test_done_callback_stops_a_row(model):
    seen = []
    steps = generate(model, [[1, 2], [3, 4]], GREEDY, 10, done=lambda row: row == 0 and len(seen) >= 2)
    for step in steps:
        seen.extend(r for r, _ in step if r == 0)
    assert len(seen) == 2


def test_seeded_sampling_is_reproducible(model):
    params = SamplingParams(temperature=1.0, top_k=20)
    runs = [
        generate_batch(model, [[1, 2, 3]] * 3, params, 15, generator=torch.Generator().manual_seed(5))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    other = generate_batch(model, [[1, 2, 3]] * 3, params, 15, generator=torch.Generator().manual_seed(6))
    assert other != runs[0]


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


SAMPLED = SamplingParams(temperature=1.2, top_k=40)


def test_a_sampled_row_depends_only_on_its_own_prompt_settings_and_seed(model):
    """The same request gives the same completion alone, beside others, in any slot, at any batch
    size, and whether its neighbours finish early or late."""
    prompts = [[1, 2, 3], [7], [4, 5, 6, 8, 9], [1, 2, 3], [11, 12]]
    seeds = [3, 9, 4, 3, 5]  # rows 0 and 3 are the same request
    alone = [generate_batch(model, [p], SAMPLED, 20, generator=seeded(s))[0] for p, s in zip(prompts, seeds)]
    assert alone[0] == alone[3]
    assert len({tuple(a) for a in alone}) == 4  # different seeds or prompts do differ
    for batch_size in (None, 1, 2, 3):
        got = generate_batch(model, prompts, SAMPLED, 20, generator=seeded(*seeds), batch_size=batch_size)
        assert got == alone, batch_size
    order = [4, 2, 0, 3, 1]  # other slots and neighbours
    got = generate_batch(model, [prompts[i] for i in order], SAMPLED, 20, generator=seeded(*(seeds[i] for i in order)),
                         batch_size=2)
    assert got == [alone[i] for i in order]
    # Neighbours that stop early (short limits) free their slots for others mid-run.
    limits = [20, 2, 20, 20, 3]
    got = generate_batch(model, prompts, SAMPLED, limits, generator=seeded(*seeds), batch_size=2)
    assert got == [a[:n] for a, n in zip(alone, limits)]


def test_rows_with_different_settings_share_one_batch(model):
    settings = [GREEDY, SamplingParams(temperature=0.7, top_p=0.8), SamplingParams(temperature=1.5, min_p=0.05),
                SamplingParams(temperature=1.0, top_k=5, repetition_penalty=1.3),
                SamplingParams(temperature=0, repetition_penalty=2.0)]
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [3, 2, 1]]
    alone = [generate_batch(model, [p], s, 15, generator=seeded(i))[0] for i, (p, s) in enumerate(zip(prompts, settings))]
    widths = []
    together: list[list[int]] = [[] for _ in prompts]
    for step in generate(model, prompts, settings, 15, generator=seeded(*range(5))):
        widths.append(len(step))
        for row, token in step:
            together[row].append(token)
    assert together == alone
    assert max(widths) == len(prompts)  # one generation, not group after group


def naive_penalised_greedy(model, prompt: list[int], n: int, penalty: float) -> list[int]:
    """Greedy with the CTRL penalty applied by hand to every token seen so far: the reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[ids] = True
            logits = torch.where(seen & (logits > 0), logits / penalty, torch.where(seen, logits * penalty, logits))
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_repetition_penalty_is_applied_to_every_token_seen(model):
    prompt = [1, 2, 3]
    plain = list(stream(model, prompt, GREEDY, 30))
    penalised = list(stream(model, prompt, SamplingParams(temperature=0, repetition_penalty=5.0), 30))
    assert penalised == naive_penalised_greedy(model, prompt, 30, 5.0)
    assert penalised != plain


def test_identical_prompts_are_prefilled_once(model, monkeypatch):
    calls = []
    hidden = model.hidden

    def counting(idx, *args, **kw):
        calls.append(tuple(idx.shape))
        return hidden(idx, *args, **kw)

    monkeypatch.setattr(model, "hidden", counting)
    prompt = [5, 6, 7, 8, 9, 10]
    got = generate_batch(model, [prompt] * 4, SAMPLED, 6, generator=seeded(1, 2, 3, 4))
    assert calls[0] == (1, len(prompt)) and all(shape == (4, 1) for shape in calls[1:])  # then decode steps of 4
    monkeypatch.setattr(model, "hidden", hidden)
    assert got == [generate_batch(model, [prompt], SAMPLED, 6, generator=seeded(s))[0] for s in (1, 2, 3, 4)]


@pytest.mark.parametrize("block", [1, 2, 3, 4])
def test_tiny_contexts_slide_like_full_recompute(block):
    """With a context of a few tokens the window keeps block - 1 of them: exactly what recomputing
    over the last block tokens sees (a context of 1 crashed here before)."""
    model = make_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=block, vocab_size=31), scale=3.0)
    for prompt in ([3], [1, 2, 3, 4, 5]):
        assert list(stream(model, prompt, GREEDY, 12)) == naive_generate(model, prompt, 12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu_greedy_prefix():
    config = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=48, vocab_size=97)
    cpu = make_model(config, scale=3.0)
    gpu = make_model(config, scale=3.0).to("cuda", torch.bfloat16)
    prompt = [1, 2, 3, 4]
    a = list(stream(cpu, prompt, GREEDY, 8))
    b = list(stream(gpu, prompt, GREEDY, 8))
    assert a[:3] == b[:3]  # bf16 rounding may flip a near-tie later on


def test_sliding_in_a_batch_is_per_row(model):
    """A row that fills its context slides alone; a short row beside it is unaffected."""
    block = model.config.block_size
    long_row, short_row = list(range(block - 1)), [5, 6, 7]
    batched = generate_batch(model, [long_row, short_row], GREEDY, 30)
    assert batched[1] == list(stream(model, short_row, GREEDY, 30))
    assert batched[0] == list(stream(model, long_row, GREEDY, 30))


def test_continuous_batching_refills_slots_and_matches_unbatched(model):
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [2, 3]]
    limits = {0: 3, 2: 4}  # rows that end early (as a stop string would end them) free their slots
    finished, made = [], {}

    def done(row):
        return row in limits and len(made.get(row, [])) >= limits[row]

    steps = generate(model, prompts, GREEDY, 12, done=done, batch_size=2, finished=finished.append)
    widths = []
    for step in steps:
        widths.append(len(step))
        for row, token in step:
            made.setdefault(row, []).append(token)
    assert max(widths) == 2  # never more rows at once than asked for
    assert sorted(finished) == list(range(len(prompts))) and finished[0] == 0  # the early finisher leaves first
    for row, prompt in enumerate(prompts):
        assert made[row] == naive_generate(model, prompt, limits.get(row, 12)), row


def test_the_cache_holds_what_the_longest_request_reaches(model, monkeypatch):
    from tinygen.generate import forward

    sizes = []

    class Recorded(forward.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sizes.append(self.max_len)

    monkeypatch.setattr(forward, "KVCache", Recorded)
    prompts = [[1, 2, 3], [4] * 9, [5, 6]]
    limits = [4, 6, 20]  # the last row, admitted into a slot later, reaches 22 slots
    assert generate_batch(model, prompts, GREEDY, limits, batch_size=1) == \
        [naive_generate(model, p, n) for p, n in zip(prompts, limits)]
    assert sizes[0] == 22  # the batch's cache; refills prefill into caches of their own prompt's size
    assert sizes[1:] == [8, 1]
    sizes.clear()
    block = model.config.block_size
    out = list(stream(model, [1, 2], GREEDY, 2 * block))  # past the context: the cache is the whole context
    assert sizes[0] == block and len(out) == 2 * block


def _can_build_cpu_kernels() -> bool:
    import sysconfig
    from pathlib import Path

    return bool(shutil.which("g++") or shutil.which("c++")) and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()


@pytest.fixture
def split_everything(monkeypatch):
    """Send every decode matmul through the split product, on two threads."""
    from tinygen.generate import fastlinear, plan

    monkeypatch.setattr(plan, "SPLIT_MIN_WEIGHTS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield fastlinear
    torch.set_num_threads(threads)


def test_split_decode_matmul_equals_linear(split_everything):
    torch.manual_seed(4)
    for rows, n, bias in ((1, 97, True), (3, 64, False), (4, 33, True), (6, 10, True)):  # 6 rows: plain path
        linear = torch.nn.Linear(24, n, bias=bias)
        x = torch.randn(rows, 1, 24)
        torch.testing.assert_close(split_everything.SplitLinear(linear)(x), linear(x))


def test_split_layers_are_swapped_in_for_inference_only(model, split_everything):
    torch.manual_seed(5)
    prompts = [[3, 1, 4, 1, 5]], [[2, 7], [1, 8, 2, 8], [9]]  # batch 1, and batches of up to 3 rows
    expected = [[naive_generate(model, p, 25) for p in ps] for ps in prompts]
    from tinygen.generate.plan import prepare

    plain = make_model(model.config, scale=3.0)
    fast = prepare(plain).model
    assert isinstance(fast.lm_head, split_everything.SplitLinear)
    assert fast.lm_head.weight is fast.transformer.wte.weight  # still tied
    assert fast.state_dict().keys() == model.state_dict().keys()
    assert not any(isinstance(m, split_everything.SplitLinear) for m in plain.modules())  # the caller's stays plain
    for ps, want in zip(prompts, expected):
        assert generate_batch(fast, ps, GREEDY, 25) == want


def test_int8_blocks_give_back_a_q8_0_matrix_exactly():
    from tinygen.generate.fastlinear import exact_int8_blocks

    torch.manual_seed(7)
    w = q8_0_like(40, 96)
    w[3, 32:64] = 0  # an all-zero block
    codes, scales = exact_int8_blocks(w)
    assert codes.dtype == torch.int8 and scales.shape == (40, 3)
    assert torch.equal(codes.float().view(40, 3, 32) * scales[..., None], w.view(40, 3, 32))
    assert exact_int8_blocks(torch.randn(40, 96)) is None  # ordinary float weights: not int8 blocks
    assert exact_int8_blocks(w[:, :80]) is None  # not whole blocks
    assert exact_int8_blocks(w * 1.001) is None  # no longer 127 codes of one scale


@pytest.mark.skipif(not _can_build_cpu_kernels(), reason="torch.compile on a CPU needs a C++ compiler and Python's headers")
def test_a_compiled_step_multiplies_the_int8_blocks(tmp_path, monkeypatch, split_everything):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(8)
    linear = torch.nn.Linear(64, 48, bias=True)
    linear.weight.data = q8_0_like(48, 64)
    x = torch.randn(1, 1, 64)
    want = linear(x)
    layer = split_everything.SplitLinear(linear)
    assert layer.keep_int8_blocks()
    linear.weight.data.zero_()  # from here on, only the codes hold the matrix
    step = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(step(x), want)
    torch.testing.assert_close(layer(x), linear(x))  # eager steps still read the float weight


@pytest.mark.skipif(not _can_build_cpu_kernels(), reason="torch.compile on a CPU needs a C++ compiler and Python's headers")
def test_a_compiled_step_multiplies_a_small_layer_as_a_fused_reduction(tmp_path, monkeypatch):
    from tinygen.generate.fastlinear import SmallLinear
    from tinygen.generate.plan import prepare

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(9)
    model = make_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=64)).eval()
    model = prepare(model, compile=True).model  # the small layers swapped in, sharing their parameters
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, SmallLinear)
    assert model.lm_head.weight is model.transformer.wte.weight  # a tied head stays tied
    x = torch.randn(1, 1, 32)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), F.linear(x, layer.weight, layer.bias))
    many = torch.randn(1, 9, 32)  # a prefill's rows: the plain product
    torch.testing.assert_close(layer(many), F.linear(many, layer.weight, layer.bias))


def _static_greedy_matches(model, compile: bool, decoder=None):
    from tinygen.generate.compiled import StaticDecoder

    decoder = decoder or StaticDecoder(model, compile=compile)
    torch.manual_seed(6)
    for length in (1, 9):  # fresh decoders and reused ones must both start clean
        prompt = torch.randint(0, 97, (length,)).tolist()
        n = model.config.block_size + 10  # past the context: the window slides inside the static cache
        assert list(stream(model, prompt, GREEDY, n, decoder=decoder)) == list(stream(model, prompt, GREEDY, n))
    prompts = [[1, 2, 3], [4, 5], [6]]  # one slot, refilled twice
    assert generate_batch(model, prompts, GREEDY, 8, batch_size=1, decoder=decoder) == \
        [naive_generate(model, p, 8) for p in prompts]


def test_static_decoder_equals_the_dynamic_path(model):
    _static_greedy_matches(model, compile=False)


@pytest.mark.skipif(not _can_build_cpu_kernels(), reason="torch.compile on a CPU needs a C++ compiler and Python's headers")
def test_compiled_static_decoder_equals_the_dynamic_path(model, tmp_path, monkeypatch, split_everything):
    # Inductor's own variable, so that the decoder's setdefault leaves it alone and it is restored after.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    from tinygen.generate.plan import prepare

    # With the split layers that a CPU decodes with (the crash: get_num_threads breaks the graph).
    prepared = prepare(model, compile=True)
    assert isinstance(prepared.model.lm_head, split_everything.SplitLinear)
    torch._dynamo.reset()
    # fullgraph=True: a graph break would fail here. The slots a step reads are a dynamic length,
    # so the window sliding up to the whole context must reuse the one compiled step.
    with torch._dynamo.config.patch(error_on_recompile=True):
        _static_greedy_matches(prepared.model, compile=True, decoder=prepared.decoder)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _can_build_cpu_kernels(), reason="torch.compile on a CPU needs a C++ compiler and Python's headers"))])
def test_a_cpu_step_never_reads_the_slots_past_its_position(model, tmp_path, monkeypatch, compile):
    """A CPU step attends over the slots up to its position only, not over a masked whole cache:
    NaN in every later slot (where a masked read would still multiply the values by zero) leaves
    its tokens those of the dynamic path."""
    from tinygen.generate.compiled import StaticDecoder

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    decoder = StaticDecoder(model, compile=compile)
    for t in decoder.cache.tensors():
        t.fill_(float("nan"))  # a prefill writes the prompt's slots, each step its own
    prompt = [5, 17, 3, 3, 40]
    assert list(stream(model, prompt, GREEDY, 20, decoder=decoder)) == list(stream(model, prompt, GREEDY, 20))


@pytest.fixture
def sized_cache(monkeypatch):
    """Give the 48-token test models a CPU decoder's request-sized cache, from 8 slots up."""
    from tinygen.generate import compiled

    monkeypatch.setattr(compiled, "SIZED_ABOVE", 16)
    monkeypatch.setattr(compiled, "FIRST_SLOTS", 8)
    return compiled


def test_a_request_sized_cache_grows_and_decodes_as_the_dynamic_path(model, sized_cache):
    decoder = sized_cache.StaticDecoder(model, compile=False)
    assert decoder.sized and decoder.max_len == 8
    _static_greedy_matches(model, compile=False, decoder=decoder)  # a request past the context: it grows to all 48 slots
    assert decoder.max_len == model.config.block_size


def test_a_chat_keeps_its_cache_when_the_decoders_grows(model, sized_cache):
    from tinygen.generate.context import Context

    decoder, context = sized_cache.StaticDecoder(model, compile=False), Context()
    first = [3, 1, 4, 1, 5]
    reply = list(stream(model, first, GREEDY, 2, decoder=decoder, context=context))
    assert decoder.max_len == 8
    second = first + reply + [9, 2, 6, 5, 3]  # needs 12 + 6 slots: the cache grows
    got = list(stream(model, second, GREEDY, 6, decoder=decoder, context=context))
    assert decoder.max_len > 8 and context.reused == len(first) + len(reply) - 1
    assert got == naive_generate(model, second, 6)


@pytest.mark.skipif(not _can_build_cpu_kernels(), reason="torch.compile on a CPU needs a C++ compiler and Python's headers")
def test_a_compiled_request_sized_cache_grows_without_recompiling(model, tmp_path, monkeypatch, sized_cache):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    decoder = sized_cache.StaticDecoder(model, compile=True)
    # The cache's length is a dynamic dimension: growing it must reuse the one compiled step.
    with torch._dynamo.config.patch(error_on_recompile=True):
        _static_greedy_matches(model, compile=True, decoder=decoder)
    assert decoder.max_len == model.config.block_size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decoder_matches_eager_bf16():
    from tinygen.generate.compiled import StaticDecoder

    config = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=97)
    model = make_model(config, scale=3.0).to("cuda", torch.bfloat16)
    decoder = StaticDecoder(model, compile=True)
    decoder.warm_up()
    prompt = [5, 17, 3, 3, 40]
    fast = list(stream(model, prompt, GREEDY, 40, decoder=decoder))
    eager = list(stream(model, prompt, GREEDY, 40))
    # bf16 kernels differ between the graph and eager; near-ties may flip late, so compare a prefix.
    assert fast[:10] == eager[:10]
    agree = next((i for i, (a, b) in enumerate(zip(fast, eager)) if a != b), len(fast))
    assert agree >= 10


def test_a_model_whose_output_is_not_finite_is_a_user_error(model):
    from tinygen.errors import TinygenError

    broken = make_model(model.config, scale=3.0)
    with torch.no_grad():
        broken.transformer.ln_f.weight.fill_(float("inf"))  # finite weights can overflow to this too
    with pytest.raises(TinygenError, match="not finite"):
        list(stream(broken, [1, 2, 3], SAMPLED, 5))
