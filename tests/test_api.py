"""The Python API on what users have in memory: a model, a DataLoader, arrays.

The judged path: a small CNN trained in memory is passed with a plain
``DataLoader(TensorDataset(x, y))`` and with a dict-yielding loader; both give the scores that
``evalkit report`` gives on a YAML config naming the same weights and data, and the saved
folder passes ``evalkit check``.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import evalkit
from evalkit.cli import main as cli_main
from evalkit.data import digits_split
from evalkit.errors import EvalkitError
from usermodels import digits_cnn

METHODS = ["tsne", "pca"]
TSNE = {"tsne": {"n_iter": 250}}
CHECKS = [{"metric": "knn_accuracy", "where": {"model": "cnn", "layer": "penultimate", "method": "features"},
           "gte": 0.8}]


def _tensors(split: str):
    """Digits as the config's preprocess {channels: 1, mean: [0.5], std: [0.5]} makes them."""
    images, labels = digits_split(split)
    x = torch.from_numpy(images).float().div(255).sub(0.5).div(0.5)[:, None]
    return x, torch.from_numpy(labels)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CNN trained for a second on the digits' train split, and its checkpoint file."""
    torch.manual_seed(0)
    model = digits_cnn()
    x, y = _tensors("train")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(1)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "cnn.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def api_result(trained):
    model, _ = trained
    x, y = _tensors("test")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100)
    feats = evalkit.extract_features(model, loader, layers=["penultimate", "features"])
    return evalkit.evaluate({"cnn": feats}, methods=METHODS, method_settings=TSNE, checks=CHECKS, name="api")


def _scores(rows):
    return {(r["model"], r["layer"], r["method"]): {k: v for k, v in r.items() if k not in ("model", "layer", "method")}
            for r in rows}


def test_tuple_loader_gives_the_scores_of_evalkit_report(api_result, trained, tmp_path, monkeypatch, capsys):
    _, ckpt = trained
    monkeypatch.chdir(tmp_path)
    config = {
        "name": "yaml", "data": {"kind": "digits", "split": "test"},
        "models": [{"name": "cnn", "source": "python:usermodels:digits_cnn", "checkpoint": str(ckpt),
                    "layers": ["penultimate", "features"],
                    "preprocess": {"channels": 1, "mean": [0.5], "std": [0.5]}}],
        "embed": {"methods": METHODS, **TSNE}, "checks": CHECKS, "extract": {"cache": False},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["report", "c.yaml", "--out", "run"]) == 0, capsys.readouterr().err
    cli_rows = json.loads((tmp_path / "run" / "metrics.json").read_text())["rows"]
    api = _scores(api_result.table())
    cli = _scores(cli_rows)
    assert set(api) == set(cli) and len(api) == 2 * (1 + len(METHODS))
    for key, values in cli.items():
        assert api[key] == pytest.approx(values, rel=1e-9, abs=1e-12), key
    assert api_result.passed and api_result.checks[0].status == "pass"
    assert api_result.score("knn_accuracy", model="cnn", layer="penultimate") > 0.8


