"""The whole run: config -> data -> extract -> neighbours -> embed -> score -> report / check.

``run_report(config, out_dir)`` is what ``evalkit report`` calls; notebooks can call the
stages one by one (``evalkit.data.load_dataset``, ``evalkit.extract.extract_model``, ...).
"""
from __future__ import annotations

import itertools
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.results import Embedding, RunResult


def _progress(msg: str) -> None:
    """Progress goes to stdout: stderr carries only problems (errors, failing checks)."""
    print(msg, file=sys.stdout, flush=True)


def validate_sizes(config, n_samples: int, n_classes: int, *, n_total: int | None = None):
    """Fail early, naming the key, when the data are too small for the chosen parameters.

    A parameter the config sets explicitly must fit the data (``n_neighbors < n_samples / 2``
    for trustworthiness, ``3 x perplexity < n_samples`` for t-SNE, ...); a default that does
    not fit small data is lowered instead. Returns ``(config, notes)``: the config with the
    values actually used (what the run folder's config.yaml records, so running that file
    again gives the same run) and one note per lowered default.
    """
    mc, ec = config.metrics, config.embed
    subsampled = n_total is not None and n_total > n_samples
    fewer = (f"; data.max_samples keeps {n_samples} of {n_total}" if subsampled else "")
    if n_samples < 4:
        raise EvalkitError(f"data: {n_samples} samples; evalkit needs at least 4 (raise data.max_samples or add data){fewer}")
    notes, metrics_update, umap_update, tsne_update = [], {}, {}, {}

    def fit(key: str, value: int, limit: int, why: str, explicit: bool, update: dict, field: str):
        if value <= limit:
            return
        if explicit:
            raise EvalkitError(f"{key}: {value} is too large for {n_samples} samples ({why}); expected at most "
                               f"{limit}: lower {key} or use more data{fewer}")
        update[field] = limit
        notes.append(f"{key} lowered from its default {value} to {limit}: only {n_samples} samples ({why})")

    k_max = (n_samples - 1) // 2
    fit("metrics.n_neighbors", mc.n_neighbors, k_max, "n_neighbors < n_samples / 2 for trustworthiness",
        "n_neighbors" in mc.model_fields_set, metrics_update, "n_neighbors")
    if mc.knn_k is not None:
        fit("metrics.knn_k", mc.knn_k, n_samples - 1, "each sample has n_samples - 1 neighbours", True,
            metrics_update, "knn_k")
    fit("metrics.weighted_knn_k", mc.weighted_knn_k, n_samples - 1, "each sample has n_samples - 1 neighbours",
        "weighted_knn_k" in mc.model_fields_set, metrics_update, "weighted_knn_k")
    p_max = (n_samples - 1) / 3.0
    if "tsne" in ec.methods and ec.tsne.perplexity > p_max:
        if "perplexity" not in ec.tsne.model_fields_set:
            tsne_update["perplexity"] = p_max
            notes.append(f"embed.tsne.perplexity lowered from its default {ec.tsne.perplexity:g} to {p_max:.3g}: "
                         f"only {n_samples} samples (t-SNE needs n_samples > 3 x perplexity)")
        else:
            raise EvalkitError(f"embed.tsne.perplexity: {ec.tsne.perplexity:g} is too large for {n_samples} samples "
                               f"(t-SNE needs n_samples > 3 x perplexity); expected at most {p_max:.3g}: "
                               f"lower embed.tsne.perplexity or use more data{fewer}")
    if "umap" in ec.methods:
        fit("embed.umap.n_neighbors", ec.umap.n_neighbors, n_samples - 1, "each sample has n_samples - 1 neighbours",
            "n_neighbors" in ec.umap.model_fields_set, umap_update, "n_neighbors")
    if metrics_update:
        config = config.model_copy(update={"metrics": mc.model_copy(update=metrics_update)})
    if umap_update or tsne_update:
        embed = ec.model_copy(update={"umap": ec.umap.model_copy(update=umap_update),
                                      "tsne": ec.tsne.model_copy(update=tsne_update)})
        config = config.model_copy(update={"embed": embed})
    return config, notes


# --- the run folder -------------------------------------------------------------------------

RUN_FILES = ("index.html", "metrics.json")  # every run folder has both


