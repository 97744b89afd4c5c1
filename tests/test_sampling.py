"""Sampling is a pure function of logits, settings and a generator."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygen.errors import TinygenError
from tinygen.generate.sampling import RowSettings, SamplingParams, logits_to_probs, sample_next


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0)), logits.argmax(-1))


def test_top_k_one_is_argmax_at_any_temperature():
    logits = torch.randn(4, 50)
    ids = sample_next(logits, SamplingParams(temperature=5.0, top_k=1), torch.Generator().manual_seed(0))
    assert torch.equal(ids, logits.argmax(-1))


def test_top_p_keeps_the_smallest_sufficient_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.allclose(probs, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]))
    # The top token alone always survives, however small top_p is.
    assert logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.01))[0, 0] == 1.0


def test_min_p_drops_tokens_relative_to_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, min_p=0.4))  # threshold 0.4 * 0.5 = 0.2
    assert probs[0, 2:].sum() == 0 and probs[0, 1] > 0
    assert logits_to_probs(logits, SamplingParams(temperature=1.0, min_p=0.2))[0, 2] > 0  # 0.15 >= 0.1 stays
    assert torch.isclose(probs.sum(), torch.tensor(1.0))


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold = logits_to_probs(logits, SamplingParams(temperature=0.5))
    warm = logits_to_probs(logits, SamplingParams(temperature=2.0))
    assert cold[0, 0] > logits.softmax(-1)[0, 0] > warm[0, 0]


def test_repetition_penalty_demotes_seen_tokens():
    logits = torch.tensor([[3.0, 2.9, -1.0]])
    seen = torch.tensor([[True, False, True]])
    ids = sample_next(logits, SamplingParams(temperature=0, repetition_penalty=2.0), seen=seen)
    assert ids.item() == 1
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, repetition_penalty=2.0), seen)
    assert probs[0, 2] < logits.softmax(-1)[0, 2]


def test_seeded_generator_reproduces():
    logits = torch.randn(3, 100)
    params = SamplingParams(temperature=1.0)
    a = sample_next(logits, params, torch.Generator().manual_seed(42))
    b = sample_next(logits, params, torch.Generator().manual_seed(42))
    assert torch.equal(a, b)


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(20000, 3)
    ids = sample_next(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=3).float() / ids.numel()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02)


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0), dict(repetition_penalty=0)]
)
def test_invalid_settings_are_user_errors(bad):
    with pytest.raises(TinygenError):
        SamplingParams(**bad)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 30),
    st.floats(0.1, 3.0),
    st.integers(0, 40),
    st.floats(0.05, 1.0),
    st.floats(0.0, 0.9),
    st.integers(0, 2**31 - 1),
)
def test_probs_are_a_distribution_over_allowed_tokens(vocab, temperature, top_k, top_p, min_p, seed):
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    probs = logits_to_probs(logits, params)
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-5)
    assert (probs >= 0).all()
    assert (probs.argmax(-1) == logits.argmax(-1)).all()  # the favourite is never filtered out
    if 0 < top_k < vocab:
        assert ((probs > 0).sum(-1) <= top_k).all()
    ids = sample_next(logits, params, torch.Generator().manual_seed(seed))
    assert (probs.gather(-1, ids[:, None]) > 0).all()


# Any float32 logits, with ties, huge magnitudes and long flat tails; any valid flags.
finite_logits = st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False)
                         | st.sampled_from([0.0, 1.0, -1.0, 1e30, -1e30]), min_size=1, max_size=40)
flags = st.builds(SamplingParams,
                  temperature=st.one_of(st.just(0.0), st.floats(1e-30, 1e30)),
                  top_k=st.integers(0, 50),
                  top_p=st.floats(1e-6, 1.0, exclude_min=False),
                  min_p=st.floats(0.0, 0.999),
                  repetition_penalty=st.floats(0.01, 100.0))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(finite_logits, flags, st.integers(0, 2**32 - 1)), min_size=1, max_size=4), st.data())
def test_any_logits_and_flags_give_a_distribution(rows, data):
    """Per row: probabilities finite, zero outside the kept set, summing to 1 over it; greedy rows
    are one-hot at the argmax of the (penalised) logits; a drawn token always has probability > 0.
    Rows with different flags share one call, and each row's result is what it gets alone."""
    V = max(len(r[0]) for r in rows)
    logits = torch.tensor([r[0] + [min(r[0])] * (V - len(r[0])) for r in rows], dtype=torch.float32)
    seen = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=V, max_size=V),
                                           min_size=len(rows), max_size=len(rows))))
    params = [r[1] for r in rows]
    settings_ = RowSettings.of(params)
    probs = logits_to_probs(logits, settings_, seen)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    kept = probs > 0
    assert kept.any(-1).all()
    assert torch.allclose(probs.sum(-1), torch.ones(len(rows)), atol=1e-5)
    penalised = torch.stack([torch.where(seen[i] & (logits[i] > 0), logits[i] / p.repetition_penalty,
                                         torch.where(seen[i], logits[i] * p.repetition_penalty, logits[i]))
                             for i, p in enumerate(params)])
    for i, p in enumerate(params):
        alone = logits_to_probs(logits[i : i + 1], p, seen[i : i + 1])[0]
        assert torch.equal(alone, probs[i])  # a row's distribution does not depend on its neighbours
        # The filters never remove every favourite (ties count: a high temperature can make them).
        tempered = logits_to_probs(logits[i : i + 1], SamplingParams(p.temperature, repetition_penalty=p.repetition_penalty),
                                   seen[i : i + 1])[0]
        assert (kept[i] & (tempered == tempered.max())).any()
        if p.greedy:
            assert kept[i].sum() == 1 and penalised[i][probs[i].argmax()] == penalised[i].max()
    generators = [torch.Generator().manual_seed(r[2]) for r in rows]
    ids = sample_next(logits, settings_, generators, seen)
    assert (probs.gather(-1, ids[:, None]) > 0).all()
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    for i in greedy_rows:
        assert penalised[i][ids[i]] == penalised[i].max()
