"""Feature extraction: one forward pass per batch captures every requested layer.

Layers are any ``named_modules`` name, captured with forward hooks (no tracing, so models
whose forward has control flow work). ``penultimate`` names the input of the final
classifier. Outputs are pooled to one vector per sample and cached by content: the model
(source, kwargs, checkpoint bytes; a ``python:`` model's code and initial weights), layers,
pooling, preprocessing, the dataset and the selected samples, and the evalkit version.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from evalkit.cache import cache_key, cache_read, cache_write  # noqa: F401  (re-exported)
from evalkit.errors import EvalkitError, unknown
from evalkit.interrupt import check_interrupted
from evalkit.preprocess import build_transform, depth_rule, resolve_preprocess  # noqa: F401  (re-exported)
from evalkit.progress import progress_bar
from evalkit.results import FeatureSet

PENULTIMATE = "penultimate"
PROGRESS_MIN_IMAGES = 2000  # below this a progress bar is noise
_NOTES_KEY = "__notes__"  # a cache file's notes about its model (never a layer name: those come from a module)


# --- device ---------------------------------------------------------------------------------


def resolve_device(name: str = "auto"):
    """``auto``: CUDA, then Apple MPS, then CPU; else the named device, which must exist.

    :func:`evalkit.device.resolve_device` with the config key ``extract.device`` in its messages.
    """
    from evalkit.device import resolve_device as _resolve

    try:
        return _resolve(name)
    except EvalkitError as exc:
        raise EvalkitError(f"extract.device: {exc}") from exc


# --- layers ---------------------------------------------------------------------------------


HEAD_NAMES = ("classifier", "fc", "head", "heads", "last_linear")  # where models keep their classifier


def classifier_name(model, example=None) -> Optional[str]:
    """Name of the final classifier module.

    timm's ``get_classifier()``; else, given ``example`` (an input batch), the Linear whose
    output is the model's output, or the last Linear the forward pass runs; else (no example,
    or its forward fails) the last Linear inside a top-level ``classifier``, ``fc``, ``head``,
    ``heads`` or ``last_linear``; else the last Linear the model registers.
    """
    import torch

    names = {id(m): n for n, m in model.named_modules()}
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:
            head = None
        if isinstance(head, torch.nn.Module) and names.get(id(head)):
            return names[id(head)]
    if example is not None and (found := _last_linear_run(model, example)):
        return found

    def last_linear(module, prefix=""):
        found = None
        for n, m in module.named_modules(prefix=prefix):
            if isinstance(m, torch.nn.Linear):
                found = n
        return found

    for attr in HEAD_NAMES:
        sub = getattr(model, attr, None)
        if isinstance(sub, torch.nn.Module) and (found := last_linear(sub, attr)):
            return found
    return last_linear(model)


def _output_tensors(out) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for t in out if isinstance(t, torch.Tensor)] if isinstance(out, (tuple, list)) else []


def _last_linear_run(model, example) -> Optional[str]:
    """The Linear whose output the model returns, else the last Linear run; None if the forward fails."""
    import torch

    calls: list = []
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: calls.append((n, out)))
               for n, m in model.named_modules() if n and isinstance(m, torch.nn.Linear)]
    if not handles:
        return None
    training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            outputs = _output_tensors(model(example))
    except Exception:  # the real pass reports it; here it only means "decide without running"
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    for name, out in reversed(calls):
        if any(out is t for t in outputs):
            return name
    return calls[-1][0] if calls else None


def resolve_layers(model, layers, *, source: Optional[str] = None, example=None) -> dict:
    """Map each requested layer to ``(module_name, "output" | "input")``.

    ``penultimate`` is the input of :func:`classifier_name`; any other name must be one of
    ``model.named_modules()``, else the error lists the closest names. ``source`` only makes
    the error messages name the model; ``example`` (an input batch) lets ``penultimate`` find
    the classifier by running the model (:func:`classifier_name`).
    """
    names = [n for n, _ in model.named_modules() if n]
    listing = f"`evalkit layers {source or 'SOURCE'}`"
    out = {}
    for layer in layers:
        if layer == PENULTIMATE:
            head = classifier_name(model, example)
            if head is None:
                raise EvalkitError(f"layer 'penultimate': this model has no final Linear classifier; name a layer "
                                   f"({listing} lists them)")
            out[layer] = (head, "input")
        elif layer in names:
            out[layer] = (layer, "output")
        else:
            err = unknown("layer", layer, names + [PENULTIMATE])
            raise EvalkitError(f"{err}; {listing} lists every name")
    return out


# --- pooling --------------------------------------------------------------------------------


def num_prefix_tokens(model) -> int:
    """Class/register tokens before the patch tokens (timm's ``num_prefix_tokens``)."""
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    return 1 if getattr(model, "cls_token", None) is not None or getattr(model, "class_token", None) is not None else 0


def pool(t, *, spatial: str = "avg", tokens: str = "cls", prefix_tokens: int = 0, channels_last: bool = False):
    """Reduce one layer's batch output to ``(batch, n_features)`` float32.

    4-D ``(B, C, H, W)`` maps (``(B, H, W, C)`` with ``channels_last``, as in timm's Swin):
    global ``avg``/``max`` pooling or ``flatten``.
    3-D ``(B, T, D)`` token sequences: the class token (``cls``, when the model has one; else
    the mean of all tokens), the ``mean`` of the patch tokens, or ``flatten``.
    A tuple/list/dict output is reduced to its first tensor.
    """
    import torch

    if isinstance(t, dict):
        t = next((x for x in t.values() if isinstance(x, torch.Tensor)), None)
    elif isinstance(t, (tuple, list)):
        t = next((x for x in t if isinstance(x, torch.Tensor)), None)
    if not isinstance(t, torch.Tensor):
        raise EvalkitError("layer output holds no tensor; choose another layer")
    t = t.float()
    if t.ndim == 1:
        return t[:, None]
    if t.ndim == 2:
        return t
    if t.ndim == 4:
        if channels_last:
            t = t.permute(0, 3, 1, 2)
        if spatial == "avg":
            return t.mean(dim=(2, 3))
        if spatial == "max":
            return t.amax(dim=(2, 3))
        return t.flatten(1)
    if t.ndim == 3:
        if tokens == "cls" and prefix_tokens > 0:
            return t[:, 0]
        if tokens in ("cls", "mean"):
            return t[:, prefix_tokens:].mean(dim=1) if t.shape[1] > prefix_tokens else t.mean(dim=1)
        return t.flatten(1)
    return t.flatten(1)


# --- the forward pass -----------------------------------------------------------------------


class _AllCaptured(Exception):
    """Raised by the last hook to end a forward pass once every requested layer is captured."""


class _Images:
    """A torch-style dataset over ``Dataset.load_image`` with a transform."""

    def __init__(self, dataset, transform, start: int = 0, stop: Optional[int] = None):
        self.load, self.transform = dataset.load_image, transform
        self.start = start
        self.n = (len(dataset) if stop is None else stop) - start

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform(self.load(self.start + i))


def _collate(items):
    import torch

    shapes = sorted({tuple(x.shape) for x in items})
    if len({s[0] for s in shapes}) > 1:  # grey and colour images mixed, whatever their sizes
        raise EvalkitError(f"images with {' and '.join(str(s[0]) for s in sorted({s[:1] for s in shapes}))} channels "
                           f"(grey and colour) in one batch; set 'preprocess: {{channels: 3}}' (or 1) on this model")
    if len(shapes) > 1:
        raise EvalkitError(f"images of different sizes in one batch ({shapes[0]} and {shapes[-1]}); set "
                           f"'preprocess: {{resize: N, crop: N}}' on this model")
    return torch.stack(items)


def _one_line(exc: BaseException) -> str:
    """A DataLoader worker re-raises with the worker's traceback in the message: keep the cause."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return exc.__class__.__name__
    last = lines[-1]
    for prefix in ("evalkit.errors.EvalkitError: ", "EvalkitError: "):
        last = last.removeprefix(prefix)
    return last if len(lines) > 1 else lines[0]


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "MPS backend out of memory" in str(exc))


def run_layers(model, loader, layer_map: dict, *, device, pooling, bf16: bool = False, progress: bool = False,
               stop_early: bool = True, log=None, labels_out: Optional[list] = None, channels_last: bool = False,
               compile: bool = False):
    """Run ``model`` over ``loader`` once, capturing every layer of ``layer_map`` with hooks.

    Parameters
    ----------
    model : torch.nn.Module
    loader : iterable of batches
        Float tensors (B, C, H, W), ``(inputs, labels, ...)`` tuples or lists, or dicts with
        the inputs under ``image``/``pixel_values``/``input``/``inputs``/``x`` and the labels
        under ``label``/``labels``/``target``/``targets``/``y`` (see :func:`split_batch`).
    layer_map : dict
        From :func:`resolve_layers`.
    device : torch.device
    pooling : evalkit.config.PoolingConfig
    bf16 : bool
        bfloat16 autocast (CUDA only).
    progress : bool
        A progress bar with images/s on stderr (only when it is a terminal and the run is long).
    stop_early : bool
        End each forward pass once every layer is captured (skips the rest of the network).
        A module that runs several times per forward pass yields its first call's output.
    log : callable, optional
        Receives one-line notes (out-of-memory retries).
    labels_out : list, optional
        Receives each batch's labels (a 1-D array per batch) when the batches carry them.
    channels_last : bool
        On CUDA, the model and 4-D batches in ``torch.channels_last`` memory format (faster
        convolutions on tensor cores; the features are the same up to rounding).
    compile : bool
        ``torch.compile`` the model first; if compiling or the first compiled batch fails, the
        run continues uncompiled with a note.

    Returns
    -------
    features : dict of str to ndarray of shape (n_samples, n_features), float32
    images_per_second : float
    """
    import torch

    modules = dict(model.named_modules())
    captured: dict = {}
    prefix = num_prefix_tokens(model)
    n_layers = len(layer_map)

    # timm models with output_fmt NHWC (Swin) keep maps channels-last, except in their convolutions
    nhwc_model = getattr(model, "output_fmt", None) == "NHWC"

    def keep(layer, value, channels_last):
        if layer not in captured:  # first call wins: the same answer with or without stop_early
            captured[layer] = pool(value, spatial=pooling.spatial, tokens=pooling.tokens, prefix_tokens=prefix,
                                   channels_last=channels_last)
        if stop_early and len(captured) == n_layers:
            raise _AllCaptured

    handles = []
    for layer, (name, kind) in layer_map.items():
        module = modules[name]
        if kind == "input":
            hook = module.register_forward_pre_hook(lambda _m, inp, layer=layer: keep(layer, inp[0], False))
        else:
            nhwc = nhwc_model and not isinstance(module, torch.nn.modules.conv._ConvNd)
            hook = module.register_forward_hook(lambda _m, _i, out, layer=layer, nhwc=nhwc: keep(layer, out, nhwc))
        handles.append(hook)

    runner = [model]

    def forward(x):
        captured.clear()
        try:
            runner[0](x)
        except _AllCaptured:
            pass
        except Exception as exc:
            if runner[0] is model or _is_oom(exc):
                raise
            runner[0] = model  # torch.compile could not run this model: the eager model gives the same features
            if log:
                log(f"  torch.compile failed ({exc.__class__.__name__}: {_one_line(exc)[:200]}); running uncompiled")
            return forward(x)
        missing = [layer for layer in layer_map if layer not in captured]
        if missing:
            raise EvalkitError(f"layer {missing[0]!r} was not run by the model's forward; choose another layer")
        return {layer: captured[layer].float().cpu().numpy() for layer in layer_map}

    chunks = {layer: [] for layer in layer_map}
    model.eval().to(device)
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if channels_last and cuda else None
    if memory_format is not None:
        model.to(memory_format=memory_format)
    if compile:
        try:
            runner[0] = torch.compile(model)
        except Exception as exc:  # no compiler backend on this machine, an unsupported Python, ...
            if log:
                log(f"  torch.compile unavailable ({exc.__class__.__name__}: {_one_line(exc)[:200]}); running "
                    f"uncompiled")
    use_bf16 = bf16 and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    step = getattr(loader, "batch_size", None) or 1 << 30
    done, start = 0, time.perf_counter()
    total = len(loader.dataset) if progress and hasattr(loader, "dataset") else 0
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(progress_bar(total, "extracting", unit="img", min_total=PROGRESS_MIN_IMAGES))
        stack.callback(lambda: [h.remove() for h in handles])
        with torch.inference_mode(), autocast:
            batches = iter(loader)
            while True:
                check_interrupted()  # per batch: a Ctrl-C the command line recorded ends the run here
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except EvalkitError as exc:  # raised in a DataLoader worker: multi-line
                    raise EvalkitError(_one_line(exc)) from None
                batch, batch_labels = split_batch(batch)
                if labels_out is not None and batch_labels is not None:
                    labels_out.append(batch_labels)
                if memory_format is not None and batch.ndim == 4:
                    batch = batch.to(device, non_blocking=True, memory_format=memory_format)
                else:
                    batch = batch.to(device, non_blocking=True)
                pos = 0
                while pos < batch.shape[0]:
                    part = batch[pos:pos + step]
                    try:
                        out = forward(part)
                    except Exception as exc:  # anything but running out of memory propagates as is
                        if not _is_oom(exc):
                            raise
                        out = None
                    if out is None:  # out of memory: retry this part at half the size
                        captured.clear()
                        if part.shape[0] == 1:
                            raise EvalkitError(f"{device.type} out of memory with a batch of 1; use a smaller "
                                               f"model or input size, or extract.device: cpu")
                        step = max(1, part.shape[0] // 2)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        if log:
                            log(f"  {device.type} out of memory: retrying with batch size {step}")
                        continue
                    for layer, arr in out.items():
                        chunks[layer].append(arr)
                    pos += part.shape[0]
                done += batch.shape[0]
                bar.update(batch.shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = done / max(time.perf_counter() - start, 1e-9)
    feats = {layer: np.concatenate(c).astype(np.float32, copy=False) if c else np.zeros((0, 0), np.float32)
             for layer, c in chunks.items()}
    return feats, rate


INPUT_KEYS = ("image", "images", "pixel_values", "input", "inputs", "x", "img")
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class", "class_idx")


def split_batch(batch):
    """``(inputs, labels or None)`` of one batch.

    A tensor is the inputs; a tuple or list is ``(inputs, labels, ...)`` (anything after the
    labels is ignored); a dict holds the inputs under one of :data:`INPUT_KEYS` and the labels
    under one of :data:`LABEL_KEYS`. Labels become a 1-D numpy array (numbers or strings).
    """
    import torch

    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)):
        if not batch or not isinstance(batch[0], torch.Tensor):
            raise EvalkitError(f"data: a batch is a {type(batch).__name__} whose first item is "
                               f"{type(batch[0]).__name__ if batch else 'missing'}; expected (inputs, labels) with "
                               f"inputs a tensor of shape (batch, channels, height, width)")
        return batch[0], (_labels_array(batch[1]) if len(batch) > 1 else None)
    if isinstance(batch, dict):
        x = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        if not isinstance(x, torch.Tensor):
            raise EvalkitError(f"data: a batch is a dict with keys {sorted(map(str, batch))}; expected the inputs "
                               f"under one of {', '.join(INPUT_KEYS)} (a tensor)")
        y = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return x, (_labels_array(y) if y is not None else None)
    raise EvalkitError(f"data: a batch is a {type(batch).__name__}; expected a tensor, an (inputs, labels) "
                       f"tuple or a dict with an 'image' or 'pixel_values' key")


def _labels_array(y) -> np.ndarray:
    import torch

    if isinstance(y, torch.Tensor):
        y = y.detach().cpu()
        if y.ndim == 2 and y.shape[1] > 1:  # one-hot or scores: the class is the largest entry
            y = y.argmax(dim=1)
        return y.reshape(-1).numpy()
    return np.asarray(list(y) if not isinstance(y, np.ndarray) else y).reshape(-1)


# --- one model entry ------------------------------------------------------------------------


def _precomputed(mcfg, dataset) -> list:
    """A ``features: FILE`` model entry: one row per sample of the full split, in its order.

    When the dataset came from the features files themselves, ``dataset.rows`` are the rows.
    """
    from evalkit.data import encode_labels, read_feature_file

    feats, labels, _ = read_feature_file(mcfg.features)
    rows = dataset.rows if dataset.rows is not None else dataset.indices
    n_total = dataset.n_total or (int(rows.max()) + 1 if len(dataset) else 0)
    if feats.shape[0] != n_total:
        raise EvalkitError(f"{mcfg.features}: {feats.shape[0]} feature rows for a dataset of {n_total} samples; "
                           f"expected one row per sample, in the dataset's order")
    if labels is not None:
        codes = encode_labels(labels)[0][rows]
        pairs = {(int(a), int(b)) for a, b in zip(codes, dataset.labels)}
        if len(pairs) != len({a for a, _ in pairs}) or len(pairs) != len({b for _, b in pairs}):
            raise EvalkitError(f"{mcfg.features}: its 'labels' disagree with the dataset's; rows must follow the "
                               f"dataset's sample order")
    layer = mcfg.layer_names[0]
    return [FeatureSet(mcfg.name, layer, np.ascontiguousarray(feats[rows]))]


def extract_model(mcfg, dataset, ecfg, *, use_cache: bool = True, log=None, notes: Optional[list] = None,
                  stats: Optional[dict] = None) -> list:
    """Features of every requested layer of one model entry.

    Parameters
    ----------
    mcfg : evalkit.config.ModelConfig
    dataset : evalkit.data.Dataset
    ecfg : evalkit.config.ExtractConfig
    use_cache : bool
        ``False`` (``--no-cache``) recomputes even when cached, then refreshes the cache.
    log : callable, optional
        Receives one-line progress notes, and the notes below.
    notes : list, optional
        Receives one-line notes for the run's report (a classifier width taken from the
        checkpoint); they come back with cached features too.
    stats : dict, optional
        Receives ``images`` computed (not from the cache) and ``seconds`` spent on them.

    Returns
    -------
    list of FeatureSet
        One per layer, in the entry's order; features of shape (n_samples, n_features).
    """
    if mcfg.features:
        return _precomputed(mcfg, dataset)
    job = ModelExtraction(mcfg, dataset, ecfg, use_cache=use_cache, log=log, notes=notes)
    out = job.features()
    if stats is not None:
        stats.update(job.stats())
    return out


class ModelExtraction:
    """One model entry's features, computed in slices that the feature cache keeps.

    A slice is rows ``start..stop`` of the selected samples, cached as
    ``NAME-KEY.START-STOP.npz`` beside the whole set's ``NAME-KEY.npz`` (same content key).
    Any range is served from whatever cached slices cover it, and only the gaps are computed,
    in slices of at most ``extract.slice_size`` images, each written as soon as it is done:
    so a run that was killed (one rank of a torchrun job, or a single process) resumes where
    it stopped, and under torchrun each rank hands its slice to rank 0 through the cache.
    """

    def __init__(self, mcfg, dataset, ecfg, *, use_cache: bool = True, log=None, notes: Optional[list] = None):
        if dataset.load_image is None:
            raise EvalkitError(f"model {mcfg.name!r}: data.kind 'features' has no images; give this model "
                               f"'features: FILE'")
        from evalkit.models import create_model, file_digest, read_checkpoint

        self.mcfg, self.dataset, self.ecfg, self.use_cache, self.log = mcfg, dataset, ecfg, use_cache, log
        self.notes, self.found = notes, []  # found: notes about this model, kept with its cached features
        self.n = len(dataset)
        self.model = create_model(mcfg.source, kwargs=mcfg.kwargs)
        self.spec = resolve_preprocess(self.model, mcfg.preprocess, source=mcfg.source)
        example = None
        if PENULTIMATE in mcfg.layers and self.n:  # one real image finds the classifier by running it
            example = build_transform(self.spec)(dataset.load_image(0))[None]
        self.layer_map = resolve_layers(self.model, mcfg.layers, source=mcfg.source, example=example)
        digest = "random-init"
        if mcfg.checkpoint and ecfg.cache:
            if not Path(mcfg.checkpoint).is_file():
                read_checkpoint(mcfg.checkpoint)  # the one-line "not found" error
            digest = file_digest(mcfg.checkpoint, cache_dir=ecfg.cache_dir)
            # a checkpoint loaded once under these settings loads the same again: a hit skips loading it
            digest += f"|strict={mcfg.strict}|unsafe_pickle={mcfg.unsafe_pickle}"
        if ecfg.cache and mcfg.source.startswith("python:"):  # the user's code and weights as created
            from evalkit.cache import python_model_digest

            digest += f"|code+init={python_model_digest(mcfg.source, self.model)}"
        self.key = cache_key(mcfg, dataset, self.spec, digest, bf16=ecfg.bf16)
        self.cache_dir = Path(ecfg.cache_dir)
        self.full_path = self.cache_dir / f"{mcfg.name}-{self.key}.npz"
        self.images, self.seconds = 0, 0.0  # computed here, not read from the cache
        self._ready = False
        self._full: Optional[dict] = None
        self._logged_files: set = set()

    # --- notes and numbers ---

    def note(self, text: str) -> None:
        if text in self.found:
            return
        self.found.append(text)
        if self.notes is not None and text not in self.notes:
            self.notes.append(text)
        if self.log:
            self.log(f"  note: {text}")

    def stats(self) -> dict:
        """``{"images": computed here, "seconds": spent on them}``."""
        return {"images": self.images, "seconds": round(self.seconds, 4)}

    # --- the cache ---

    def slice_path(self, start: int, stop: int) -> Path:
        if (start, stop) == (0, self.n):
            return self.full_path
        return self.cache_dir / f"{self.mcfg.name}-{self.key}.{start}-{stop}.npz"

    def cached_files(self, *, full: bool = True) -> list:
        """``[(start, stop, path, mtime_ns)]`` of this key's cache files (not yet verified)."""
        out = []
        prefix = f"{self.mcfg.name}-{self.key}."
        try:
            names = os.listdir(self.cache_dir)
        except OSError:
            return out
        for name in names:
            if not (name.startswith(prefix) and name.endswith(".npz")):
                continue
            middle = name[len(prefix):-len(".npz")]
            if middle == "":
                if not full:
                    continue
                start, stop = 0, self.n
            else:
                a, sep, b = middle.partition("-")
                if not (sep and a.isdigit() and b.isdigit()):
                    continue
                start, stop = int(a), int(b)
                if not 0 <= start < stop <= self.n:
                    continue
            try:
                mtime = (self.cache_dir / name).stat().st_mtime_ns
            except OSError:
                continue
            out.append((start, stop, self.cache_dir / name, mtime))
        return out

    def _read(self, path: Path, start: int, stop: int) -> Optional[dict]:
        hit = cache_read(path)
        if hit is None:
            return None
        cached_notes = hit.pop(_NOTES_KEY, None)
        if set(hit) != set(self.mcfg.layers) or any(a.shape[0] != stop - start for a in hit.values()):
            return None
        for text in [] if cached_notes is None else cached_notes.reshape(-1).tolist():
            self.note(str(text))
        return hit

    def _write(self, path: Path, feats: dict) -> None:
        try:
            cache_write(path, {**feats, _NOTES_KEY: np.array(self.found, dtype=str)} if self.found else feats)
        except OSError as exc:  # a full disk or read-only cache folder costs a recompute, nothing more
            if self.log:
                self.log(f"  {self.mcfg.name}: cannot write the feature cache {path} ({exc})")

    def cached_full(self) -> Optional[dict]:
        """The whole set from the cache (its notes re-emitted), else None."""
        if self._full is not None or not (self.use_cache and self.ecfg.cache):
            return self._full
        hit = self._read(self.full_path, 0, self.n)
        if hit is not None and self.log:
            self.log(f"  {self.mcfg.name}: features from cache ({self.full_path.name})")
        self._full = hit
        return hit

    # --- slices ---

    def pieces(self, start: int = 0, stop: Optional[int] = None, *, compute: bool = True, reuse: Optional[bool] = None):
        """Yield ``(start, stop, {layer: features})`` covering ``start..stop`` in order.

        Cached slices (the newest first where several cover a row) are read back; the gaps are
        computed in slices of at most ``extract.slice_size`` and cached as they finish. With
        ``compute=False`` a gap is an error (rank 0 gathering what the other ranks wrote).
        """
        stop = self.n if stop is None else stop
        reuse = (self.use_cache and self.ecfg.cache) if reuse is None else (reuse and self.ecfg.cache)
        files = self.cached_files() if reuse else []
        pos = start
        while pos < stop:
            over = [f for f in files if f[0] <= pos < f[1]]
            if over:
                f = max(over, key=lambda f: (f[3], f[1]))
                s, e, path, _ = f
                hit = self._read(path, s, e)
                if hit is None:  # truncated or altered: never served
                    files.remove(f)
                    continue
                b = min(e, stop)
                if self.log and compute and path not in self._logged_files:
                    self._logged_files.add(path)
                    self.log(f"  {self.mcfg.name}: {self._rows(pos, b)} from cache ({path.name})")
                yield pos, b, {k: v[pos - s:b - s] for k, v in hit.items()}
                pos = b
                continue
            nxt = min([f[0] for f in files if pos < f[0] < stop], default=stop)
            b = min(nxt, pos + self.ecfg.slice_size)
            if not compute:
                raise EvalkitError(f"model {self.mcfg.name!r}: images {pos}-{b - 1} are not in the feature cache "
                                   f"{self.cache_dir} after every rank finished; on several machines "
                                   f"extract.cache_dir must be a folder that every machine shares")
            feats = self._compute(pos, b)
            if self.ecfg.cache:
                self._write(self.slice_path(pos, b), feats)
            yield pos, b, feats
            pos = b

    def _rows(self, a: int, b: int) -> str:
        return f"{self.n} images" if (a, b) == (0, self.n) else f"images {a}-{b - 1}"

    def run(self, start: int, stop: int) -> None:
        """Make sure ``start..stop`` is in the cache (a rank's part under torchrun)."""
        for _ in self.pieces(start, stop):
            pass

    def features(self, *, compute: bool = True) -> list:
        """The whole set as FeatureSets; cached as one file, which replaces the slices."""
        hit = self.cached_full()
        if hit is not None:
            return [FeatureSet(self.mcfg.name, layer, hit[layer]) for layer in self.mcfg.layers]
        parts = {layer: [] for layer in self.mcfg.layers}
        ranges = []
        # under --no-cache, rank 0 still reads what the ranks just wrote (the newest slices)
        for a, b, feats in self.pieces(compute=compute, reuse=True if not compute else None):
            ranges.append((a, b))
            for layer in self.mcfg.layers:
                parts[layer].append(feats[layer])
        if not compute and self.log:
            self.log(f"  {self.mcfg.name}: {len(ranges)} slice{'s' if len(ranges) != 1 else ''} read back from the "
                     f"cache in dataset order")
        feats = {layer: (np.concatenate(c) if len(c) > 1 else c[0]) if c else np.zeros((0, 0), np.float32)
                 for layer, c in parts.items()}
        if self.ecfg.cache and ranges != [(0, self.n)]:
            self._write(self.full_path, feats)
            for s, e, path, _ in self.cached_files(full=False):
                with contextlib.suppress(OSError):
                    path.unlink()
        return [FeatureSet(self.mcfg.name, layer, np.ascontiguousarray(feats[layer], dtype=np.float32))
                for layer in self.mcfg.layers]

    # --- the forward pass ---

    def _prepare(self) -> None:
        """Load the checkpoint (once, and only when something is computed)."""
        if self._ready:
            return
        from evalkit.models import load_checkpoint

        mcfg, log = self.mcfg, self.log
        if mcfg.checkpoint:
            report = load_checkpoint(self.model, mcfg.checkpoint, unsafe_pickle=mcfg.unsafe_pickle,
                                     strict=mcfg.strict, source=mcfg.source, kwargs=mcfg.kwargs, name=mcfg.name)
            if report["model"] is not self.model:  # built again with the checkpoint's classifier width
                self.model = report["model"]
                self.layer_map = resolve_layers(self.model, mcfg.layers, source=mcfg.source)
            for text in report["notes"]:
                self.note(text)
            skipped = len(report["missing"]) + len(report["unexpected"]) + len(report["mismatched"])
            if skipped and log:
                log(f"  {mcfg.name}: loaded {report['loaded']} tensors from {mcfg.checkpoint}; skipped {skipped} "
                    f"(strict: false)")
        self.device = resolve_device(self.ecfg.device)
        from evalkit import distributed

        session = distributed.current()
        if session is not None:
            self.device = session.map_device(self.device)
        rule = depth_rule(self.dataset.load_image(0)) if self.n and log else None
        if rule:
            log(f"  {mcfg.name}: images of {rule} to 8 bits (see README, Config)")
        if self.ecfg.bf16 and self.device.type != "cuda" and log:
            log(f"  {mcfg.name}: extract.bf16 applies on CUDA only; running in float32 on {self.device.type}")
        self._ready = True

    def _compute(self, start: int, stop: int) -> dict:
        import torch

        from evalkit import distributed

        self._prepare()
        device = self.device
        loader = torch.utils.data.DataLoader(
            _Images(self.dataset, build_transform(self.spec), start, stop), batch_size=self.ecfg.batch_size,
            shuffle=False, num_workers=loader_workers(self.ecfg, stop - start), pin_memory=device.type == "cuda",
            collate_fn=_collate,
        )
        feats, rate = run_layers(self.model, distributed.maybe_fail(loader), self.layer_map, device=device,
                                 pooling=self.mcfg.pooling, bf16=self.ecfg.bf16, progress=True, log=self.log,
                                 channels_last=self.ecfg.channels_last, compile=self.ecfg.compile)
        self.images += stop - start
        self.seconds += (stop - start) / rate if rate > 0 else 0.0
        if self.log:
            self.log(f"  {self.mcfg.name}: {self._rows(start, stop)} on {device} at {rate:,.0f} img/s")
        return feats