def default_out_dir(config) -> Path:
    """``reports/out/NAME``; a name that is not a plain folder name needs ``--out``."""
    name = config.name
    if name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("."):
        raise EvalkitError(f"name: {name!r} cannot name a folder under reports/out; pass --out DIR "
                           f"or use a name without '/', '\\' or a leading '.'")
    return Path("reports/out") / name


def check_out_dir(out_dir) -> Path:
    """Fail before any work when ``out_dir`` cannot become the run folder.

    It must be a folder or not exist yet, under a writable folder, and an existing folder must
    be an earlier run folder: the run replaces it as a whole, so any other folder (``--out .``,
    a data folder) is refused rather than deleted.
    """
    import tempfile

    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise EvalkitError(f"--out {out_dir}: is a file; expected a run folder (or a path that does not exist yet)")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise EvalkitError(f"--out {out_dir}: {blocker} is a file; expected a folder there")
    if out.is_dir():
        cwd = Path.cwd().absolute()
        if out == cwd or out in cwd.parents:
            raise EvalkitError(f"--out {out_dir}: is the working folder or holds it; the run replaces its "
                               f"folder as a whole, so expected a folder of its own (e.g. reports/out/NAME)")
        entries = [e.name for e in out.iterdir()]
        if entries and not all(f in entries for f in RUN_FILES):
            raise EvalkitError(f"--out {out_dir}: exists and is not an evalkit run folder (no index.html and "
                               f"metrics.json); the run replaces its folder as a whole, so expected a new or "
                               f"earlier run folder")
    probe_in = out.parent if out.parent.exists() else existing
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=probe_in)).rmdir()
    except OSError as exc:
        raise EvalkitError(f"--out {out_dir}: cannot write in {probe_in} ({exc.strerror or exc}); expected a "
                           f"writable folder") from None
    return out


def clean_stale_siblings(out_dir, *, older_than: float) -> list:
    """Remove ``.NAME.tmp-*`` folders a killed run left beside the run folder.

    Only folders last modified before ``older_than`` (this process's start) go, so a run that
    is writing right now is left alone. A ``.NAME.old-*`` folder is an earlier run moved aside
    for the swap: it is put back when the run folder itself is missing, else removed.
    """
    import glob
    import shutil

    out = Path(out_dir).expanduser().absolute()
    if not out.parent.is_dir():
        return []
    removed = []
    for kind in ("old", "tmp"):
        for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            try:
                if not path.is_dir() or path.is_symlink() or path.stat().st_mtime >= older_than:
                    continue
                if kind == "old" and not out.exists():
                    path.rename(out)
                    continue
                shutil.rmtree(path)
                removed.append(path)
            except OSError:
                continue  # another run got there first, or no permission: not this run's business
    return removed


_PROCESS_START = time.time()


# --- stage boundaries -------------------------------------------------------------------------


def _failing_module(exc):
    """``(name, type)`` of the innermost torch module whose forward raised ``exc``, if any."""
    torch = sys.modules.get("torch")
    if torch is None or exc is None:
        return None
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    modules = [f.f_locals.get("self") for f in frames]
    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    if not modules:
        return None
    root, inner = modules[0], modules[-1]
    try:
        names = {id(m): n for n, m in root.named_modules()}
    except Exception:
        return None
    name = names.get(id(inner))
    return (name or "(the model itself)", type(inner).__name__) if inner is not root or name is not None else None


def _raised_in_evalkit(exc) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and Path(last).resolve().parent == Path(__file__).resolve().parent


def _model_error(exc, mcfg):
    """An :class:`EvalkitError` naming the model entry (and the failing layer), or None for a bug."""
    label = f"model {mcfg.name!r}" + (f" ({mcfg.source})" if mcfg.source else "")
    if isinstance(exc, EvalkitError):
        msg = str(exc).removeprefix(f"source {mcfg.source!r}: ")  # the label below names the source
        cause = exc.__cause__ or exc.__context__
        failing = _failing_module(cause) if cause is not None else None
        if failing and failing[0] not in msg:
            msg += f" [raised in layer {failing[0]!r} ({failing[1]})]"
        return EvalkitError(msg if repr(mcfg.name) in msg else f"{label}: {msg}")
    failing = _failing_module(exc)
    if failing is not None and not _raised_in_evalkit(exc):
        text = (str(exc).strip().splitlines() or [""])[0][:300]
        return EvalkitError(
            f"{label}: the forward pass failed in layer {failing[0]!r} ({failing[1]}): {exc.__class__.__name__}: "
            f"{text}; the inputs may not fit the model: check 'preprocess' (resize, crop, channels) and 'kwargs' "
            f"(`evalkit layers {mcfg.source or 'SOURCE'}` lists every layer's output shape)")
    if isinstance(exc, OSError) and exc.filename:
        return EvalkitError(f"{label}: {exc.filename}: {exc.strerror or exc}")
    return None


