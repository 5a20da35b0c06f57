"""The report in a real browser: headless chromium over the DevTools pipe (tests/browser_util.py).

Skipped only when no chromium is installed *and* ``CI`` is unset; in CI a missing browser fails.
"""
from __future__ import annotations

import os

import pytest

from browser_util import Browser, find_chromium, screenshot
from evalkit import runfolder
from helpers_report import make_result

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = find_chromium()
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("no chromium binary found (install Debian's `chromium` or set EVALKIT_CHROMIUM)",
                allow_module_level=True)

HOSTILE_CLASS = "<script>alert(1)</script>"
HOSTILE_MODEL = "<img src=x onerror=alert(2)>"

ROWS = "Array.from(document.querySelector('table.scores').tBodies[0].rows)"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    result = make_result(n=300, n_classes=4, models=(HOSTILE_MODEL, "b"), seeds=(0, 1),
                         label_names=(HOSTILE_CLASS, "cat", "dog", "a & b"))
    return runfolder.write_run(tmp_path_factory.mktemp("browser") / "run", result)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("CI is set but no chromium binary was found: install chromium")
    with Browser(CHROMIUM, width=1440, height=900) as b:
        yield b


@pytest.fixture
def page(browser, run_dir):
    browser.events.clear()
    browser.set_viewport(1440, 900)
    browser.open(run_dir / "index.html")
    return browser


def test_every_image_decodes(page):
    images = page.evaluate(
        "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(images) == 2 * 2 * 3 + 3  # every panel, and one R_NX chart per method
    assert all(complete and width > 0 and height > 0 for complete, width, height in images)


def test_clicking_a_header_sorts_the_table(page):
    column = page.evaluate(
        "Array.from(document.querySelector('table.scores').tHead.rows[0].cells)"
        ".findIndex(th => th.dataset.key === 'silhouette')")
    assert column > 2
    read = f"{ROWS}.map(r => r.cells[{column}].getAttribute('data-sort'))"

    def values():
        raw = page.evaluate(read)
        return [float(v) if v else None for v in raw]

    before = values()
    assert None in before and before.index(None) < len(before) - 1  # a NaN row, not at the end

    page.click("table.scores th[data-key='silhouette'] button")
    first = values()
    numbers = [v for v in first if v is not None]
    assert first[len(numbers):] == [None] * (len(first) - len(numbers))  # undefined last
    assert numbers == sorted(numbers, reverse=True)  # a score: best first
    assert page.evaluate("document.querySelector(\"th[data-key='silhouette']\")"
                         ".getAttribute('aria-sort')") == "descending"

    page.click("table.scores th[data-key='silhouette'] button")
    second = values()
    numbers = [v for v in second if v is not None]
    assert numbers == sorted(numbers) and second[-1] is None

    page.click("table.scores th[data-key='model'] button")
    models = page.evaluate(f"{ROWS}.map(r => r.cells[0].textContent)")
    assert models == sorted(models, key=str.lower)


def test_no_errors_no_network_no_alert_and_hostile_names_are_text(page):
    assert page.errors() == []
    assert page.dialogs() == []
    urls = page.requested_urls()
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls
    text = page.evaluate("document.body.innerText")
    assert HOSTILE_CLASS in text and HOSTILE_MODEL in text
    assert page.evaluate("document.scripts.length") == 4  # libraries, explorer, data, report.js
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
    legend = page.evaluate("Array.from(document.querySelectorAll('.legend .class-name'))"
                           ".map(e => e.textContent)")
    assert legend == [HOSTILE_CLASS, "cat", "dog", "a & b"]


@pytest.mark.parametrize("width", [1440, 1024])
def test_page_does_not_scroll_sideways(browser, run_dir, width):
    browser.set_viewport(width, 900)
    browser.open(run_dir / "index.html")
    assert browser.evaluate("document.documentElement.scrollWidth") <= width


def test_print_layout_hides_navigation(page):
    page.call("Emulation.setEmulatedMedia", {"media": "print"})
    try:
        style = "getComputedStyle(document.querySelector('{}')).{}"
        assert page.evaluate(style.format("nav.toc", "display")) == "none"
        assert page.evaluate(style.format(".fs-head", "position")) == "static"
    finally:
        page.call("Emulation.setEmulatedMedia", {"media": ""})


def test_screenshot_at_laptop_width(run_dir, tmp_path):
    from PIL import Image

    full = screenshot(run_dir / "index.html", tmp_path / "full.png", width=1440, binary=CHROMIUM)
    top = screenshot(run_dir / "index.html", tmp_path / "top.png", width=1024, height=700,
                     binary=CHROMIUM)
    with Image.open(full) as image:
        assert image.size[0] == 1440 and image.size[1] > 2000
    with Image.open(top) as image:
        assert image.size == (1024, 700)
