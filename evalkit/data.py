"""Datasets: scikit-learn's digits, image folders, torchvision sets on disk, feature files.

Every loader returns a :class:`Dataset` of the selected samples (after the seeded, stratified
``max_samples`` subsample). Nothing here downloads anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from evalkit.errors import EvalkitError

NOT_CLASSES = ("__MACOSX",)  # folders archivers add next to the class folders
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
        Identifies the data source (kind, path, split, file sizes and times) for the feature cache.
    n_total : int
        Samples in the full split, before ``max_samples``.
    rows : ndarray of shape (n_samples,), int64, or None
        For samples read from the ``features:`` files themselves (no ``data:`` section): each
        sample's row in those files, while ``indices`` are the files' sample ids. None: the
        files hold one row per sample of the full split, so ``indices`` are the rows.
    """

    name: str
    labels: np.ndarray
    label_names: tuple
    indices: np.ndarray
    load_image: Optional[Callable] = None
    features: Optional[np.ndarray] = None
    fingerprint: str = ""
    n_total: int = 0
    sample_ids: Optional[np.ndarray] = None  # str per selected sample (image paths), shown on hover
    rows: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def stratified_subsample(labels: np.ndarray, max_samples: Optional[int], *, seed: int = 0) -> np.ndarray:
    """Sorted positions of a seeded subsample that keeps class proportions.

    The budget is shared in proportion to class sizes (largest remainders first); a class too
    small for its share still keeps one sample, taken from the largest share, while the budget
    allows one per class.

    Parameters
    ----------
    labels : ndarray of shape (n_samples,)
    max_samples : int or None
        ``None`` or ``>= n_samples`` keeps everything.
    seed : int

    Returns
    -------
    ndarray of shape (min(n_samples, max_samples),), int64
    """
    n = labels.shape[0]
    if max_samples is None or max_samples >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (max_samples / n)
    take = np.floor(exact).astype(np.int64)
    if max_samples < classes.size:
        # fewer samples than classes: which classes get one is a seeded draw (by share, ties at
        # random), not the alphabetically first ones
        order = np.lexsort((rng.permutation(classes.size), -(exact - take)))
    else:
        order = np.argsort(-(exact - take), kind="stable")
    for k in order[: max_samples - take.sum()]:
        take[k] += 1
    if max_samples >= classes.size:  # a class too small for its share still gets one sample
        for k in np.flatnonzero(take == 0):
            take[int(np.argmax(take))] -= 1
            take[k] = 1
    chosen = []
    for cls, k in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        chosen.append(rng.choice(members, size=int(k), replace=False))
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


class _Subset:
    """``load(i)`` of the selected samples; a class (not a closure) so DataLoader workers can pickle it."""

    def __init__(self, load_full, indices):
        self.load_full, self.indices = load_full, indices

    def __call__(self, i: int):
        return self.load_full(int(self.indices[i]))