def check_features(fs, n_samples: int):
    """Features a model produced must be finite and one row per sample."""
    X = fs.features
    if X.ndim != 2 or X.shape[0] != n_samples:
        raise EvalkitError(f"model {fs.model!r}, layer {fs.layer!r}: features of shape {X.shape} for {n_samples} "
                           f"samples; expected ({n_samples}, n_features)")
    if X.shape[1] == 0:
        raise EvalkitError(f"model {fs.model!r}, layer {fs.layer!r}: 0 features per sample; choose another layer")
    finite = np.isfinite(X)
    if not finite.all():
        rows = np.flatnonzero(~finite.all(axis=1))
        shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if rows.size > 5 else "")
        raise EvalkitError(f"model {fs.model!r}, layer {fs.layer!r}: {int((~finite).sum())} NaN or infinite "
                           f"values in {rows.size} of {n_samples} samples (rows {shown}); check the model, its "
                           f"checkpoint and extract.bf16")


def _mean_std(values):
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals)) if len(vals) > 1 else None)


def procrustes_disparity(coords) -> float | None:
    """Mean Procrustes disparity over pairs of seeds (0 = identical up to rotation, scale, shift)."""
    from scipy.spatial import procrustes

    pairs = list(itertools.combinations(coords, 2))
    if not pairs:
        return None
    out = []
    for a, b in pairs:
        try:
            out.append(procrustes(a.astype(np.float64), b.astype(np.float64))[2])
        except ValueError:  # a degenerate (constant) embedding
            out.append(float("nan"))
    return float(np.nanmean(out)) if np.isfinite(out).any() else None


