"""The interactive panels in a real headless chromium with WebGL (SwiftShader).

Real mouse events over the DevTools pipe where the point is the interaction (hover, box and
lasso selection, buttons); ``window.evalkitExplorer`` to read the state back. Screenshots go
to ``$EVALKIT_SCREENSHOTS`` when set (for a person to look at), else to a temporary folder.
Skipped only when no chromium is installed *and* ``CI`` is unset.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from browser_util import NO_WEBGL_FLAGS, WEBGL_FLAGS, Browser, find_chromium
from evalkit import runfolder
from evalkit.score import knn_predict
from helpers_report import make_result

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

CHROMIUM = find_chromium()
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("no chromium binary found (install Debian's `chromium` or set EVALKIT_CHROMIUM)",
                allow_module_level=True)

HOSTILE_CLASS = "<script>alert(1)</script>"
NAMES = (HOSTILE_CLASS, "cat", "dog", "a & b")
N = 300
API = "window.evalkitExplorer"


def _thumbnails(n: int) -> np.ndarray:
    """8 x 8 grey thumbnails, each different: a ramp offset by the sample's position."""
    ramp = np.arange(64, dtype=np.int64).reshape(8, 8) * 3
    return ((ramp[None] + np.arange(n)[:, None, None] * 7) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def result():
    base = make_result(n=N, n_classes=4, models=("cnn", "vit"), label_names=NAMES)
    result = dataclasses.replace(base)
    rng = np.random.default_rng(3)
    extra = {
        "thumbnails": _thumbnails(N),
        "sample_ids": [f"img_{i:04d}.png" for i in range(N)],
        "point_scores": {e.key: {"trustworthiness": rng.uniform(0.6, 1.0, N),
                                 "continuity": rng.uniform(0.6, 1.0, N)}
                         for e in base.embeddings},
    }
    for name, value in extra.items():
        object.__setattr__(result, name, value)
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, result):
    return runfolder.write_run(tmp_path_factory.mktemp("explorer") / "run", result)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = os.environ.get("EVALKIT_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("shots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("CI is set but no chromium binary was found: install chromium")
    with Browser(CHROMIUM, width=1440, height=900, flags=WEBGL_FLAGS) as b:
        yield b


@pytest.fixture
def page(browser, run_dir):
    browser.events.clear()
    browser.set_viewport(1440, 900)
    browser.open(run_dir / "index.html")
    assert browser.evaluate(f"{API}.ready") is True, browser.evaluate(f"{API}.error")
    assert browser.evaluate(f"{API}.whenDrawn()") is True
    return browser


# --------------------------------------------------------------------------- helpers


def shoot(browser, path: Path) -> Path:
    """The viewport as it is now (scrolled), as a PNG."""
    data = browser.call("Page.captureScreenshot", {"format": "png"})["data"]
    path.write_bytes(base64.b64decode(data))
    return path


def mouse(browser, kind: str, x: float, y: float, **extra) -> None:
    browser.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, **extra})


def show_panel(browser, key: str) -> None:
    browser.evaluate(f"document.querySelector('td.panel[data-key={json.dumps(key)}]')"
                     ".scrollIntoView({block: 'center'})")
    time.sleep(0.2)


def positions(browser, key: str) -> np.ndarray:
    raw = browser.evaluate(f"Array.from({{length: {API}.n}}, (_, i) => "
                           f"{API}.screenPosition({json.dumps(key)}, i))")
    return np.array([[p["x"], p["y"]] for p in raw])


def canvas_rect(browser, key: str) -> dict:
    return browser.evaluate(
        f"(function () {{ var r = document.querySelector('td.panel[data-key={json.dumps(key)}]"
        " canvas').getBoundingClientRect(); return {x: r.left, y: r.top, w: r.width,"
        " h: r.height}; })()")


