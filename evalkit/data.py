"""Datasets: scikit-learn's digits, image folders, torchvision sets on disk, feature files.

Every loader returns a :class:`Dataset` of the selected samples (after the seeded, stratified
``max_samples`` subsample). Nothing here downloads anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from evalkit.errors import EvalkitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Dataset:
    """The samples a run works on.

    Attributes
    ----------
    name : str
    labels : ndarray of shape (n_samples,), int64
    label_names : tuple of str, ``label_names[k]`` names class ``k``
    indices : ndarray of shape (n_samples,), int64
        Positions of the selected samples in the full split (what the cache keys on).
    load_image : callable or None
        ``load_image(i)`` returns sample ``i`` (0 <= i < n_samples) as a PIL image.
    features : ndarray of shape (n_samples, n_features) or None
        For ``kind: features``.
    fingerprint : str
        Identifies the data source (kind, path, split, sizes) for the feature cache.
    """

    name: str
    labels: np.ndarray
    label_names: tuple
    indices: np.ndarray
    load_image: Optional[Callable] = None
    features: Optional[np.ndarray] = None
    fingerprint: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def stratified_subsample(labels: np.ndarray, max_samples: Optional[int], *, seed: int = 0) -> np.ndarray:
    """Sorted positions of a seeded subsample that keeps class proportions.

    Parameters
    ----------
    labels : ndarray of shape (n_samples,)
    max_samples : int or None
        ``None`` or ``>= n_samples`` keeps everything.
    """
    n = labels.shape[0]
    if max_samples is None or max_samples >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder allocation, at least one per class while budget allows.
    exact = counts * (max_samples / n)
    take = np.floor(exact).astype(int)
    order = np.argsort(-(exact - take), kind="stable")
    for k in order[: max_samples - take.sum()]:
        take[k] += 1
    chosen = []
    for cls, k in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        chosen.append(rng.choice(members, size=min(k, members.size), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def load_dataset(cfg) -> Dataset:
    """Load the dataset a :class:`evalkit.config.DataConfig` describes."""
    loaders = {
        "digits": _load_digits,
        "imagefolder": _load_imagefolder,
        "torchvision": _load_torchvision,
        "features": _load_features_dataset,
    }
    return loaders[cfg.kind](cfg)


def _select(name, labels, label_names, cfg, *, load_full=None, features=None, fingerprint=""):
    labels = np.asarray(labels)
    if labels.shape[0] == 0:
        raise EvalkitError(f"data: {name} has no samples")
    idx = stratified_subsample(labels, cfg.max_samples, seed=cfg.seed)
    load = (lambda i: load_full(int(idx[i]))) if load_full is not None else None
    return Dataset(
        name=name,
        labels=labels[idx].astype(np.int64),
        label_names=tuple(str(n) for n in label_names),
        indices=idx,
        load_image=load,
        features=None if features is None else features[idx],
        fingerprint=f"{fingerprint}|n={labels.shape[0]}|max={cfg.max_samples}|seed={cfg.seed}",
    )


# --- digits ---------------------------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.5
DIGITS_SPLIT_SEED = 0


def digits_split(split: str = "test"):
    """scikit-learn's 8x8 digits, split 50/50 into a seeded stratified train/test pair.

    Returns ``(images, labels)``: uint8 arrays of shape (n, 8, 8) scaled to 0..255, and (n,).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise EvalkitError(f"data.split: digits has splits 'train', 'test', 'all'; got {split!r}")
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    if split == "all":
        return images, labels
    tr, te = train_test_split(
        np.arange(labels.size), test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    pick = np.sort(te if split == "test" else tr)
    return images[pick], labels[pick]


def _load_digits(cfg) -> Dataset:
    from PIL import Image

    split = cfg.split or "test"
    images, labels = digits_split(split)
    return _select(
        f"digits ({split})",
        labels,
        [str(d) for d in range(10)],
        cfg,
        load_full=lambda i: Image.fromarray(images[i], mode="L"),
        fingerprint=f"digits|{split}",
    )


# --- image folders --------------------------------------------------------------------------


def _load_imagefolder(cfg) -> Dataset:
    root = Path(cfg.path)
    if cfg.split:
        root = root / cfg.split
    if not root.is_dir():
        raise EvalkitError(f"data.path: {root} is not a folder; expected one sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise EvalkitError(f"data.path: {root} has no class sub-folders; expected ROOT/CLASS/IMAGE files")
    files, labels = [], []
    for k, cls in enumerate(classes):
        for f in sorted((root / cls).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(k)
    if not files:
        raise EvalkitError(f"data.path: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")

    def load(i: int):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(files[i]) as im:
                im.load()
                return im.copy()
        except (UnidentifiedImageError, OSError) as exc:
            raise EvalkitError(f"{files[i]}: cannot read image ({exc.__class__.__name__}); fix or remove the file") from None

    stat = sum(f.stat().st_size for f in files)
    return _select(
        f"{root.name} (imagefolder)", np.array(labels), classes, cfg,
        load_full=load, fingerprint=f"imagefolder|{root.resolve()}|{len(files)}|{stat}",
    )


# --- torchvision sets on local disk -----------------------------------------------------------


def _load_torchvision(cfg) -> Dataset:
    import torchvision.datasets as tvd

    from evalkit.errors import unknown

    names = [n for n in dir(tvd) if not n.startswith("_") and n[0].isupper() and n not in ("VisionDataset", "DatasetFolder", "ImageFolder")]
    if cfg.name not in names:
        raise unknown("torchvision dataset", cfg.name, names)
    cls = getattr(tvd, cfg.name)
    split = cfg.split or "test"
    kwargs = {"root": cfg.path, "download": False}
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    try:
        ds = cls(**kwargs)
    except (RuntimeError, FileNotFoundError) as exc:
        raise EvalkitError(
            f"data.path: {cfg.name} ({split}) not found under {cfg.path}; evalkit never downloads: "
            f"place the dataset files there in torchvision's layout ({exc})"
        ) from None
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(ds, "labels", None)
    if targets is None:
        targets = [ds[i][1] for i in range(len(ds))]
    labels = np.asarray(targets, dtype=np.int64)
    names_ = list(getattr(ds, "classes", []) or [str(k) for k in range(int(labels.max()) + 1)])

    def load(i: int):
        from PIL import Image

        img = ds[i][0]
        return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))

    return _select(f"{cfg.name} ({split})", labels, names_, cfg, load_full=load, fingerprint=f"torchvision|{cfg.name}|{Path(cfg.path).resolve()}|{split}")


# --- feature files --------------------------------------------------------------------------


def read_feature_file(path: str | Path, *, labels_path: Optional[str] = None):
    """Read ``(features, labels, label_names)`` from ``.npz``, ``.npy`` (+ labels) or ``.safetensors``.

    ``.npz`` holds ``features`` (N, D), ``labels`` (N,) and optionally ``label_names``.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalkitError(f"{path}: feature file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("features",) if k not in z.files]
                if missing:
                    raise EvalkitError(f"{path}: needs an array 'features' (N, D); it has {', '.join(z.files) or 'none'}")
                feats = z["features"]
                labels = z["labels"] if "labels" in z.files else None
                names = [str(n) for n in z["label_names"]] if "label_names" in z.files else None
        elif suffix == ".npy":
            feats = np.load(path, allow_pickle=False)
            labels, names = None, None
        elif suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if "features" not in tensors:
                raise EvalkitError(f"{path}: needs a tensor 'features'; it has {', '.join(tensors)}")
            feats, labels, names = tensors["features"], tensors.get("labels"), None
        else:
            raise EvalkitError(f"{path}: unknown feature file type {suffix!r}; expected .npz, .npy or .safetensors")
    except EvalkitError:
        raise
    except Exception as exc:  # corrupt archives raise many types
        raise EvalkitError(f"{path}: cannot read feature file ({exc.__class__.__name__}: {exc})") from None
    if labels is None and labels_path:
        lp = Path(labels_path)
        if not lp.is_file():
            raise EvalkitError(f"data.labels: {lp} not found")
        labels = np.load(lp, allow_pickle=False) if lp.suffix == ".npy" else np.loadtxt(lp)
    feats = np.asarray(feats)
    if feats.ndim != 2:
        raise EvalkitError(f"{path}: features must be 2-D (n_samples, n_features); got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.number):
        raise EvalkitError(f"{path}: features must be numeric; got dtype {feats.dtype}")
    feats = feats.astype(np.float32, copy=False)
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if rows.size > 5 else "")
        raise EvalkitError(f"{path}: {int((~np.isfinite(feats)).sum())} NaN or infinite values in {rows.size} rows (rows {shown})")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != feats.shape[0]:
            raise EvalkitError(f"{path}: {labels.shape[0]} labels for {feats.shape[0]} feature rows; expected one label per row")
    return feats, labels, names


def encode_labels(labels: np.ndarray, names=None):
    """Map raw labels to 0..C-1; returns ``(codes, names)``."""
    uniq, codes = np.unique(labels, return_inverse=True)
    if names is not None and np.issubdtype(uniq.dtype, np.integer) and uniq.min() >= 0 and uniq.max() < len(names):
        return codes.astype(np.int64), [str(names[int(u)]) for u in uniq]
    return codes.astype(np.int64), [str(u) for u in uniq]


def _load_features_dataset(cfg) -> Dataset:
    feats, labels, names = read_feature_file(cfg.path, labels_path=cfg.labels)
    if labels is None:
        raise EvalkitError(f"{cfg.path}: no labels; add a 'labels' array to the .npz or set data.labels")
    codes, names = encode_labels(labels, names)
    st = Path(cfg.path).stat()
    return _select(Path(cfg.path).name, codes, names, cfg, features=feats,
                   fingerprint=f"features|{Path(cfg.path).resolve()}|{st.st_size}|{st.st_mtime_ns}")