def test_dict_loader_and_dataset_give_the_same_features(trained, api_result):
    model, _ = trained
    x, y = _tensors("test")

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return {"image": x[i], "label": int(y[i]), "path": f"img{i}.png"}

    by_dict = evalkit.extract_features(model, torch.utils.data.DataLoader(Dicts(), batch_size=64), layers="penultimate")
    by_dataset = evalkit.extract_features(model, Dicts(), layers=["penultimate"], batch_size=50)
    expected = api_result.feature_sets[0].features
    np.testing.assert_allclose(by_dict["penultimate"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_dataset["penultimate"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(by_dict.labels, y.numpy())
    result = evalkit.evaluate({"cnn": by_dict}, methods=["pca"])
    assert result.row("cnn", "penultimate", "features")["knn_accuracy"] == pytest.approx(
        api_result.row("cnn", "penultimate", "features")["knn_accuracy"])


def test_model_mode_and_device_are_restored(trained):
    model, _ = trained
    model.train()
    x, y = _tensors("test")
    evalkit.extract_features(model, torch.utils.data.TensorDataset(x[:20], y[:20]))
    assert model.training
    model.eval()


def test_saved_folder_passes_evalkit_check(api_result, tmp_path):
    out = api_result.save(tmp_path / "saved")
    assert {p.name for p in out.iterdir()} >= {"index.html", "metrics.json", "embeddings.npz", "config.yaml"}
    proc = subprocess.run([sys.executable, "-m", "evalkit", "check", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout
    z = np.load(out / "embeddings.npz")
    np.testing.assert_array_equal(z["cnn/penultimate/pca"], api_result.embedding("cnn", "penultimate", "pca"))
    # the config that recorded the run says it cannot be re-run, in one line
    proc = subprocess.run([sys.executable, "-m", "evalkit", "report", str(out / "config.yaml"), "--out",
                           str(tmp_path / "again")], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "in memory to the Python API" in proc.stderr


def test_jupyter_view_shows_summary_pictures_and_checks(api_result):
    from html import unescape

    view = api_result._repr_html_()
    page = unescape(view)
    assert "the check passed" in view
    assert "<iframe" in view and 'sandbox="allow-scripts"' in view
    assert "Summary" in page and "Embeddings" in page and "Checks" in page
    assert page.count("data:image/png;base64,") == 2 * len(METHODS)
    assert 'id="scores"' not in page  # the long tables stay in the saved report


def test_public_names_are_visible():
    for name in ("extract_features", "evaluate", "evaluate_models", "Result", "Features", "METRICS", "METHODS"):
        assert name in dir(evalkit)
    assert "neighbourhood_hit" in evalkit.METRICS and "pacmap" in evalkit.METHODS
    import pydoc

    text = pydoc.render_doc(evalkit, renderer=pydoc.plaintext)
    assert "extract_features" in text and "evaluate_models" in text


def test_evaluate_models_compares_in_memory_models(trained):
    model, _ = trained
    torch.manual_seed(1)
    untrained = digits_cnn()
    x, y = _tensors("test")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128)
    result = evalkit.evaluate_models({"trained": model, "untrained": untrained}, loader, methods=["pca"],
                                     label_names=[f"digit {i}" for i in range(10)])
    trained_acc = result.score("knn_accuracy", model="trained", layer="penultimate")
    untrained_acc = result.score("knn_accuracy", model="untrained", layer="penultimate")
    assert trained_acc > untrained_acc
    assert result.label_names[3] == "digit 3"
    assert result.cka.keys == ("trained/penultimate", "untrained/penultimate")


def test_arrays_and_tensors_with_string_labels():
    rng = np.random.default_rng(0)
    y = np.repeat(["cat", "dog", "eel"], 20)
    X = rng.normal(size=(60, 5)) + (y[:, None] == np.array(["cat", "dog", "eel", "x", "y"])) * 5
    result = evalkit.evaluate({("enc", "last"): torch.from_numpy(X), "raw": X}, y, methods=["pca"], seeds=[0, 1])
    assert result.label_names == ("cat", "dog", "eel")
    assert [(r.model, r.layer, r.method) for r in result.rows][:2] == [("enc", "last", "features"), ("enc", "last", "pca")]
    assert result.row("raw", "features", "pca")["knn_accuracy"] == pytest.approx(
        result.row("enc", "last", "pca")["knn_accuracy"])
    assert "knn_accuracy_std" in dict(result.row("raw", "features", "pca"))


@pytest.mark.parametrize("call, message", [
    (lambda X, y: evalkit.evaluate({"a": X}), "labels: missing"),
    (lambda X, y: evalkit.evaluate({"a": X}, y[:-1]), "labels: shape (59,); expected (60,)"),
    (lambda X, y: evalkit.evaluate({"a": X, "b": X[:-1]}, y), "different numbers of samples"),
    (lambda X, y: evalkit.evaluate({"a": X}, y, methods=["tnse"]),
     "evaluate(): embed.methods[0]: expected one of 'tsne', 'umap', 'pca', 'pacmap' (got 'tnse'; did you mean 'tsne'?)"),
    (lambda X, y: evalkit.evaluate({"a": X}, y, method_settings={"tsne": {"perplexty": 5}}),
     "evaluate(): embed.tsne.perplexty: unknown key; did you mean 'perplexity'?"),
    (lambda X, y: evalkit.evaluate({"a": X}, y, n_neighbors=40), "metrics.n_neighbors: 40 is too large for 60 samples"),
    (lambda X, y: evalkit.evaluate({"a": X}, y, checks=[{"metric": "knn_accuracy", "where": {"model": "b"}, "gte": 1}]),
     "checks[0].where.model: no such model"),
    (lambda X, y: evalkit.extract_features("not a model", X), "model: got str; expected a torch.nn.Module"),
])
def test_mistakes_are_one_line_errors_naming_the_argument(call, message):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)), np.repeat([0, 1, 2], 20)
    with pytest.raises(EvalkitError) as info:
        call(X, y)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_batches_without_inputs_are_named():
    model = digits_cnn()
    loader = [{"pixels": torch.zeros(2, 1, 8, 8)}]
    with pytest.raises(EvalkitError, match=r"a batch is a dict with keys \['pixels'\]; expected the inputs under one of image"):
        evalkit.extract_features(model, loader)


def test_a_list_of_batches_and_single_strings(trained):
    model, _ = trained
    x, y = _tensors("test")
    batches = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 300, 100)]
    feats = evalkit.extract_features(model, batches, layers="penultimate")
    assert feats["penultimate"].shape == (300, 32) and feats.labels.shape == (300,)
    result = evalkit.evaluate(feats, methods="pca", seeds=3)
    assert [e.method for e in result.embeddings] == ["pca"] and result.provenance["seeds"] == [3]
    with pytest.raises(KeyError, match="no score 'knn_acc'"):
        result.score("knn_acc", model="model", layer="penultimate")
    with pytest.raises(EvalkitError, match="metric_settings: got list; expected a mapping"):
        evalkit.evaluate(feats, metric_settings=["knn_accuracy"])
    assert "neighbourhood_hit (neighbourhood hit)" in repr(evalkit.METRICS)


def test_thumbnails_and_predictions_reach_the_saved_report(api_result, tmp_path):
    thumbs = api_result.thumbnails
    assert thumbs is not None and thumbs.shape == (899, 8, 8) and thumbs.dtype == np.uint8
    x, _ = _tensors("test")
    # the first digit, scaled from its own range: the same picture
    first = x[0, 0].numpy()
    expected = np.round((first - first.min()) / (first.max() - first.min()) * 255)
    assert np.abs(thumbs[0].astype(int) - expected).max() <= 1
    assert set(api_result.knn_predictions) == {"cnn/penultimate", "cnn/features"}
    pred = api_result.knn_predictions["cnn/penultimate"]
    assert (pred == api_result.labels).mean() == pytest.approx(
        api_result.score("knn_accuracy", model="cnn", layer="penultimate"))
    run = api_result.save(tmp_path / "r")
    page = (run / "index.html").read_text()
    assert '"thumbnails"' in page and "explorer" in page
    # each point's share of trustworthiness: in the result, the page and the run folder; its mean is the score
    points = api_result.point_scores["cnn/penultimate/tsne"]["trustworthiness"]
    assert points.mean() == pytest.approx(api_result.score("trustworthiness", model="cnn", layer="penultimate",
                                                            method="tsne"), abs=1e-9)
    saved = np.load(run / "point_scores.npz")
    np.testing.assert_allclose(saved["cnn/penultimate/tsne/trustworthiness"], points, rtol=1e-6)
    import re

    data = json.loads(re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page,
                                re.S).group(1))
    assert "trustworthiness" in data["point_scores"]["cnn/penultimate/tsne"]