def drag(browser, points, *, modifiers: int = 0) -> None:
    """Press at the first point, move through the others, release at the last."""
    (x0, y0), rest = points[0], points[1:]
    mouse(browser, "mouseMoved", x0, y0)
    mouse(browser, "mousePressed", x0, y0, button="left", buttons=1, clickCount=1,
          modifiers=modifiers)
    mouse(browser, "mouseMoved", x0 + 1, y0 + 1, button="left", buttons=1, modifiers=modifiers)
    for x, y in rest:
        time.sleep(0.02)
        mouse(browser, "mouseMoved", x, y, button="left", buttons=1, modifiers=modifiers)
    x1, y1 = points[-1]
    mouse(browser, "mouseReleased", x1, y1, button="left", buttons=0, clickCount=1,
          modifiers=modifiers)
    time.sleep(0.3)


def line(a, b, steps=30):
    return [(a[0] + (b[0] - a[0]) * t / steps, a[1] + (b[1] - a[1]) * t / steps)
            for t in range(1, steps + 1)]


def _edge_distance(points: np.ndarray, polygon) -> np.ndarray:
    """Distance of each point to the nearest edge of the closed polygon."""
    corners = np.asarray(polygon, dtype=float)
    best = np.full(len(points), np.inf)
    for a, b in zip(corners, np.roll(corners, -1, axis=0)):
        t = np.clip(((points - a) @ (b - a)) / max((b - a) @ (b - a), 1e-12), 0, 1)
        best = np.minimum(best, np.linalg.norm(points - (a + t[:, None] * (b - a)), axis=1))
    return best


def selected_everywhere(browser) -> dict:
    return browser.evaluate(f"Object.fromEntries({API}.panels.map(k => [k, {API}.selected(k)]))")


# --------------------------------------------------------------------------- tests


def test_opens_from_disk_with_no_errors_and_no_network(page, result):
    assert page.evaluate(f"{API}.webgl") is True
    keys = list(dict.fromkeys(e.key for e in result.embeddings))
    assert page.evaluate(f"{API}.panels") == keys
    assert page.evaluate("document.querySelectorAll('.explorer-view canvas').length") == len(keys)
    assert page.evaluate("document.querySelector('td.explorer-on figure > img')"
                         ".offsetWidth") == 0  # the PNG hides behind the live view
    assert page.errors() == []
    assert page.dialogs() == []
    urls = page.requested_urls()
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls
    # Something was drawn: the canvas is not blank.
    key = keys[0]
    inked = page.evaluate(
        f"(function () {{ var c = document.querySelector('td.panel[data-key={json.dumps(key)}]"
        " canvas'); var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " var n = 0; for (var i = 0; i < d.length; i += 4) { if (d[i] + d[i+1] + d[i+2] < 600)"
        " n++; } return n; })()")
    assert inked > 500


def test_hover_shows_index_class_id_and_thumbnail(page, result, shots):
    key = page.evaluate(f"{API}.panels")[1]
    show_panel(page, key)
    pos = positions(page, key)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=2) + np.eye(N) * 1e9
    inside = np.array([page.evaluate(f"document.elementFromPoint({x}, {y}).tagName") == "CANVAS"
                       for x, y in pos])
    lonely = np.where(inside, d.min(axis=1), 0)
    i = int(np.argmax(lonely))
    assert lonely[i] > 8, "no isolated point to hover"
    mouse(page, "mouseMoved", pos[i, 0] - 30, pos[i, 1] - 30)
    mouse(page, "mouseMoved", pos[i, 0], pos[i, 1])
    time.sleep(0.3)
    tip = page.evaluate("(function () { var t = document.getElementById('explorer-tip');"
                        " return {shown: t.style.display, point: t.getAttribute('data-point'),"
                        " text: t.innerText}; })()")
    assert tip["shown"] == "block" and tip["point"] == str(i)
    assert f"#{result.indices[i]}" in tip["text"]
    assert NAMES[result.labels[i]] in tip["text"]  # the hostile class name, as text
    assert f"img_{i:04d}.png" in tip["text"]
    pixels = page.evaluate(
        f"(function () {{ var c = document.querySelector('#explorer-tip canvas[data-thumb=\"{i}\"]');"
        " var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " return Array.from(d).filter((_, k) => k % 4 === 0); })()")
    np.testing.assert_array_equal(np.array(pixels).reshape(8, 8), _thumbnails(N)[i])
    # The same sample is highlighted in the other panels too.
    shoot(page, shots / "explorer-hover.png")
    mouse(page, "mouseMoved", 5, 5)
    time.sleep(0.2)
    assert page.evaluate("document.getElementById('explorer-tip').style.display") == "none"
    assert page.errors() == []


