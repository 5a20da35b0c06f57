"""The public Python API: models, DataLoaders and arrays in memory in, a :class:`Result` out.

- :func:`extract_features`: one forward pass of an in-memory model over a DataLoader (or a
  Dataset), capturing any layers; returns the features per layer and the labels the data carry.
- :func:`evaluate`: embeds and scores feature sets that are already arrays; writes nothing.
- :func:`evaluate_models`: both, for several in-memory models (the end of a training script).

``evalkit report CONFIG`` builds the same objects from YAML and runs the same core
(:func:`evalkit.pipeline.evaluate_feature_sets`); ``result.save(DIR)`` writes the same run folder.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.results import FeatureSet, Result

__all__ = ["Features", "extract_features", "evaluate", "evaluate_models"]

logger = logging.getLogger("evalkit")
DEFAULT_METHODS = ("tsne", "umap", "pca")


@dataclass(frozen=True)
class Features(Mapping):
    """Features of one model: a read-only mapping of layer name -> array (n_samples, n_features).

    Attributes
    ----------
    layers : dict of str to ndarray of shape (n_samples, n_features), float32
    labels : ndarray of shape (n_samples,) or None
        The labels the data carried (``(x, y)`` batches, ``label`` keys), in row order.
    images_per_second : float
    thumbnails : ndarray of uint8 or None
        (n_samples, h, w[, 3]) small copies of the inputs for the report's hover (None for
        inputs that are not images, or above ``max_thumbnails``).
    """

    layers: Mapping[str, np.ndarray]
    labels: Optional[np.ndarray] = None
    images_per_second: float = 0.0
    thumbnails: Optional[np.ndarray] = None

    def __getitem__(self, layer: str) -> np.ndarray:
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(f"no layer {layer!r}; layers: {', '.join(self.layers)}") from None

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.shape}" for k, v in self.layers.items())
        labels = "with labels" if self.labels is not None else "no labels"
        return f"<evalkit.Features {shapes}; {labels}>"


def extract_features(model, data, layers: Sequence[str] | str = ("penultimate",), *, pooling="avg",
                     tokens: str = "cls", device: str = "auto", batch_size: int = 128, num_workers: int = 0,
                     bf16: bool = False, progress: bool = True, thumbnail_size: int = 24,
                     max_thumbnails: int = 20_000) -> Features:
    """Run an in-memory model over data once, capturing every requested layer.

    Parameters
    ----------
    model : torch.nn.Module
        Used as it is (no file, no factory). It runs in eval mode under ``inference_mode``; its
        training mode and device are restored afterwards.
    data : torch.utils.data.DataLoader or Dataset
        Batches (or items) that are tensors, ``(inputs, labels)`` tuples or lists, or dicts
        with the inputs under ``image``/``pixel_values``/``input`` and the labels under
        ``label``/``labels``/``target``. A Dataset is batched in order with ``batch_size``.
    layers : str or sequence of str
        ``"penultimate"`` (the classifier's input) or any name of ``model.named_modules()``.
    pooling : {"avg", "max", "flatten"}
        How (B, C, H, W) maps become one vector per sample.
    tokens : {"cls", "mean", "flatten"}
        How (B, T, D) token sequences become one vector per sample.
    device : {"auto", "cpu", "cuda", "mps"}
        ``auto``: CUDA, then MPS, then CPU.
    batch_size, num_workers : int
        For a Dataset (a DataLoader keeps its own).
    bf16 : bool
        bfloat16 autocast on CUDA.
    progress : bool
        A progress bar in a terminal or notebook for long runs.
    thumbnail_size, max_thumbnails : int
        Image inputs (B, 1|3, H, W) are also kept as thumbnails of at most this side, each
        scaled from its own range to 0..255, for the report's hover; none above
        ``max_thumbnails`` samples (0 turns them off).

    Returns
    -------
    Features
        ``features[layer]`` of shape (n_samples, n_features), float32, plus ``features.labels``
        and ``features.thumbnails``.
    """
    import torch

    from evalkit.config import PoolingConfig
    from evalkit.extract import resolve_device, resolve_layers, run_layers

    if not isinstance(model, torch.nn.Module):
        raise EvalkitError(f"model: got {type(model).__name__}; expected a torch.nn.Module")
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    if not layers:
        raise EvalkitError("layers: give at least one layer name (e.g. 'penultimate')")
    pool = _parse(PoolingConfig, {"spatial": pooling, "tokens": tokens}, "pooling")
    loader = _ThumbnailTap(_as_loader(data, batch_size=batch_size, num_workers=num_workers), thumbnail_size,
                           max_thumbnails)
    dev = resolve_device(device)
    layer_map = resolve_layers(model, layers)
    was_training = model.training
    first = next(model.parameters(), None)
    home = first.device if first is not None else None
    labels: list = []
    try:
        feats, rate = run_layers(model, loader, layer_map, device=dev, pooling=pool, bf16=bf16, progress=progress,
                                 log=logger.info, labels_out=labels)
    finally:
        model.train(was_training)
        if home is not None and home != dev:
            model.to(home)
    n = next(iter(feats.values())).shape[0]
    if n == 0:
        raise EvalkitError("data: yielded no samples; expected a non-empty DataLoader or Dataset")
    y = np.concatenate(labels) if labels else None
    if y is not None and y.shape[0] != n:
        raise EvalkitError(f"data: {y.shape[0]} labels for {n} samples; expected one label per sample")
    return Features({layer: feats[layer] for layer in layers}, y, float(rate), loader.thumbnails(n))


def evaluate(features, labels=None, *, label_names: Optional[Sequence[str]] = None,
             methods: Sequence[str] | str = DEFAULT_METHODS, seeds: Sequence[int] | int = (0,),
             n_neighbors: Optional[int] = None, metric_settings: Optional[Mapping[str, Any]] = None,
             method_settings: Optional[Mapping[str, Mapping]] = None,
             pca_dims: int = 50, checks: Optional[Sequence[Mapping]] = None, device: str = "auto",
             name: str = "evalkit-run", sample_ids=None, indices=None, thumbnails=None) -> Result:
    """Embed and score feature sets that are in memory; nothing is written.

    Parameters
    ----------
    features : mapping, Features, or array
        ``{name: array}`` (the layer is then ``features``), ``{(model, layer): array}``,
        ``{model: Features}`` (from :func:`extract_features`), one :class:`Features` (model
        ``model``), or one array. Arrays (or tensors) have shape (n_samples, n_features), rows
        in the same sample order everywhere.
    labels : array-like of shape (n_samples,), optional
        Class of each sample (ints or strings). Taken from the features when they carry them.
    label_names : sequence of str, optional
        ``label_names[k]`` names class ``k`` when ``labels`` are 0..n_classes-1.
    methods : str or sequence of str
        Registered embedding methods (``tsne``, ``umap``, ``pca``, ``pacmap``; see
        ``evalkit.METHODS``). Every registered score that applies is computed
        (``evalkit.METRICS``).
    seeds : int or sequence of int
        Several seeds give mean ± std scores and seed stability.
    n_neighbors : int, optional
        k of trustworthiness and continuity (and of kNN accuracy unless ``metrics`` sets
        ``knn_k``); by default 10, lowered with a note when the data are too few for it.
    metric_settings : mapping, optional
        More ``metrics:`` settings (``knn_k``, ``weighted_knn_k``, ``silhouette_max_samples``).
    method_settings : mapping, optional
        Per-method settings, e.g. ``{"tsne": {"perplexity": 20}, "umap": {"min_dist": 0.3}}``.
    pca_dims : int
        PCA to this many dimensions before t-SNE and UMAP when the features are wider.
    checks : sequence of mapping, optional
        As a config's ``checks:`` (``{"metric": "knn_accuracy", "where": {...}, "gte": 0.9}``).
    device : {"auto", "cpu", "cuda", "mps"}
        Where neighbour graphs and scores are computed.
    name : str
        The run's name (report title).
    sample_ids : array-like of shape (n_samples,), optional
        Identifiers shown for each sample.
    indices : array-like of shape (n_samples,), optional
        Positions of the samples in their dataset (default 0..n_samples-1).
    thumbnails : array-like of shape (n_samples, h, w[, 3]) or (n_samples, 1|3, h, w), optional
        Images shown when hovering a point in the saved report (uint8, or floats scaled from
        their own range); by default those :func:`extract_features` kept.

    Returns
    -------
    Result
        ``result.rows``, ``result.checks``, ``result.passed``, ``result.save(DIR)``; shows itself
        in Jupyter.
    """
    from evalkit.config import CheckConfig, EmbedConfig, MetricsConfig
    from evalkit.extract import resolve_device
    from evalkit.pipeline import evaluate_feature_sets, fit_sizes

    methods = [methods] if isinstance(methods, str) else list(methods)
    seeds = [seeds] if isinstance(seeds, (int, np.integer)) else list(seeds)
    for arg, value in (("metric_settings", metric_settings), ("method_settings", method_settings)):
        if value is not None and not isinstance(value, Mapping):
            raise EvalkitError(f"{arg}: got {type(value).__name__}; expected a mapping of settings such as "
                               + ("{'knn_k': 20}" if arg == "metric_settings" else "{'tsne': {'perplexity': 20}}")
                               + " (every registered score is computed; evalkit.METRICS lists them)")
    sets, carried, carried_thumbnails = _feature_sets(features)
    n = sets[0].features.shape[0]
    thumbs = _thumbnails(thumbnails, n) if thumbnails is not None else carried_thumbnails
    samples = _samples(labels if labels is not None else carried, label_names, n, sample_ids, indices)
    embed = _parse(EmbedConfig, {"methods": methods, "seeds": seeds, "pca_dims": pca_dims,
                                 **dict(method_settings or {})}, "embed")
    given = {"n_neighbors": n_neighbors} if n_neighbors is not None else {}
    settings = _parse(MetricsConfig, {**given, **dict(metric_settings or {})}, "metrics")
    check_list = [_parse(CheckConfig, dict(c), f"checks[{i}]") for i, c in enumerate(checks or ())]
    embed, settings, notes = fit_sizes(embed, settings, n)
    yaml_text = _settings_yaml(name, sets, embed, settings, check_list)
    _validate_checks(yaml_text)
    return evaluate_feature_sets(sets, samples, embed=embed, metrics=settings, checks=check_list,
                                 device=resolve_device(device), config_yaml=yaml_text, name=name, notes=notes,
                                 provenance={"command": "evalkit.evaluate() in Python"}, thumbnails=thumbs)


def evaluate_models(models: Mapping[str, Any], data, *, layers: Sequence[str] | str = ("penultimate",),
                    labels=None, label_names=None, pooling="avg", tokens: str = "cls", device: str = "auto",
                    batch_size: int = 128, bf16: bool = False, **evaluate_kwargs) -> Result:
    """Extract several in-memory models over the same data and evaluate them together.

    Parameters
    ----------
    models : mapping of str to torch.nn.Module
        Name -> model; every model sees the same ``data`` in the same order.
    data : DataLoader or Dataset
        As for :func:`extract_features` (keep ``shuffle=False`` so rows line up across models).
    layers : str or sequence of str
        The layers of every model.
    labels, label_names
        As for :func:`evaluate`; by default the labels the data carry.
    pooling, tokens, device, batch_size, bf16
        As for :func:`extract_features`.
    **evaluate_kwargs
        Passed to :func:`evaluate` (``methods``, ``seeds``, ``checks``, ``name``, ...).

    Returns
    -------
    Result
    """
    if not isinstance(models, Mapping) or not models:
        raise EvalkitError(f"models: got {type(models).__name__}; expected a mapping of name -> torch.nn.Module, "
                           f"e.g. {{'cnn': model}}")
    extracted = {}
    for model_name, model in models.items():
        logger.info(f"  {model_name}: extracting {', '.join([layers] if isinstance(layers, str) else layers)}")
        extracted[str(model_name)] = extract_features(model, data, layers, pooling=pooling, tokens=tokens,
                                                      device=device, batch_size=batch_size, bf16=bf16)
    return evaluate(extracted, labels, label_names=label_names, device=device, **evaluate_kwargs)


# --- adapting what users have ------------------------------------------------------------------


def _as_loader(data, *, batch_size: int, num_workers: int):
    import torch

    if isinstance(data, torch.utils.data.DataLoader):
        sampler = getattr(data, "sampler", None)
        if isinstance(sampler, torch.utils.data.RandomSampler):
            logger.warning("evalkit: the DataLoader shuffles (shuffle=True); features and the labels it carries "
                           "still line up, but another model's pass will see another order: use shuffle=False")
        return data
    if isinstance(data, (list, tuple)) and data and _is_batch(data[0]):
        return data  # a list of batches, as a DataLoader would yield them
    if isinstance(data, torch.utils.data.Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if hasattr(data, "__iter__"):
        return data  # any iterable of batches
    raise EvalkitError(f"data: got {type(data).__name__}; expected a torch DataLoader or Dataset")


class _ThumbnailTap:
    """Passes a loader's batches through, keeping a small copy of image inputs for the report."""

    def __init__(self, loader, size: int, cap: int):
        self.loader, self.size, self.cap = loader, int(size), int(cap)
        self.kept: list = []
        self.count = 0
        self.off = self.cap <= 0

    @property
    def dataset(self):  # the progress bar's total
        return self.loader.dataset

    def __len__(self):
        return len(self.loader)

    @property
    def batch_size(self):
        return getattr(self.loader, "batch_size", None)

    def __iter__(self):
        for batch in self.loader:
            if not self.off:
                self._keep(batch)
            yield batch

    def _keep(self, batch) -> None:
        import torch

        from evalkit.extract import split_batch

        try:
            x = split_batch(batch)[0]
        except EvalkitError:
            self.off = True  # run_layers names the problem
            return
        self.count += x.shape[0]
        if x.ndim != 4 or x.shape[1] not in (1, 3) or self.count > self.cap:
            self.off, self.kept = True, []
            return
        with torch.no_grad():
            x = x.detach().float().cpu()
            h, w = x.shape[2:]
            scale = min(1.0, self.size / max(h, w))
            if scale < 1.0:
                x = torch.nn.functional.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                                    mode="area")
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            span = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)
            u8 = ((x - lo) / span * 255).round().to(torch.uint8).numpy()
        self.kept.append(u8[:, 0] if u8.shape[1] == 1 else np.moveaxis(u8, 1, -1))

    def thumbnails(self, n: int) -> Optional[np.ndarray]:
        if self.off or not self.kept:
            return None
        out = np.concatenate(self.kept)
        return out if out.shape[0] == n else None


