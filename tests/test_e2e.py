"""End to end on a tiny digits config: every output file, its keys and shapes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from evalkit.cli import main
from evalkit.config import load_config

TINY = {
    "name": "tiny",
    "data": {"kind": "digits", "split": "test", "max_samples": 150},
    "models": [
        {"name": "cnn", "source": "demo:cnn", "layers": ["features", "penultimate"]},
        {"name": "mlp", "source": "demo:mlp", "layers": ["hidden1"]},
    ],
    "embed": {"methods": ["tsne", "umap", "pca"], "seeds": [0], "tsne": {"n_iter": 300}, "umap": {"n_epochs": 50}},
    "metrics": {"n_neighbors": 5},
    "checks": [
        {"name": "raw features separate", "metric": "knn_accuracy", "where": {"model": "cnn", "method": "features"}, "gte": 0.0},
        {"name": "impossible", "metric": "trustworthiness", "where": {"model": "mlp", "method": "pca"}, "gt": 1.0,
         "severity": "warn"},
    ],
    "extract": {"cache": False},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    cfg = d / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = d / "out"
    code = main(["report", str(cfg), "--out", str(out)])
    return code, cfg, out


def test_exit_code_and_files(run):
    code, _, out = run
    assert code == 0  # the failing check is only a warning
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "embeddings.npz", "index.html", "metrics.json",
                                                     "point_scores.npz"]


def test_metrics_rows_cover_every_model_layer_method(run):
    _, _, out = run
    data = json.loads((out / "metrics.json").read_text())
    assert set(data) >= {"rows", "checks", "provenance"}
    rows = {(r["model"], r["layer"], r["method"]): r for r in data["rows"]}
    sets = [("cnn", "features"), ("cnn", "penultimate"), ("mlp", "hidden1")]
    for m, layer in sets:
        feat = rows[(m, layer, "features")]
        assert 0.0 <= feat["knn_accuracy"] <= 1.0 and -1.0 <= feat["silhouette"] <= 1.0
        for method in ("tsne", "umap", "pca"):
            r = rows[(m, layer, method)]
            for metric in ("trustworthiness", "continuity", "knn_accuracy"):
                assert 0.0 <= r[metric] <= 1.0, (m, layer, method, metric)
            assert -1.0 <= r["silhouette"] <= 1.0
    statuses = {c["name"]: c["status"] for c in data["checks"]}
    assert statuses == {"raw features separate": "pass", "impossible": "warn"}
    assert data["provenance"]["n_samples"] == 150


def test_embeddings_npz(run):
    _, _, out = run
    with np.load(out / "embeddings.npz", allow_pickle=False) as z:
        keys = set(z.files)
        assert {"labels", "indices", "label_names"} <= keys
        emb = sorted(k for k in keys if k.count("/") == 2)
        assert len(emb) == 9
        for k in emb:
            assert z[k].shape == (150, 2) and z[k].dtype == np.float32 and np.isfinite(z[k]).all()
        assert z["labels"].shape == (150,)
        assert np.bincount(z["labels"]).min() >= 14  # stratified sample: every digit present
        assert list(z["label_names"]) == [str(d) for d in range(10)]


def test_html_is_self_contained_and_shows_every_panel(run):
    _, _, out = run
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 9
    for bad in ('src="http', "src='http", 'href="http', "@import", "<link "):
        assert bad not in html
    for metric in ("trustworthiness", "continuity", "silhouette", "kNN"):
        assert metric in html


def test_config_yaml_round_trips(run):
    _, cfg, out = run
    again = load_config(out / "config.yaml")
    assert again == load_config(cfg)


def test_check_command_agrees_without_recomputing(run, capsys):
    _, _, out = run
    assert main(["check", str(out)]) == 0
    assert "WARN" in capsys.readouterr().out


def test_help_is_instant_and_imports_no_heavy_library():
    code = ("import sys, evalkit.cli; evalkit.cli._parser(); "
            "print(sorted(m for m in ('torch','umap','openTSNE','matplotlib','sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- a features-only config: no data: section -------------------------------------------------


def _features_only(tmp_path, b_labels=None):
    from helpers_cli import blobs, write_features

    X, y = blobs(n_per_class=8)
    names = np.array(["ant", "bee", "cow"])
    np.savez(tmp_path / "a.npz", features=X, labels=y, label_names=names, ids=np.arange(50, 50 + y.size))
    write_features(tmp_path / "b.npz", X[:, :4] * 3.0, names[y] if b_labels is None else b_labels)
    cfg = {"name": "files", "models": [{"name": "a", "features": str(tmp_path / "a.npz")},
                                       {"name": "b", "features": str(tmp_path / "b.npz"), "layers": ["emb"]}],
           "embed": {"methods": ["pca"]}, "metrics": {"n_neighbors": 3}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return tmp_path / "c.yaml", X, y


def test_a_features_only_config_needs_no_data_section(tmp_path, capsys):
    from helpers_cli import run_cli

    cfg, X, y = _features_only(tmp_path)
    code, _, err = run_cli(["report", cfg, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {(r["model"], r["layer"], r["method"]) for r in data["rows"]} == {
        ("a", "features", "features"), ("a", "features", "pca"), ("b", "emb", "features"), ("b", "emb", "pca")}
    assert data["provenance"]["n_samples"] == y.size and data["provenance"]["n_classes"] == 3
    with np.load(tmp_path / "out" / "embeddings.npz") as z:
        assert np.array_equal(z["labels"], y) and list(z["label_names"]) == ["ant", "bee", "cow"]
        assert np.array_equal(z["indices"], np.arange(50, 50 + y.size))  # the files' sample ids
        assert z["a/features/pca"].shape == (y.size, 2)
    again = load_config(tmp_path / "out" / "config.yaml")  # the resolved config loads again
    assert again.data is None and again == load_config(cfg)


def test_disagreeing_feature_files_exit_2_naming_both(tmp_path, capsys):
    from helpers_cli import run_cli

    _, _, y = _features_only(tmp_path)
    wrong = np.array(["ant", "bee", "cow"])[y]
    wrong[5] = "cow"
    cfg, _, _ = _features_only(tmp_path, b_labels=wrong)
    code, _, err = run_cli(["report", cfg, "--out", tmp_path / "out"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and not (tmp_path / "out").exists()
    assert lines[0] == (f"evalkit: error: features files {tmp_path / 'a.npz'} and {tmp_path / 'b.npz'} disagree: "
                        f"row 5: label 'ant' vs 'cow'; without a 'data:' section every features file must hold the "
                        f"same samples in the same order")


def test_a_source_model_without_data_is_a_config_error(tmp_path, capsys):
    from helpers_cli import run_cli

    cfg, _, _ = _features_only(tmp_path)
    raw = yaml.safe_load(cfg.read_text())
    raw["models"].append({"name": "cnn", "source": "demo:cnn"})
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    code, _, err = run_cli(["report", cfg, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.strip() == (
        f"evalkit: error: {cfg}: data: required when a model has a 'source' (model 'cnn' extracts features from "
        f"it); only a config whose models all read 'features' files may leave it out")