@pytest.mark.parametrize("tool", ["box", "lasso"])
def test_selection_in_one_panel_is_the_same_in_every_panel(page, result, shots, tool):
    keys = page.evaluate(f"{API}.panels")
    key = keys[2]
    page.evaluate(f"document.querySelector('button[data-drag={tool}]').click()")
    assert page.evaluate(f"document.querySelector('button[data-drag={tool}]')"
                         ".getAttribute('aria-pressed')") == "true"
    show_panel(page, key)
    rect = canvas_rect(page, key)
    pos = positions(page, key)
    x0, y0 = rect["x"] + 0.2 * rect["w"], rect["y"] + 0.2 * rect["h"]
    x1, y1 = rect["x"] + 0.65 * rect["w"], rect["y"] + 0.6 * rect["h"]
    if tool == "box":
        drag(page, line((x0, y0), (x1, y1)))
        polygon = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    else:  # a freeform triangle
        corners = [(x0, y0), (x1, y0), (x0, y1)]
        drag(page, line(corners[0], corners[1]) + line(corners[1], corners[2])
             + line(corners[2], corners[0]))
        polygon = corners
    selection = page.evaluate(f"{API}.selection()")
    assert len(selection) > 10
    # Every panel (all models, layers, methods) shows exactly this selection.
    everywhere = selected_everywhere(page)
    assert set(everywhere) == set(keys)
    for other, chosen in everywhere.items():
        assert chosen == selection, other
    # ... which is what lies inside the drawn shape (points within 10 px of its edge may go
    # either way: the lasso's first vertex is where the drag was first seen).
    from matplotlib.path import Path as Polygon

    inside = set(np.flatnonzero(Polygon(polygon).contains_points(pos)))
    near_edge = set(np.flatnonzero(_edge_distance(pos, polygon) < 10))
    assert (set(selection) ^ inside) <= near_edge
    assert len(inside - near_edge) > 5
    # The selection bar: count and class mix.
    bar = page.evaluate("(function () { var s = document.getElementById('explorer-sel');"
                        " return {on: s.classList.contains('on'),"
                        " count: s.querySelector('.count').textContent,"
                        " mix: Array.from(s.querySelectorAll('.mix [data-class]')).map(e =>"
                        " [Number(e.getAttribute('data-class')), e.textContent])}; })()")
    assert bar["on"] and bar["count"] == f"{len(selection)} selected"
    counts = np.bincount(result.labels[selection], minlength=4)
    expected = sorted(((int(c), NAMES[c] + " " + str(counts[c])) for c in np.flatnonzero(counts)),
                      key=lambda e: (-counts[e[0]], e[0]))
    assert [tuple(m) for m in bar["mix"]] == expected
    shoot(page, shots / f"explorer-{tool}-selection.png")
    # Clearing (a real click on the bar's button) clears every panel.
    page.click("#explorer-sel button[data-action=clear]")
    assert page.evaluate(f"{API}.selection()") == []
    assert all(v == [] for v in selected_everywhere(page).values())
    assert page.evaluate("document.getElementById('explorer-sel').classList.contains('on')") is False
    assert page.errors() == []