def _thumbnails(images, n: int) -> Optional[np.ndarray]:
    from evalkit.explorer import make_thumbnails

    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.shape[0] != n:
        raise EvalkitError(f"thumbnails: {images.shape[0]} images for {n} samples; expected one per sample")
    return make_thumbnails(lambda i: images[i], n, max_samples=max(n, 1))


def _is_batch(item) -> bool:
    """Is ``item`` a batch (inputs of 4 or more dimensions) rather than one sample?"""
    import torch

    if isinstance(item, dict):
        from evalkit.extract import INPUT_KEYS

        item = next((item[k] for k in INPUT_KEYS if k in item), None)
    elif isinstance(item, (tuple, list)) and item:
        item = item[0]
    return isinstance(item, torch.Tensor) and item.ndim >= 4


def _to_numpy(array, what: str) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, on any device
        array = array.detach().float().cpu().numpy()
    try:
        X = np.asarray(array)
    except Exception as exc:
        raise EvalkitError(f"{what}: cannot be read as an array ({exc})") from None
    if X.ndim != 2:
        raise EvalkitError(f"{what}: shape {X.shape}; expected (n_samples, n_features)")
    if X.dtype.kind not in "fiub":
        raise EvalkitError(f"{what}: dtype {X.dtype}; expected numbers")
    return np.ascontiguousarray(X, dtype=np.float32)


