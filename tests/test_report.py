"""The run folder and the HTML report: files, strict JSON, self-containment, escaping, atomicity."""
from __future__ import annotations

import base64
import difflib
import io
import json
import math
import os
import re
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evalkit import plots, report, runfolder
from evalkit.errors import EvalkitError
from helpers_report import make_result

GOLDEN = Path(__file__).parent / "golden" / "report.html"
HOSTILE_CLASS = "<script>alert(1)</script>"
HOSTILE_MODEL = "<img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def result():
    return make_result(n=200, n_classes=4, seeds=(0, 1))


@pytest.fixture(scope="module")
def html(result):
    return report.render_html(result)


def _strict_json(text: str):
    def reject(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=reject)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# --------------------------------------------------------------------------- files


def test_write_run_writes_the_four_files(tmp_path, result):
    out = runfolder.write_run(tmp_path / "run", result)
    assert out == (tmp_path / "run").absolute()
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "embeddings.npz", "index.html", "metrics.json"]
    assert (out / "config.yaml").read_text(encoding="utf-8") == result.config_yaml
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left beside it


def test_metrics_json_is_strict_and_nan_becomes_null(tmp_path, result):
    out = runfolder.write_run(tmp_path / "run", result)
    text = (out / "metrics.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    data = _strict_json(text)
    assert {"rows", "checks", "provenance"} <= set(data)
    assert len(data["rows"]) == len(result.rows)
    assert data["rows"][0]["silhouette"] is None  # NaN in the result
    assert data["rows"][1] == {k: v for k, v in result.rows[1].items()}
    assert [c["name"] for c in data["checks"]] == [c.name for c in result.checks]
    assert data["checks"][2]["value"] is None
    assert set(data["checks"][0]) == set(result.checks[0].as_dict())
    assert data["provenance"]["seeds"] == [0, 1]
    assert data["extras"]["cka"]["keys"] == list(result.cka.keys)


def test_embeddings_npz_keys_shapes_dtypes(tmp_path, result):
    out = runfolder.write_run(tmp_path / "run", result)
    with np.load(out / "embeddings.npz", allow_pickle=False) as npz:
        keys = set(npz.files)
        n = len(result.labels)
        for emb in result.embeddings:
            key = emb.key if emb.seed == 0 else f"{emb.key}@seed{emb.seed}"
            assert key in keys
            assert npz[key].dtype == np.float32 and npz[key].shape == (n, 2)
            np.testing.assert_array_equal(npz[key], emb.coords.astype(np.float32))
        assert len(keys) == len(result.embeddings) + 3
        assert npz["labels"].dtype == np.int64
        np.testing.assert_array_equal(npz["labels"], result.labels)
        np.testing.assert_array_equal(npz["indices"], result.indices)
        assert list(npz["label_names"]) == list(result.label_names)


def test_json_sanitiser_handles_numpy_and_non_finite():
    payload = runfolder._jsonable({"a": np.float32(0.5), "b": np.int64(3),
                                "c": np.array([1.0, np.nan]), "d": (float("inf"), -float("inf")),
                                "e": Path("x"), 1: np.bool_(True)})
    assert payload == {"a": 0.5, "b": 3, "c": [1.0, None], "d": [None, None], "e": "x", "1": True}


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=20))
def test_json_sanitiser_always_gives_strict_json(value):
    text = json.dumps(runfolder._jsonable(value), allow_nan=False)
    _strict_json(text)


# --------------------------------------------------------------------------- atomic writing


def test_rewrite_replaces_evalkits_files_and_keeps_the_users(tmp_path, result):
    """Everything evalkit did not write (notes, figures) is carried into the new run folder."""
    out = tmp_path / "run"
    runfolder.write_run(out, result)
    (out / "index.html").write_text("an older report")
    (out / "notes.md").write_text("# what I saw\n")
    (out / "figs" / "deep").mkdir(parents=True)
    (out / "figs" / "a.png").write_bytes(bytes(range(256)) * 4)
    (out / "figs" / "deep" / "b.txt").write_text("b")
    (out / "latest.png").symlink_to("figs/a.png")
    users = {k: v for k, v in _tree(out).items() if k.startswith(("notes", "figs"))}
    runfolder.write_run(out, result)
    assert "an older report" not in (out / "index.html").read_text()
    assert {k: v for k, v in _tree(out).items() if k.startswith(("notes", "figs"))} == users
    assert (out / "latest.png").is_symlink() and os.readlink(out / "latest.png") == "figs/a.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    runfolder.write_run(out, result)  # again: still there
    assert {k: v for k, v in _tree(out).items() if k.startswith(("notes", "figs"))} == users


