"""`tinygen embed`: cosine neighbours and analogies in the token embedding space."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinygen.core.checkpoint import load_model, save_checkpoint
from tinygen.errors import TinygenError
from tinygen.inspect.embedding import analogy, nearest, neighbours, table, word_vector

from conftest import assert_ok, assert_one_line_error

BUNDLED = Path(__file__).resolve().parents[1] / "weights" / "stories.safetensors"


@pytest.fixture(scope="module")
def planted(tmp_path_factory, model_path):
    """The tiny model with a few embeddings set by hand: dog and ball close together, and
    Spot - Tom + sun landing exactly on sky."""
    model, tok, _ = load_model(model_path)
    ids = {w: tok.encode(" " + w)[0] for w in ("dog", "ball", "Spot", "Tom", "sun", "sky", "red")}
    n = model.config.n_embd
    basis = torch.eye(n) * 3
    with torch.no_grad():
        table = model.transformer.wte.weight
        table.mul_(0.01)  # everything else far from the planted directions
        table[ids["dog"]] = basis[0] + 0.1 * basis[1]
        table[ids["ball"]] = basis[0]
        table[ids["red"]] = basis[1]
        table[ids["Spot"]] = basis[2] + basis[3]
        table[ids["Tom"]] = basis[3]
        table[ids["sun"]] = basis[4]
        table[ids["sky"]] = basis[2] + basis[4]
    path = tmp_path_factory.mktemp("planted") / "planted.safetensors"
    save_checkpoint(path, model, tok)
    return path, model, tok, ids


def test_nearest_by_cosine_leaves_out_the_word_itself(planted):
    _, model, tok, ids = planted
    dog = word_vector(table(model), tok, "dog")
    assert dog.ids == [ids["dog"]] and dog.note is None
    found = nearest(table(model), tok, dog.vector, 3, exclude=dog.ids)
    assert found[0][0] == ids["ball"] and found[0][1] == pytest.approx(1 / 1.01 ** 0.5, abs=1e-5)
    assert ids["dog"] not in [i for i, _ in found]
    assert not set(i for i, _ in nearest(table(model), tok, dog.vector, tok.n_vocab)) & tok.special_ids


def test_analogy_is_vector_arithmetic(planted):
    _, model, tok, ids = planted
    vector, words = analogy(table(model), tok, "Spot", "Tom", "sun")
    found = nearest(table(model), tok, vector, 3, exclude=[i for w in words for i in w.ids])
    assert found[0][0] == ids["sky"] and found[0][1] == pytest.approx(1.0, abs=1e-5)


def test_a_word_of_several_tokens_is_their_mean(planted):
    _, model, tok, _ = planted
    w = word_vector(table(model), tok, "happy")
    assert len(w.ids) == 2 and "2 tokens" in w.note and "their mean" in w.note
    assert torch.allclose(w.vector, model.transformer.wte.weight[w.ids].mean(0))
    with pytest.raises(TinygenError):
        word_vector(table(model), tok, "  ")


def test_embed_command(cli, planted):
    path, _, _, _ = planted
    r = cli("embed", "--analogy", "Spot", "Tom", "sun", "-m", path, "--json", "-k", "2")
    assert_ok(r)
    data = json.loads(r.out)
    assert data["query"] == "Spot - Tom + sun" and data["nearest"][0]["text"] == " sky"
    r = cli("embed", "dog", "happy", "-m", path, "-k", "2")
    assert_ok(r)
    assert r.out.count("nearest to") == 2 and "·ball" in r.out and "their mean" in r.err
    assert_one_line_error(cli("embed", "--analogy", "a", "b", "-m", path), "three words")


def test_neighbours_is_what_embed_reports(planted):
    _, model, tok, ids = planted
    results, notes = neighbours(model, tok, ["dog", "happy"], 2)
    assert [r["query"] for r in results] == ["dog", "happy"]
    assert results[0]["tokens"] == {"dog": [" dog"]} and results[0]["nearest"][0]["token"] == ids["ball"]
    assert results[0]["nearest"][0]["text"] == " ball" and len(results[1]["nearest"]) == 2
    assert len(notes) == 1 and "'happy' is 2 tokens" in notes[0]
    (result,), notes = neighbours(model, tok, ["Spot", "Tom", "sun"], 1, as_analogy=True)
    assert notes == [] and result["query"] == "Spot - Tom + sun" and set(result["tokens"]) == {"Spot", "Tom", "sun"}
    assert result["nearest"] == [{"token": ids["sky"], "text": " sky", "cosine": pytest.approx(1.0, abs=1e-5)}]


def test_embed_top_must_be_positive(cli, planted):
    assert_one_line_error(cli("embed", "dog", "-m", planted[0], "--top", "0"), "--top", rc=2)


@pytest.mark.skipif(not BUNDLED.exists(), reason="no bundled model in weights/")
def test_bundled_story_model_has_meaningful_neighbours():
    """What the README shows: the story model learned that dogs are like cats and puppies, and that
    happy sits with sad and glad (words used in the same places)."""
    model, tok, _ = load_model(BUNDLED)

    def near(word, k=8):
        w = word_vector(table(model), tok, word)
        return {tok.label(i).strip() for i, _ in nearest(table(model), tok, w.vector, k, exclude=w.ids)}

    assert {"cat", "puppy"} <= near("dog")
    assert {"sad", "glad"} <= near("happy")
    vector, words = analogy(table(model), tok, "boy", "he", "she")
    assert tok.label(nearest(table(model), tok, vector, 1, exclude=[i for w in words for i in w.ids])[0][0]) == " girl"
