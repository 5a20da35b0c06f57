"""Degenerate but legal data gives a complete report, never a crash.

Each case is a generated features file run through ``evalkit report`` (in this process) with
t-SNE, UMAP and PCA on a few dozen points and default metric parameters, so defaults that do
not fit small data are lowered (and noted) rather than refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers_cli import blobs, features_config, make_run_folder, run_cli, write_features

METHODS = ("tsne", "umap", "pca")


def _one_class():
    X, _ = blobs(n_per_class=20, n_classes=1)
    return X, np.zeros(20, np.int64)


def _duplicated_points():
    X, y = blobs(n_per_class=4)
    return np.repeat(X, 3, axis=0), np.repeat(y, 3)  # every point three times


def _all_identical():
    return np.ones((24, 5), np.float32), np.repeat([0, 1, 2], 8)


def _constant_columns():
    X, y = blobs(n_per_class=8)
    X[:, 2:] = 7.0
    return X, y


def _two_unique_points():
    return np.repeat(np.array([[0.0, 1.0], [3.0, -1.0]], np.float32), 12, axis=0), np.repeat([0, 1], 12)


def _two_per_class():
    return blobs(n_per_class=2)


def _one_dimension():
    X, y = blobs(n_per_class=8, dim=1)
    return X, y


CASES = {
    "one_class": _one_class,
    "duplicated_points": _duplicated_points,
    "all_identical": _all_identical,
    "constant_columns": _constant_columns,
    "two_unique_points": _two_unique_points,
    "two_per_class": _two_per_class,
    "one_dimension": _one_dimension,
}


@pytest.mark.parametrize("case", list(CASES))
def test_degenerate_data_gives_a_complete_report(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    X, y = CASES[case]()
    write_features(tmp_path / "f.npz", X, y)
    cfg = features_config(tmp_path / "c.yaml", "f.npz", name=case, methods=METHODS)
    cfg.write_text(cfg.read_text().replace("metrics:\n  n_neighbors: 3\n", ""))  # defaults
    out = make_run_folder(tmp_path / "run")  # an earlier run (with a user's folder "extra", which is kept)

    code, stdout, err = run_cli(["report", cfg, "--out", out], capsys)

    assert code == 0, err
    assert err == ""
    assert {p.name for p in out.iterdir()} == {"index.html", "metrics.json", "embeddings.npz", "config.yaml",
                                               "point_scores.npz", "extra"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {r["method"]: r for r in metrics["rows"]}
    assert set(rows) == {"features", *METHODS}
    n = len(y)
    with np.load(out / "embeddings.npz") as z:
        for method in METHODS:
            coords = z[f"m/features/{method}"]
            assert coords.shape == (n, 2) and np.isfinite(coords).all()
    for method in METHODS:
        for metric in ("trustworthiness", "continuity"):
            value = rows[method][metric]
            assert value is not None and 0.0 <= value <= 1.0 + 1e-9
    html = (out / "index.html").read_text()
    extras = metrics["extras"]

    if case == "one_class":
        for method in ("features", *METHODS):
            assert rows[method]["silhouette"] is None and rows[method]["knn_accuracy"] is None
        assert "single class" in extras["undefined_reasons"]["silhouette"]
        assert "not defined for a single class" in html
    else:
        assert rows["features"]["knn_accuracy"] is not None
    if case == "all_identical":
        assert any("identical features" in note for note in extras["notes"])
        assert "identical features" in html
    if case == "two_per_class":  # 6 samples: the default n_neighbors (10) is lowered to 2
        assert extras["n_neighbors"] == 2
        assert any("metrics.n_neighbors lowered from its default 10 to 2" in note for note in extras["notes"])
    if case == "one_dimension":
        assert rows["features"]["n_features"] == 1


def test_a_layer_with_one_output_gives_a_complete_report(tmp_path, monkeypatch, capsys):
    """A torch model whose chosen layer outputs one number per image (a 1-logit classifier)."""
    import yaml

    from conftest import write_image_folder

    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=6, size=(8, 8), mode="L")
    cfg = {"name": "one-dim", "data": {"kind": "imagefolder", "path": "imgs"},
           "models": [{"name": "m", "source": "demo:mlp", "kwargs": {"num_classes": 1}, "layers": ["classifier"]}],
           "extract": {"device": "cpu", "cache": False},
           "embed": {"methods": list(METHODS), "tsne": {"n_iter": 100}, "umap": {"n_epochs": 30}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(["report", "c.yaml", "--out", "run"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())["rows"]
    assert rows[0]["n_features"] == 1 and len(rows) == 1 + len(METHODS)
    with np.load(tmp_path / "run" / "embeddings.npz") as z:
        assert all(np.isfinite(z[f"m/classifier/{m}"]).all() for m in METHODS)


def test_the_recorded_config_runs_again_on_small_data(tmp_path, monkeypatch, capsys):
    """Defaults lowered for small data are recorded, so config.yaml of the run reproduces it."""
    monkeypatch.chdir(tmp_path)
    X, y = blobs(n_per_class=2)
    write_features(tmp_path / "f.npz", X, y)
    cfg = features_config(tmp_path / "c.yaml", "f.npz", methods=("tsne", "pca"))
    cfg.write_text(cfg.read_text().replace("metrics:\n  n_neighbors: 3\n", ""))
    assert run_cli(["report", cfg, "--out", "run1"], capsys)[0] == 0
    code, _, err = run_cli(["report", "run1/config.yaml", "--out", "run2"], capsys)
    assert code == 0, err
    first, second = (json.loads((tmp_path / r / "metrics.json").read_text())["rows"] for r in ("run1", "run2"))
    assert first == second


def _scores(tmp_path, capsys, X, y, tag):
    write_features(tmp_path / f"{tag}.npz", X, y)
    cfg = features_config(tmp_path / f"{tag}.yaml", f"{tag}.npz", name=tag, methods=METHODS)
    code, _, err = run_cli(["report", cfg, "--out", tmp_path / f"run-{tag}"], capsys)
    assert code == 0 and err == "", err
    with np.load(tmp_path / f"run-{tag}" / "embeddings.npz") as z:
        assert all(np.isfinite(z[f"m/features/{m}"]).all() for m in METHODS)
    return {r["method"]: r for r in json.loads((tmp_path / f"run-{tag}" / "metrics.json").read_text())["rows"]}


@pytest.mark.parametrize("factor", [1e18, 1e20, 1e-25])
def test_scores_do_not_depend_on_a_global_factor(factor, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    X, y = blobs(n_per_class=10)
    ref = _scores(tmp_path, capsys, X, y, "ref")
    got = _scores(tmp_path, capsys, (X.astype(np.float64) * factor).astype(np.float32), y, "scaled")
    for method in ("features", "pca"):  # deterministic: the same scores
        for metric, value in ref[method].items():
            if isinstance(value, float):
                assert got[method][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (method, metric)
    for method in ("tsne", "umap"):  # seeded, yet float rounding differs: the same picture
        assert got[method]["knn_accuracy"] == pytest.approx(ref[method]["knn_accuracy"], abs=0.05)
        assert got[method]["trustworthiness"] == pytest.approx(ref[method]["trustworthiness"], abs=0.05)


def test_one_sample_per_class_leaves_the_knn_scores_undefined_with_the_reason():
    import evalkit

    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 5))
    result = evalkit.evaluate({"m": X}, np.arange(12), methods=["pca"])
    for method, metric in (("features", "knn_accuracy"), ("features", "weighted_knn_accuracy"),
                           ("pca", "knn_accuracy"), ("pca", "neighbourhood_hit")):
        assert result.score(metric, model="m", layer="features", method=method) is None
    assert "single sample" in result.undefined_reasons["knn_accuracy"]