def test_downloads_and_copy_hold_exactly_the_selection(page, result, tmp_path):
    chosen = [3, 17, 42, 99, 250]
    assert page.evaluate(f"{API}.select({chosen})") == chosen
    csv_text = page.evaluate(f"{API}.exportText('csv')").splitlines()
    assert csv_text[0] == "index,position,class,id"
    rows = [line.split(",", 2) for line in csv_text[1:]]
    assert [int(r[0]) for r in rows] == [int(result.indices[i]) for i in chosen]
    assert [int(r[1]) for r in rows] == chosen
    data = json.loads(page.evaluate(f"{API}.exportText('json')"))
    assert data["positions"] == chosen and data["count"] == 5
    assert data["indices"] == [int(result.indices[i]) for i in chosen]
    assert data["classes"] == [NAMES[result.labels[i]] for i in chosen]
    assert data["ids"] == [f"img_{i:04d}.png" for i in chosen]
    # The buttons: a real download into a folder, and the copy.
    page.call("Browser.setDownloadBehavior", {"behavior": "allow",
                                              "downloadPath": str(tmp_path)}, session=False)
    page.click("#explorer-sel button[data-action=json]")
    target = tmp_path / "selection.json"
    for _ in range(50):
        if target.exists() and target.stat().st_size:
            break
        time.sleep(0.1)
    assert json.loads(target.read_text())["indices"] == data["indices"]
    page.click("#explorer-sel button[data-action=copy]")
    time.sleep(0.2)
    assert page.evaluate(f"{API}.lastCopy") == ",".join(str(int(result.indices[i])) for i in chosen)
    assert "copied" in page.evaluate("document.querySelector('#explorer-sel .status').textContent")
    page.evaluate(f"{API}.clear()")
    assert page.errors() == []


def test_colour_by_switches(page, result, shots):
    keys = page.evaluate(f"{API}.panels")
    labels = np.asarray(result.labels)
    colors = page.evaluate(f"{API}.colors({json.dumps(keys[0])})")
    from evalkit import plots

    palette = plots.class_colors(4)
    assert colors == [palette[c] for c in labels]
    options = page.evaluate("Array.from(document.querySelectorAll('#explorer-color option'))"
                            ".map(o => o.value)")
    assert options == ["class", "knn", "disagree", "trustworthiness", "continuity"]

    def choose(mode):  # as a person does: pick an option of the select
        page.evaluate("(function () { var s = document.getElementById('explorer-color');"
                      f" s.value = {json.dumps(mode)}; s.dispatchEvent(new Event('change'));"
                      " })()")
        assert page.evaluate(f"{API}.whenDrawn()") is True
        assert page.evaluate(f"{API}.mode()") == mode

    def pixels(key):
        return page.evaluate(
            f"(function () {{ var c = document.querySelector('td.panel[data-key={json.dumps(key)}]"
            " canvas'); var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " var h = 0; for (var i = 0; i < d.length; i += 7) { h = (h * 31 + d[i]) | 0; }"
            " return h; })()")

    before = pixels(keys[0])
    choose("knn")
    time.sleep(0.3)
    assert pixels(keys[0]) != before  # really redrawn
    by_fs = {fs.key: fs for fs in result.feature_sets}
    for key in (keys[0], keys[-1]):
        model, layer, _ = key.split("/")
        wrong = knn_predict(by_fs[f"{model}/{layer}"].features, labels) != labels
        assert 0 < wrong.sum() < N
        got = np.array(page.evaluate(f"{API}.colors({json.dumps(key)})"))
        assert set(got[wrong]) == {"#d62728"} and "#d62728" not in set(got[~wrong])
    show_panel(page, keys[0])
    shoot(page, shots / "explorer-colour-knn.png")

    a, b = result.feature_sets[0].key, result.feature_sets[-1].key
    page.evaluate(f"{API}.colorBy('disagree', {json.dumps(a)}, {json.dumps(b)})")
    assert page.evaluate(f"{API}.whenDrawn()") is True
    differ = (knn_predict(by_fs[a].features, labels) != knn_predict(by_fs[b].features, labels))
    got = np.array(page.evaluate(f"{API}.colors({json.dumps(keys[3])})"))
    assert differ.any() and set(got[differ]) == {"#e6550d"}
    assert "#e6550d" not in set(got[~differ])

    choose("trustworthiness")
    got = page.evaluate(f"{API}.colors({json.dumps(keys[0])})")
    trust = result.point_scores[keys[0]]["trustworthiness"]
    assert got[int(np.argmin(trust))] != got[int(np.argmax(trust))]
    choose("class")
    assert page.evaluate(f"{API}.colors({json.dumps(keys[0])})") == [palette[c] for c in labels]
    assert page.errors() == []


