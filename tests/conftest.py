"""Shared, generic test helpers: tiny generated images on disk and the ``gpu`` marker."""
from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `python:usermodels:...` sources and helper modules
    sys.path.insert(0, str(TESTS_DIR))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run on a GPU machine)")


@pytest.fixture(autouse=True)
def numba_kernels_on_small_inputs(monkeypatch):
    """Tests use small inputs, where a run takes the torch paths (kernels.NUMBA_MIN_ENTRIES);
    they run the numba kernels on them unless a test says otherwise. The torch paths have
    their own tests (``no_numba``), and both are checked against the same references."""
    from evalkit import kernels

    monkeypatch.setattr(kernels, "NUMBA_MIN_ENTRIES", 0)


def assert_same_rows(got, want) -> None:
    """Score rows equal, silhouettes to 1e-12: the silhouette is a sum of distances, which the
    torch path and the numba kernel add in different orders (a small-data process takes the
    torch path, one with numba loaded the kernel); every other score is a count, identical."""
    got, want = [dict(r) for r in got], [dict(r) for r in want]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        gs, ws = g.pop("silhouette", None), w.pop("silhouette", None)
        assert g == w
        assert (gs is None) == (ws is None)
        if gs is not None:
            assert gs == pytest.approx(ws, rel=1e-12, abs=1e-15)


def class_images(n_classes: int, n_per_class: int, *, size=(16, 16), channels: int = 3, seed: int = 0):
    """uint8 images of shape (n, H, W[, 3]) whose mean brightness and stripes depend on the class.

    Returns ``(images, labels)`` with labels 0..n_classes-1, class-major order.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    images, labels = [], []
    for k in range(n_classes):
        for _ in range(n_per_class):
            base = np.full((h, w), 40 + 180 * k / max(n_classes - 1, 1))
            base[:, :: k + 2] += 40
            img = np.clip(base + rng.normal(0, 12, size=(h, w)), 0, 255).astype(np.uint8)
            if channels == 3:
                img = np.stack([img, img[::-1], np.roll(img, k, axis=1)], axis=-1)
            images.append(img)
            labels.append(k)
    return np.stack(images), np.array(labels, dtype=np.int64)


def write_image_folder(root: Path, *, classes=("cat", "dog", "fish"), n_per_class: int = 5, size=(16, 16),
                       mode: str = "RGB", seed: int = 0) -> Path:
    """ROOT/CLASS/NNN.png, generated; returns ROOT."""
    from PIL import Image

    images, labels = class_images(len(classes), n_per_class, size=size, channels=3 if mode == "RGB" else 1, seed=seed)
    root = Path(root)
    for i, (img, k) in enumerate(zip(images, labels)):
        folder = root / classes[k]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert(mode).save(folder / f"{i:03d}.png")
    return root


def write_mnist(root: Path, *, n_train: int = 20, n_test: int = 30, size: int = 28, name: str = "MNIST",
                gz: bool = False) -> Path:
    """Raw idx files in torchvision's layout: ROOT/NAME/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte."""
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = class_images(10, -(-n // 10), size=(size, size), channels=1, seed=seed)
        order = np.random.default_rng(seed).permutation(len(labels))[:n]
        images, labels = images[order], labels[order].astype(np.uint8)
        blobs = {
            f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 0x0803, n, size, size) + images.tobytes(),
            f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 0x0801, n) + labels.tobytes(),
        }
        for fname, blob in blobs.items():
            if gz:
                with gzip.open(raw / (fname + ".gz"), "wb") as f:
                    f.write(blob)
            else:
                (raw / fname).write_bytes(blob)
    return Path(root)


@pytest.fixture
def image_folder(tmp_path):
    """A generated ImageFolder: 3 classes x 5 RGB 16x16 PNGs."""
    return write_image_folder(tmp_path / "images")