def _feature_sets(features):
    """``(list of FeatureSet, labels carried by Features or None, thumbnails carried or None)``."""
    if isinstance(features, Features):
        features = {"model": features}
    elif not isinstance(features, Mapping):
        features = {("features", "features"): features}
    if not features:
        raise EvalkitError("features: empty; expected at least one array of shape (n_samples, n_features)")
    sets, carried, thumbs = [], None, None
    for key, value in features.items():
        if isinstance(value, Features):
            thumbs = thumbs if thumbs is not None else value.thumbnails
            if isinstance(key, tuple):
                raise EvalkitError(f"features[{key!r}]: a Features object is keyed by its model name alone")
            for layer, array in value.items():
                sets.append(FeatureSet(_name(key, "model"), _name(layer, "layer"),
                                       _to_numpy(array, f"features[{key!r}][{layer!r}]")))
            if value.labels is not None:
                if carried is not None and not np.array_equal(carried, value.labels):
                    raise EvalkitError(f"features[{key!r}]: its labels differ from the other models'; expected every "
                                       f"model to see the same data in the same order (shuffle=False)")
                carried = value.labels
            continue
        if isinstance(key, tuple):
            if len(key) != 2:
                raise EvalkitError(f"features: key {key!r}; expected a name or a (model, layer) pair")
            model, layer = key
        else:
            model, layer = key, "features"
        sets.append(FeatureSet(_name(model, "model"), _name(layer, "layer"), _to_numpy(value, f"features[{key!r}]")))
    n = {fs.features.shape[0] for fs in sets}
    if len(n) > 1:
        shapes = ", ".join(f"{fs.key}: {fs.features.shape[0]}" for fs in sets)
        raise EvalkitError(f"features: different numbers of samples ({shapes}); expected the same samples in every "
                           f"feature set")
    keys = [fs.key for fs in sets]
    if len(set(keys)) != len(keys):
        raise EvalkitError(f"features: the names {keys} repeat; expected unique model/layer names")
    return sets, carried, thumbs


