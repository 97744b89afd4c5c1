"""The HTML attention explorer: the page is self-contained and its data survives the trip, and in a
real browser (the system's chromium, driven by playwright; skipped without them) it draws and reacts.

The data is synthetic: random causal softmax maps, with one row of one head set by hand so that a
check knows which bar must come first and what it must say.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from tinygen.cli.explorer import SCALE, render_html, write_html, write_page
from tinygen.errors import TinygenError

from conftest import run_real

BUNDLED = Path(__file__).resolve().parents[1] / "weights" / "stories.safetensors"

TOKENS = ["He", " sat", " on\n", "</script><!--<b>x</b>", " naïve", " 😀", " end"]
PEAK_LAYER, PEAK_HEAD = 1, 2
PEAK_ROW = [0.02, 0.03, 0.05, 0.8123, 0.04, 0.0277, 0.02]  # the last query's row there: key 3 leads, 81.2%


def synthetic(tokens: list[str] = TOKENS, n_layer: int = 2, n_head: int = 3, seed: int = 0) -> dict:
    T = len(tokens)
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n_layer, n_head, T, T)) * 2
    logits[..., np.triu(np.ones((T, T), dtype=bool), 1)] = -np.inf
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    if tokens is TOKENS:
        weights[PEAK_LAYER, PEAK_HEAD, -1] = PEAK_ROW
    return {"model": "test.safetensors", "text": "".join(tokens), "tokens": list(tokens),
            "n_layer": n_layer, "n_head": n_head, "query": T - 1, "attention": weights.tolist()}


def page_data(html: str) -> dict:
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1)
    return json.loads(blob)


def data_block(html: str) -> dict:
    """The attention view's data in the page."""
    return page_data(html)["views"]["attention"]


def decode(payload: dict) -> np.ndarray:
    """The (L, H, T, T) weights back from the page's lower triangles."""
    T = len(payload["tokens"])
    units = np.array(payload["attention"], dtype=np.float64)
    weights = np.zeros(units.shape[:2] + (T, T))
    weights[..., np.tril_indices(T)[0], np.tril_indices(T)[1]] = units / payload["attention_scale"]
    return weights


def assert_offline(html: str) -> None:
    assert "http://" not in html and "https://" not in html
    for pattern in (r"<link\b", r"\bsrc\s*=", r"@import", r"url\(", r"\bfetch\(", r"XMLHttpRequest"):
        assert not re.search(pattern, html, re.I), pattern


def test_page_works_offline():
    assert_offline(render_html(synthetic()))


def test_data_round_trips_within_rounding():
    data = synthetic()
    payload = data_block(render_html(data))
    assert {k: v for k, v in payload.items() if k not in ("attention", "attention_scale")} == \
        {k: v for k, v in data.items() if k != "attention"}
    np.testing.assert_allclose(decode(payload), np.array(data["attention"]), atol=0.5 / SCALE + 1e-12)


def test_token_text_cannot_close_the_script():
    html = render_html(synthetic())
    template = files("tinygen.cli").joinpath("explorer.html").read_text(encoding="utf-8")
    assert html.count("</script") == template.count("</script")
    assert html.count("<!--") == template.count("<!--")
    assert data_block(html)["tokens"] == TOKENS


def test_write_html(tmp_path):
    path = tmp_path / "pages" / "attention.html"
    with pytest.raises(TinygenError):
        write_html(path, synthetic())
    assert not path.parent.exists()  # a folder that is not there is a mistake to report, not one to make
    path.parent.mkdir()
    write_html(path, synthetic())
    assert path.read_text(encoding="utf-8") == render_html(synthetic())
    assert [p.name for p in path.parent.iterdir()] == ["attention.html"]  # no temp file left behind


def test_rejects_weights_that_do_not_match_the_tokens():
    data = synthetic()
    data["tokens"] = data["tokens"][:-1]
    with pytest.raises(ValueError, match="shape"):
        render_html(data)


# -- in a browser ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        except sync_api.Error as e:
            pytest.skip(f"{chromium} does not start: {e}")
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, tmp_path):
    """Opens the page for some attention data and any other views (lens=..., trace=...) from a
    file:// URL; the test fails on any script error."""
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    def open_(data: dict | None = None, **views: dict):
        path = tmp_path / "explorer.html"
        write_page(path, "test.safetensors", views if data is None else {**views, "attention": data})
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready]", state="attached")
        return page

    yield open_
    page.close()
    assert errors == []


def bar_weights(page) -> list[float]:
    return [float(w) for w in page.locator(".bar").evaluate_all("bars => bars.map(b => b.dataset.weight)")]


def choose(page, layer: str, head: str) -> None:
    page.select_option("#layer", layer)
    page.select_option("#head", head)


