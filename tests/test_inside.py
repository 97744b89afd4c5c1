"""Looking inside a model through its one hook (core/model.Hook): the hook leaves every architecture's
outputs bit-identical; the lens, tracing, patching, ablation and head detection compute what they
say (the batched, cached grids against one plain pass per cell); and the commands print, write JSON
rows and refuse mistakes as users see them. tests/test_inside_reference.py checks the numbers
against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinygen.core.config import ModelConfig
from tinygen.inspect import heads as heads_lib
from tinygen.inspect import patching
from tinygen.inspect.activations import Target, put, run, sites
from tinygen.inspect.lens import logit_lens

from conftest import assert_ok, assert_one_line_error, make_model
from test_kquants import mixed  # noqa: F401  (a fixture: a GGUF in a Q4_K_M-like mix of block types)

SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"

ARCHS = {
    "rope": {},
    "gpt2": {"arch": "gpt2"},
    "llama-gqa-bias": {"n_kv_head": 2, "qkv_bias": True},
    "gemma3": {"post_norms": True, "embed_scale": True, "qk_norm": True, "mlp": "geglu", "head_size": 32,
               "sliding_window": 4, "sliding_layers": (0, 2), "rope_local_theta": 1e4},
    "speedrun": {"qk_norm": True, "mlp": "relu2", "tie_embeddings": False, "logit_softcap": 10.0, "value_embeds": 1},
}


def model_of(arch: str, seed: int = 0):
    config = ModelConfig(**{"n_layer": 4, "n_head": 4, "n_embd": 64, "block_size": 48, "vocab_size": 97,
                            **ARCHS[arch]})
    return make_model(config, seed=seed, scale=2.0)


def every_site(n_layer: int) -> list:
    return [*sites(n_layer, "resid"), *sites(n_layer, "z"), *sites(n_layer, "attn"), *sites(n_layer, "mlp")]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_hook_leaves_every_architecture_bit_identical(arch):
    """A hook that looks at every site, and a pass started from a recorded layer, give the plain
    pass's logits to the bit; so do passes over a KV cache."""
    from tinygen.core.kvcache import CacheSlots, KVCache

    model = model_of(arch)
    idx = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(idx)
        seen = []
        h, _ = model.hidden(idx, hook=lambda point, layer, x: seen.append((point, layer)) or x)
        assert torch.equal(model.head(h), plain)
        assert sorted(seen) == sorted(every_site(4))
        logits, rec = run(model, idx, record=every_site(4), all_positions=True)
        assert torch.equal(logits, plain.float())
        for layer in range(4):
            started, _ = run(model, idx, all_positions=True, start=(layer, rec[("resid", layer)]))
            assert torch.equal(started, plain.float()), layer
        cache = KVCache(model.config, 2, "cpu", torch.float32, 11)
        cached, _ = model.hidden(idx, CacheSlots(cache, torch.arange(11), 11), hook=lambda p, l, x: x)
        fresh_cache = KVCache(model.config, 2, "cpu", torch.float32, 11)
        fresh, _ = model.hidden(idx, CacheSlots(fresh_cache, torch.arange(11), 11))
        assert torch.equal(cached, fresh)


def test_the_hook_leaves_a_file_run_as_stored_bit_identical(mixed):  # noqa: F811
    """A GGUF whose blocks run natively (plan.prepare): a hooked pass takes the same products."""
    from tinygen.cli.common import load_model

    net, tok, _, _ = load_model(str(mixed[0]), "cpu")
    idx = torch.tensor([tok.encode("Once upon a time there was")])
    with torch.inference_mode():
        plain = net.head(net.hidden(idx)[0][:, -1]).float()
        logits, rec = run(net, idx, record=every_site(net.config.n_layer))
        assert torch.equal(logits, plain)
        assert torch.equal(run(net, idx, start=(1, rec[("resid", 1)]))[0], plain)