def test_a_panel_opens_large_with_the_same_interactions(page, result, shots):
    keys = page.evaluate(f"{API}.panels")
    key = keys[4]
    page.evaluate(f"{API}.select([1, 2, 3])")
    page.click(f"td.panel[data-key={json.dumps(key)}] .explorer-expand")
    assert page.evaluate(f"{API}.whenDrawn()") is True
    assert page.evaluate(f"{API}.large") == key
    assert page.evaluate("document.getElementById('explorer-modal').classList.contains('on')")
    assert page.evaluate(f"{API}.selectedLarge()") == [1, 2, 3]
    big = page.evaluate("(function () { var r = document.querySelector('#explorer-modal canvas')"
                        ".getBoundingClientRect(); return {x: r.left, y: r.top, w: r.width,"
                        " h: r.height}; })()")
    assert big["w"] > 800 and big["h"] > 500
    page.evaluate("document.querySelector('button[data-drag=box]').click()")
    drag(page, line((big["x"] + 0.3 * big["w"], big["y"] + 0.3 * big["h"]),
                    (big["x"] + 0.7 * big["w"], big["y"] + 0.7 * big["h"])))
    selection = page.evaluate(f"{API}.selection()")
    assert len(selection) > 10 and selection != [1, 2, 3]
    assert page.evaluate(f"{API}.selectedLarge()") == selection
    assert all(v == selection for v in selected_everywhere(page).values())
    shoot(page, shots / "explorer-large.png")
    page.call("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape", "code": "Escape",
                                         "windowsVirtualKeyCode": 27})
    page.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": "Escape", "code": "Escape",
                                         "windowsVirtualKeyCode": 27})
    assert page.evaluate(f"{API}.large") is None
    assert not page.evaluate("document.getElementById('explorer-modal').classList"
                             ".contains('on')")
    assert page.evaluate(f"{API}.selection()") == selection  # closing keeps the selection
    page.evaluate(f"{API}.clear()")
    assert page.errors() == []


BIG = 10_500  # above the explorer's MOVING_POINTS (10,000): a moving view draws a sample


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    big = make_result(n=BIG, n_classes=3, models=("a",), layers=("features",),
                      methods=("pca", "umap"))
    return big, runfolder.write_run(tmp_path_factory.mktemp("explorer-big") / "run", big)


def test_a_moving_view_draws_a_sample_and_every_point_again_at_rest(browser, big_run):
    big, run = big_run
    browser.events.clear()
    browser.open(run / "index.html")
    assert browser.evaluate(f"{API}.whenDrawn()") is True
    key, other = browser.evaluate(f"{API}.panels")
    drawn = f"{API}.drawnPoints({json.dumps(key)})"
    sample = browser.evaluate(f"{API}.movingPoints")
    assert 9_990 <= sample <= 10_010 and browser.evaluate(drawn) == BIG
    chosen = list(range(0, BIG, 7))  # points in the sample and out of it
    assert browser.evaluate(f"{API}.select({json.dumps(chosen)})") == chosen
    show_panel(browser, key)
    rect = canvas_rect(browser, key)
    x, y = rect["x"] + rect["w"] / 2, rect["y"] + rect["h"] / 2
    mouse(browser, "mouseMoved", x, y)
    mouse(browser, "mousePressed", x, y, button="left", buttons=1, clickCount=1)
    seen, moving = [], []
    # The count and the points in one evaluation: the view rests REST_MS (180 ms) after the
    # last move, and a loaded machine can take that long between two calls.
    state = f"[{drawn}, {API}.plot({json.dumps(key)}).get('filteredPoints')]"
    for step in range(1, 80):  # pan until a frame shows the sample (one frame may lag)
        mouse(browser, "mouseMoved", x + step % 40, y + step % 40 / 2, button="left", buttons=1)
        count, moving = browser.evaluate(state)
        seen.append(count)
        if seen[-1] == sample:
            break
    mouse(browser, "mouseReleased", x + 30, y + 15, button="left", buttons=0, clickCount=1)
    assert seen[-1] == sample, seen
    # The sample: each class in proportion, the same sample whichever panel moves.
    counts, parts = np.bincount(big.labels, minlength=3), np.bincount(big.labels[moving], minlength=3)
    assert len(set(moving)) == sample
    np.testing.assert_array_equal(parts, np.maximum(1, np.round(counts * 10_000 / BIG)))
    assert browser.evaluate(f"{API}.drawnPoints({json.dumps(other)})") == BIG  # it did not move
    # At rest (REST_MS after the last move): every point again, and the whole selection.
    deadline = time.monotonic() + 10
    while browser.evaluate(drawn) != BIG and time.monotonic() < deadline:
        time.sleep(0.05)
    assert browser.evaluate(drawn) == BIG
    assert browser.evaluate(f"{API}.selected({json.dumps(key)})") == chosen
    assert browser.evaluate(f"{API}.selection()") == chosen
    assert browser.errors() == []