def test_users_files_are_copied_when_links_are_refused(tmp_path, result, monkeypatch):
    out = tmp_path / "run"
    runfolder.write_run(out, result)
    (out / "figs").mkdir()
    (out / "figs" / "a.png").write_bytes(b"png")

    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(runfolder.os, "link", no_links)
    runfolder.write_run(out, result)
    assert (out / "figs" / "a.png").read_bytes() == b"png"


def test_a_failing_rerun_keeps_the_folder_with_the_users_files(tmp_path, result, monkeypatch):
    out = tmp_path / "run"
    runfolder.write_run(out, result)
    (out / "notes.md").write_text("# mine\n")
    (out / "figs").mkdir()
    (out / "figs" / "a.png").write_bytes(b"\x89PNG" + bytes(100))
    before = _tree(out)

    def broken(old, new, **kwargs):  # the disk fills up while carrying the user's files
        (new / "notes.md").write_text("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runfolder, "_carry_user_files", broken)
    with pytest.raises(EvalkitError, match="No space left on device"):
        runfolder.write_run(out, result)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failure_mid_write_keeps_the_previous_folder(tmp_path, result, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "index.html").write_text("previous run")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(bytes(range(256)))
    before = _tree(out)

    real_write = runfolder._write_file
    calls = []

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(runfolder, "_write_file", failing_write)
    with pytest.raises(EvalkitError, match=r"cannot write the run folder .*run: No space left on device; the "
                                           r"earlier run folder is left as it was; free some space"):
        runfolder.write_run(out, result)
    assert len(calls) == 2
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failure_during_the_swap_puts_the_previous_folder_back(tmp_path, result, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"rows": []}')
    before = _tree(out)
    real_rename = os.rename
    calls = []

    def failing_rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old folder moved aside; moving the new one in fails
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(runfolder.os, "rename", failing_rename)
    with pytest.raises(EvalkitError, match="Input/output error; the earlier run folder is left as it was"):
        runfolder.write_run(out, result)
    monkeypatch.undo()
    assert calls[0][0] == "run" and calls[1][1] == "run"
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failure_while_rendering_leaves_nothing(tmp_path, result, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(report, "render_html", broken)
    with pytest.raises(RuntimeError):
        runfolder.write_run(tmp_path / "run", result)
    assert list(tmp_path.iterdir()) == []


def test_out_dir_that_is_a_file_is_a_user_error(tmp_path, result):
    target = tmp_path / "run"
    target.write_text("not a folder")
    with pytest.raises(EvalkitError, match=r"run.*not a folder"):
        runfolder.write_run(target, result)
    assert target.read_text() == "not a folder"


def test_parent_that_is_a_file_is_a_user_error(tmp_path, result):
    (tmp_path / "parent").write_text("x")
    with pytest.raises(EvalkitError, match="parent"):
        runfolder.write_run(tmp_path / "parent" / "run", result)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root can write anywhere; needs POSIX permissions")
def test_unwritable_parent_is_a_user_error(tmp_path, result):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(EvalkitError, match="ro"):
            runfolder.write_run(parent / "run", result)
    finally:
        parent.chmod(0o700)


def test_permission_denied_in_parent_is_a_user_error(tmp_path, result, monkeypatch):
    real_mkdir = Path.mkdir

    def denied(self, *args, **kwargs):
        if self.name.startswith(".run.tmp-"):
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(EvalkitError, match=r"cannot write in .*Permission denied"):
        runfolder.write_run(tmp_path / "run", result)
    assert list(tmp_path.iterdir()) == []


def test_missing_parents_are_created(tmp_path, result):
    out = runfolder.write_run(tmp_path / "a" / "b" / "run", result)
    assert (out / "index.html").exists()


# --------------------------------------------------------------------------- HTML


def _without_script_bodies(html: str) -> str:
    return re.sub(r"(<script\b[^>]*>).*?(</script>)", r"\1\2", html, flags=re.S)


def test_html_loads_nothing_from_the_network(html):
    markup = _without_script_bodies(html)  # the vendored libraries name URLs in messages
    attributes = re.findall(r"""(?:src|href|action|poster|data)\s*=\s*["']?([^"'\s>]+)""", markup)
    for value in attributes:
        assert value.startswith(("data:", "#")), value
    assert not re.search(r"url\(\s*['\"]?(?!data:)", markup)
    assert "<link" not in markup and "@import" not in markup
    assert "http://" not in markup and "https://" not in markup
    for script in re.findall(r"<script>(.*?)</script>", html, flags=re.S):
        for api in ("fetch(", "XMLHttpRequest", "importScripts", "sendBeacon", "WebSocket",
                    "EventSource"):
            assert api not in script, api
    assert "Content-Security-Policy" in html and "default-src 'none'" in unescape(html)


def test_every_image_is_an_inline_png_that_decodes(html, result):
    from PIL import Image

    images = re.findall(r"<img\b[^>]*>", html)
    # one panel per embedding (first seed), one R_NX chart per method
    assert len(images) == len({e.key for e in result.embeddings}) + len({e.method for e in result.embeddings})
    for tag in images:
        src = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag)
        assert src, tag
        assert re.search(r'alt="[^"]+"', tag)
        with Image.open(io.BytesIO(base64.b64decode(src.group(1), validate=True))) as image:
            image.verify()
            assert image.format == "PNG"


def test_script_hash_in_csp_matches_the_inline_script(html):
    import hashlib

    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    assert len(scripts) == 3  # vendored libraries, explorer.js, report.js
    csp = unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"',
                             html).group(1))
    for script in scripts:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert csp.count("'sha256-") == 3
    # Only the one JSON block is a script of another type, and it cannot run.
    others = re.findall(r"<script\b([^>]+)>", html)
    assert others == [' type="application/json" id="explorer-data"']


