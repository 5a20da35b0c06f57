"""Data for the report's interactive panels (``reports/templates/explorer.js``).

Data first: :func:`build_explorer_data` turns a run into one plain JSON-ready dict, compact
enough to inline in the page, and :func:`explorer_assets` wraps it with the browser scripts
that draw it (regl-scatterplot, vendored in ``reports/templates/vendor`` with its licences).
The PNG panels of the report stay in the page as the fallback without WebGL or JavaScript.

Encoding (``version`` 1), chosen so a 70,000-point report stays small:

- coordinates: per panel and axis, quantised to uint16 over ``[lo, hi]`` (65535 marks a
  missing, non-finite coordinate), little-endian, x then y, base64; decoded
  ``lo + q / 65534 * (hi - lo)`` (at most half a step, ``(hi - lo) / 65534 / 2``, off);
- labels once (uint8, or uint16 beyond 255 classes), dataset indices once (uint32, or None
  when they are ``0..n-1``), optional sample ids as a list of strings;
- leave-one-out kNN predictions on each feature set's raw features (one label per sample),
  from which the page colours correct/wrong and the disagreement of two feature sets;
- optional per-point scores (trustworthiness, continuity) quantised to uint8 over their range;
- optional thumbnails: one PNG sprite sheet (at most 8192 px a side, as TensorBoard's
  projector), cell ``i`` at column ``i % cols``, row ``i // cols``.
"""
from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["ExplorerAssets", "build_explorer_data", "explorer_assets", "encode_json",
           "decode_coords", "make_thumbnails", "sprite_sheet", "vendor_script",
           "VENDOR_LIBRARIES"]

FORMAT_VERSION = 1
QUANT_MAX = 65534  # largest quantised coordinate; 65535 means "missing"
MISSING = 65535
SPRITE_MAX_PX = 8192
#: Above this many samples the explorer does not run its own exact kNN search (about 26 s per
#: feature set at 70,000 on 2 cores): it shows kNN colours only from predictions the pipeline
#: made with its shared graph (``result.knn_predictions`` or the ``predictions`` argument).
KNN_FALLBACK_MAX = 20_000
#: (file, npm package, version, licence file) of the vendored browser libraries, load order.
VENDOR_LIBRARIES = (
    ("regl.min.js", "regl", "2.1.1", "LICENSE.regl"),
    ("pub-sub-es.js", "pub-sub-es", "3.0.0", "LICENSE.pub-sub-es"),
    ("regl-scatterplot.min.js", "regl-scatterplot", "1.16.0", "LICENSE.regl-scatterplot"),
)


@dataclass(frozen=True)
class ExplorerAssets:
    """What the page inlines: the data as safe-to-inline JSON text, and the scripts.

    ``scripts`` run in order (vendored libraries, then ``explorer.js``); each is an inline
    ``<script>`` whose hash the page's Content-Security-Policy lists. ``needs_eval`` is true:
    regl compiles its draw commands with ``Function`` at run time.
    """

    data_json: str
    scripts: tuple
    needs_eval: bool = True


# --------------------------------------------------------------------------- data


