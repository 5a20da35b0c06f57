"""The compare and history pages in a real browser (headless chromium, tests/browser_util.py).

Skipped only when no chromium is installed *and* ``CI`` is unset; in CI a missing browser fails.
"""
from __future__ import annotations

import os

import pytest

from browser_util import Browser, find_chromium
from evalkit import runfolder
from evalkit.cli import main
from helpers_report import make_result
from test_compare import _dropped

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = find_chromium()
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("no chromium binary found (install Debian's `chromium` or set EVALKIT_CHROMIUM)",
                allow_module_level=True)

HOSTILE_MODEL = "<img src=x onerror=alert(2)>"
HOSTILE_CLASS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-browser")
    base = make_result(models=(HOSTILE_MODEL, "b"), seeds=(0, 1), label_names=(HOSTILE_CLASS, "cat", "dog", "a & b"))
    runs = [runfolder.write_run(root / f"run{i}", _dropped(base, "b", by=by)) for i, by in enumerate((0.0, 0.2, 0.1))]
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(root / "cmp")]) == 0
    assert main(["history", *map(str, runs), "--out", str(root / "hist")]) == 0
    return {"compare": root / "cmp" / "index.html", "history": root / "hist" / "index.html"}


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("CI is set but no chromium binary was found: install chromium")
    with Browser(CHROMIUM, width=1440, height=900) as b:
        yield b


@pytest.mark.parametrize("which, n_images", [("compare", 2 * 2 * 2 * 3), ("history", 6)])
def test_page_opens_from_disk_cleanly(browser, pages, which, n_images):
    browser.events.clear()
    browser.set_viewport(1440, 900)
    browser.open(pages[which])
    assert browser.errors() == []
    assert browser.dialogs() == []
    urls = browser.requested_urls()
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls
    images = browser.evaluate(
        "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(images) == n_images
    assert all(complete and width > 0 and height > 0 for complete, width, height in images)
    assert browser.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert HOSTILE_MODEL in browser.evaluate("document.body.innerText")
    assert browser.evaluate("document.documentElement.scrollWidth") <= 1440


def test_compare_page_lists_the_dropped_model_first_and_sorts(browser, pages):
    browser.events.clear()
    browser.open(pages["compare"])
    first = browser.evaluate("Array.from(document.querySelectorAll('table.worst tbody tr'))"
                             ".map(r => r.cells[0].textContent)")
    assert first and all(name.startswith("b/") for name in first)
    legend = browser.evaluate("Array.from(document.querySelectorAll('.legend .class-name')).map(e => e.textContent)")
    assert legend == [HOSTILE_CLASS, "cat", "dog", "a & b"]
    browser.click("table.deltas th[data-key='delta'] button")  # numbers: largest first
    deltas = browser.evaluate("Array.from(document.querySelector('table.deltas').tBodies[0].rows)"
                              ".map(r => r.cells[5].getAttribute('data-sort'))")
    numbers = [float(v) for v in deltas if v]
    assert numbers == sorted(numbers, reverse=True) and browser.errors() == []