def test_hostile_names_are_escaped():
    result = make_result(n=60, n_classes=3, models=(HOSTILE_MODEL, "b"), methods=("pca",),
                         label_names=(HOSTILE_CLASS, "a & b", '"quoted"'),
                         name="</title><script>alert(3)</script>")
    page = report.render_html(result)
    assert HOSTILE_CLASS not in page
    assert HOSTILE_MODEL not in page
    assert "</title><script>" not in page
    assert page.count("<script") == 4  # ours: libraries, explorer, report, explorer data
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "a &amp; b" in page
    markup = _without_script_bodies(page)
    assert "onerror=" not in markup.replace("onerror=alert(2)&gt;", "")


def test_header_summary_and_sections(html, result):
    assert "<h1>fake-run</h1>" in html
    assert "2024-05-01 12:00 UTC" in html
    for section in ("summary", "checks", "grid", "scores", "cka", "per-class", "stability",
                    "notes", "provenance"):
        assert f'<section id="{section}">' in html
    assert "1 of 3 checks failed:</strong> trust-tsne." in html
    assert "1 warned: silhouette-warn" in html
    assert "status status-fail" in html and "status status-pass" in html
    # hyper-parameters next to their method, explanations, provenance, config
    assert '<span class="pk">perplexity</span> 30' in html
    assert "majority vote of its k = 10 nearest neighbours" in html
    assert "<code>evalkit report configs/demo.yaml --out runs/demo</code>" in html
    assert "3 min 25 s" in html
    assert "<pre class=\"config\">name: fake-run" in html
    assert "mean \u00b1 standard deviation over 2 seeds" in html


