"""``evalkit extract``: features only, one file per model and layer, for later ``features:`` entries.

``DIR/MODEL/LAYER.npz`` (``--format npz``, the default) holds ``features`` (N, D) float32,
``labels`` (N,), ``label_names`` and ``indices`` (the sample ids: positions in the data split);
``--format npy`` writes the folder ``DIR/MODEL/LAYER/`` with the same arrays as ``.npy`` files,
``features.npy`` ready to memory-map. Either way the features are streamed to disk slice by
slice (the slices of the feature cache), so memory does not grow with N. ``DIR/extract.json``
lists the files; the whole folder is written beside ``DIR`` and swapped into place at the end.
Under torchrun every rank extracts its slice and rank 0 writes the folder.
"""
from __future__ import annotations

import json
import logging
import time
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.interrupt import check_interrupted

logger = logging.getLogger("evalkit")

MANIFEST = "extract.json"
FORMATS = ("npz", "npy")


def run_extract(config, out_dir, *, fmt: str = "npz", use_cache: bool = True, argv=None) -> Optional[dict]:
    """Extract every model entry of ``config`` into ``out_dir``; returns the manifest (None on ranks > 0)."""
    from evalkit import distributed
    from evalkit.pipeline import extract_models, load_samples
    from evalkit.runfolder import _PROCESS_START, check_out_dir, clean_stale_siblings, fill_folder

    if fmt not in FORMATS:
        raise EvalkitError(f"--format: {fmt!r}; expected one of {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    for i, m in enumerate(config.models):
        if m.name in (".", "..") or m.name.startswith(".") or any(c in m.name for c in "/\\\0"):
            raise EvalkitError(f"models[{i}].name: {m.name!r} cannot name a folder under --out; use a name without "
                               f"'/', '\\' or a leading '.'")
    out = check_out_dir(out_dir, marker_files=(MANIFEST,), kind="evalkit extract folder")
    if distributed.ranks_from_env().main:
        clean_stale_siblings(out, older_than=_PROCESS_START)
    dataset = load_samples(config)
    logger.info(f"evalkit: {dataset.name}: {len(dataset):,} samples, {len(dataset.label_names)} classes")
    notes: list = []
    with distributed.session(config.extract.device, timeout_s=config.extract.timeout_s) as session:
        extracted = extract_models(config, dataset, use_cache=use_cache, notes=notes, session=session, streamed=True)
        if extracted is None:
            return None
        side = {"labels": np.asarray(dataset.labels, dtype=np.int64),
                "label_names": np.array([str(n) for n in dataset.label_names], dtype=str),
                "indices": np.asarray(dataset.indices, dtype=np.int64)}
        files: dict = {}

        def fill(tmp: Path) -> None:
            for mcfg, job in extracted.items:
                if isinstance(job, list):  # a features: entry: its one feature set, as it is
                    pieces = [(0, len(dataset), {fs.layer: fs.features for fs in job})]
                    layers = [fs.layer for fs in job]
                else:
                    pieces = job.pieces(compute=extracted.compute, reuse=True if not extracted.compute else None)
                    layers = list(mcfg.layers)
                writers = {}
                try:
                    for a, b, feats in pieces:
                        check_interrupted()
                        for layer in layers:
                            rows = feats[layer]
                            if layer not in writers:
                                target = tmp / mcfg.name / (f"{layer}.npz" if fmt == "npz" else layer)
                                make = _NpzWriter if fmt == "npz" else _NpyFolderWriter
                                writers[layer] = make(target, len(dataset), rows.shape[1])
                            writers[layer].write(a, rows)
                    for layer in layers:
                        w = writers.get(layer) or _empty_writer(tmp, mcfg.name, layer, fmt)
                        w.close(side)
                        files[f"{mcfg.name}/{layer}"] = {"path": str(w.path.relative_to(tmp)), "n_samples": w.n,
                                                          "n_features": w.d}
                finally:
                    for w in writers.values():
                        w.abort()
                if not isinstance(job, list) and extracted.compute:
                    s = job.stats()
                    extracted.stats[mcfg.name] = (s["images"], s["seconds"])
            manifest.update({"files": files, "format": fmt, "n_samples": len(dataset),
                             "label_names": side["label_names"].tolist(), "dataset": dataset.name,
                             "notes": notes, "command": " ".join(argv) if argv else "evalkit extract",
                             **extracted.provenance(), "duration_s": round(time.perf_counter() - t0, 2)})
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            (tmp / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")

        manifest: dict = {}
        fill_folder(out, fill, what="extract folder")
    return manifest


def _empty_writer(tmp: Path, model: str, layer: str, fmt: str):
    raise EvalkitError(f"model {model!r}, layer {layer!r}: no features were extracted (0 samples)")


class _NpzWriter:
    """``features`` streamed into an uncompressed .npz (zip64), then the small arrays beside it."""

    def __init__(self, path: Path, n: int, d: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.n, self.d, self.done = path, n, d, 0
        self.zf = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.fh = self.zf.open("features.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_2_0(self.fh, {"descr": "<f4", "fortran_order": False, "shape": (n, d)})

    def write(self, start: int, rows) -> None:
        if start != self.done:  # pieces always come in order; a gap would misalign every row after it
            raise RuntimeError(f"rows {start}.. after {self.done}")
        self.fh.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
        self.done += len(rows)

    def close(self, side: dict) -> None:
        if self.done != self.n:
            raise RuntimeError(f"{self.path}: {self.done} rows written of {self.n}")
        self.fh.close()
        for key, value in side.items():
            with self.zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
        self.zf.close()
        self.zf = None

    def abort(self) -> None:
        if self.zf is not None:
            try:
                self.fh.close()
                self.zf.close()
            except Exception:
                pass


class _NpyFolderWriter:
    """``LAYER/features.npy`` as a memory map filled slice by slice, then the small arrays."""

    def __init__(self, path: Path, n: int, d: int):
        path.mkdir(parents=True, exist_ok=True)
        self.path, self.n, self.d, self.done = path, n, d, 0
        self.mm = np.lib.format.open_memmap(path / "features.npy", mode="w+", dtype=np.float32, shape=(n, d))

    def write(self, start: int, rows) -> None:
        if start != self.done:
            raise RuntimeError(f"rows {start}.. after {self.done}")
        self.mm[start:start + len(rows)] = rows
        self.done += len(rows)

    def close(self, side: dict) -> None:
        if self.done != self.n:
            raise RuntimeError(f"{self.path}: {self.done} rows written of {self.n}")
        self.mm.flush()
        self.mm = None
        for key, value in side.items():
            np.save(self.path / f"{key}.npy", np.asarray(value), allow_pickle=False)

    def abort(self) -> None:
        self.mm = None
