"""The explorer's other views (logit lens, causal tracing, activation patching, head detector, head
ablation) and its tabs: the data survives the trip and bad data is refused, and in a real browser (see
test_explorer.py) each tab draws its heatmaps and says the right thing about a cell set by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from tinygen.cli.explorer import render_page

import test_explorer
from test_explorer import assert_offline, page_data, synthetic

browser, open_page = test_explorer.browser, test_explorer.open_page  # its fixtures, named here for pytest to find

TOKENS = [" The", " E", "iff", "el", " Tower", " is", " in", "</script>"]
CLEAN = [" The", " Col", "os", "se", "um", " is", " in", "</script>"]
T, L, K = len(TOKENS), 4, 3
PEAK = (2, 3)  # (layer, position) of the cell set by hand in each view
SUBJECT = [1, 4]


def rounded(rng, *shape) -> list:
    """Random numbers that six significant digits keep as they are."""
    return np.round(rng.random(shape), 4).tolist()


def lens(target: bool = True) -> dict:
    rng = np.random.default_rng(0)
    words = [" Paris", " London", " the", "<b>", " Rome"]
    top = [[[[words[(l + t + i) % len(words)], p] for i, p in enumerate(sorted(rounded(rng, K), reverse=True))]
            for t in range(T)] for l in range(L + 1)]
    top[PEAK[0]][PEAK[1]] = [[" Paris", 0.4123], [" Rome", 0.2], [" the", 0.05]]
    p, rank = rounded(rng, L + 1, T), rng.integers(1, 500, (L + 1, T)).tolist()
    p[PEAK[0]][PEAK[1]], rank[PEAK[0]][PEAK[1]] = 0.4123, 1
    return {"tokens": TOKENS, "n_layer": L, "top": top,
            "target": {"text": " Paris", "p": p, "rank": rank} if target else None}


def grids(kinds=("resid", "mlp", "attn")) -> dict:
    rng = np.random.default_rng(1)
    out = {kind: {"recovered": rounded(rng, L, T), "score": rounded(rng, L, T)} for kind in kinds}
    layer, pos = PEAK
    out[kinds[-1]]["recovered"][layer][pos], out[kinds[-1]]["score"][layer][pos] = 0.8762, 0.7151
    out[kinds[-1]]["recovered"][0][0], out[kinds[-1]]["recovered"][1][0] = 1.3, 1.0  # the colour stops at 1
    return out


def trace() -> dict:
    return {"tokens": TOKENS, "subject": SUBJECT, "metric": "p(' Paris')", "clean": 0.8123, "broken": 0.0312,
            "samples": 10, "grids": grids()}


def patch() -> dict:
    return {"tokens": CLEAN, "clean_tokens": TOKENS, "metric": "logit(' Paris') - logit(' Rome')", "clean": 3.21,
            "broken": -1.5, "samples": 1, "grids": grids(("resid", "attn"))}


def heads(n_layer: int = 3, n_head: int = 4) -> dict:
    rng = np.random.default_rng(2)
    scores = {kind: (0.9 * np.array(rounded(rng, n_layer, n_head))).round(4).tolist()
              for kind in ("previous-token", "duplicate-token", "induction")}
    scores["induction"][1][2] = 0.99
    return {"n_layer": n_layer, "n_head": n_head, "scores": scores}


def ablate() -> dict:
    rows = [[" Paris", 0.684, 0.109], [" the", 0.05, 0.312], ["</script>", 0.0213, 0.02128], [" Rome", None, 0.0004]]
    return {"tokens": TOKENS, "heads": ["23.4", "19.1"], "mode": "zero", "rows": rows}


VIEWS = {"lens": lens, "trace": trace, "patch": patch, "heads": heads, "ablate": ablate}


@pytest.mark.parametrize("name", VIEWS)
def test_each_view_round_trips(name):
    data = VIEWS[name]()
    html = render_page("test.safetensors", {name: data})
    assert_offline(html)
    assert page_data(html) == {"model": "test.safetensors", "views": {name: data}}


def test_numbers_are_rounded_and_arrays_become_lists():
    data = {**lens(), "target": None, "n_layer": np.int64(L)}
    data["top"][0][0][0][1] = np.float32(0.123456789)
    grid = {"recovered": np.full((L, T), 1 / 3), "score": np.full((L, T), np.nan)}
    page = page_data(render_page("m", {"lens": data, "trace": {**trace(), "grids": {"attn": grid}}}))["views"]
    assert page["lens"]["top"][0][0][0][1] == 0.123457 and page["lens"]["n_layer"] == L
    assert page["trace"]["grids"]["attn"]["recovered"][0][0] == 0.333333
    assert page["trace"]["grids"]["attn"]["score"][0][0] is None  # JSON has no NaN


def test_views_and_grids_in_the_page_order():
    page = page_data(render_page("m", {"attention": synthetic(), "heads": heads(),
                                       "trace": {**trace(), "grids": dict(reversed(grids().items()))}}))["views"]
    assert list(page) == ["trace", "heads", "attention"]
    assert list(page["trace"]["grids"]) == ["resid", "mlp", "attn"]


def test_refuses_unknown_views_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown views \\['logits'\\]"):
        render_page("m", {"lens": lens(), "logits": {}})
    with pytest.raises(ValueError, match="no views"):
        render_page("m", {})
    bad = [("lens", {**lens(), "n_layer": L + 1}), ("lens", {**lens(), "tokens": TOKENS[:-1]}),
           ("trace", {**trace(), "subject": [3, T]}), ("trace", {**trace(), "grids": {"embed": grids()["resid"]}}),
           ("patch", {**patch(), "clean_tokens": CLEAN[:-1]}), ("heads", heads() | {"n_head": 5})]
    for name, data in bad:
        with pytest.raises(ValueError, match=name):
            render_page("m", {name: data})
    attention = synthetic()
    attention["tokens"] = attention["tokens"][:-1]
    with pytest.raises(ValueError, match="shape"):
        render_page("m", {"attention": attention, "lens": lens()})


def test_ablate_refuses_bad_data():
    bad = [{"tokens": " The Eiffel"}, {"heads": "23.4"}, {"heads": []}, {"heads": ["23"]}, {"heads": [23.4]},
           {"mode": "half"}, {"rows": {" Paris": [0.5, 0.1]}}, {"rows": [[" Paris", 0.5]]}, {"rows": [[7, 0.5, 0.1]]},
           {"rows": [[" Paris", 1.2, 0.1]]}, {"rows": [[" Paris", 0.5, -0.1]]}, {"rows": [[" Paris", "0.5", 0.1]]},
           {"rows": [[" Paris", True, 0.1]]}]
    for change in bad:
        with pytest.raises(ValueError, match="ablate"):
            render_page("m", {"ablate": ablate() | change})
    with pytest.raises(ValueError, match="expected one of zero, mean"):
        render_page("m", {"ablate": ablate() | {"mode": "half"}})


def test_ablate_rounds_and_keeps_unknowns_as_null():
    rows = [(" Paris", np.float32(0.123456789), np.nan), (" the", 1, np.float64(0))]
    page = page_data(render_page("m", {"ablate": ablate() | {"rows": rows}}))["views"]["ablate"]
    assert page["rows"] == [[" Paris", 0.123457, None], [" the", 1, 0]]


# -- in a browser ---------------------------------------------------------------------------------

def shown(page) -> list[str]:
    return page.locator("section[id^=tab-]:visible").evaluate_all("els => els.map(e => e.id)")


def test_tabs_list_the_views_present(open_page):
    from playwright.sync_api import expect

    page = open_page(synthetic(), heads=heads(), lens=lens())
    tabs = page.locator("#tabs button")
    assert tabs.evaluate_all("bs => bs.map(b => b.dataset.tab)") == ["lens", "heads", "attention"]
    expect(page.locator("body")).to_have_attribute("data-tab", "lens")  # the first present, in the page's order
    expect(page.locator('#tabs button[data-tab="lens"]')).to_have_attribute("aria-selected", "true")
    assert shown(page) == ["tab-lens"]
    page.click('#tabs button[data-tab="heads"]')
    assert shown(page) == ["tab-heads"]
    expect(page.locator('#tabs button[data-tab="lens"]')).to_have_attribute("aria-selected", "false")
    expect(page.locator("#title")).to_have_text("Head detector")
    page.click('#tabs button[data-tab="attention"]')
    assert shown(page) == ["tab-attention"]
    expect(page.locator(".bar")).to_have_count(len(synthetic()["tokens"]))
    page.click('#view button[data-view="heatmap"]')
    expect(page.locator("#heatmap")).to_be_visible()
    page.click('#tabs button[data-tab="lens"]')
    assert shown(page) == ["tab-lens"]

    page = open_page(synthetic())  # one view: no tab bar
    expect(page.locator("#tabs button")).to_have_count(1)
    expect(page.locator("#tabs")).to_be_hidden()
    expect(page.locator("#title")).to_have_text("Attention explorer")


def test_lens_in_a_browser(open_page):
    from playwright.sync_api import expect

    page = open_page(lens=lens())
    cells, title, guesses = page.locator("#tab-lens .cell"), page.locator("#lens-title"), page.locator(".guess")
    expect(cells).to_have_count((L + 1) * T)
    rows = page.locator("#tab-lens .hm-row").evaluate_all("els => els.map(e => e.textContent)")
    assert rows == [f"L{L} output", "L3", "L2", "L1", "L0 embed"]
    assert cells.first.get_attribute("data-layer") == str(L)  # the output on top

    # It opens on the output at the last position.
    expect(page.locator(".cell.pinned")).to_have_count(1)
    expect(title).to_have_text(f"L{L} output at #{T - 1} </script> (pinned)")
    expect(page.locator("#lens-chart circle.p")).to_have_count(L + 1)
    expect(page.locator("#lens-chart circle.p.current")).to_have_attribute("data-layer", str(L))

    layer, pos = PEAK
    cell = page.locator(f'.cell[data-layer="{layer}"][data-pos="{pos}"]')
    expect(cell).to_have_text("·Paris")
    cell.hover()
    expect(title).to_have_text(f"L{layer} at #{pos} el")
    expect(guesses).to_have_count(K)
    expect(guesses.first).to_have_attribute("data-rank", "1")
    expect(guesses.first).to_contain_text("·Paris")
    expect(guesses.first).to_contain_text("41.2%")
    expect(page.locator("#lens-target-title")).to_have_text(f"target ·Paris at L{layer}, #{pos}: 41.2%, rank 1")
    expect(page.locator("#lens-chart circle.rank.current")).to_have_attribute("data-layer", str(layer))
    page.mouse.move(5, 5)
    expect(title).to_contain_text("(pinned)")
    cell.click()
    page.mouse.move(5, 5)
    expect(page.locator(".cell.pinned")).to_have_attribute("data-pos", str(pos))
    expect(title).to_have_text(f"L{layer} at #{pos} el (pinned)")

    page = open_page(lens=lens(target=False))
    expect(page.locator(".guess")).to_have_count(K)
    expect(page.locator("#lens-target")).to_be_hidden()


def tip_at(page, cell) -> str:
    cell.hover()
    return page.locator("#tip").inner_text()


def test_trace_in_a_browser(open_page):
    from playwright.sync_api import expect

    page = open_page(trace=trace())
    kinds = page.locator("#tab-trace .kind")
    assert kinds.evaluate_all("els => els.map(e => e.dataset.kind)") == ["resid", "mlp", "attn"]
    for k in range(3):
        expect(kinds.nth(k).locator(".cell")).to_have_count(L * T)
    resid = kinds.nth(0)
    rows = resid.locator(".hm-row")
    expect(rows).to_have_count(T)
    assert resid.locator(".hm-row.marked").evaluate_all("els => els.map(e => Number(e.dataset.pos))") == \
        list(range(SUBJECT[0], SUBJECT[1] + 1))
    expect(rows.nth(SUBJECT[0])).to_have_text("·E*")
    expect(rows.nth(0)).to_have_text("·The")
    caption = page.locator("#tab-trace .caption")
    expect(caption).to_contain_text("p(' Paris'): 0.8123 on the clean run, 0.0312 with the subject corrupted")
    expect(caption).to_contain_text("10 noise samples")

    attn = kinds.nth(2)
    layer, pos = PEAK
    assert tip_at(page, attn.locator(f'.cell[data-layer="{layer}"][data-pos="{pos}"]')) == \
        f"#{pos} “el” (subject), layer {layer}\np(' Paris') = 0.7151\nrecovered 87.6%"
    over, full = attn.locator('.cell[data-layer="0"][data-pos="0"]'), attn.locator('.cell[data-layer="1"][data-pos="0"]')
    assert tip_at(page, over).endswith("recovered 130.0%")  # the number as it is, the colour clamped
    assert over.evaluate("c => c.style.background") == full.evaluate("c => c.style.background") != ""


def test_patch_in_a_browser(open_page):
    from playwright.sync_api import expect

    page = open_page(patch=patch(), trace=trace())
    page.click('#tabs button[data-tab="patch"]')
    kinds = page.locator("#tab-patch .kind")
    assert kinds.evaluate_all("els => els.map(e => e.dataset.kind)") == ["resid", "attn"]
    expect(kinds.nth(1).locator(".cell")).to_have_count(L * T)
    differ = [t for t in range(T) if TOKENS[t] != CLEAN[t]]
    assert kinds.nth(0).locator(".hm-row.marked").evaluate_all("els => els.map(e => Number(e.dataset.pos))") == differ
    expect(page.locator("#tab-patch .caption")).to_contain_text("logit(' Paris') - logit(' Rome'): 3.21 on the clean run")
    layer, pos = PEAK
    assert tip_at(page, kinds.nth(1).locator(f'.cell[data-layer="{layer}"][data-pos="{pos}"]')).startswith(
        f"#{pos} “se” (clean “el”), layer {layer}\n")
    assert tip_at(page, kinds.nth(1).locator(f'.cell[data-layer="{layer}"][data-pos="5"]')).startswith(
        f"#5 “·is”, layer {layer}\n")


def test_heads_in_a_browser(open_page):
    from playwright.sync_api import expect

    data = heads()
    page = open_page(heads=data)
    kinds = page.locator("#tab-heads .kind")
    assert kinds.evaluate_all("els => els.map(e => e.dataset.kind)") == list(data["scores"])
    for k in range(3):
        expect(kinds.nth(k).locator(".cell")).to_have_count(3 * 4)
        expect(kinds.nth(k).locator(".top li")).to_have_count(5)
    induction = kinds.nth(2)
    assert tip_at(page, induction.locator('.cell[data-layer="1"][data-head="2"]')) == "layer 1, head 2\ninduction: 0.990"
    best = induction.locator(".top li").first
    expect(best).to_have_text("1.2 0.990")
    expect(best).to_have_attribute("data-layer", "1")
    scores = [float(li.split()[1]) for li in induction.locator(".top li").all_inner_texts()]
    np.testing.assert_allclose(scores, sorted(np.ravel(data["scores"]["induction"]), reverse=True)[:5], atol=5e-4)


def test_ablate_in_a_browser(open_page):
    from playwright.sync_api import expect

    page = open_page(synthetic(), **{name: view() for name, view in VIEWS.items()})
    tabs = page.locator("#tabs button").evaluate_all("bs => bs.map(b => b.dataset.tab)")
    assert tabs == ["lens", "trace", "patch", "heads", "ablate", "attention"]
    page.click('#tabs button[data-tab="ablate"]')
    assert shown(page) == ["tab-ablate"]
    expect(page.locator("#title")).to_have_text("Head ablation")
    caption = page.locator("#tab-ablate .caption")
    expect(caption).to_contain_text("Heads 23.4, 19.1 zero-ablated (their output set to zeros)")
    expect(caption).to_contain_text("·The·Eiffel·Tower·is·in</script>")
    expect(caption.locator("b").last).to_have_text("</script>")  # the last token, whose next one is shown

    rows = page.locator(".abl-row[data-index]")
    expect(rows).to_have_count(len(ablate()["rows"]))
    paris = rows.nth(0)
    expect(paris.locator(".bar-label")).to_have_text("·Paris")
    assert paris.locator(".bar-pct").all_inner_texts() == ["68.4%", "10.9%"]
    expect(paris.locator(".abl-change")).to_have_text("−57.5 pts")
    expect(paris.locator(".abl-change")).to_have_class("abl-change down")
    expect(rows.nth(1).locator(".abl-change")).to_have_text("+26.2 pts")
    expect(rows.nth(2).locator(".abl-change")).to_have_text("0.00 pts")  # 2.13% -> 2.128%: no sign, no colour
    assert rows.nth(3).locator(".bar-pct").all_inner_texts() == ["n/a", "0.04%"]
    expect(rows.nth(3).locator(".abl-change")).to_have_text("n/a")

    background = "e => getComputedStyle(e).backgroundColor"
    rows.nth(1).hover()
    assert rows.nth(1).evaluate(background) != rows.nth(0).evaluate(background) == "rgba(0, 0, 0, 0)"