def test_explorer_in_a_browser(open_page, tmp_path):
    from playwright.sync_api import expect

    data = synthetic()
    weights = decode(data_block(render_html(data)))
    page = open_page(data)
    tokens, bars = page.locator("#text .token"), page.locator(".bar")

    expect(tokens).to_have_count(len(TOKENS))
    assert tokens.nth(1).inner_text() == "·sat"
    assert tokens.nth(3).inner_text() == TOKENS[3]  # shown as text, not parsed as markup
    expect(page.locator("#text b")).to_have_count(0)
    expect(page.locator("#desc")).to_have_text("layer 1, mean of heads")

    # The query opens on data["query"]; hovering another previews it, clicking pins it.
    expect(bars).to_have_count(7)
    page.hover('.token[data-index="2"]')
    expect(bars).to_have_count(3)
    page.mouse.move(5, 5)
    expect(bars).to_have_count(7)
    page.click('.token[data-index="4"]')
    page.mouse.move(5, 5)
    expect(bars).to_have_count(5)
    expect(page.locator(".token.pinned")).to_have_attribute("data-index", "4")
    page.keyboard.press("ArrowRight")
    expect(bars).to_have_count(6)

    choose(page, str(PEAK_LAYER), str(PEAK_HEAD))
    page.click('.token[data-index="6"]')
    page.mouse.move(5, 5)
    expect(bars).to_have_count(7)
    expect(page.locator("#desc")).to_have_text(f"layer {PEAK_LAYER}, head {PEAK_HEAD}")
    expect(bars.first).to_have_attribute("data-index", "3")
    expect(bars.first).to_contain_text("81.2%")
    assert bar_weights(page) == sorted(PEAK_ROW, reverse=True)

    page.select_option("#head", "0")
    expect(bars.first).not_to_contain_text("81.2%")
    np.testing.assert_allclose(bar_weights(page), sorted(weights[PEAK_LAYER, 0, 6], reverse=True), atol=1e-4)
    choose(page, "mean", "mean")
    np.testing.assert_allclose(bar_weights(page), sorted(weights[..., 6, :].mean((0, 1)), reverse=True), atol=1e-4)

    links = page.locator("#links line")
    assert 0 < links.count() <= 7

    # The heatmap: past cells painted, future cells left empty, a tooltip per cell.
    choose(page, str(PEAK_LAYER), str(PEAK_HEAD))
    page.click('#view button[data-view="heatmap"]')
    expect(page.locator("body")).to_have_attribute("data-view", "heatmap")
    heat = page.locator("#heatmap")
    expect(heat).to_be_visible()
    alpha = heat.evaluate("""c => {
        const d = c.dataset, s = c.width / c.getBoundingClientRect().width, ctx = c.getContext("2d");
        const n = Number(d.n), out = [];
        for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
            const x = (Number(d.x0) + (j + 0.5) * d.cell) * s, y = (Number(d.y0) + (i + 0.5) * d.cell) * s;
            out.push(ctx.getImageData(x, y, 1, 1).data[3]);
        }
        return out;
    }""")
    painted = np.array(alpha).reshape(7, 7) == 255
    assert (painted == np.tri(7, dtype=bool)).all()

    d = heat.evaluate("c => c.dataset")
    box = heat.bounding_box()
    cell, x0, y0 = float(d["cell"]), float(d["x0"]), float(d["y0"])
    page.mouse.move(box["x"] + x0 + 3.5 * cell, box["y"] + y0 + 6.5 * cell)
    expect(page.locator("#tip")).to_have_text("“·end” #6 → “</script><!--<b>x</b>” #3: 81.2%")
    page.mouse.move(box["x"] + x0 + 6.5 * cell, box["y"] + y0 + 0.5 * cell)
    expect(page.locator("#tip")).to_contain_text("future")

    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_long_input_stays_responsive(open_page):
    from playwright.sync_api import expect

    T = 400
    start = time.perf_counter()
    page = open_page(synthetic([f" w{i}" for i in range(T)], n_layer=2, n_head=2))
    expect(page.locator(".bar")).to_have_count(T)
    expect(page.locator(f'.token[data-index="{T - 1}"]')).to_be_in_viewport()  # the text scrolled to the query
    page.click('#view button[data-view="heatmap"]')
    expect(page.locator("#heatmap")).to_have_attribute("data-n", str(T))
    page.hover('.token[data-index="10"]')
    expect(page.locator(".bar")).to_have_count(11)
    assert time.perf_counter() - start < 15


def test_page_opens_on_the_layer_and_head_it_names(open_page):
    from playwright.sync_api import expect

    page = open_page({**synthetic(), "layer": 0, "head": 2})
    assert page.input_value("#layer") == "0" and page.input_value("#head") == "2"
    expect(page.locator("#desc")).to_have_text("layer 0, head 2")


@pytest.mark.skipif(not BUNDLED.exists(), reason="no bundled model in weights/")
def test_cli_page_of_the_bundled_model(browser, tmp_path):
    """`tinygen attention --html` end to end: the page of the README's example, in the browser,
    shows what the terminal chart shows (layer 2, head 2: "bank" looks at "river")."""
    from playwright.sync_api import expect

    path = tmp_path / "bank.html"
    r = run_real("attention", "He sat on the river's bank", "--token", "bank", "--layer", "2", "--head", "2",
                 "--html", path)
    assert r.rc == 0, r.err
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready]", state="attached")
    expect(page.locator("#text .token")).to_have_count(8)
    expect(page.locator("#desc")).to_have_text("layer 2, head 2")
    expect(page.locator(".bar").first).to_contain_text("river")
    expect(page.locator(".bar").first).to_contain_text("35.5%")
    page.close()