def _select(name, labels, label_names, cfg, *, load_full=None, features=None, fingerprint="", ids=None):
    labels = np.asarray(labels)
    if labels.shape[0] == 0:
        raise EvalkitError(f"data: {name} has no samples")
    idx = stratified_subsample(labels, cfg.max_samples, seed=cfg.seed)
    return Dataset(
        name=name,
        labels=labels[idx].astype(np.int64),
        label_names=tuple(str(n) for n in label_names),
        indices=idx,
        load_image=_Subset(load_full, idx) if load_full is not None else None,
        features=None if features is None else features[idx],
        fingerprint=f"{fingerprint}|n={labels.shape[0]}|max={cfg.max_samples}|seed={cfg.seed}",
        n_total=int(labels.shape[0]),
        sample_ids=None if ids is None else np.asarray([str(ids[i]) for i in idx]),
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


class _ArrayImages:
    """``load(i)``: a PIL image from a uint8 array of shape (n, H, W) or (n, H, W, C)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])


def _load_digits(cfg) -> Dataset:
    split = cfg.split or "test"
    images, labels = digits_split(split)
    return _select(
        f"digits ({split})", labels, [str(d) for d in range(10)], cfg,
        load_full=_ArrayImages(images), fingerprint=f"digits|{split}",
    )


# --- image folders --------------------------------------------------------------------------


class _ImageFiles:
    """``load(i)``: the image file ``files[i]``; a corrupt file is an error naming it."""

    def __init__(self, files):
        self.files = files

    def __call__(self, i: int):
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except Image.DecompressionBombError:  # PIL's guard: more than 2 x MAX_IMAGE_PIXELS pixels
            limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
            raise EvalkitError(f"{path}: image too large to decode (over {limit:,} pixels, PIL's decompression-bomb "
                               f"limit); downscale it or remove it") from None
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for broken files
            raise EvalkitError(f"{path}: cannot read image ({exc.__class__.__name__}: {exc}); fix or remove "
                               f"the file") from None


def _files_fingerprint(root: Path, files) -> str:
    """Changes when any file is added, removed, renamed, resized or rewritten."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _load_imagefolder(cfg) -> Dataset:
    root = Path(cfg.path)
    if cfg.split:
        root = root / cfg.split
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise EvalkitError(f"data.path: {root} {what}; expected a folder with one sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and p.name not in NOT_CLASSES)
    if not classes:
        raise EvalkitError(f"data.path: {root} has no class sub-folders; expected ROOT/CLASS/IMAGE files")
    files, labels, empty = [], [], []
    for k, cls in enumerate(classes):
        try:
            os.listdir(root / cls)
        except OSError as exc:  # rglob would skip it silently and call it empty
            raise EvalkitError(f"data.path: class folder {cls} under {root} cannot be read ({exc.strerror}); fix its "
                               f"permissions or remove it") from None
        found = [f for f in sorted((root / cls).rglob("*"))
                 if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                 and not any(part.startswith(".") for part in f.relative_to(root).parts)]
        if not found:
            empty.append(cls)
        files.extend(found)
        labels.extend([k] * len(found))
    if not files:
        raise EvalkitError(f"data.path: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {root}")
    if empty:
        shown = ", ".join(empty[:5]) + (f", ... ({len(empty)} in all)" if len(empty) > 5 else "")
        raise EvalkitError(f"data.path: class folder{'s' if len(empty) > 1 else ''} {shown} under {root} "
                           f"hold{'' if len(empty) > 1 else 's'} no images ({', '.join(IMAGE_SUFFIXES)}); "
                           f"add images or remove the folder")
    return _select(
        f"{root.name} (imagefolder)", np.array(labels), classes, cfg, load_full=_ImageFiles(files),
        ids=[str(Path(f).relative_to(root)) if Path(f).is_relative_to(root) else str(f) for f in files],
        fingerprint=f"imagefolder|{root.resolve()}|{_files_fingerprint(root, files)}",
    )


# --- torchvision sets on local disk -----------------------------------------------------------

# where torchvision looks for each set's files under data.path (evalkit never downloads)
TORCHVISION_LAYOUTS = {
    "MNIST": "PATH/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "FashionMNIST": "PATH/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "KMNIST": "PATH/KMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "EMNIST": "PATH/EMNIST/raw/emnist-SPLIT-{train,test}-{images-idx3,labels-idx1}-ubyte",
    "QMNIST": "PATH/QMNIST/raw/qmnist-{train,test}-{images-idx3,labels-idx2}-ubyte",
    "CIFAR10": "PATH/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (the original files: their MD5 is checked)",
    "CIFAR100": "PATH/cifar-100-python/{train,test,meta} (the original files: their MD5 is checked)",
    "SVHN": "PATH/{train,test,extra}_32x32.mat",
    "STL10": "PATH/stl10_binary/{train,test}_{X,y}.bin and class_names.txt",
}


def _torchvision_fingerprint(root: Path) -> str:
    """Names, sizes and times of the files under ``root`` (a few thousand at most are read)."""
    import hashlib
    import itertools

    h = hashlib.sha256()
    if root.is_dir():
        for f in sorted(itertools.islice((p for p in root.rglob("*") if p.is_file()), 5000)):
            st = f.stat()
            h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


class _TorchvisionImages:
    """``load(i)``: sample ``i`` of a torchvision dataset as a PIL image."""

    def __init__(self, ds):
        self.ds = ds

    def __call__(self, i: int):
        from PIL import Image

        img = self.ds[i][0]
        return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))