def build_explorer_data(result, *, n_neighbors: int | None = None,
                        predictions: Mapping[str, np.ndarray] | None = None,
                        colors: list[str] | None = None) -> dict:
    """The explorer's data for ``result`` as a JSON-ready dict.

    Reads ``result.embeddings``, ``labels``, ``label_names``, ``indices``, ``feature_sets``
    and, when present, ``thumbnails`` ((n, h, w) or (n, h, w, 3) uint8), ``sample_ids``
    (n strings), ``point_scores`` (``"model/layer/method"`` -> ``{"trustworthiness":
    (n,), "continuity": (n,)}``) and ``knn_predictions`` (``"model/layer"`` -> (n,) labels
    predicted by leave-one-out kNN on the raw features, as :func:`evalkit.score.knn_predict`).

    Parameters
    ----------
    result : RunResult or Result
    n_neighbors : int, optional
        k of the leave-one-out kNN predictions; default ``result.extras["n_neighbors"]`` or 10.
    predictions : mapping, optional
        ``"model/layer"`` -> (n,) predicted labels, to reuse predictions already made
        (default ``result.knn_predictions``); feature sets missing here are predicted with
        :func:`evalkit.score.knn_predict` when there are at most ``KNN_FALLBACK_MAX`` samples.
    colors : list of str, optional
        Class colours; default :func:`evalkit.plots.class_colors`.

    Returns
    -------
    dict
        See the module docstring for the encoding.
    """
    labels = np.asarray(result.labels).astype(np.int64).reshape(-1)
    n = int(labels.shape[0])
    names = [str(x) for x in result.label_names]
    if colors is None:
        from evalkit import plots

        colors = plots.class_colors(len(names))
    indices = np.asarray(result.indices).astype(np.int64).reshape(-1)
    identity = indices.shape[0] == n and bool(np.array_equal(indices, np.arange(n)))

    panels, seen = [], set()
    for emb in result.embeddings:  # the first seed of each key, as the PNG grid shows
        if emb.key in seen:
            continue
        seen.add(emb.key)
        coords = np.asarray(emb.coords, dtype=np.float64)
        if coords.shape != (n, 2):
            continue
        xy, bounds = encode_coords(coords)
        panels.append({"key": str(emb.key), "model": str(emb.model), "layer": str(emb.layer),
                       "method": str(emb.method), "seed": int(emb.seed),
                       "xy": xy, "bounds": bounds})

    k = n_neighbors if n_neighbors is not None else (getattr(result, "knn_k", None) or getattr(result, "n_neighbors", None))
    k = int(k or 10)
    if predictions is None:
        predictions = getattr(result, "knn_predictions", None)
    wide = len(names) > 256  # labels and predictions: uint16, else uint8
    knn = _knn_predictions(result, labels, k, predictions or {}, "<u2" if wide else "u1")

    return {
        "version": FORMAT_VERSION,
        "n": n,
        "labels": _b64(labels.astype("<u2" if wide else "u1")),
        "label_dtype": "uint16" if wide else "uint8",
        "label_names": names,
        "colors": list(colors),
        "indices": None if identity else _b64(indices.astype("<u4")),
        "ids": _sample_ids(getattr(result, "sample_ids", None), n),
        "panels": panels,
        "knn": {"k": k, "feature_sets": knn},
        "point_scores": _point_scores(getattr(result, "point_scores", None), n, seen),
        "thumbnails": sprite_sheet(getattr(result, "thumbnails", None), n),
    }


def encode_coords(coords: np.ndarray) -> tuple[str, list]:
    """(n, 2) floats -> (base64 of uint16 x then y, [xlo, xhi, ylo, yhi])."""
    coords = np.asarray(coords, dtype=np.float64)
    finite = np.isfinite(coords).all(axis=1)
    bounds, columns = [], []
    for axis in range(2):
        values = coords[:, axis]
        lo = float(values[finite].min()) if finite.any() else 0.0
        hi = float(values[finite].max()) if finite.any() else 0.0
        span = hi - lo
        q = np.full(values.shape, MISSING, dtype=np.int64)
        if span > 0:
            q[finite] = np.rint((values[finite] - lo) / span * QUANT_MAX)
        else:
            q[finite] = QUANT_MAX // 2
        columns.append(np.clip(q, 0, MISSING).astype("<u2"))
        bounds += [lo, hi]
    return _b64(np.concatenate(columns)), bounds


def decode_coords(xy: str, bounds, n: int) -> np.ndarray:
    """Inverse of :func:`encode_coords` (as the page decodes): (n, 2) float64, NaN if missing."""
    q = np.frombuffer(base64.b64decode(xy), dtype="<u2").astype(np.float64).reshape(2, n)
    out = np.empty((n, 2))
    for axis in range(2):
        lo, hi = bounds[2 * axis], bounds[2 * axis + 1]
        if hi > lo:
            out[:, axis] = lo + q[axis] / QUANT_MAX * (hi - lo)
        else:
            out[:, axis] = lo
        out[q[axis] == MISSING, axis] = np.nan
    return out