def test_score_table_marks_best_and_explains_undefined(html):
    table = html.split('<table class="scores sortable">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[1], flags=re.S)
    assert len(rows) == 2 * 2 * 4  # 2 models x 2 layers x (features + 3 methods)
    reason = "needs at least 2 classes with 2+ samples each"
    assert f'<span class="na" title="{reason}">n/a</span>' in table
    assert table.count('class="mark"') >= 4
    # the best kNN accuracy among raw features is b/head
    best_rows = [r for r in rows if "<td data-sort=\"features\">" in r and "★" in r]
    assert len(best_rows) == 1 and ">b<" in best_rows[0] and ">head<" in best_rows[0]
    assert 'data-type="number" data-key="knn_accuracy"' in table


def test_optional_sections_are_left_out():
    result = make_result(n=60, n_classes=3, models=("a",), methods=("pca",), checks=(),
                         extras=False)
    page = report.render_html(result)
    for section in ("checks", "cka", "per-class", "stability"):
        assert f'<section id="{section}">' not in page
    assert "No checks configured." in page


def test_all_checks_passing_says_so():
    from evalkit.results import CheckResult

    check = CheckResult("ok", "knn_accuracy", "a", "head", "features", ">= 0.1", 0.8, "pass",
                        "fail")
    page = report.render_html(make_result(n=60, n_classes=3, models=("a",), methods=("pca",),
                                          checks=(check,)))
    assert "The check passed." in page


def test_legend_uses_the_panel_colours(html):
    legend = html.split('<ul class="legend"', 1)[1].split("</ul>", 1)[0]
    colors = re.findall(r"background:(#[0-9a-f]{6})", legend)
    assert colors == plots.class_colors(4)


def test_demo_sized_report_stays_small():
    result = make_result(n=900, n_classes=10, models=("a", "b", "c"), seeds=(0,))
    page = report.render_html(result)
    assert page.count("<img ") == 18 + 3  # 18 panels, 3 R_NX charts
    assert len(page.encode("utf-8")) < 5 * 1024 * 1024


def test_rnx_charts_and_intervals_are_shown(result, html, tmp_path):
    from PIL import Image

    section = html.split('<section id="rnx">', 1)[1].split("</section>", 1)[0]
    charts = re.findall(r"<figure class=\"chart\"><img [^>]*>", section)
    assert len(charts) == 3  # tsne, umap, pca: one line per feature set in each
    alt = unescape(re.search(r'alt="([^"]+)"', charts[0]).group(1))
    assert "t-SNE" in alt and all(f"{fs.key} from" in alt for fs in result.feature_sets)
    src = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', charts[0]).group(1)
    with Image.open(io.BytesIO(base64.b64decode(src))) as image:
        assert image.size == (420, 300)
    # kNN accuracy with its 95% interval in the scores table: "0.575 ± 0.005 [0.49, 0.66]"
    row = result.rows[1]
    lo, hi = row["knn_accuracy_lo"], row["knn_accuracy_hi"]
    scores = html.split('<section id="scores">', 1)[1].split("</section>", 1)[0]
    assert f"[{lo:.2f}, {hi:.2f}]" in scores
    assert "knn_accuracy_lo" not in scores and "rnx_auc" in scores  # bounds are not columns of their own
    assert "95% interval over the class" in html.split('<section id="per-class">', 1)[1]
    assert "R_NX area" in html.split('<section id="notes">', 1)[1] and "K = 1 to 198" in html
    data = json.loads((runfolder.write_run(tmp_path / "run", result) / "metrics.json").read_text())
    assert data["rows"][1]["knn_accuracy_lo"] == lo
    curve = data["extras"]["rnx_curves"]["a/features/tsne"]
    assert curve["k"][0] == 1 and curve["k"][-1] == 198 and len(curve["k"]) == len(curve["r_nx"])
    assert data["extras"]["per_class_knn_interval"]["a/features"][0] == list(result.per_class_knn_interval["a/features"][0])


def test_large_panel_stays_reasonable():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 70_000)
    uri = plots.scatter_png(rng.normal(size=(70_000, 2)), labels, plots.class_colors(10))
    assert len(uri) < 400_000


# --------------------------------------------------------------------------- plots


def test_twenty_five_classes_get_twenty_five_colours():
    colors = plots.class_colors(25)
    assert len(colors) == 25 and len(set(colors)) == 25
    page = report.render_html(make_result(n=100, n_classes=25, models=("a",), methods=("pca",),
                                          extras=False))
    legend = page.split('<ul class="legend"', 1)[1].split("</ul>", 1)[0]
    assert len(set(re.findall(r"background:(#[0-9a-f]{6})", legend))) == 25


@pytest.mark.parametrize("n", [1, 10, 11, 20, 21, 60])
def test_palettes_are_distinct_up_to_sixty(n):
    colors = plots.class_colors(n)
    assert len(colors) == n and len(set(colors)) == n
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colors)