def _torchvision_labels(ds, name: str) -> np.ndarray:
    for attr in ("targets", "labels", "_labels", "y"):
        targets = getattr(ds, attr, None)
        if targets is not None:
            break
    else:
        targets = [ds[i][1] for i in range(len(ds))]
    try:
        labels = np.asarray(targets).reshape(-1)
        if labels.shape[0] != len(ds) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError
    except (TypeError, ValueError):
        raise EvalkitError(f"data.name: {name} does not have one integer class label per image; evalkit needs "
                           f"a classification dataset") from None
    return labels.astype(np.int64)


def _init_parameters(cls) -> dict:
    """Keyword parameters of ``cls.__init__``, with those its ``**kwargs`` pass on to base classes."""
    import inspect

    params = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        own = list(inspect.signature(klass.__init__).parameters.values())[1:]
        for p in own:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in own):
            break
    return params


def _load_torchvision(cfg) -> Dataset:
    import inspect

    import torchvision.datasets as tvd

    from evalkit.errors import unknown

    names = [n for n in dir(tvd) if not n.startswith("_") and n[0].isupper() and inspect.isclass(getattr(tvd, n))
             and n not in ("VisionDataset", "DatasetFolder", "ImageFolder", "FakeData")]
    if cfg.name not in names:
        raise unknown("torchvision dataset (data.name)", cfg.name, names)
    cls = getattr(tvd, cfg.name)
    root = Path(cfg.path)
    params = _init_parameters(cls)
    needs = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in ("root", "split")]
    if needs:
        raise EvalkitError(f"data.name: {cfg.name} needs {', '.join(map(repr, needs))}, which evalkit cannot pass; "
                           f"evalkit reads classification datasets that take root (and train or split), such as "
                           f"MNIST or CIFAR10; for others use data.kind: imagefolder or features")
    kwargs = {"root": str(root)}
    if "download" in params:
        kwargs["download"] = False
    split = cfg.split or "test"
    subsets = getattr(cls, "splits", None)
    if "split" in params and "train" in params and subsets:
        # EMNIST: a subset (balanced, letters, ...) and its train or test part, as 'balanced/test'
        subset, _, part = str(cfg.split or "").partition("/")
        if subset not in subsets or part not in ("", "train", "test"):
            raise EvalkitError(f"data.split: {cfg.name} needs one of {', '.join(map(repr, subsets))}, optionally "
                               f"with '/train' or '/test' (default test), e.g. '{subsets[0]}/test'; got {cfg.split!r}")
        split = f"{subset}/{part or 'test'}"
        kwargs["split"], kwargs["train"] = subset, part == "train"
    elif "train" in params:
        if split not in ("train", "test"):
            raise EvalkitError(f"data.split: {cfg.name} has splits 'train' and 'test'; got {split!r}")
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    if not root.is_dir():
        where = TORCHVISION_LAYOUTS.get(cfg.name, "PATH in torchvision's layout for this dataset")
        raise EvalkitError(f"data.path: {root} is not a folder; evalkit never downloads: put the {cfg.name} files "
                           f"at {where.replace('PATH', str(root))}")
    try:
        ds = cls(**kwargs)
    except TypeError as exc:  # an argument evalkit does not know about
        raise EvalkitError(f"data.name: {cfg.name} cannot be built from root, train and split ({exc}); evalkit "
                           f"reads classification datasets such as MNIST or CIFAR10") from None
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as exc:
        where = TORCHVISION_LAYOUTS.get(cfg.name, "PATH in torchvision's layout for this dataset")
        text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        said = "" if "download" in text else f" ({text})"
        raise EvalkitError(f"data.path: {cfg.name} ({split}) not found or incomplete under {root}; evalkit never "
                           f"downloads: put the files at {where.replace('PATH', str(root))}{said}") from None
    labels = _torchvision_labels(ds, cfg.name)
    classes = list(getattr(ds, "classes", None) or [])
    if len(classes) <= int(labels.max()):
        classes = [str(k) for k in range(int(labels.max()) + 1)]
    return _select(f"{cfg.name} ({split})", labels, classes, cfg, load_full=_TorchvisionImages(ds),
                   fingerprint=f"torchvision|{cfg.name}|{root.resolve()}|{split}|{_torchvision_fingerprint(root)}")


