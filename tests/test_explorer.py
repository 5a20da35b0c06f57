"""The explorer's data (evalkit/explorer.py): compact encoding, round trips, sizes, safety.

The browser side is tested in test_browser_explorer.py.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import re

import numpy as np
import pytest

from evalkit import explorer, report
from evalkit.score import knn_accuracy, knn_predict
from helpers_report import make_result

HOSTILE = "</script><script>alert(1)</script><!-- \u2028 & \"q\""


def with_attrs(result, **attrs):
    """A copy of ``result`` carrying the optional attributes the pipeline will add."""
    copy = dataclasses.replace(result)
    for name, value in attrs.items():
        object.__setattr__(copy, name, value)
    return copy


def _bytes(b64: str) -> bytes:
    return base64.b64decode(b64, validate=True)


@pytest.fixture(scope="module")
def result():
    return make_result(n=240, n_classes=4, models=("a", "b"), seeds=(0, 1),
                       label_names=("cat", "dog", HOSTILE, "a & b"))


@pytest.fixture(scope="module")
def data(result):
    return explorer.build_explorer_data(result)


# --------------------------------------------------------------------------- encoding


def test_coordinates_round_trip_within_half_a_quantisation_step(result, data):
    first = {}
    for emb in result.embeddings:
        first.setdefault(emb.key, emb)
    assert [p["key"] for p in data["panels"]] == list(first)  # one panel per key, grid order
    for panel in data["panels"]:
        coords = first[panel["key"]].coords.astype(np.float64)
        assert panel["seed"] == first[panel["key"]].seed == 0
        assert len(_bytes(panel["xy"])) == 2 * 2 * data["n"]  # uint16, x then y
        decoded = explorer.decode_coords(panel["xy"], panel["bounds"], data["n"])
        for axis in range(2):
            lo, hi = panel["bounds"][2 * axis], panel["bounds"][2 * axis + 1]
            assert (lo, hi) == (coords[:, axis].min(), coords[:, axis].max())
            step = (hi - lo) / explorer.QUANT_MAX
            error = np.abs(decoded[:, axis] - coords[:, axis])
            assert error.max() <= step / 2 * (1 + 1e-9)
            assert error.max() > 0  # really quantised, not stored as floats


def test_missing_and_constant_coordinates():
    coords = np.array([[0.0, 1.0], [np.nan, 2.0], [4.0, np.inf], [2.0, 3.0]])
    xy, bounds = explorer.encode_coords(coords)
    assert bounds == [0.0, 2.0, 1.0, 3.0]  # from rows whose x and y are both finite
    decoded = explorer.decode_coords(xy, bounds, 4)
    assert np.isnan(decoded[1]).all() and np.isnan(decoded[2]).all()
    np.testing.assert_allclose(decoded[[0, 3]], coords[[0, 3]])
    xy, bounds = explorer.encode_coords(np.ones((3, 2)))
    np.testing.assert_allclose(explorer.decode_coords(xy, bounds, 3), np.ones((3, 2)))


def test_labels_indices_and_ids_are_stored_once(result, data):
    labels = np.frombuffer(_bytes(data["labels"]), dtype=np.uint8)
    np.testing.assert_array_equal(labels, result.labels)
    indices = np.frombuffer(_bytes(data["indices"]), dtype="<u4")
    np.testing.assert_array_equal(indices, result.indices)
    assert data["label_names"] == list(result.label_names)
    assert data["ids"] is None and data["thumbnails"] is None and data["point_scores"] == {}
    ids = [f"sample {i}" for i in range(len(result.labels))]
    with_ids = explorer.build_explorer_data(with_attrs(result, sample_ids=ids))
    assert with_ids["ids"] == ids
    identity = dataclasses.replace(result, indices=np.arange(len(result.labels)))
    assert explorer.build_explorer_data(identity)["indices"] is None


def test_knn_predictions_match_the_score_module(result, data):
    assert data["knn"]["k"] == 10
    by_key = {fs["key"]: fs for fs in data["knn"]["feature_sets"]}
    assert list(by_key) == [fs.key for fs in result.feature_sets]
    for fs in result.feature_sets:
        predicted = np.frombuffer(_bytes(by_key[fs.key]["predicted"]), dtype=np.uint8)
        np.testing.assert_array_equal(predicted, knn_predict(fs.features, result.labels))
        assert by_key[fs.key]["accuracy"] == pytest.approx(
            knn_accuracy(fs.features, result.labels))
    given = {result.feature_sets[0].key: np.zeros(len(result.labels), dtype=int)}
    reused = explorer.build_explorer_data(result, predictions=given, n_neighbors=3)
    assert reused["knn"]["k"] == 3
    assert _bytes(reused["knn"]["feature_sets"][0]["predicted"]) == bytes(len(result.labels))


def test_point_scores_are_quantised_per_panel(result):
    rng = np.random.default_rng(0)
    n = len(result.labels)
    key = result.embeddings[0].key
    trust = rng.uniform(0.5, 1.0, n)
    trust[3] = np.nan
    scores = {key: {"trustworthiness": trust, "continuity": rng.uniform(size=n)},
              "not/a/panel": {"trustworthiness": trust}}
    data = explorer.build_explorer_data(with_attrs(result, point_scores=scores))
    assert list(data["point_scores"]) == [key]
    stored = data["point_scores"][key]["trustworthiness"]
    q = np.frombuffer(_bytes(stored["q"]), dtype=np.uint8).astype(float)
    assert q[3] == 255
    decoded = stored["lo"] + q / 254 * (stored["hi"] - stored["lo"])
    finite = np.isfinite(trust)
    step = (stored["hi"] - stored["lo"]) / 254
    assert np.abs(decoded[finite] - trust[finite]).max() <= step / 2 + 1e-12


# --------------------------------------------------------------------------- knn_predict


def test_knn_predict_matches_scikit_learn_leave_one_out():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(7)
    X = rng.normal(size=(120, 5))
    y = (X[:, 0] + 0.8 * rng.normal(size=120) > 0).astype(int)  # two classes, odd k: no tie
    names = np.array(["neg", "pos"])[y]
    for k in (1, 5, 9):
        ours = knn_predict(X, names, n_neighbors=k)
        expected = []
        for i in range(len(X)):
            keep = np.arange(len(X)) != i
            clf = KNeighborsClassifier(n_neighbors=k).fit(X[keep], names[keep])
            expected.append(clf.predict(X[i:i + 1])[0])
        assert ours.dtype == names.dtype
        np.testing.assert_array_equal(ours, expected)
        assert (ours == names).mean() == pytest.approx(knn_accuracy(X, names, n_neighbors=k))


# --------------------------------------------------------------------------- thumbnails


def test_sprite_sheet_holds_every_thumbnail():
    from PIL import Image

    rng = np.random.default_rng(1)
    for shape in ((50, 8, 6), (50, 8, 6, 3)):
        thumbs = rng.integers(0, 256, size=shape, dtype=np.uint8)
        sheet = explorer.sprite_sheet(thumbs, 50)
        assert sheet["w"] == 6 and sheet["h"] == 8 and sheet["n"] == 50
        png = base64.b64decode(sheet["png"].split(",", 1)[1])
        with Image.open(io.BytesIO(png)) as image:
            pixels = np.asarray(image)
        cols = sheet["cols"]
        for i in (0, 7, 49):
            r, c = divmod(i, cols)
            np.testing.assert_array_equal(pixels[r * 8:(r + 1) * 8, c * 6:(c + 1) * 6], thumbs[i])
    assert explorer.sprite_sheet(np.zeros((5, 4, 4), np.float32), 5) is None  # not uint8
    assert explorer.sprite_sheet(np.zeros((5, 4, 4), np.uint8), 6) is None  # wrong count
    assert explorer.sprite_sheet(np.zeros((70_000, 64, 64), np.uint8), 70_000) is None  # > 8192 px


def test_make_thumbnails_fits_never_enlarges_and_respects_the_cap():
    from PIL import Image

    digits = np.arange(64, dtype=np.float64).reshape(8, 8) / 4  # sklearn digits: 0-16 floats
    small = explorer.make_thumbnails(lambda i: digits + i, 3, size=24)
    assert small.shape == (3, 8, 8) and small.dtype == np.uint8  # not enlarged to 24
    assert small[0].min() == 0 and small[0].max() == 255
    big = Image.new("RGB", (100, 50), (200, 10, 10))
    thumbs = explorer.make_thumbnails(lambda i: big, 2, size=24)
    assert thumbs.shape == (2, 24, 24, 3)
    assert tuple(thumbs[0, 12, 12]) == (200, 10, 10)  # the picture, centred
    assert tuple(thumbs[0, 0, 12]) == (0, 0, 0)  # letterboxed: 24 x 12 fits in 24 x 24
    chw = np.zeros((3, 16, 16), np.uint8)
    assert explorer.make_thumbnails(lambda i: chw, 1, size=8).shape == (1, 8, 8, 3)
    assert explorer.make_thumbnails(lambda i: big, 21, max_samples=20) is None
    with pytest.raises(ValueError, match="size"):
        explorer.make_thumbnails(lambda i: big, 1, size=0)


def test_config_has_a_report_section():
    from evalkit.config import Config

    config = Config.model_validate({"models": [{"name": "m", "features": "f.npz"}],
                                    "report": {"max_thumbnails": 5}})
    assert config.report.max_thumbnails == 5 and config.report.thumbnail_size == 24
    assert config.report.thumbnails is True
    with pytest.raises(Exception, match="thumbnail_sise"):
        Config.model_validate({"models": [{"name": "m", "features": "f.npz"}],
                               "report": {"thumbnail_sise": 5}})


# --------------------------------------------------------------------------- the page


def test_hostile_class_names_stay_text_in_the_data(result):
    html = report.render_html(result)
    block = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>',
                      html, flags=re.S).group(1)
    assert "<" not in block and ">" not in block and "&" not in block and "\u2028" not in block
    assert json.loads(block)["label_names"] == list(result.label_names)
    assert html.count("<script") == 4  # the JSON block did not end early or open a new one


def test_vendored_libraries_and_licences_ship():
    script = explorer.vendor_script()
    for name, package, version, licence in explorer.VENDOR_LIBRARIES:
        assert f"/* {package} {version} (MIT)" in script
        text = report._templates().joinpath("vendor", licence).read_text(encoding="utf-8")
        assert "MIT" in text and "Permission is hereby granted" in text
    assert "export " not in script.split("/* regl-scatterplot")[0].split("/* pub-sub-es")[1]
    assert "window.createPubSub = createPubSub" in script


def test_report_size_for_a_demo_like_run(tmp_path):
    """899 points x 8 feature sets x 3 methods (the demo's shape), with thumbnails."""
    result = make_result(n=899, n_classes=10, models=("cnn", "cnn-untrained", "vit", "resnet18"))
    rng = np.random.default_rng(0)
    thumbs = (rng.random((899, 8, 8)) * 255).astype(np.uint8)  # noise: the worst case for PNG
    result = with_attrs(result, thumbnails=thumbs,
                        sample_ids=[f"digit_{i:04d}" for i in range(899)])
    html = report.render_html(result)
    block = re.search(r'id="explorer-data">(.*?)</script>', html, flags=re.S).group(1)
    data = json.loads(block)
    assert len(data["panels"]) == 24
    total, data_size = len(html.encode()), len(block.encode())
    libraries = len(explorer.vendor_script().encode())
    print(f"\ndemo-like report: {total / 1e6:.2f} MB; explorer data {data_size / 1e3:.0f} KB, "
          f"libraries {libraries / 1e3:.0f} KB")
    assert total < 3_000_000  # the target for the demo report
    assert data_size < 400_000


def test_many_classes_store_labels_and_predictions_as_uint16():
    result = make_result(n=120, n_classes=300, models=("a",), methods=("pca",), extras=False,
                         checks=())
    data = explorer.build_explorer_data(result)
    assert data["label_dtype"] == "uint16"
    labels = np.frombuffer(_bytes(data["labels"]), dtype="<u2")
    np.testing.assert_array_equal(labels, result.labels)
    for fs in data["knn"]["feature_sets"]:
        assert len(_bytes(fs["predicted"])) == 2 * 120
