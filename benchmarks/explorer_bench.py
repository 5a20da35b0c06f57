"""The report's interactive explorer at scale: file size, time to interactive, panning speed.

Builds a report of ``--n`` points (default 70,000), 2 models x 2 layers x 3 methods (12
panels), from the synthetic run of ``tests/helpers_report.py`` (no thumbnails: 70,000 is above
the default cap of 20,000), opens it from disk in headless chromium with WebGL on SwiftShader
(``--use-angle=swiftshader``; software rendering on the CPU, so a real GPU only does better),
then pans one panel with real mouse drags for ``--seconds`` and counts the frames the panel
redrew (regl-scatterplot's ``draw`` events) and the page's animation frames.

``whenDrawn()`` resolves when every panel has handed its first frames to WebGL; a software
GPU may still be working through them for a second or two, and a pan started at once pays for
that. ``--settle S`` waits S seconds before panning, to measure panning alone.

Usage: ``python benchmarks/explorer_bench.py [--n 70000] [--seconds 4] [--settle 0] [--out DIR]``.
Prints one JSON object. Not a test: the figures depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=70_000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", default=None, help="keep the run folder here")
    parser.add_argument("--run", default=None, help="measure this existing run folder instead")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to wait after the panels are drawn, before panning")
    parser.add_argument("--screenshot", default=None, help="PNG of the panned panel's row")
    args = parser.parse_args(argv)

    from browser_util import WEBGL_FLAGS, Browser
    from evalkit import explorer, report, runfolder
    from helpers_report import make_result

    import re

    from evalkit.score import knn_predict

    if args.run:
        figures = {"run": args.run}
        run = Path(args.run)
        return _browse(run, figures, args)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="explorer-bench-"))
    started = time.perf_counter()
    result = make_result(n=args.n, n_classes=10, models=("a", "b"))
    # As the pipeline will: kNN predictions from the raw features (it reuses its shared graph;
    # here an exact search, not timed as part of the report).
    object.__setattr__(result, "knn_predictions", {
        fs.key: knn_predict(fs.features, result.labels) for fs in result.feature_sets})
    made = time.perf_counter()
    run = runfolder.write_run(out / "run", result)
    written = time.perf_counter()
    html = (run / "index.html").read_text(encoding="utf-8")
    block = re.search(r'id="explorer-data">(.*?)</script>', html, flags=re.S).group(1)
    figures = {
        "n_points": args.n, "panels": len(json.loads(block)["panels"]),
        "html_mb": round(len(html.encode()) / 1e6, 2),
        "explorer_data_mb": round(len(block.encode()) / 1e6, 2),
        "libraries_kb": round(len(explorer.vendor_script().encode()) / 1e3),
        "report_build_s": round(written - made, 1), "fake_result_and_knn_s": round(made - started, 1),
    }

    return _browse(run, figures, args)


def _browse(run, figures, args) -> int:
    from browser_util import WEBGL_FLAGS, Browser

    with Browser(width=1440, height=900, flags=WEBGL_FLAGS, timeout=300) as browser:
        t0 = time.perf_counter()
        browser.open(run / "index.html")
        loaded = time.perf_counter()
        assert browser.evaluate("window.evalkitExplorer.ready") is True
        browser.evaluate("window.evalkitExplorer.whenDrawn()")
        figures["load_s"] = round(loaded - t0, 2)
        figures["interactive_s"] = round(time.perf_counter() - t0, 2)
        key = browser.evaluate("window.evalkitExplorer.panels")[0]
        browser.evaluate(f"document.querySelector('td.panel[data-key={json.dumps(key)}]')"
                         ".scrollIntoView({block: 'center'})")
        rect = browser.evaluate(
            f"(function () {{ var r = document.querySelector('td.panel[data-key="
            f"{json.dumps(key)}] canvas').getBoundingClientRect(); return [r.left, r.top,"
            " r.width, r.height]; })()")
        browser.evaluate(
            "(function () { window.__draws = 0; window.__frames = 0;"
            f" window.evalkitExplorer.plot({json.dumps(key)}).subscribe('draw',"
            " function () { window.__draws++; });"
            " (function tick() { window.__frames++; requestAnimationFrame(tick); })(); })()")
        cx, cy = rect[0] + rect[2] / 2, rect[1] + rect[3] / 2
        if args.settle:
            figures["settle_s"] = args.settle
            time.sleep(args.settle)

        def move(kind, x, y, **extra):
            browser.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, **extra})

        move("mouseMoved", cx, cy)
        move("mousePressed", cx, cy, button="left", buttons=1, clickCount=1)
        draws0, frames0 = browser.evaluate("[window.__draws, window.__frames]")
        start, step, events = time.perf_counter(), 0, 0
        while time.perf_counter() - start < args.seconds:
            step += 1
            dx = 60 * ((step // 40) % 2 * 2 - 1) * ((step % 40) / 40)  # back and forth
            move("mouseMoved", cx + dx, cy + dx / 3, button="left", buttons=1)
            events += 1
            time.sleep(0.004)
        elapsed = time.perf_counter() - start
        draws1, frames1 = browser.evaluate("[window.__draws, window.__frames]")
        # Released away from where it was pressed: a release on the spot is a click, which
        # selects a point and redraws every panel just before the in-page pan below.
        move("mouseMoved", cx + 40, cy + 20, button="left", buttons=1)
        move("mouseReleased", cx + 40, cy + 20, button="left", buttons=0, clickCount=1)
        figures["pan_events_per_s"] = round(events / elapsed, 1)
        figures["pan_redraws_per_s"] = round((draws1 - draws0) / elapsed, 1)
        figures["page_frames_per_s"] = round((frames1 - frames0) / elapsed, 1)
        # The same pan driven from inside the page, one camera step per animation frame: the
        # frame rate the page reaches, without the DevTools round trip per mouse event.
        figures["pan_in_page_frames_per_s"] = browser.evaluate(f"""(async function () {{
            var p = window.evalkitExplorer.plot({json.dumps(key)}), frames = 0;
            var t0 = performance.now();
            await new Promise(function (done) {{ (function step() {{
                frames++; var t = (performance.now() - t0) / 1000;
                p.set({{cameraTarget: [0.3 * Math.sin(3 * t), 0.2 * Math.cos(2 * t)]}});
                if (t < {args.seconds}) {{ requestAnimationFrame(step); }} else {{ done(); }}
            }})(); }});
            return Math.round(frames / ((performance.now() - t0) / 1000) * 10) / 10; }})()""")
        figures["load_average"] = [round(x, 2) for x in __import__("os").getloadavg()]
        figures["console_errors"] = browser.errors()
        if args.screenshot:
            import base64

            shot = browser.call("Page.captureScreenshot", {"format": "png"})["data"]
            Path(args.screenshot).write_bytes(base64.b64decode(shot))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