# --- feature files --------------------------------------------------------------------------


def read_feature_file(path: str | Path, *, labels_path: Optional[str] = None, with_ids: bool = False):
    """Read ``(features, labels, label_names)`` from ``.npz``, ``.npy`` (+ labels) or ``.safetensors``.

    ``.npz`` holds ``features`` (N, D), ``labels`` (N,) and optionally ``label_names`` and
    the sample ids: ``ids`` (N,) or ``indices`` (N,). A folder holds the same arrays as
    ``.npy`` files (``features.npy`` is memory-mapped; ``evalkit extract --format npy``).
    With ``with_ids`` the ids (or None) come fourth: ``(features, labels, label_names, ids)``.
    """
    ids = None
    path = Path(path)
    if path.is_dir():
        if not (path / "features.npy").is_file():
            raise EvalkitError(f"{path}: a folder without features.npy; expected a features file (.npz, .npy, "
                               f".safetensors) or a folder of .npy files as `evalkit extract --format npy` writes")
    elif not path.is_file():
        raise EvalkitError(f"{path}: feature file not found")
    suffix = path.suffix.lower()
    try:
        if path.is_dir():  # features.npy memory-mapped, beside labels.npy, label_names.npy, indices.npy or ids.npy
            feats = np.load(path / "features.npy", mmap_mode="r", allow_pickle=False)
            part = {k: np.load(path / f"{k}.npy", allow_pickle=False)
                    for k in ("labels", "label_names", *ID_KEYS) if (path / f"{k}.npy").is_file()}
            labels = part.get("labels")
            names = [str(n) for n in part["label_names"]] if "label_names" in part else None
            id_key = next((k for k in ID_KEYS if k in part), None)
            ids = part[id_key] if with_ids and id_key else None
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("features",) if k not in z.files]
                if missing:
                    raise EvalkitError(f"{path}: needs an array 'features' (N, D); it has {', '.join(z.files) or 'none'}")
                feats = z["features"]
                labels = z["labels"] if "labels" in z.files else None
                names = [str(n) for n in z["label_names"]] if "label_names" in z.files else None
                id_key = next((k for k in ID_KEYS if k in z.files), None)
                ids = z[id_key] if with_ids and id_key else None
        elif suffix == ".npy":
            feats = np.load(path, allow_pickle=False)
            labels, names = None, None
        elif suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if "features" not in tensors:
                raise EvalkitError(f"{path}: needs a tensor 'features'; it has {', '.join(tensors)}")
            feats, labels, names = tensors["features"], tensors.get("labels"), None
            ids = next((tensors[k] for k in ID_KEYS if k in tensors), None) if with_ids else None
        else:
            raise EvalkitError(f"{path}: unknown feature file type {suffix!r}; expected .npz, .npy or .safetensors")
    except EvalkitError:
        raise
    except Exception as exc:  # corrupt archives raise many types
        raise EvalkitError(f"{path}: cannot read feature file ({exc.__class__.__name__}: {exc})") from None
    if labels is None and labels_path:
        labels = read_labels_file(labels_path)
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
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise EvalkitError(f"{path}: labels must be 1-D (n_samples,); got shape {labels.shape}")
        if labels.shape[0] != feats.shape[0]:
            raise EvalkitError(f"{path}: {labels.shape[0]} labels for {feats.shape[0]} feature rows; expected one label per row")
    if not with_ids:
        return feats, labels, names
    if ids is not None:
        ids = _check_ids(np.asarray(ids), feats.shape[0], path)
    return feats, labels, names, ids


ID_KEYS = ("ids", "indices")  # where a features file keeps its sample ids, first found wins