def _knn_predictions(result, labels, k, given, dtype) -> list:
    from evalkit.score import knn_predict

    out = []
    n = labels.shape[0]
    for fs in getattr(result, "feature_sets", ()) or ():
        key = str(fs.key)
        predicted = given.get(key)
        if predicted is None:
            features = np.asarray(fs.features)
            if features.ndim != 2 or features.shape[0] != n or not 2 <= n <= KNN_FALLBACK_MAX:
                continue
            try:
                predicted = knn_predict(features, labels, n_neighbors=min(k, n - 1))
            except Exception:  # noqa: BLE001 - a feature set the vote cannot use (NaNs...)
                continue
        predicted = np.asarray(predicted).astype(np.int64).reshape(-1)
        if predicted.shape[0] != n:
            continue
        out.append({"key": key, "model": str(fs.model), "layer": str(fs.layer),
                    "predicted": _b64(predicted.astype(dtype)),
                    "accuracy": float((predicted == labels).mean())})
    return out


def _point_scores(scores, n: int, keys) -> dict:
    """``key`` -> ``{metric: {"q": base64 uint8, "lo": float, "hi": float}}`` (255 = NaN)."""
    out: dict = {}
    if not isinstance(scores, Mapping):
        return out
    for key, metrics in scores.items():
        if str(key) not in keys or not isinstance(metrics, Mapping):
            continue
        for metric in ("trustworthiness", "continuity"):
            values = metrics.get(metric)
            if values is None:
                continue
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            if values.shape[0] != n:
                continue
            finite = np.isfinite(values)
            lo = float(values[finite].min()) if finite.any() else 0.0
            hi = float(values[finite].max()) if finite.any() else 1.0
            q = np.full(n, 255, dtype=np.uint8)
            span = hi - lo
            q[finite] = (np.rint((values[finite] - lo) / span * 254) if span > 0 else 127)
            out.setdefault(str(key), {})[metric] = {"q": _b64(q), "lo": lo, "hi": hi}
    return out


def _sample_ids(ids, n: int):
    if ids is None:
        return None
    ids = [str(x) for x in np.asarray(ids, dtype=object).reshape(-1)]
    return ids if len(ids) == n else None


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


# --------------------------------------------------------------------------- thumbnails