def loader_workers(ecfg, n_images: int) -> int:
    """DataLoader workers: ``extract.num_workers``, or for ``auto`` min(4, cores - 1).

    ``auto`` counts the cores this process may use, shared among the ranks torchrun started on
    this machine, and uses none for a single batch (starting workers would cost more than it
    saves).
    """
    if ecfg.num_workers != "auto":
        return int(ecfg.num_workers)
    if n_images <= ecfg.batch_size:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(4, cores // local - 1))


# --- listing layers -------------------------------------------------------------------------


def list_layers(source: str, *, kwargs: dict | None = None, input_size=None) -> list:
    """``[(name, type, output shape)]`` for every module, from one dummy forward pass.

    Parameters
    ----------
    source : str
        A model source string (``timm:resnet18``, ...).
    kwargs : dict, optional
    input_size : tuple, optional
        ``(1, C, H, W)`` of the dummy input; default from the model's preprocessing.
    """
    import torch

    from evalkit.models import create_model

    model = create_model(source, kwargs=kwargs).eval()
    if input_size is None:
        spec = resolve_preprocess(model, None, source=source)
        c = spec.get("channels") or 3
        s = spec.get("crop") or spec.get("resize") or 224
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        input_size = (1, c, h, w)
    shapes: dict = {}
    head = classifier_name(model, torch.zeros(*input_size))
    modules = dict(model.named_modules())

    def note(name, value) -> None:  # a hook that returns a value would replace the module's output
        shapes.setdefault(name, _shape(value))

    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: note(n, o)) for n, m in modules.items() if n]
    if head is not None:
        handles.append(modules[head].register_forward_pre_hook(lambda _m, inp: note(PENULTIMATE, inp[0])))
    try:
        with torch.inference_mode():
            model(torch.zeros(*input_size))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise EvalkitError(f"{source}: a dummy forward pass with input {tuple(input_size)} failed "
                           f"({exc.__class__.__name__}: {first}); pass --input-size C,H,W") from exc
    finally:
        for h in handles:
            h.remove()
    rows = [(n, type(m).__name__, shapes.get(n, "not run")) for n, m in modules.items() if n]
    if head is not None:
        rows.append((PENULTIMATE, f"input of {head}", shapes.get(PENULTIMATE, "not run")))
    return rows


def _shape(o):
    import torch

    if isinstance(o, torch.Tensor):
        return tuple(o.shape)
    if isinstance(o, (tuple, list)) and o and isinstance(o[0], torch.Tensor):
        return tuple(o[0].shape)
    if isinstance(o, dict):
        t = next((x for x in o.values() if isinstance(x, torch.Tensor)), None)
        if t is not None:
            return tuple(t.shape)
    return type(o).__name__