def _check_ids(ids: np.ndarray, n_rows: int, path) -> np.ndarray:
    """One unique id (a number or a string) per feature row."""
    if ids.ndim != 1 or ids.shape[0] != n_rows:
        raise EvalkitError(f"{path}: ids must be 1-D with one id per feature row ({n_rows}); got shape {ids.shape}")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        k = int(np.argmax(counts > 1))
        rows = np.flatnonzero(ids == uniq[k])[:2]
        raise EvalkitError(f"{path}: ids must be unique; id {_show_value(uniq[k])} is on rows {rows[0]} and {rows[1]}")
    return ids


def _show_value(v) -> str:
    return repr(v.item() if isinstance(v, np.generic) else v)


def read_labels_file(path: str | Path) -> np.ndarray:
    """Labels from ``.npy`` or a text file with one label (a number or a class name) per line."""
    lp = Path(path)
    if not lp.is_file():
        raise EvalkitError(f"data.labels: {lp} not found")
    try:
        if lp.suffix.lower() == ".npy":
            labels = np.load(lp, allow_pickle=False)
        else:
            lines = [line.strip() for line in lp.read_text(encoding="utf-8").splitlines()]
            labels = np.array([line for line in lines if line])
            try:
                labels = labels.astype(np.int64)
            except ValueError:
                pass  # class names
    except EvalkitError:
        raise
    except Exception as exc:
        raise EvalkitError(f"data.labels: cannot read {lp} ({exc.__class__.__name__}: {exc})") from None
    return np.asarray(labels).reshape(-1)


def encode_labels(labels: np.ndarray, names=None, *, source: str = "labels"):
    """Map raw labels to 0..C-1; returns ``(codes, names)``.

    Raises EvalkitError naming the rows when a float label is NaN or infinite.
    """
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(labels))
        if bad.size:
            shown = ", ".join(str(r) for r in bad[:5]) + (", ..." if bad.size > 5 else "")
            raise EvalkitError(f"{source}: {bad.size} labels are NaN or infinite (rows {shown}); expected one class per row")
    uniq, codes = np.unique(labels, return_inverse=True)
    if names is not None and np.issubdtype(uniq.dtype, np.integer):
        outside = [int(u) for u in uniq if not 0 <= u < len(names)]
        if outside:
            shown = ", ".join(str(u) for u in outside[:5]) + (", ..." if len(outside) > 5 else "")
            raise EvalkitError(f"{source}: label_names has {len(names)} names (for labels 0..{len(names) - 1}) but the "
                               f"labels include {shown}; give one name per label value, or remove label_names")
        return codes.astype(np.int64), [str(names[int(u)]) for u in uniq]
    return codes.astype(np.int64), [str(u) for u in uniq]


def feature_file_stat(path):
    """``os.stat`` of a features file, or of ``features.npy`` in a features folder."""
    p = Path(path)
    return (p / "features.npy").stat() if p.is_dir() else p.stat()


def _load_features_dataset(cfg) -> Dataset:
    feats, labels, names = read_feature_file(cfg.path, labels_path=cfg.labels)
    if labels is None:
        raise EvalkitError(f"{cfg.path}: no labels; add a 'labels' array to the .npz or set data.labels")
    codes, names = encode_labels(labels, names, source=str(cfg.path))
    st = feature_file_stat(cfg.path)
    return _select(Path(cfg.path).name, codes, names, cfg, features=feats,
                   fingerprint=f"features|{Path(cfg.path).resolve()}|{st.st_size}|{st.st_mtime_ns}")


# --- samples from the features files themselves (no data: section) ---------------------------


def resolve_dataset(config) -> Dataset:
    """The dataset of a run: ``config.data``, or, without one, the models' ``features`` files."""
    if config.data is not None:
        return load_dataset(config.data)
    return dataset_from_feature_files(config.models)


class _FeatureFile:
    """What one ``features:`` file says about the samples: labels (as text per row), ids."""

    def __init__(self, path: str):
        self.path = path
        feats, labels, names, self.ids = read_feature_file(path, with_ids=True)
        self.n = feats.shape[0]
        self.labels, self.names = labels, names
        self.named = labels is not None and (names is not None or not np.issubdtype(labels.dtype, np.integer))

    def label_text(self) -> np.ndarray:
        codes, names = encode_labels(self.labels, self.names, source=self.path)
        return np.asarray(names, dtype=object)[codes]