def _name(value, what: str) -> str:
    text = str(value)
    if not text or "/" in text or any(ord(c) < 32 for c in text):
        raise EvalkitError(f"features: {what} name {text!r}; expected a non-empty name without '/' or control "
                           f"characters")
    return text


def _samples(labels, label_names, n: int, sample_ids, indices):
    from evalkit.pipeline import Samples

    if labels is None:
        raise EvalkitError("labels: missing; pass labels=... (one class per sample), or use data that yields "
                           "(inputs, labels)")
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels).reshape(-1) if np.ndim(labels) <= 1 else None
    if y is None or y.shape[0] != n:
        shape = np.shape(labels)
        raise EvalkitError(f"labels: shape {shape}; expected ({n},), one class per sample")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            bad = np.flatnonzero(~np.isfinite(y))[:5].tolist()
            raise EvalkitError(f"labels: NaN or infinite at rows {bad}; expected a class for every sample")
        if not np.all(y == np.round(y)):
            raise EvalkitError("labels: fractional values; expected class labels (ints or strings)")
        y = y.astype(np.int64)
    classes, codes = np.unique(y, return_inverse=True)
    if label_names is not None:
        names = [str(s) for s in label_names]
        if y.dtype.kind not in "iu" or classes.min() < 0 or classes.max() >= len(names):
            raise EvalkitError(f"label_names: {len(names)} names for labels {classes[:5].tolist()}...; expected "
                               f"labels 0..{len(names) - 1} that index label_names")
        names_used = [names[int(c)] for c in classes]
    else:
        names_used = [str(c) for c in classes]
    ids = None
    if sample_ids is not None:
        ids = np.asarray([str(s) for s in sample_ids])
        if ids.shape[0] != n:
            raise EvalkitError(f"sample_ids: {ids.shape[0]} ids for {n} samples; expected one per sample")
    idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.shape[0] != n:
        raise EvalkitError(f"indices: {idx.shape[0]} for {n} samples; expected one per sample")
    return Samples(codes.astype(np.int64).reshape(-1), tuple(names_used), idx, name="in-memory data",
                   sample_ids=ids)


