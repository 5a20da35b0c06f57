"""``evalkit compare`` and ``evalkit history`` on fake run folders (tests/helpers_report.py)."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from evalkit import runfolder
from evalkit.cli import main
from evalkit.compare import align_embeddings, build_history, compare_runs, history_csv, load_run
from evalkit.errors import EvalkitError
from evalkit.results import Embedding
from helpers_report import make_result

MAX_DROP_CONFIG = """\
name: b-run
models:
  - {name: a, features: a.npz}
  - {name: b, features: b.npz}
checks:
  - {name: b must not drop, metric: knn_accuracy, where: {model: b, method: tsne}, max_drop: 0.02}
"""


def _dropped(result, model: str, by: float = 0.2, seed: int = 7):
    """``result`` with every score of ``model`` lower by ``by`` and its embeddings scrambled."""
    rows = []
    for row in result.rows:
        row = dict(row)
        if row["model"] == model:
            for key, value in list(row.items()):
                if key not in ("model", "layer", "method") and not key.endswith("_std") \
                        and isinstance(value, float) and math.isfinite(value):
                    row[key] = round(value - by, 4)
        rows.append(row)
    rng = np.random.default_rng(seed)
    embeddings = tuple(replace(e, coords=rng.permutation(e.coords)) if e.model == model else e
                       for e in result.embeddings)
    return replace(result, rows=tuple(rows), embeddings=embeddings, name="b-run")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    base = make_result(models=("a", "b"), seeds=(0, 1), name="a-run")
    run_a = runfolder.write_run(root / "A", base)
    run_b = runfolder.write_run(root / "B", _dropped(base, "b"))
    return root, run_a, run_b


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- compare


def test_largest_negative_deltas_are_the_dropped_models(runs, capsys):
    root, run_a, run_b = runs
    code, out, err = _run(["compare", run_a, run_b, "--out", root / "cmp"], capsys)
    assert code == 0, err
    payload = json.loads((root / "cmp" / "comparison.json").read_text())
    scores = payload["scores"]
    dropped = [s for s in scores if s["model"] == "b" and s["delta"] is not None]
    assert dropped and all(s["delta"] == pytest.approx(-0.2) for s in dropped)
    assert {s["model"] for s in scores[:len(dropped)]} == {"b"}  # worst change first
    assert all(s["delta"] == 0 for s in scores if s["model"] == "a" and s["delta"] is not None)
    seeded = [s for s in dropped if s["method"] != "features"]
    assert seeded and all(s["beyond_noise"] is True and s["noise"] is not None for s in seeded)
    assert payload["exit_code"] == 0
    html = (root / "cmp" / "index.html").read_text()
    assert "Largest drops" in html and "compare" not in payload["run_b"]["name"]
    assert "worse: b/" in out


def test_max_drop_check_fails_with_exit_code_1(runs, capsys, tmp_path):
    root, run_a, run_b = runs
    config = tmp_path / "checks.yaml"
    config.write_text(MAX_DROP_CONFIG)
    junit = tmp_path / "checks.xml"
    code, out, err = _run(["compare", run_a, run_b, "--out", tmp_path / "cmp", "--config", config,
                           "--junit", junit], capsys)
    assert code == 1
    assert "FAIL" in err and "b must not drop" in err
    payload = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert payload["exit_code"] == 1
    assert {r["status"] for r in payload["checks"]["results"]} == {"fail"}
    assert "<failure" in junit.read_text()
    # B against itself: nothing dropped, the same check passes
    code, _, _ = _run(["compare", run_b, run_b, "--out", tmp_path / "same", "--config", config], capsys)
    assert code == 0


def test_aligned_embeddings_mark_the_changed_model(runs):
    _, run_a, run_b = runs
    cmp = compare_runs(load_run(run_a), load_run(run_b))
    disparity = {e.key: e.disparity for e in cmp.aligned}
    assert all(disparity[k] < 1e-9 for k in disparity if k.startswith("a/"))
    assert all(disparity[k] > 0.5 for k in disparity if k.startswith("b/"))
    assert cmp.aligned[0].model == "b"  # largest disparity first
    assert len(cmp.aligned[0].moved) == 15  # 5 % of 300 samples


def test_rotated_scaled_copy_aligns_to_zero_disparity():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 2))
    theta = 1.1
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    b = 3.7 * a @ rotation + np.array([5.0, -2.0])
    aligned = align_embeddings(a, b)
    assert aligned.disparity == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(aligned.a, aligned.b, atol=1e-9)
    moved = b.copy()
    moved[17] += 40.0
    assert align_embeddings(a, moved).moved[0] == 17


def test_samples_matched_by_index_and_the_rest_counted(tmp_path):
    base = make_result(n=120, models=("a",), methods=("pca",), checks=(), name="a-run")
    # B holds the last 90 of A's samples plus 30 of its own, in another order.
    keep = np.arange(30, 120)
    extra = np.max(base.indices) + 1 + np.arange(30)
    order = np.random.default_rng(1).permutation(120)
    indices = np.concatenate([base.indices[keep], extra])[order]
    labels = np.concatenate([base.labels[keep], base.labels[:30]])[order]
    coords_a = {e.key: e.coords for e in base.embeddings}
    embeddings = tuple(Embedding(e.model, e.layer, e.method, e.seed,
                                 (2.0 * np.concatenate([coords_a[e.key][keep], np.ones((30, 2))]))[order]
                                 .astype(np.float32)) for e in base.embeddings)
    other = replace(base, indices=indices, labels=labels, embeddings=embeddings, name="b-run")
    run_a = load_run(runfolder.write_run(tmp_path / "A", base))
    run_b = load_run(runfolder.write_run(tmp_path / "B", other))
    cmp = compare_runs(run_a, run_b)
    s = cmp.samples
    assert (s.key, s.n_a, s.n_b, s.n_shared, s.only_a, s.only_b) == ("indices", 120, 120, 90, 30, 30)
    assert s.labels_differ == 0
    for e in cmp.aligned:  # the shared samples, matched by index: B is a scaled copy of A
        assert len(e.ids) == 90 and e.disparity == pytest.approx(0.0, abs=1e-9)
        assert set(e.ids.tolist()) == set(base.indices[keep].tolist())


def test_config_and_provenance_differences(runs, tmp_path):
    _, run_a, _ = runs
    base = make_result(models=("a", "b"), seeds=(0, 1), name="a-run")
    provenance = dict(base.provenance, device="cuda:0", versions=dict(base.provenance["versions"], torch="2.4.0"),
                      started="2025-01-01T00:00:00+00:00")
    config = base.config_yaml.replace("n_neighbors: 10", "n_neighbors: 15").replace("name: a-run", "name: b-run")
    b = runfolder.write_run(tmp_path / "B", replace(base, provenance=provenance, config_yaml=config))
    cmp = compare_runs(load_run(run_a), load_run(b))
    config_diff = {d.key: (d.a, d.b) for d in cmp.config_diff}
    assert config_diff == {"name": ("a-run", "b-run"), "metrics.n_neighbors": (10, 15)}
    provenance_diff = {d.key: (d.a, d.b) for d in cmp.provenance_diff}
    assert provenance_diff == {"device": ("cpu", "cuda:0"), "versions.torch": ("2.3.0", "2.4.0")}


# --------------------------------------------------------------------------- refusals


def test_not_a_run_folder_is_refused_in_one_line(runs, capsys, tmp_path):
    _, run_a, _ = runs
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for bad, words in ((tmp_path / "empty", ["RUN_B", "empty", "no metrics.json", "expected a run folder"]),
                       (tmp_path / "missing", ["RUN_B", "missing", "not found", "expected a run folder"]),
                       (tmp_path / "file.txt", ["RUN_B", "file.txt", "is a file"])):
        code, out, err = _run(["compare", run_a, bad, "--out", tmp_path / "cmp"], capsys)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "cmp").exists()
    code, _, err = _run(["history", run_a, tmp_path / "empty", "--out", tmp_path / "h"], capsys)
    assert code == 2 and "empty" in err and len(err.strip().splitlines()) == 1


def test_runs_sharing_no_feature_set_are_refused(tmp_path, capsys):
    a = runfolder.write_run(tmp_path / "A", make_result(models=("a",), checks=()))
    b = runfolder.write_run(tmp_path / "B", make_result(models=("z",), checks=()))
    code, _, err = _run(["compare", a, b, "--out", tmp_path / "cmp"], capsys)
    assert code == 2 and "share no feature set" in err and str(a) in err and len(err.strip().splitlines()) == 1


def test_older_run_folder_without_extras_still_compares(runs, tmp_path, capsys):
    _, run_a, run_b = runs
    old = tmp_path / "old"
    old.mkdir()
    data = json.loads((Path(run_b) / "metrics.json").read_text())
    for row in data["rows"]:
        row.pop("weighted_knn_accuracy", None)
    (old / "metrics.json").write_text(json.dumps({"rows": data["rows"], "checks": []}))
    (old / "index.html").write_text("<html></html>")
    code, _, err = _run(["compare", run_a, old, "--out", tmp_path / "cmp"], capsys)
    assert code == 0, err
    payload = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert "weighted_knn_accuracy" not in {s["metric"] for s in payload["scores"]}
    assert payload["embeddings"] == [] and any("older evalkit" in n for n in payload["notes"])
    (old / "metrics.json").write_text(json.dumps({"rows": [{"model": "a", "knn_accuracy": 0.9}]}))
    code, _, err = _run(["compare", run_a, old, "--out", tmp_path / "cmp"], capsys)
    assert code == 2 and "too old" in err and "old" in err


def test_out_folder_that_is_a_run_folder_is_refused(runs, capsys):
    _, run_a, run_b = runs
    code, _, err = _run(["compare", run_a, run_b, "--out", run_a], capsys)
    assert code == 2 and "not an evalkit comparison folder" in err
    assert (Path(run_a) / "metrics.json").exists()


# --------------------------------------------------------------------------- history


def _three_runs(root: Path) -> list:
    base = make_result(models=("a", "b"), seeds=(0, 1), checks=(), name="epoch")
    paths = []
    for epoch, by in enumerate((0.3, 0.1, 0.2)):
        paths.append(runfolder.write_run(root / f"epoch{epoch}", _dropped(base, "b", by=by)))
    return paths


def test_history_csv_equals_metrics_json(tmp_path, capsys):
    paths = _three_runs(tmp_path)
    code, out, err = _run(["history", *paths, "--out", tmp_path / "hist"], capsys)
    assert code == 0, err
    with open(tmp_path / "hist" / "history.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    expected = []
    for i, path in enumerate(paths):
        expected += [(i + 1, row) for row in json.loads((path / "metrics.json").read_text())["rows"]]
    assert len(table) == len(expected)
    for got, (run, row) in zip(table, expected):
        assert int(got["run"]) == run and got["run_path"] == str(Path(paths[run - 1]))
        for key, value in row.items():
            if key in ("model", "layer", "method"):
                assert got[key] == value
            elif value is None:
                assert got[key] == ""
            else:
                assert float(got[key]) == value  # exactly, not approximately
        assert all(got[k] == "" for k in got if k not in row and k not in ("run", "run_name", "run_path"))
    html = (tmp_path / "hist" / "index.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 6  # one chart per score (the fake rows hold six)


def test_history_chosen_metric_and_best_run(tmp_path):
    runs = [load_run(p) for p in _three_runs(tmp_path)]
    history = build_history(runs, metrics=["knn_accuracy"])
    assert history.metrics == ("knn_accuracy",)
    assert history.columns == ("knn_accuracy", "knn_accuracy_std")
    header = history_csv(history).splitlines()[0]
    assert header == "run,run_name,run_path,model,layer,method,knn_accuracy,knn_accuracy_std"
    from evalkit.compare_report import history_context

    chart = history_context(history).charts[0]
    best = {label: name for label, _, name in chart.rows}
    assert best["b/head \u00b7 t-SNE"].startswith("2.")  # dropped least in the second run
    with pytest.raises(EvalkitError, match=r"unknown --metric 'knn_acuracy'.*did you mean 'knn_accuracy'"):
        build_history(runs, metrics=["knn_acuracy"])


def test_float_noise_is_no_change():
    from evalkit.compare import ScoreDelta

    tiny = ScoreDelta("m", "l", "pca", "continuity", 0.9, 0.9 - 2.5e-7)
    assert tiny.verdict == "same" and tiny.change < 0
    assert ScoreDelta("m", "l", "pca", "continuity", 0.9, 0.8).verdict == "worse"
    assert ScoreDelta("m", "l", "pca", "mystery", 0.9, 0.8, higher_is_better=None).verdict is None


def test_history_charts_only_the_methods_a_score_applies_to(tmp_path):
    from evalkit.compare_report import history_context

    runs = [load_run(p) for p in _three_runs(tmp_path)]
    charts = {c.metric: c for c in history_context(build_history(runs)).charts}
    methods = {label.split(" \u00b7 ")[1] for label, _, _ in charts["trustworthiness"].rows}
    assert "raw features" not in methods and "t-SNE" in methods
    assert charts["trustworthiness"].runs == ("1. epoch0", "2. epoch1", "3. epoch2")  # same name: by folder
