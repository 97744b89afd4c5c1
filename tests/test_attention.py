"""`tinygen attention`: the weights are probabilities under a causal mask and match a reference
implementation, words find their tokens, and the text views are pinned by snapshots at 80 columns.

The model-level check that the explicit path gives SDPA's outputs is test_model's
test_explicit_attention_matches_sdpa; this file checks what the command builds on it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from rich.cells import cell_len
from rich.console import Console

from tinygen.cli import views
from tinygen.core.checkpoint import load_model
from tinygen.errors import TinygenError
from tinygen.inspect.attention import AttentionMap, attention_map, find_word, query_at

from conftest import assert_ok, assert_one_line_error, clean_env

SNAPSHOTS = Path(__file__).parent / "snapshots"
BUNDLED = Path(__file__).resolve().parents[1] / "weights" / "stories.safetensors"
BANK = "He sat on the river's bank"


@pytest.fixture(scope="module")
def tiny(model_path):
    model, tok, _ = load_model(model_path)
    return model, tok


@pytest.mark.parametrize("path_fixture", ["model_path", "gpt2_arch_path"])
def test_rows_are_distributions_with_nothing_on_the_future(request, path_fixture):
    model, tok, _ = load_model(request.getfixturevalue(path_fixture))
    amap = attention_map(model, tok, tok.encode("Spot liked to run in the park with his friend Tom."))
    L, H, T, _ = amap.weights.shape
    assert (L, H) == (model.config.n_layer, model.config.n_head) and T == len(amap.ids)
    assert torch.allclose(amap.weights.sum(-1), torch.ones(L, H, T), atol=1e-5)
    assert amap.weights.triu(diagonal=1).abs().max().item() == 0.0
    # A mean over heads is still a distribution, and so what the default view shows sums to 1.
    assert torch.allclose(amap.matrix().sum(-1), torch.ones(T), atol=1e-5)
    assert torch.equal(amap.matrix(0, 1), amap.weights[0, 1])


def test_weights_match_transformers_on_a_gpt2_model(hf_gpt2_dir):
    """On a Hugging Face GPT-2 folder, our probabilities are transformers' own attentions."""
    transformers = pytest.importorskip("transformers")
    model, tok, _ = load_model(hf_gpt2_dir)
    amap = attention_map(model, tok, tok.encode(BANK))
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor([amap.ids]), output_attentions=True).attentions
    assert torch.allclose(amap.weights, torch.stack([a[0] for a in ref]), atol=1e-5)


def test_long_input_keeps_the_last_context(tiny):
    model, tok = tiny
    ids = tok.encode(" ".join(["Spot ran to the park."] * 40))
    amap = attention_map(model, tok, ids)
    assert len(amap.ids) == model.config.block_size and amap.dropped == len(ids) - model.config.block_size
    assert amap.ids == ids[-model.config.block_size :]


def _map(labels: list[str]) -> AttentionMap:
    T = len(labels)
    weights = torch.tril(torch.ones(1, 1, T, T))
    return AttentionMap(list(range(T)), labels, weights / weights.sum(-1, keepdim=True))


class Pieces:
    """A stand-in tokenizer whose tokens are exactly the labels given."""

    def __init__(self, labels):
        self.labels = labels

    def token_bytes(self, i):
        return self.labels[i].encode()


def test_find_word_uses_the_last_token_of_a_split_word_and_says_so():
    labels = ["He", " sat", " on", " the", " river", "'s", " b", "ank"]
    q = find_word(_map(labels), Pieces(labels), "bank")
    assert q.position == 7
    assert "2 tokens" in q.note and "' b'" in q.note
    assert find_word(_map(labels), Pieces(labels), "river") == find_word(_map(labels), Pieces(labels), " river ")
    assert find_word(_map(labels), Pieces(labels), "river").position == 4


def test_find_word_prefers_whole_words_then_the_last_match_then_any_case():
    labels = ["There", " the", " cat", " and", " the", " dog"]
    amap, tok = _map(labels), Pieces(labels)
    q = find_word(amap, tok, "the")
    assert q.position == 4 and "2 times" in q.note  # not "There", and the later of the two
    assert find_word(amap, tok, "there").position == 0  # a case-insensitive match when nothing else fits
    with pytest.raises(TinygenError, match="not in the text"):
        find_word(amap, tok, "bird")


def test_positions_layers_and_heads_are_checked():
    amap = _map(["a", "b", "c"])
    assert query_at(amap, None).position == 2 and query_at(amap, -3).position == 0
    with pytest.raises(TinygenError, match="--position 3"):
        query_at(amap, 3)
    with pytest.raises(TinygenError, match="--layer 1 is out of range"):
        amap.layer_index(1)
    with pytest.raises(TinygenError, match="--head -2"):
        amap.head_index(-2)