def test_without_webgl_the_png_panels_stay(run_dir, result, shots):
    with Browser(CHROMIUM, width=1440, height=900, flags=NO_WEBGL_FLAGS) as b:
        b.open(run_dir / "index.html")
        assert b.evaluate(f"{API}.webgl") is False
        assert b.evaluate(f"{API}.error") == "no WebGL"
        images = b.evaluate("Array.from(document.querySelectorAll('td.panel img'))"
                            ".map(i => [i.offsetWidth, i.complete && i.naturalWidth > 0])")
        assert len(images) == len({e.key for e in result.embeddings})
        assert all(width > 200 and ok for width, ok in images)
        assert b.evaluate("document.querySelectorAll('.explorer-view, #explorer-bar').length") == 0
        assert b.errors() == []
        b.evaluate("document.getElementById('grid').scrollIntoView()")
        shoot(b, shots / "explorer-no-webgl.png")


def test_without_javascript_the_png_grid_is_visible(run_dir, result):
    with Browser(CHROMIUM, width=1440, height=900, flags=WEBGL_FLAGS) as b:
        b.call("Emulation.setScriptExecutionDisabled", {"value": True})
        b.open(run_dir / "index.html")
        images = b.evaluate("Array.from(document.querySelectorAll('td.panel img'))"
                            ".map(i => i.offsetWidth)")
        assert len(images) == len({e.key for e in result.embeddings})
        assert all(width > 200 for width in images)
        assert b.evaluate("document.querySelectorAll('.explorer-view').length") == 0


def test_narrow_screens_shrink_the_panels_without_sideways_scroll(browser, run_dir):
    browser.set_viewport(1024, 900)
    browser.open(run_dir / "index.html")
    assert browser.evaluate(f"{API}.whenDrawn()") is True
    assert browser.evaluate("document.documentElement.scrollWidth") <= 1024
    sizes = browser.evaluate("(function () { var v = document.querySelector('.explorer-view');"
                             " return [v.offsetWidth, v.clientWidth,"
                             " v.querySelector('canvas').getBoundingClientRect().width,"
                             " document.querySelector('td.panel img').offsetWidth]; })()")
    view, inner, canvas, png = sizes
    assert view == 236 and math.isclose(canvas, inner, abs_tol=0.5)  # as the PNG's 236 px
    assert png == 0
    browser.set_viewport(1440, 900)


def test_printing_shows_the_png_panels(page):
    page.call("Emulation.setEmulatedMedia", {"media": "print"})
    try:
        assert page.evaluate("getComputedStyle(document.querySelector('.explorer-view'))"
                             ".display") == "none"
        assert page.evaluate("getComputedStyle(document.querySelector('td.explorer-on img'))"
                             ".display") != "none"
        assert page.evaluate("getComputedStyle(document.getElementById('explorer-bar'))"
                             ".display") == "none"
    finally:
        page.call("Emulation.setEmulatedMedia", {"media": ""})