def _parse(model, raw: dict, where: str):
    """Validate ``raw`` with a config model; errors name the argument like a config key."""
    from pydantic import ValidationError

    from evalkit.config import format_validation_error

    try:
        return model.model_validate(raw)
    except ValidationError as err:
        line = format_validation_error(err, "evaluate()", model=model)
        raise EvalkitError(line.replace("evaluate(): ", f"evaluate(): {where}.", 1)) from None


def _settings_yaml(name: str, sets, embed, metrics, checks) -> str:
    """config.yaml of an in-memory run: the settings, and models as ``memory:`` entries that
    record what ran (``evalkit check`` reads it; ``evalkit report`` cannot re-run it)."""
    import yaml

    models: dict = {}
    for fs in sets:
        models.setdefault(fs.model, []).append(fs.layer)
    doc = {
        "name": name,
        "models": [{"name": m, "source": "memory:python-api", "layers": layers} for m, layers in models.items()],
        "embed": embed.model_dump(mode="json"),
        "metrics": metrics.model_dump(mode="json"),
        "checks": [c.model_dump(mode="json", exclude_none=True) for c in checks],
    }
    header = ("# Written by evalkit.evaluate() from features in memory: the settings of the run; "
              "`evalkit check` reads it,\n# `evalkit report` cannot re-run it (its models lived in a "
              "Python process).\n")
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


def _validate_checks(yaml_text: str) -> None:
    """The checks must select rows of this run: the config's own validation says so."""
    import yaml

    from evalkit.config import parse_config

    parse_config(yaml.safe_load(yaml_text), source="evaluate()")