def test_an_edit_changes_the_pass_from_its_site_on():
    """An edit at a layer's MLP output changes that layer's residual stream and later, not earlier."""
    model = model_of("rope")
    idx = torch.randint(0, 97, (1, 9))
    _, clean = run(model, idx, record=sites(4, "resid"))
    _, edited = run(model, idx, record=sites(4, "resid"), edits={("mlp", 1): lambda x: x + 1.0})
    for layer in range(5):
        same = torch.equal(clean[("resid", layer)], edited[("resid", layer)])
        assert same == (layer <= 1), layer


@pytest.mark.parametrize("arch", ["rope", "gpt2", "gemma3"])
def test_the_lens_reads_each_layer_and_ends_at_the_models_output(arch):
    model = model_of(arch)
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    lens = logit_lens(model, ids, [str(i) for i in ids], Target(5, "5"), k=4)
    with torch.no_grad():
        out = model(torch.tensor([ids]))[0].float().softmax(-1)
        _, rec = run(model, torch.tensor([ids]), record=[("resid", 2)])
        mid = model.head(model.transformer.ln_f(rec[("resid", 2)][0])).float().softmax(-1)
    for layer, probs in ((4, out), (2, mid)):
        top = probs.topk(4)
        assert torch.equal(lens.top_ids[layer], top.indices) and torch.allclose(lens.top_p[layer], top.values)
        assert torch.allclose(lens.target_p[layer], probs[:, 5])
        assert torch.equal(lens.target_rank[layer], (probs > probs[:, 5:6]).sum(-1) + 1)
    rows = lens.rows(str)
    assert len(rows) == 5 * 12 and rows[-1]["layer"] == 4 and rows[-1]["target"]["rank"] >= 1
    assert set(rows[0]) == {"layer", "position", "token", "top", "target"}


