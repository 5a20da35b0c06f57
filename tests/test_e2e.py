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
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "embeddings.npz", "index.html", "metrics.json"]


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