def _first_difference(a: np.ndarray, b: np.ndarray) -> Optional[int]:
    differ = np.flatnonzero(a != b)
    return int(differ[0]) if differ.size else None


def _disagree(a: _FeatureFile, b: _FeatureFile, what: str) -> EvalkitError:
    return EvalkitError(f"features files {a.path} and {b.path} disagree: {what}; without a 'data:' section every "
                        f"features file must hold the same samples in the same order")


def _same_labels(a: _FeatureFile, b: _FeatureFile) -> None:
    """Labels agree row by row: as numbers when a side has no names for them, else by name."""
    if not (a.named and b.named) and np.issubdtype(a.labels.dtype, np.number) \
            and np.issubdtype(b.labels.dtype, np.number):
        left, right = a.labels, b.labels
    else:
        left, right = a.label_text(), b.label_text()
    row = _first_difference(np.asarray(left, dtype=object), np.asarray(right, dtype=object))
    if row is not None:
        raise _disagree(a, b, f"row {row}: label {_show_value(left[row])} vs {_show_value(right[row])}")


def dataset_from_feature_files(model_cfgs) -> Dataset:
    """The samples of a config without a ``data:`` section, read from its ``features:`` files.

    Labels, label names and sample ids (the files' ``ids``, else ``indices``, else row
    numbers) come from the files, which must agree: the same number of rows, the same label
    on every row (compared by name where the files name them) and the same ids. A file
    without labels or ids takes the others'.

    Parameters
    ----------
    model_cfgs : sequence of evalkit.config.ModelConfig
        Every entry must read a ``features`` file.

    Returns
    -------
    Dataset
        Every row of the files (no subsampling); ``rows`` are the row numbers, ``indices``
        the integer sample ids (row numbers when the ids are strings); ``load_image`` None.
    """
    paths = [m.features for m in model_cfgs]
    extracting = next((m for m in model_cfgs if not m.features), None)
    if extracting is not None or not paths:
        what = f"model {extracting.name!r} extracts features" if extracting is not None else "no model reads features"
        raise EvalkitError(f"data: required ({what}); only a config whose models all read 'features' files may "
                           f"leave it out")
    files = [_FeatureFile(p) for p in dict.fromkeys(paths)]
    first = files[0]
    for other in files[1:]:
        if other.n != first.n:
            raise _disagree(first, other, f"{first.n} rows vs {other.n} rows")
    labelled = [f for f in files if f.labels is not None]
    if not labelled:
        raise EvalkitError(f"{first.path}: no 'labels' array; without a 'data:' section the labels come from the "
                           f"features files: add 'labels' (N,) to one of them (or give the config a 'data:' section)")
    for other in labelled[1:]:
        _same_labels(labelled[0], other)
    with_ids = [f for f in files if f.ids is not None]
    for other in with_ids[1:]:
        a, b = with_ids[0].ids, other.ids
        row = _first_difference(a.astype(str) if a.dtype != b.dtype else a, b.astype(str) if a.dtype != b.dtype else b)
        if row is not None:
            raise _disagree(with_ids[0], other, f"row {row}: id {_show_value(a[row])} vs {_show_value(b[row])}")
    if first.n == 0:
        raise EvalkitError(f"{first.path}: no samples (0 feature rows)")
    ref = next((f for f in labelled if f.named), labelled[0])  # the one that names the classes, if any
    codes, names = encode_labels(ref.labels, ref.names, source=ref.path)
    ids = with_ids[0].ids if with_ids else None
    rows = np.arange(first.n, dtype=np.int64)
    indices = ids.astype(np.int64) if ids is not None and np.issubdtype(ids.dtype, np.integer) else rows
    stats = [feature_file_stat(f.path) for f in files]
    shown = [Path(f.path).name for f in files]
    return Dataset(
        name=" + ".join(shown) if len(shown) <= 3 else f"{shown[0]} + {len(shown) - 1} more features files",
        labels=codes, label_names=tuple(names), indices=indices, load_image=None,
        fingerprint="feature-files|" + "|".join(f"{Path(f.path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
                                                for f, st in zip(files, stats)),
        n_total=first.n, rows=rows,
    )