def _versions() -> dict:
    from importlib import metadata

    import evalkit

    out = {"python": platform.python_version(), "evalkit": evalkit.__version__}
    for pkg in ("numpy", "scikit-learn", "torch", "torchvision", "timm", "openTSNE", "umap-learn", "pynndescent", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def score_feature_set(fs, labels, config, *, device=None, notes=None, undefined=None):
    """Rows, embeddings, extras for one feature set (every method x seed)."""
    from evalkit import score
    from evalkit.embed import create_embedder, reduce_dims
    from evalkit.neighbors import knn_graph

    X = fs.features
    n = X.shape[0]
    mc = config.metrics
    k = mc.n_neighbors
    knn_k = mc.knn_k or k
    n_classes = np.unique(labels).size
    embedders = {method: create_embedder(method, config.embed) for method in config.embed.methods}
    # One graph of the raw features serves the metrics and t-SNE (3 x perplexity neighbours)
    # and UMAP (n_neighbors - 1 besides the point itself): neither searches its own.
    graph_k = min(n - 1, max(k, knn_k, mc.weighted_knn_k, *(e.graph_neighbors(n) for e in embedders.values())))
    graph = knn_graph(X, n_neighbors=graph_k, device=device)

    sil_sample = mc.silhouette_max_samples if (mc.silhouette_max_samples and n > mc.silhouette_max_samples) else None
    if sil_sample and notes is not None:
        notes.add(f"silhouette: computed on a seeded stratified sample of {sil_sample:,} of {n:,} points "
                  f"(metrics.silhouette_max_samples); every other score uses all points")

    def sil(Z):
        if n_classes < 2 or n_classes >= n:
            return None
        return score.silhouette(Z, labels, device=device, sample_size=sil_sample)

    if n_classes < 2 and undefined is not None:
        undefined["silhouette"] = "not defined for a single class"
        undefined["knn_accuracy"] = "not meaningful for a single class"
        undefined["weighted_knn_accuracy"] = "not meaningful for a single class"
    feature_row = {
        "model": fs.model, "layer": fs.layer, "method": "features", "n_features": int(X.shape[1]),
        "silhouette": sil(X),
        "knn_accuracy": score.knn_accuracy(X, labels, n_neighbors=knn_k, graph=graph) if n_classes > 1 else None,
        "weighted_knn_accuracy": score.weighted_knn_accuracy(X, labels, n_neighbors=min(mc.weighted_knn_k, n - 1))
        if n_classes > 1 else None,
    }
    per_class = score.per_class_knn_accuracy(X, labels, n_neighbors=knn_k, graph=graph)

    # t-SNE and UMAP take their neighbours from the graph of the raw features, the space the
    # neighbourhood metrics judge them in; the PCA-reduced features only give t-SNE its PCA
    # start and UMAP the centroids of disconnected components (PCA was only ever a speed
    # step for a neighbour search that the shared graph now replaces).
    Xr = reduce_dims(X, config.embed.pca_dims)
    if Xr.shape[1] == 1:
        # t-SNE and UMAP initialise from two principal components; a zero second column
        # changes no distance, so the embedding is that of the single feature.
        Xr = np.hstack([Xr, np.zeros_like(Xr)])
    scale = float(np.sqrt(np.mean(np.square(Xr - Xr.mean(axis=0), dtype=np.float64))))
    if scale > 0 and not 1e-4 <= scale <= 1e4:
        # t-SNE and UMAP calibrate each point's bandwidth, so the result does not depend on the
        # scale of the data; their numerics do (openTSNE's PCA start divides by a std of ~0).
        # The graph's distances are rescaled inside evalkit.embed for the same reason.
        Xr = ((Xr - Xr.mean(axis=0)) / scale).astype(np.float32)
        if notes is not None:
            notes.add(f"{fs.model}/{fs.layer}: features of scale {scale:.3g} are rescaled to unit scale "
                      f"before t-SNE and UMAP (neither depends on the scale; their numerics do)")
    constant = bool(n and np.ptp(X, axis=0).max() == 0)
    if constant and notes is not None:
        notes.add(f"{fs.model}/{fs.layer}: all {n} samples have identical features, so every embedding "
                  f"places them at one point (t-SNE and UMAP are not defined for such data)")
    embeddings, rows, method_params, stability = [], [], {}, {}
    per_method = {}
    for method, embedder in embedders.items():
        method_params[method] = embedder.params(n, graph)
        if method in ("tsne", "umap") and X.shape[1] > config.embed.pca_dims:
            method_params[method]["input"] = (f"neighbours of the raw features, start from PCA to "
                                              f"{config.embed.pca_dims} dims")
        per_seed = []
        for seed in config.embed.seeds:
            t0 = time.perf_counter()
            if constant:
                Z = np.zeros((n, 2), dtype=np.float32)
            else:
                Z = embedder.fit_transform(X if method == "pca" else Xr, random_state=seed, graph=graph)
            embeddings.append(Embedding(fs.model, fs.layer, method, seed, Z, method_params[method],
                                        time.perf_counter() - t0))
            per_seed.append(Z)
        per_method[method] = per_seed
    # One pass over X's distances scores every method and seed (at 70,000 x 256 a pass takes
    # minutes). An approximate graph is not passed: the same pass finds the exact neighbours.
    nb = score.neighbourhood_scores(
        X, {f"{method}/{i}": Z for method, zs in per_method.items() for i, Z in enumerate(zs)}, n_neighbors=k,
        graph_X=graph if graph.exact and graph.indices.shape[1] >= k else None, device=device)
    for method, per_seed in per_method.items():
        vals = {
            "trustworthiness": [nb[f"{method}/{i}"]["trustworthiness"] for i in range(len(per_seed))],
            "continuity": [nb[f"{method}/{i}"]["continuity"] for i in range(len(per_seed))],
            "silhouette": [sil(Z) for Z in per_seed],
            "knn_accuracy": [score.knn_accuracy(Z, labels, n_neighbors=knn_k) if n_classes > 1 else None
                             for Z in per_seed],
        }
        row = {"model": fs.model, "layer": fs.layer, "method": method}
        for metric, vs in vals.items():
            mean, std = _mean_std(vs)
            row[metric] = mean
            if len(per_seed) > 1:
                row[f"{metric}_std"] = std
        rows.append(row)
        if len(per_seed) > 1:
            stability[f"{fs.model}/{fs.layer}/{method}"] = procrustes_disparity(per_seed)
    return feature_row, rows, embeddings, per_class, method_params, stability


def run_report(config, out_dir, *, use_cache: bool = True, log=_progress, argv=None) -> RunResult:
    """Run every stage and write the run folder atomically; returns the :class:`RunResult`."""
    from evalkit.check import evaluate_checks
    from evalkit.data import resolve_dataset
    from evalkit.extract import extract_model, resolve_device
    from evalkit.report import write_run
    from evalkit.score import linear_cka

    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    out_dir = check_out_dir(out_dir)
    clean_stale_siblings(out_dir, older_than=_PROCESS_START)
    try:
        dataset = resolve_dataset(config)
    except OSError as exc:  # an unreadable file: a user's problem, named by the OS
        where = exc.filename or (config.data.path if config.data is not None else None)
        raise EvalkitError(f"data.path: {where}: cannot read ({exc.strerror or exc})") from exc
    labels = dataset.labels
    n_classes = int(np.unique(labels).size)
    config, size_notes = validate_sizes(config, len(dataset), n_classes, n_total=getattr(dataset, "n_total", None))
    log(f"evalkit: {dataset.name}: {len(dataset):,} samples, {n_classes} classes")

    device = resolve_device(config.extract.device)
    feature_sets = []
    for mcfg in config.models:
        try:
            sets = extract_model(mcfg, dataset, config.extract, use_cache=use_cache, log=log)
        except Exception as exc:
            err = _model_error(exc, mcfg)
            if err is None:
                raise
            raise err from exc
        for fs in sets:
            check_features(fs, len(dataset))
        feature_sets.extend(sets)
    t_extract = time.perf_counter() - t0

    notes: set = set(size_notes)
    undefined: dict = {}
    rows, embeddings, per_class, method_params, stability = [], [], {}, {}, {}
    for fs in feature_sets:
        t1 = time.perf_counter()
        frow, erows, embs, pc, mp, stab = score_feature_set(fs, labels, config, device=device, notes=notes,
                                                            undefined=undefined)
        rows.append(frow)
        rows.extend(erows)
        embeddings.extend(embs)
        per_class[f"{fs.model}/{fs.layer}"] = [None if not np.isfinite(v) else float(v) for v in pc]
        method_params.update(mp)
        stability.update(stab)
        log(f"  {fs.model}/{fs.layer}: {fs.features.shape[1]} features, embedded and scored in "
            f"{time.perf_counter() - t1:.1f} s")

    keys = [fs.key for fs in feature_sets]
    cka = [[linear_cka(a.features, b.features) for b in feature_sets] for a in feature_sets]
    checks = evaluate_checks(rows, config.checks)
    finished = datetime.now(timezone.utc)
    provenance = {
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 2),
        "extract_s": round(t_extract, 2),
        "device": str(device) + (f" ({_gpu_name()})" if device.type == "cuda" else f" ({platform.processor() or platform.machine()})"),
        "host": platform.node(),
        "platform": platform.platform(),
        "command": " ".join(argv) if argv else "evalkit report",
        "seeds": list(config.embed.seeds),
        "data_seed": config.data.seed if config.data is not None else None,
        "dataset": dataset.name,
        "n_samples": len(dataset),
        "n_classes": n_classes,
        "versions": _versions(),
    }
    result = RunResult(
        name=config.name, labels=labels, label_names=dataset.label_names, indices=dataset.indices,
        feature_sets=tuple(feature_sets), embeddings=tuple(embeddings), rows=tuple(rows), checks=tuple(checks),
        provenance=provenance, config_yaml=config.to_yaml(),
        extras={
            "per_class_knn": per_class, "cka": {"keys": keys, "matrix": cka}, "method_params": method_params,
            "stability": stability, "notes": sorted(notes), "undefined_reasons": undefined,
            "n_neighbors": config.metrics.n_neighbors, "knn_k": config.metrics.knn_k or config.metrics.n_neighbors,
        },
    )
    write_run(Path(out_dir), result)
    return result


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)