def test_palette_starts_with_tab10_and_repeats_past_sixty():
    assert plots.class_colors(10)[:2] == ["#1f77b4", "#ff7f0e"]
    assert plots.class_colors(20)[:10] == plots.class_colors(10)
    many = plots.class_colors(130)
    assert many[60] == many[0] and len(set(many)) == 60


def test_marker_style_shrinks_with_n():
    sizes = [plots.marker_style(n) for n in (10, 500, 900, 5_000, 70_000, 1_000_000)]
    diameters = [d for d, _ in sizes]
    assert diameters == sorted(diameters, reverse=True)
    assert diameters[1] == pytest.approx(8.0) and diameters[4] == pytest.approx(0.6)
    assert all(0 < a <= 1 for _, a in sizes)


def test_scatter_png_handles_non_finite_points_and_bad_shapes():
    from PIL import Image

    coords = np.array([[0, 0], [1, np.nan], [2, 1], [np.inf, 0]], dtype=np.float32)
    uri = plots.scatter_png(coords, np.array([0, 1, 0, 1]), plots.class_colors(2))
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.size == (plots.PANEL_PX, plots.PANEL_PX)
    with pytest.raises(ValueError, match="n_samples, 2"):
        plots.scatter_png(np.zeros((3, 3)), np.zeros(3, int), plots.class_colors(1))


def test_heat_color_is_readable():
    assert plots.heat_color(None) == plots.heat_color(math.nan)
    light, dark = plots.heat_color(0.0), plots.heat_color(1.0)
    assert light[1] != dark[1]  # text colour flips on dark cells
    assert plots.heat_color(2.0) == dark and plots.heat_color(-1.0) == light


# --------------------------------------------------------------------------- golden


def scrub(page: str) -> str:
    """Remove what changes between machines and runs: image bytes, dates, durations, versions."""
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,<png>", page)
    page = re.sub(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?( ?(UTC|Z|[+-]\d{2}:?\d{2}))?",
                  "<date>", page)
    page = re.sub(r"\b(\d+ h )?(\d+ min )?\d+(\.\d+)? s\b", "<duration>", page)
    page = re.sub(r"\b\d+\.\d+\.\d+[\w.+-]*", "<version>", page)
    # The explorer: its data (tested in test_explorer.py), libraries and script, their hashes.
    page = re.sub(r'(<script type="application/json" id="explorer-data">).*?(</script>)',
                  r"\1<explorer data>\2", page, flags=re.S)
    page = re.sub(r"<script>(/\* regl |// Interactive embedding panels).*?</script>",
                  lambda m: "<script><vendored libraries></script>" if m.group(1).startswith("/*")
                  else "<script><explorer.js></script>", page, flags=re.S)
    page = re.sub(r"sha256-[A-Za-z0-9+/=]+", "sha256-<hash>", page)
    return page


def test_golden_report():
    result = make_result(n=120, n_classes=3, models=("a", "b"), methods=("tsne", "pca"),
                         seeds=(0, 1), label_names=("cat", "dog", HOSTILE_CLASS))
    page = scrub(report.render_html(result))
    if os.environ.get("EVALKIT_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(page, encoding="utf-8")
    expected = GOLDEN.read_text(encoding="utf-8")
    if page != expected:
        diff = "".join(list(difflib.unified_diff(expected.splitlines(True), page.splitlines(True),
                                                 "golden", "rendered"))[:80])
        pytest.fail("rendered report differs from tests/golden/report.html; if the change is "
                    f"intended, rerun with EVALKIT_UPDATE_GOLDEN=1\n{diff}")


def test_a_skipped_check_shows_as_skipped_not_passed():
    from evalkit.results import CheckResult

    checks = (CheckResult("no drop", "knn_accuracy", "a", "head", "features", "drop <= 0.02 vs baseline", 0.8,
                          "skip", "fail", "drop <= 0.02 vs baseline: skipped (no baseline value; pass --baseline DIR)"),)
    result = make_result(n=60, n_classes=3, models=("a",), methods=("pca",), checks=checks)
    page = report.render_html(result)
    assert "checks passed" not in page and "The check passed" not in page
    assert "No check failed; 1 of 1 skipped, not evaluated:</strong> no drop" in page
    assert 'class="status status-skip">skip<' in page
    assert "skipped" in report.render_notebook(result)