def sprite_sheet(thumbnails, n: int) -> dict | None:
    """Thumbnails (n, h, w) or (n, h, w, 3) uint8 -> one PNG sprite sheet, or None.

    Returns ``{"png": data URI, "w", "h", "cols", "n"}``; None when there are no thumbnails,
    they do not match the ``n`` samples, or the sheet would exceed 8192 px a side.
    """
    if thumbnails is None:
        return None
    from PIL import Image

    thumbs = np.asarray(thumbnails)
    if thumbs.dtype != np.uint8 or thumbs.ndim not in (3, 4) or thumbs.shape[0] != n or n == 0:
        return None
    if thumbs.ndim == 4 and thumbs.shape[3] != 3:
        return None
    h, w = int(thumbs.shape[1]), int(thumbs.shape[2])
    cols = max(1, min(math.ceil(math.sqrt(n * h / w)), SPRITE_MAX_PX // w))
    rows = math.ceil(n / cols)
    if rows * h > SPRITE_MAX_PX:
        return None
    sheet = np.zeros((rows * h, cols * w) + thumbs.shape[3:], dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = thumbs[i]
    buffer = io.BytesIO()
    Image.fromarray(sheet, "L" if thumbs.ndim == 3 else "RGB").save(buffer, "PNG", optimize=True)
    data = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"png": data, "w": w, "h": h, "cols": cols, "n": n}


def make_thumbnails(load_image: Callable[[int], Any], n_samples: int, *, size: int = 24,
                    max_samples: int = 20_000) -> np.ndarray | None:
    """Small thumbnails of every sample for the report's hover, or None above the cap.

    Parameters
    ----------
    load_image : callable
        ``load_image(i)`` for ``i`` in ``range(n_samples)`` returns a PIL image, or an array
        (h, w), (h, w, 3), (h, w, 4) or channels-first (1|3, h, w); float arrays are scaled
        from their own min-max to 0-255.
    n_samples : int
    size : int
        Side of the square cell; images are scaled to fit it (never enlarged: 8 x 8 digits
        stay 8 x 8) and centred on black.
    max_samples : int
        Above this many samples no thumbnails are made (the report stays small).

    Returns
    -------
    ndarray of shape (n_samples, s, s) (all images grey) or (n_samples, s, s, 3), uint8
        ``s <= size``; None when ``n_samples > max_samples`` or ``n_samples == 0``.
    """
    from PIL import Image

    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if n_samples <= 0 or n_samples > max_samples:
        return None
    images = [_as_pil(load_image(i)) for i in range(n_samples)]
    grey = all(im.mode in ("L", "1", "I", "F", "I;16") for im in images)
    side = int(min(size, max(max(im.size) for im in images)))
    mode = "L" if grey else "RGB"
    out = np.zeros((n_samples, side, side) + (() if grey else (3,)), dtype=np.uint8)
    for i, im in enumerate(images):
        im = im.convert(mode)
        scale = min(side / im.width, side / im.height, 1.0)  # shrink to fit, never enlarge
        target = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        if target != im.size:
            im = im.resize(target, Image.Resampling.LANCZOS)
        cell = Image.new(mode, (side, side))
        cell.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
        out[i] = np.asarray(cell, dtype=np.uint8)
    return out


def _as_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode in ("I", "F", "I;16"):
            image = Image.fromarray(_to_uint8(np.asarray(image, dtype=np.float64)))
        return image
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first -> last
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim not in (2, 3):
        raise ValueError(f"expected an image of shape (h, w) or (h, w, 3), got {array.shape}")
    if array.dtype != np.uint8:
        array = _to_uint8(array.astype(np.float64))
    return Image.fromarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    finite = np.isfinite(array)
    lo = float(array[finite].min()) if finite.any() else 0.0
    hi = float(array[finite].max()) if finite.any() else 0.0
    scaled = (array - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(array)
    return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)


# --------------------------------------------------------------------------- page assets


def encode_json(data: Mapping) -> str:
    """JSON text safe inside ``<script type="application/json">``: no ``<``, ``>``, ``&``."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def vendor_script() -> str:
    """The vendored libraries as one classic script defining ``createREGL``,
    ``createPubSub`` and ``createScatterplot``.

    pub-sub-es 3 ships only as an ES module: its two ``export`` lines become assignments to
    the global its UMD consumers read, inside a function scope; the files are otherwise
    byte-for-byte those of the npm packages (``vendor/README.md``).
    """
    parts = []
    for name, package, version, _licence in VENDOR_LIBRARIES:
        source = _static(f"vendor/{name}")
        if package == "pub-sub-es":
            exports = ("export { globalPubSub, createPubSub };\n"
                       "export default createPubSub;\n")
            if exports not in source:
                raise RuntimeError("vendor/pub-sub-es.js is not the expected pub-sub-es 3.0.0")
            source = ("(function () {\n" + source.replace(
                exports, "window.createPubSub = createPubSub;\n") + "})();\n")
        parts.append(f"/* {package} {version} (MIT), see vendor/LICENSE.{package} */\n{source}")
    return "\n;\n".join(parts)


def explorer_assets(result, **kwargs) -> ExplorerAssets | None:
    """Data and scripts for the page, or None when the run has no embedding to explore."""
    data = build_explorer_data(result, **kwargs)
    if not data["panels"]:
        return None
    scripts = (vendor_script(), _static("explorer.js"))
    for script in scripts:  # inlined verbatim: nothing in them may end the <script> element
        if "</script" in script.lower() or "<!--" in script:
            raise RuntimeError("a vendored script contains '</script' or '<!--'")
    return ExplorerAssets(encode_json(data), scripts)


def _static(name: str) -> str:
    from evalkit.report import _templates

    path = _templates()
    for part in name.split("/"):  # one step at a time: resource readers differ on "a/b"
        path = path.joinpath(part)
    return path.read_text(encoding="utf-8")