def test_bars_and_labels():
    assert views.bar(1.0, 4) == "████" and views.bar(0.5, 3) == "█▌" and views.bar(0.0, 5) == ""
    assert views.visible(" the\n") == "·the↵"
    assert views.visible("x" * 20, 8) == "xxxxxxx…"
    # Wide characters count as two cells, so columns after a label still line up.
    assert cell_len(views.column("日本語日本語日本語")) == views.LABEL_WIDTH
    assert cell_len(views.column(" 😀")) == views.LABEL_WIDTH and views.column(" 😀").startswith("·😀")


def _render(fn, *args, width=80) -> str:
    buf = io.StringIO()
    fn(Console(file=buf, width=width, color_system=None, highlight=False), *args)
    return buf.getvalue()


@pytest.mark.parametrize("width", [80, 60])
def test_views_of_a_long_input_fit_the_width(tiny, width):
    model, tok = tiny
    amap = attention_map(model, tok, tok.encode(" ".join(["Lily and Spot played in the sunny park."] * 8)))
    q = len(amap.ids) - 1
    outputs = [
        _render(views.attention_bars, amap.labels, amap.matrix()[q], q, "bars", width=width),
        _render(views.attention_grid, amap.labels, amap.weights, q, "grid", width=width),
        _render(views.attention_matrix, amap.labels, amap.matrix(), "matrix", width=width),
    ]
    for text in outputs:
        assert max(cell_len(line) for line in text.splitlines()) <= width, text
    bars, grid, matrix = outputs
    assert "weaker tokens with" in bars  # more tokens than rows: the rest is accounted for
    assert len([ln for ln in bars.splitlines() if "%" in ln]) <= 41
    assert "showing tokens" in matrix and "sparklines show tokens" in grid


def test_matrix_leaves_the_future_blank(tiny):
    model, tok = tiny
    amap = attention_map(model, tok, tok.encode("Spot liked to run"))
    rows = _render(views.attention_matrix, amap.labels, amap.matrix(), "m").splitlines()[2:-1]
    cells_start = 4 + views.LABEL_WIDTH + 1
    for i, row in enumerate(rows):
        cells = row[cells_start:]
        assert len(cells.rstrip()) == 2 * (i + 1)  # shaded up to and including the diagonal, blank after


# -- the command ---------------------------------------------------------------------------------


def test_json_has_every_weight_and_the_tokens(cli, model_path, tokenizer):
    r = cli("attention", "Spot liked to run", "-m", model_path, "--device", "cpu", "--json")
    assert_ok(r)
    data = json.loads(r.out)
    T = len(tokenizer.encode("Spot liked to run"))
    w = torch.tensor(data["attention"])
    assert w.shape == (2, 4, T, T) and data["tokens"][0] == "Spot" and data["query"] == T - 1
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, T), atol=1e-4)


def test_html_page_is_written(cli, model_path, tmp_path):
    page = tmp_path / "page.html"
    r = cli("attention", "Spot liked to run", "-m", model_path, "--device", "cpu", "--html", page)
    assert_ok(r)
    assert r.out == "" and "open it in a browser" in r.err
    assert "Spot" in page.read_text() and "http://" not in page.read_text()


@pytest.mark.parametrize("args,needles", [
    (["--token", "bird"], ["'bird' is not in the text"]),
    (["--layer", "9"], ["--layer 9 is out of range"]),
    (["--head", "4"], ["--head 4"]),
    (["--position", "50"], ["--position 50"]),
    (["--token", "Spot", "--position", "1"], ["not both"]),
    (["--all", "--matrix"], ["pick one"]),
    (["--all", "--layer", "1"], ["--all shows every layer"]),
])
def test_user_mistakes_are_one_line(cli, model_path, args, needles):
    assert_one_line_error(cli("attention", "Spot liked to run", "-m", model_path, "--device", "cpu", *args), *needles)


@pytest.mark.skipif(not BUNDLED.exists(), reason="no bundled model in weights/")
@pytest.mark.parametrize("name,args", [
    ("attention_bank", ["--token", "bank"]),
    ("attention_bank_l2h2", ["--token", "bank", "--layer", "2", "--head", "2"]),
    ("attention_all", ["--token", "bank", "--all"]),
    ("attention_matrix", ["--matrix", "--layer", "3"]),
])
def test_text_views_match_snapshots(cli, name, args):
    """The bundled model's views at 80 columns, byte for byte. A change in layout or in the model
    shows up here; regenerate with TINYGEN_UPDATE_SNAPSHOTS=1 after checking the new output."""
    r = cli("attention", BANK, "--device", "cpu", *args, env=clean_env(COLUMNS="80"))
    assert_ok(r)
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("TINYGEN_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(r.out)
    assert r.out == path.read_text()
    assert max(cell_len(line) for line in r.out.splitlines()) <= 80


def test_html_into_a_missing_folder_is_one_line(cli, model_path, tmp_path):
    page = tmp_path / "no-such-folder" / "page.html"
    r = cli("attention", "Spot liked to run", "-m", model_path, "--device", "cpu", "--html", page)
    assert_one_line_error(r, "no-such-folder")
    assert not page.parent.exists()