def plain_grid(model, ids, broken_ids, clean_ids, metric, noise=None, window=1):
    """Each cell of a grid by one plain pass from the embeddings, no batching, cache or start layer."""
    n_layer = model.config.n_layer
    T = len(ids)
    _, clean = run(model, torch.tensor([clean_ids]), record=patching.restorable(n_layer, patching.KINDS))
    grids = {}
    for kind in patching.KINDS:
        scores = torch.zeros(n_layer, T)
        for layer in range(n_layer):
            for pos in range(T):
                edits = {} if noise is None else {("resid", 0): noise}
                span = [layer] if kind == "resid" else range(max(0, layer - window // 2),
                                                             min(n_layer, layer - (-window // 2)))
                for j in span:
                    restore = put(torch.tensor([0]), torch.tensor([pos]), clean[(kind, j)][0, pos][None])
                    before = edits.get((kind, j))  # the noise, when restoring the embeddings
                    edits[(kind, j)] = restore if before is None else (lambda x, a=before, b=restore: b(a(x)))
                logits, _ = run(model, torch.tensor([broken_ids]), edits=edits)
                scores[layer, pos] = metric(logits)[0]
        grids[kind] = scores
    return grids


@pytest.mark.parametrize("arch", ["rope", "gpt2", "gemma3"])
@pytest.mark.parametrize("window", [1, 3])
def test_patching_grids_equal_one_plain_pass_per_cell(arch, window):
    """Batched rows, chunks started mid-prompt over the corrupted run's cache and passes started at
    the cell's layer give every cell as a pass of its own does. The Gemma-like model's window (4)
    is shorter than the prompt, which takes the uncached path."""
    model = model_of(arch, seed=3)
    g = torch.Generator().manual_seed(4)
    clean_ids = torch.randint(0, 97, (10,), generator=g).tolist()
    broken_ids = list(clean_ids)
    broken_ids[3] = (broken_ids[3] + 1) % 97
    result = patching.patch(model, clean_ids, broken_ids, Target(7, "7"), Target(8, "8"), window=window)
    expected = plain_grid(model, broken_ids, broken_ids, clean_ids, patching.logit_difference(Target(7, "7"),
                                                                                              Target(8, "8")),
                          window=window)
    for kind in patching.KINDS:
        torch.testing.assert_close(result.grids[kind].scores, expected[kind], atol=1e-4, rtol=1e-4)
        assert torch.all(result.grids[kind].recovered[:, :3] == 0)  # before the first change: nothing to restore
    assert not torch.allclose(result.grids["resid"].scores, torch.full((4, 10), result.broken))
    # Restoring the changed token's embedding restores everything.
    assert result.grids["resid"].recovered[0, 3] == pytest.approx(1.0, abs=1e-4)


def test_tracing_equals_one_plain_pass_per_cell_and_averages_its_noise_samples():
    model = model_of("rope", seed=5)
    ids = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(6)).tolist()
    target = Target(11, "11")
    result = patching.trace(model, ids, range(2, 4), target, samples=2, seed=7)
    std = patching.NOISE_SCALE * patching.embedding_std(model)
    noise = std * torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(7))
    metric = patching.probability(target)
    expected = {kind: torch.zeros(4, 9) for kind in patching.KINDS}
    for s in range(2):
        def add(x, s=s):
            x = x.clone()
            x[:, 2:4] += noise[s]
            return x
        for kind, grid in plain_grid(model, ids, ids, ids, metric, noise=add).items():
            expected[kind] += grid / 2
    for kind in patching.KINDS:
        torch.testing.assert_close(result.grids[kind].scores, expected[kind], atol=1e-5, rtol=1e-4)
    assert result.passes == 2 + 4 * 4  # clean, broken, then a pass per layer and chunk of positions
    clean = float(metric(run(model, torch.tensor([ids]))[0])[0])
    assert result.clean == pytest.approx(clean)


@pytest.mark.parametrize("arch", ["rope", "gemma3"])
def test_zero_ablating_every_head_of_a_layer_removes_its_attention(arch):
    """Zeroing every head's output before the heads are mixed is dropping the layer's attention
    output (no bias on c_proj; a post-norm of zeros is zeros)."""
    model = model_of(arch, seed=8)
    ids = torch.randint(0, 97, (7,)).tolist()
    result = heads_lib.ablate(model, ids, [(1, h) for h in range(4)])
    dropped, _ = run(model, torch.tensor([ids]), edits={("attn", 1): torch.zeros_like})
    torch.testing.assert_close(result.after, dropped[0].softmax(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.before, run(model, torch.tensor([ids]))[0][0].softmax(-1))


def test_mean_ablation_gives_a_head_its_mean_output_at_every_position():
    model = model_of("rope", seed=9)
    ids = torch.randint(0, 97, (7,)).tolist()
    _, plain = run(model, torch.tensor([ids]), record=[("z", 2)])
    z = plain[("z", 2)].clone()
    z[:, :, 1] = z[:, :, 1].mean(1, keepdim=True)
    expected, _ = run(model, torch.tensor([ids]), edits={("z", 2): lambda _: z})
    result = heads_lib.ablate(model, ids, [(2, 1)], "mean")
    torch.testing.assert_close(result.after, expected[0].softmax(-1))
    assert not torch.allclose(result.after, result.before)


def test_detection_masks_mark_the_previous_token_copies_and_what_followed_them():
    masks = heads_lib.detection_masks([5, 6, 7, 5, 6, 7])
    assert masks["previous-token"].nonzero().tolist() == [[i, i - 1] for i in range(1, 6)]
    assert masks["duplicate-token"].nonzero().tolist() == [[3, 0], [4, 1], [5, 2]]
    assert masks["induction"].nonzero().tolist() == [[3, 1], [4, 2], [5, 3]]  # the token after each earlier copy


def test_the_detector_scores_a_head_by_the_attention_it_gives_the_expected_keys(monkeypatch):
    """With every head's attention replaced by a known pattern, the scores are that pattern's mass."""
    model = model_of("rope")
    seq = [3, 4, 5, 6, 3, 4, 5, 6]
    T = len(seq)
    masks = heads_lib.detection_masks(seq)
    prev = masks["previous-token"].float()
    prev[0, 0] = 1.0
    uniform = torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]
    patterns = [torch.stack([prev, uniform, prev, uniform])[None]] * 4  # (B, H, T, T) per layer
    monkeypatch.setattr(type(model), "attention", lambda self, idx: (None, patterns))
    scores = heads_lib.detect(model, [seq])
    assert scores.scores[0, :, 0].tolist() == [1.0] * 4
    queries = masks["previous-token"].any(1)
    assert scores.scores[0, 0, 1] == pytest.approx(float((uniform * masks["previous-token"]).sum(-1)[queries].mean()))
    assert scores.top("previous-token", 1)[0][1] in (0, 2)
    assert len(scores.rows()) == 3 * 4 * 4


def test_repeated_random_tokens_repeat_and_skip_special_tokens(tokenizer):
    seqs = heads_lib.repeated_random(tokenizer, tokenizer.n_vocab, 10, 3, seed=1)
    assert len(seqs) == 3 and all(s[:10] == s[10:] for s in seqs)
    assert not set().union(*seqs) & set(tokenizer.special_ids)
    assert seqs == heads_lib.repeated_random(tokenizer, tokenizer.n_vocab, 10, 3, seed=1)


# -- the commands ---------------------------------------------------------------------------------

def json_rows(r) -> list[dict]:
    return [json.loads(line) for line in r.out.splitlines()]


def test_the_commands_write_json_rows(cli, model_path):
    prompt = "Once upon a time there was a little girl"
    r = cli("lens", prompt, "-m", model_path, "--target", " girl", "--json")
    assert_ok(r)
    rows = json_rows(r)
    assert {"layer", "position", "token", "top", "target"} <= set(rows[0]) and rows[-1]["layer"] == 2
    r = cli("trace", prompt, "-m", model_path, "--subject", "little girl", "--json")
    assert_ok(r)
    rows = json_rows(r)
    assert {row["kind"] for row in rows} == {"resid", "mlp", "attn"} and {"recovered", "score"} <= set(rows[0])
    assert "following the model's prediction" in r.err and "passes" in r.err
    r = cli("patch", "-m", model_path, "--clean", "Once upon a time", "--corrupt", "Once a a time", "--json",
            "--kind", "resid")
    assert_ok(r)
    assert {row["kind"] for row in json_rows(r)} == {"resid"}
    r = cli("ablate", "Once upon a time", "-m", model_path, "--head", "0.1", "--head", "1.3", "--json")
    assert_ok(r)
    (row,) = json_rows(r)
    assert row["heads"] == ["0.1", "1.3"] and row["mode"] == "zero" and len(row["top_after"]) == 10
    r = cli("heads", "-m", model_path, "--json", "--length", "8", "--batch", "2")
    assert_ok(r)
    assert len(json_rows(r)) == 3 * 2 * 4


def test_the_commands_draw_grids(cli, model_path):
    r = cli("lens", "Once upon a time", "-m", model_path, "--target", " there")
    assert_ok(r)
    assert "out " in r.out and "' there' after" in r.out and "rank" in r.out
    r = cli("trace", "Once upon a time", "-m", model_path, "--subject", "upon", "--kind", "resid")
    assert_ok(r)
    assert "* " in r.out and "peak" in r.out
    r = cli("heads", "-m", model_path, "--length", "8")
    assert_ok(r)
    assert "induction heads" in r.out and "L1" in r.out


@pytest.mark.parametrize("args, views", [
    (["lens", "Once upon a time", "--target", " there"], ["lens", "attention"]),
    (["trace", "Once upon a time", "--subject", "upon", "--kind", "resid"], ["trace"]),
    (["patch", "--clean", "Once upon a time", "--corrupt", "Once a a time"], ["patch"]),
    (["ablate", "Once upon a time", "--head", "1.2"], ["ablate"]),
    (["heads", "--length", "6"], ["heads"]),
])
def test_each_command_writes_its_explorer_tab(cli, model_path, tmp_path, args, views):
    import re

    page = tmp_path / "page.html"
    r = cli(*args, "-m", model_path, "--html", page)
    assert_ok(r)
    assert r.out == "" and "wrote" in r.err
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', page.read_text(), re.S).group(1)
    assert list(json.loads(blob)["views"]) == views


@pytest.mark.parametrize("args, needles", [
    (["trace", "Once upon a time", "--subject", "dragon"], ["'dragon' is not in the prompt"]),
    (["trace", "Once upon a time", "--subject", "upon", "--kind", "mlp", "--kind", "heads"], ["unknown --kind"]),
    (["patch", "--clean", "Once upon", "--corrupt", "Once upon a time"], ["2 and 5 tokens"]),
    (["patch", "--clean", "Once upon", "--corrupt", "Once upon"], ["the same tokens"]),
    (["ablate", "Once", "--head", "7.0"], ["layers 0..1"]),
    (["ablate", "Once", "--head", "x"], ["LAYER.HEAD"]),
    (["ablate", "Once", "--head", "0.0", "--mode", "half"], ["unknown --mode"]),
    (["heads", "--text", "Once"], ["cannot score previous-token"]),
    (["lens", "Once", "--target", ""], ["--target needs"]),
    (["lens", "Once upon", "--target", " a", "--position", "5"], ["--position 5 is out of range"]),
])
def test_mistakes_get_one_line(cli, model_path, args, needles):
    assert_one_line_error(cli(*args, "-m", model_path), *needles)


@pytest.mark.skipif(not SMOLLM2.exists(), reason=f"{SMOLLM2} is absent")
def test_smollm2_knows_where_the_eiffel_tower_is_and_where_it_decides_so():
    """The README's claims: the lens finds " Paris" only in the last layers; the trace puts what
    brings it back on the subject's tokens in early layers and on the last token late; the
    detector finds induction heads."""
    from tinygen.cli.common import load_model
    from tinygen.generate.textgen import prompt_ids
    from tinygen.inspect.activations import target_token

    net, tok, _, _ = load_model(str(SMOLLM2), "cpu")
    ids = prompt_ids(tok, "The Eiffel Tower is in the city of")
    paris = target_token(tok, " Paris")
    lens = logit_lens(net, ids, [tok.label(i) for i in ids], paris)
    assert int(lens.target_rank[-1, -1]) == 1 and float(lens.target_p[-1, -1]) > 0.5
    assert int(lens.target_rank[10, -1]) > 100  # nowhere near the top a third of the way up
    result = patching.trace(net, ids, range(0, 4), paris, kinds=("resid",))
    grid = result.grids["resid"].recovered
    assert result.broken < 0.1 * result.clean
    assert float(grid[:8, 1:4].max()) > 0.25  # early: on the subject
    assert float(grid[-4:, -1].max()) > 0.5 and float(grid[-4:, 1:4].max()) < 0.2  # late: on the last token
    scores = heads_lib.detect(net, heads_lib.repeated_random(tok, net.config.vocab_size, 30, 2, seed=0))
    assert scores.top("induction", 1)[0][2] > 0.5


@pytest.mark.skipif(not SMOLLM2.exists(), reason=f"{SMOLLM2} is absent")
def test_smollm2s_embeddings_do_the_analogy(cli):
    """king - man + woman lands on queen in SmolLM2's table, read from the GGUF once."""
    r = cli("embed", "-m", SMOLLM2, "--analogy", "king", "man", "woman", "-k", "3", "--json")
    assert_ok(r)
    assert json.loads(r.out)["nearest"][0]["text"] == " queen"
