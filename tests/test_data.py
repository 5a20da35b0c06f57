"""Datasets: digits, image folders, torchvision sets written to disk, feature files, subsampling."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_image_folder, write_mnist
from evalkit.config import DataConfig
from evalkit.data import (
    dataset_from_feature_files, load_dataset, read_feature_file, resolve_dataset, stratified_subsample,
)
from evalkit.errors import EvalkitError

# --- stratified subsampling -----------------------------------------------------------------


def test_subsample_keeps_proportions_and_is_seeded():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    idx = stratified_subsample(labels, 100, seed=7)
    assert idx.size == 100 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [60, 30, 10]
    assert np.array_equal(idx, stratified_subsample(labels, 100, seed=7))
    assert not np.array_equal(idx, stratified_subsample(labels, 100, seed=8))


def test_subsample_keeps_every_class_when_the_budget_allows():
    labels = np.array([0] * 997 + [1, 2, 3])
    idx = stratified_subsample(labels, 10, seed=0)
    assert idx.size == 10 and set(labels[idx]) == {0, 1, 2, 3}


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=6), frac=st.floats(0.01, 1.5), seed=st.integers(0, 5))
def test_subsample_properties(counts, frac, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    n = labels.size
    m = max(2, int(n * frac))
    idx = stratified_subsample(labels, m, seed=seed)
    assert idx.size == min(m, n) and np.unique(idx).size == idx.size and idx.max() < n
    if m >= len(counts):
        assert set(labels[idx]) == set(range(len(counts)))


def test_digits_subsample():
    ds = load_dataset(DataConfig(kind="digits", max_samples=50, seed=1))
    assert len(ds) == 50 and ds.n_total == 899 and ds.label_names == tuple("0123456789")
    assert ds.load_image(0).size == (8, 8)
    assert ds.labels[0] == load_dataset(DataConfig(kind="digits")).labels[ds.indices[0]]


# --- image folders --------------------------------------------------------------------------


def test_imagefolder_classes_labels_and_images(image_folder):
    ds = load_dataset(DataConfig(kind="imagefolder", path=str(image_folder)))
    assert ds.label_names == ("cat", "dog", "fish")
    assert np.bincount(ds.labels).tolist() == [5, 5, 5]
    im = ds.load_image(7)
    assert im.size == (16, 16) and im.mode == "RGB"
    pickle.loads(pickle.dumps(ds.load_image))  # DataLoader workers can receive it


def test_imagefolder_split_and_max_samples(tmp_path):
    write_image_folder(tmp_path / "root" / "val", classes=("a", "b"), n_per_class=6)
    ds = load_dataset(DataConfig(kind="imagefolder", path=str(tmp_path / "root"), split="val", max_samples=4))
    assert len(ds) == 4 and np.bincount(ds.labels).tolist() == [2, 2] and ds.n_total == 12


def test_imagefolder_fingerprint_changes_when_a_file_changes(image_folder):
    cfg = DataConfig(kind="imagefolder", path=str(image_folder))
    before = load_dataset(cfg).fingerprint
    assert load_dataset(cfg).fingerprint == before
    target = image_folder / "dog" / "005.png"
    target.write_bytes(target.read_bytes() + b"\0")
    assert load_dataset(cfg).fingerprint != before


def test_imagefolder_corrupt_image_names_the_file(image_folder):
    bad = image_folder / "dog" / "007.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = load_dataset(DataConfig(kind="imagefolder", path=str(image_folder)))
    i = [k for k in range(len(ds)) if ds.load_image.load_full.files[ds.indices[k]] == bad][0]
    with pytest.raises(EvalkitError, match=r"007\.png: cannot read image") as info:
        ds.load_image(i)
    assert "\n" not in str(info.value)


def test_imagefolder_empty_class_folder_is_named(image_folder):
    (image_folder / "empty-class").mkdir()
    (image_folder / "empty-class" / "notes.txt").write_text("no images here")
    with pytest.raises(EvalkitError, match=r"class folder empty-class under .* holds no images"):
        load_dataset(DataConfig(kind="imagefolder", path=str(image_folder)))


@pytest.mark.parametrize("layout, match", [
    ("missing", "does not exist"),
    ("flat", "has no class sub-folders"),
    ("no-images", "no images"),
])
def test_imagefolder_bad_layouts(tmp_path, layout, match):
    root = tmp_path / "root"
    if layout == "flat":
        root.mkdir()
        (root / "x.png").write_bytes(b"")
    elif layout == "no-images":
        (root / "a").mkdir(parents=True)
    with pytest.raises(EvalkitError, match=match):
        load_dataset(DataConfig(kind="imagefolder", path=str(root)))


# --- torchvision sets on disk ---------------------------------------------------------------


def test_torchvision_mnist_from_raw_files(tmp_path):
    write_mnist(tmp_path, n_train=20, n_test=30, size=12)
    ds = load_dataset(DataConfig(kind="torchvision", name="MNIST", path=str(tmp_path), max_samples=20))
    assert len(ds) == 20 and ds.n_total == 30
    assert ds.label_names[3] == "3 - three"  # class names from the dataset
    im = ds.load_image(0)
    assert im.size == (12, 12) and im.mode == "L"
    train = load_dataset(DataConfig(kind="torchvision", name="MNIST", path=str(tmp_path), split="train"))
    assert len(train) == 20 and train.fingerprint != ds.fingerprint
    pickle.loads(pickle.dumps(ds.load_image))


def test_torchvision_fashion_mnist_is_found_by_name(tmp_path):
    write_mnist(tmp_path, name="FashionMNIST", size=8)
    ds = load_dataset(DataConfig(kind="torchvision", name="FashionMNIST", path=str(tmp_path)))
    assert ds.label_names[0] == "T-shirt/top"


@pytest.mark.parametrize("name, match", [
    ("MNIST", r"never downloads: put the files at .*/MNIST/raw/\{train,t10k\}"),
    ("CIFAR10", r"cifar-10-batches-py/\{data_batch_1..5,test_batch"),
    ("SVHN", r"\{train,test,extra\}_32x32.mat"),
])
def test_torchvision_missing_files_say_where_they_go(tmp_path, name, match):
    with pytest.raises(EvalkitError, match=match) as info:
        load_dataset(DataConfig(kind="torchvision", name=name, path=str(tmp_path)))
    assert "download=True" not in str(info.value) and "\n" not in str(info.value)


def test_torchvision_unknown_name_and_bad_split(tmp_path):
    with pytest.raises(EvalkitError, match=r"did you mean 'MNIST'"):
        load_dataset(DataConfig(kind="torchvision", name="MNSIT", path=str(tmp_path)))
    write_mnist(tmp_path, size=8)
    with pytest.raises(EvalkitError, match=r"data.split: MNIST has splits 'train' and 'test'; got 'val'"):
        load_dataset(DataConfig(kind="torchvision", name="MNIST", path=str(tmp_path), split="val"))


def _write_emnist(root, subset="balanced"):
    import os

    write_mnist(root, size=8, n_train=20, n_test=30, name="EMNIST")
    raw = root / "EMNIST" / "raw"
    for old, part in (("train", "train"), ("t10k", "test")):
        for kind in ("images-idx3", "labels-idx1"):
            os.rename(raw / f"{old}-{kind}-ubyte", raw / f"emnist-{subset}-{part}-{kind}-ubyte")


def test_torchvision_emnist_subset_reads_the_test_part_unless_told(tmp_path):
    _write_emnist(tmp_path)
    test = load_dataset(DataConfig(kind="torchvision", name="EMNIST", path=str(tmp_path), split="balanced"))
    assert test.n_total == 30 and test.name == "EMNIST (balanced/test)"
    train = load_dataset(DataConfig(kind="torchvision", name="EMNIST", path=str(tmp_path), split="balanced/train"))
    assert train.n_total == 20 and train.fingerprint != test.fingerprint
    for bad in ("test", None, "balanced/val"):
        with pytest.raises(EvalkitError, match=r"data.split: EMNIST needs one of 'byclass'.*'/test' \(default test\)"):
            load_dataset(DataConfig(kind="torchvision", name="EMNIST", path=str(tmp_path), split=bad))


def test_torchvision_dataset_that_needs_more_arguments_is_named(tmp_path):
    with pytest.raises(EvalkitError, match=r"data.name: CocoDetection needs 'annFile'.*classification datasets"):
        load_dataset(DataConfig(kind="torchvision", name="CocoDetection", path=str(tmp_path)))


# --- feature files --------------------------------------------------------------------------


def _features(n=12, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), np.arange(n) % 3


def test_npz_features_dataset(tmp_path):
    X, y = _features()
    np.savez(tmp_path / "f.npz", features=X, labels=y, label_names=np.array(["a", "b", "c"]))
    ds = load_dataset(DataConfig(kind="features", path=str(tmp_path / "f.npz"), max_samples=6))
    assert ds.label_names == ("a", "b", "c") and ds.features.shape == (6, 5) and ds.load_image is None
    assert np.array_equal(ds.features, X[ds.indices])


def test_npy_features_with_a_text_labels_file(tmp_path):
    X, _ = _features()
    np.save(tmp_path / "f.npy", X)
    names = ["dog", "cat", "cat", "bird"] * 3
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    ds = load_dataset(DataConfig(kind="features", path=str(tmp_path / "f.npy"), labels=str(tmp_path / "labels.txt")))
    assert ds.label_names == ("bird", "cat", "dog")
    assert [ds.label_names[k] for k in ds.labels] == names


def test_safetensors_features(tmp_path):
    from safetensors.numpy import save_file

    X, y = _features()
    save_file({"features": X, "labels": y.astype(np.int64)}, str(tmp_path / "f.safetensors"))
    feats, labels, _ = read_feature_file(tmp_path / "f.safetensors")
    assert np.array_equal(feats, X) and np.array_equal(labels, y)


def test_nan_and_inf_are_reported_with_count_and_rows(tmp_path):
    X, y = _features()
    X[3, 1] = np.nan
    X[3, 2] = np.inf
    X[8, 0] = -np.inf
    np.savez(tmp_path / "f.npz", features=X, labels=y)
    with pytest.raises(EvalkitError, match=r"3 NaN or infinite values in 2 rows \(rows 3, 8\)"):
        read_feature_file(tmp_path / "f.npz")


def test_label_length_mismatch(tmp_path):
    X, y = _features()
    np.save(tmp_path / "f.npy", X)
    np.save(tmp_path / "y.npy", y[:-2])
    with pytest.raises(EvalkitError, match=r"10 labels for 12 feature rows"):
        load_dataset(DataConfig(kind="features", path=str(tmp_path / "f.npy"), labels=str(tmp_path / "y.npy")))


@pytest.mark.parametrize("make, match", [
    (lambda p: np.savez(p / "f.npz", other=np.zeros(3)), r"needs an array 'features'"),
    (lambda p: np.savez(p / "f.npz", features=np.zeros(3), labels=np.zeros(3)), r"must be 2-D"),
    (lambda p: (p / "f.npz").write_bytes(b"PK\x03\x04 broken"), r"cannot read feature file"),
    (lambda p: np.save(p / "f.npy", np.zeros((4, 2))), r"no labels; add a 'labels' array"),
])
def test_bad_feature_files(tmp_path, make, match):
    make(tmp_path)
    path = next(tmp_path.glob("f.*"))
    with pytest.raises(EvalkitError, match=match):
        load_dataset(DataConfig(kind="features", path=str(path)))


def test_nan_labels_are_refused_with_their_rows(tmp_path):
    import numpy as np

    from evalkit.config import DataConfig
    from evalkit.data import load_dataset
    from evalkit.errors import EvalkitError

    labels = np.array([0.0, 1.0, np.nan, 1.0, 0.0, np.nan])
    np.savez(tmp_path / "f.npz", features=np.random.default_rng(0).normal(size=(6, 3)), labels=labels)
    with pytest.raises(EvalkitError, match=r"2 labels are NaN or infinite \(rows 2, 5\)"):
        load_dataset(DataConfig(kind="features", path=str(tmp_path / "f.npz")))


# --- samples from the features files themselves (no data: section) ---------------------------


def _models(tmp_path, **files):
    """One ``features:`` model entry per ``name=arrays`` (written as ``name.npz``)."""
    from evalkit.config import ModelConfig

    out = []
    for name, arrays in files.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        out.append(ModelConfig(name=name, features=str(tmp_path / f"{name}.npz")))
    return out


def test_dataset_from_feature_files_takes_labels_names_and_ids_from_the_files(tmp_path):
    X, y = _features()
    names = np.array(["a", "b", "c"])
    models = _models(tmp_path, one=dict(features=X, labels=y, label_names=names, ids=np.arange(100, 112)),
                     two=dict(features=X[:, :2], labels=names[y]),  # the same labels, spelt as names
                     three=dict(features=X[:, :3]))  # no labels, no ids: takes the others'
    ds = dataset_from_feature_files(models)
    assert ds.label_names == ("a", "b", "c") and np.array_equal(ds.labels, y)
    assert np.array_equal(ds.indices, np.arange(100, 112)) and np.array_equal(ds.rows, np.arange(12))
    assert ds.n_total == 12 and ds.load_image is None and ds.name == "one.npz + two.npz + three.npz"


@pytest.mark.parametrize("arrays, expected", [
    ({"ids": np.array(["x", "y", "z", "w"]), "indices": np.arange(4)}, [0, 1, 2, 3]),  # string ids: row numbers
    ({"indices": np.array([7, 3, 9, 1])}, [7, 3, 9, 1]),
    ({"ids": np.array([5, 6, 7, 8]), "indices": np.arange(4)}, [5, 6, 7, 8]),  # ids win over indices
    ({}, [0, 1, 2, 3]),
])
def test_sample_ids_are_ids_else_indices_else_row_numbers(tmp_path, arrays, expected):
    ds = dataset_from_feature_files(_models(tmp_path, f=dict(features=np.zeros((4, 2)), labels=[0, 1, 0, 1], **arrays)))
    assert ds.indices.tolist() == expected and ds.rows.tolist() == [0, 1, 2, 3]


def test_integer_labels_with_and_without_names_agree(tmp_path):
    X, y = _features()
    ds = dataset_from_feature_files(_models(tmp_path, a=dict(features=X, labels=y),
                                            b=dict(features=X, labels=y, label_names=np.array(["p", "q", "r"]))))
    assert ds.label_names == ("p", "q", "r")


def _disagreement(tmp_path, **files) -> str:
    with pytest.raises(EvalkitError) as info:
        dataset_from_feature_files(_models(tmp_path, **files))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_disagreeing_feature_files_name_both_files_and_the_difference(tmp_path):
    X, y = _features()
    names = np.array(["cat", "dog", "owl"])
    other = y.copy()
    other[7] = 0
    msg = _disagreement(tmp_path, a=dict(features=X, labels=names[y]), b=dict(features=X, labels=names[other]))
    assert msg.startswith(f"features files {tmp_path / 'a.npz'} and {tmp_path / 'b.npz'} disagree: row 7: "
                          f"label 'dog' vs 'cat'; without a 'data:' section")
    msg = _disagreement(tmp_path, a=dict(features=X, labels=y), b=dict(features=X[:10], labels=y[:10]))
    assert "a.npz and " in msg and "b.npz disagree: 12 rows vs 10 rows" in msg
    msg = _disagreement(tmp_path, a=dict(features=X, labels=y, ids=np.arange(12)),
                        b=dict(features=X, indices=np.arange(12)[::-1]))
    assert "a.npz and " in msg and "b.npz disagree: row 0: id 0 vs 11" in msg
    msg = _disagreement(tmp_path, a=dict(features=X, labels=y, ids=np.arange(12) % 6))
    assert "a.npz: ids must be unique; id 0 is on rows 0 and 6" in msg


def test_feature_files_without_any_labels_are_refused(tmp_path):
    X, _ = _features()
    msg = _disagreement(tmp_path, a=dict(features=X), b=dict(features=X))
    assert msg.startswith(f"{tmp_path / 'a.npz'}: no 'labels' array; without a 'data:' section the labels come "
                          f"from the features files")


def test_resolve_dataset_prefers_the_data_section(tmp_path):
    from evalkit.config import parse_config

    X, y = _features()
    np.savez(tmp_path / "f.npz", features=X, labels=y)
    model = {"name": "m", "features": str(tmp_path / "f.npz")}
    with_data = parse_config({"data": {"kind": "features", "path": str(tmp_path / "f.npz"), "max_samples": 6},
                              "models": [model]})
    assert len(resolve_dataset(with_data)) == 6 and resolve_dataset(with_data).rows is None
    assert len(resolve_dataset(parse_config({"models": [model]}))) == 12


# --- high-bit-depth images ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, mode):
    from PIL import Image

    from evalkit.preprocess import build_transform, depth_rule

    eight = write_image_folder(tmp_path / "eight", classes=("a", "b", "c"), n_per_class=3, mode="L")
    deep = tmp_path / "deep"
    for f in sorted(eight.rglob("*.png")):
        a = np.asarray(Image.open(f)).astype(np.float64)
        arr = {"I;16": (a * 257).astype(np.uint16), "I": (a * 257).astype(np.int32),
               "F": (a / 255).astype(np.float32)}[mode]
        (deep / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, mode if mode != "I;16" else None).save(deep / f.parent.name / (f.stem + ".tif"))
    ref = load_dataset(DataConfig(kind="imagefolder", path=str(eight)))
    ds = load_dataset(DataConfig(kind="imagefolder", path=str(deep)))
    assert ds.load_image(0).mode == mode and depth_rule(ds.load_image(0))
    for channels in (1, 3):
        t = build_transform({"channels": channels})
        for i in range(len(ds)):
            assert np.abs(t(ds.load_image(i)).numpy() - t(ref.load_image(i)).numpy()).max() <= 1 / 255 + 1e-6


def test_float_images_outside_0_1_are_min_max_scaled_per_image():
    from PIL import Image

    from evalkit.preprocess import depth_rule, to_8bit

    im = Image.fromarray(np.linspace(-3, 5, 64, dtype=np.float32).reshape(8, 8), "F")
    out = np.asarray(to_8bit(im))
    assert out.min() == 0 and out.max() == 255 and "min-max" in depth_rule(im)
    assert np.asarray(to_8bit(Image.fromarray(np.full((4, 4), 7.0, np.float32), "F"))).max() == 0


# --- rough edges ----------------------------------------------------------------------------


def test_macosx_folder_is_not_a_class(tmp_path):
    root = write_image_folder(tmp_path / "root", classes=("a", "b", "__MACOSX"), n_per_class=2, size=(8, 8))
    assert load_dataset(DataConfig(kind="imagefolder", path=str(root))).label_names == ("a", "b")


def test_unreadable_class_folder_is_named_as_unreadable(tmp_path, monkeypatch):
    import evalkit.data

    root = write_image_folder(tmp_path / "root", classes=("a", "b"), n_per_class=2, size=(8, 8))
    real = evalkit.data.os.listdir

    def listdir(path):
        if str(path).endswith("/b"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(evalkit.data.os, "listdir", listdir)
    with pytest.raises(EvalkitError, match=r"class folder b under .* cannot be read \(Permission denied\)"):
        load_dataset(DataConfig(kind="imagefolder", path=str(root)))


@pytest.mark.parametrize("labels", [[0, 1, 2], [0, 1, -1]])
def test_label_names_that_do_not_cover_the_labels_are_an_error(tmp_path, labels):
    path = tmp_path / "f.npz"
    np.savez(path, features=np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32),
             labels=np.array(labels * 3), label_names=np.array(["a", "b"]))
    with pytest.raises(EvalkitError, match=rf"f.npz: label_names has 2 names .* the labels include {labels[-1]}"):
        load_dataset(DataConfig(kind="features", path=str(path)))


def test_home_in_paths_is_expanded(tmp_path, monkeypatch):
    from evalkit.config import ModelConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    X, y = _features()
    np.savez(tmp_path / "f.npz", features=X, labels=y)
    cfg = DataConfig(kind="features", path="~/f.npz")
    assert cfg.path == str(tmp_path / "f.npz") and len(load_dataset(cfg)) == 12
    assert ModelConfig(name="m", features="~/f.npz").features == str(tmp_path / "f.npz")


def test_fewer_samples_than_classes_draws_the_classes_by_seed():
    labels = np.repeat(np.arange(20), 5)  # 20 equal classes, 100 samples
    picks = {tuple(np.unique(labels[stratified_subsample(labels, 4, seed=s)])) for s in range(6)}
    assert all(len(p) == 4 for p in picks)  # one sample from each of 4 classes
    assert len(picks) > 1  # the seed decides which classes, not their order
    assert np.array_equal(stratified_subsample(labels, 4, seed=3), stratified_subsample(labels, 4, seed=3))
