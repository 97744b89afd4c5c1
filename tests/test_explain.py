"""Next-token views: `sample --explain` shows the sampler's real distribution, and `tokenize
--probs` shows the model's real probability of each token."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tinygen.core.checkpoint import load_model
from tinygen.core.evaluate import score_tokens
from tinygen.generate.sampling import SamplingParams
from tinygen.generate.textgen import Completion, Request, TextGenerator
from tinygen.inspect.explain import explain, surprisal

from conftest import assert_ok, assert_one_line_error


@pytest.fixture(scope="module")
def loaded(model_path):
    model, tok, _ = load_model(model_path)
    return model, tok


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.9, top_k=12, top_p=0.9),
    SamplingParams(temperature=1.3, min_p=0.05, repetition_penalty=1.3),
])
def test_explained_distribution_is_the_one_sampled_from(loaded, params):
    """Replaying the draws from the shown probabilities, with the same seed, picks the same tokens:
    the distribution on screen is the sampler's, float for float."""
    model, tok = loaded
    gen = TextGenerator(model, tok)
    request = Request("Spot liked to", params, max_new_tokens=12, seed=7)
    result = Completion()
    steps = list(explain(gen, request, k=tok.n_vocab, result=result))
    assert len(steps) >= result.n_tokens >= 1
    replay = torch.Generator().manual_seed(7)
    ids = tok.encode("Spot liked to")
    for step in steps:
        sampled = torch.zeros(tok.n_vocab)
        model_p = torch.zeros(tok.n_vocab)
        for c in step.candidates:
            sampled[c.token], model_p[c.token] = c.p_sampled, c.p_model
        assert int(torch.multinomial(sampled[None], 1, generator=replay)) == step.chosen
        # "model" is the plain softmax of the logits for the text so far.
        with torch.no_grad():
            ref = model(torch.tensor([ids]))[0, -1].softmax(-1)
        assert torch.allclose(model_p, ref, atol=1e-5)
        assert step.kept == int((sampled > 0).sum())
        if params.top_k:
            assert step.kept <= params.top_k
        ids.append(step.chosen)
    # The steps are the completion, and explaining does not change what is generated.
    assert result.text == tok.decode([s.chosen for s in steps[: result.n_tokens]]) == "".join(gen.stream(request))


def test_candidates_are_the_likeliest_and_include_the_drawn_token(loaded):
    model, tok = loaded
    gen = TextGenerator(model, tok)
    for step in explain(gen, Request("The sun", SamplingParams(temperature=2.0), max_new_tokens=6, seed=3), k=3):
        assert len(step.candidates) in (3, 4) and step.chosen in [c.token for c in step.candidates]
        assert abs(step.entropy_bits) < math.log2(tok.n_vocab) + 1e-6


def test_surprisal_is_each_tokens_probability_in_context(loaded):
    model, tok = loaded
    ids = tok.encode("Spot liked to run in the park.")
    s = surprisal(model, ids, tok.eot_id)
    stream = [tok.eot_id] + ids
    with torch.no_grad():
        logp = model(torch.tensor([stream]))[0].log_softmax(-1)
    ref = np.exp([float(logp[i, stream[i + 1]]) for i in range(len(ids))])
    assert np.allclose(s.probs, ref, rtol=1e-4)
    assert s.scored == len(ids) and math.isclose(s.perplexity, math.exp(-np.log(ref).mean()), rel_tol=1e-4)
    # Without a start token, the first token has nothing to be predicted from.
    bare = surprisal(model, ids, None)
    assert math.isnan(bare.probs[0]) and np.allclose(bare.probs[1:], np.exp(logp_ids(model, ids)), rtol=1e-4)


def logp_ids(model, ids):
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].log_softmax(-1)
    return np.array([float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)])


def test_surprisal_of_a_long_text_agrees_with_eval(loaded):
    model, tok = loaded
    ids = tok.encode(" ".join(["Spot liked to run in the park with his friend Tom."] * 12))
    assert len(ids) > model.config.block_size
    s = surprisal(model, ids, tok.eot_id)
    assert math.isclose(s.mean_loss, score_tokens(model, [tok.eot_id] + ids).loss, rel_tol=1e-6)


# -- the commands --------------------------------------------------------------------------------


def test_explain_jsonl_is_one_object_per_step(cli, model_path):
    r = cli("sample", "Spot", "-m", model_path, "--explain", "--jsonl", "-n", "5", "--seed", "1", "-k", "8")
    assert_ok(r)
    steps = [json.loads(line) for line in r.out.splitlines()]
    assert 1 <= len(steps) <= 6 and [s["index"] for s in steps] == list(range(len(steps)))
    for s in steps:
        assert len(s["candidates"]) in (5, 6) and s["kept"] <= 8
        assert {"token", "text", "p_model", "p_sampled"} <= set(s["candidates"][0])


def test_explain_text_view_in_a_pipe(cli, model_path):
    r = cli("sample", "Spot", "-m", model_path, "--show-probs", "3", "-n", "4", "--seed", "1", "-t", "0")
    assert_ok(r)
    lines = r.out.splitlines()
    assert lines[0].split() == ["model", "after", "greedy", "(temperature", "0)"]
    assert sum("◀ drawn" in ln for ln in lines) >= 1
    assert lines[-1].startswith("Spot")  # the prompt and its completion close the view


@pytest.mark.parametrize("args,needle,rc", [
    (["--explain", "--input", "-"], "--explain follows one sample", 1),
    (["--explain", "--num-samples", "2"], "--explain follows one sample", 1),
    (["--show-probs", "-1"], "--show-probs", 2),
])
def test_explain_mistakes(cli, model_path, args, needle, rc):
    assert_one_line_error(cli("sample", "Spot", "-m", model_path, *args, input="x\n"), needle, rc=rc)


def test_tokenize_probs_in_a_pipe(cli, model_path, tokenizer, loaded):
    r = cli("tokenize", "--probs", "Spot liked to run", "-m", model_path, "--device", "cpu")
    assert_ok(r)
    rows = [line.split("\t") for line in r.out.splitlines()]
    ids = tokenizer.encode("Spot liked to run")
    assert [int(row[0]) for row in rows] == ids
    assert [json.loads(row[1]) for row in rows] == [tokenizer.label(i) for i in ids]
    expected = surprisal(loaded[0], ids, tokenizer.eot_id)  # the model's own probabilities, in-process
    for (_, _, p, loss), want in zip(rows, expected.probs):
        assert math.isclose(float(p), want, rel_tol=1e-4) and math.isclose(float(loss), -math.log(want), abs_tol=1e-3)
    assert f"perplexity {expected.perplexity:.2f}" in r.err
