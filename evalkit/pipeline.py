"""The one code path: feature sets in, a :class:`~evalkit.results.Result` out.

:func:`evaluate_feature_sets` embeds and scores feature sets that are already in memory; the
Python API (:mod:`evalkit.api`) and ``evalkit report`` (:func:`run_report`: config -> data ->
extraction -> the same function -> the run folder) both call it.
"""
from __future__ import annotations

import functools
import logging
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.interrupt import check_interrupted
from evalkit.results import CKA, Result

logger = logging.getLogger("evalkit")
#: From this many samples each stage of a feature set (graph, each method, scores) logs a line.
STAGE_LINES_FROM = 5_000
#: Feature sets of fewer samples than this are embedded and scored side by side (see _score_sets).
SETS_SIDE_BY_SIDE_BELOW = 5_000


@dataclass(frozen=True)
class Samples:
    """The samples every feature set describes, in row order.

    Attributes
    ----------
    labels : ndarray of shape (n_samples,), int64, values 0..n_classes-1
    label_names : tuple of str
    indices : ndarray of shape (n_samples,), int64
        Positions in the dataset split (what the run folder records).
    name : str
        The data set, as the report names it.
    n_total : int or None
        Samples before a subsample, when there was one.
    sample_ids : ndarray of str or None
    """

    labels: np.ndarray
    label_names: tuple
    indices: np.ndarray
    name: str = "data"
    n_total: Optional[int] = None
    sample_ids: Optional[np.ndarray] = None
    seed: Optional[int] = None


def fit_sizes(embed, metrics, n_samples: int, *, n_total: int | None = None):
    """Fit the settings to the data size; fail early, naming the key, where they cannot fit.

    A value set explicitly must fit (``n_neighbors < n_samples / 2`` for trustworthiness,
    ``3 x perplexity < n_samples`` for t-SNE, ...); a default that does not fit small data is
    lowered instead. Returns ``(embed, metrics, notes)``: the settings actually used (what the
    run folder's config.yaml records, so running that file again gives the same run) and one
    note per lowered default.
    """
    from evalkit.registry import methods

    subsampled = n_total is not None and n_total > n_samples
    fewer = f"; data.max_samples keeps {n_samples} of {n_total}" if subsampled else ""
    if n_samples < 4:
        raise EvalkitError(f"data: {n_samples} samples; evalkit needs at least 4 (raise data.max_samples or add "
                           f"data){fewer}")
    notes, update = [], {}

    def fit(key: str, field: str, limit: int, why: str, explicit: bool):
        value = getattr(metrics, field)
        if value is None or value <= limit:
            return
        if explicit:
            raise EvalkitError(f"{key}: {value} is too large for {n_samples} samples ({why}); expected at most "
                               f"{limit}: lower {key} or use more data{fewer}")
        update[field] = limit
        notes.append(f"{key} lowered from its default {value} to {limit}: only {n_samples} samples ({why})")

    fit("metrics.n_neighbors", "n_neighbors", (n_samples - 1) // 2, "n_neighbors < n_samples / 2 for "
        "trustworthiness", "n_neighbors" in metrics.model_fields_set)
    fit("metrics.knn_k", "knn_k", n_samples - 1, "each sample has n_samples - 1 neighbours", True)
    fit("metrics.weighted_knn_k", "weighted_knn_k", n_samples - 1, "each sample has n_samples - 1 neighbours",
        "weighted_knn_k" in metrics.model_fields_set)
    if update:
        metrics = metrics.model_copy(update=update)
    per_method = {}
    for name in embed.methods:
        spec = methods().get(name)
        if spec.missing():
            how = f"pip install 'evalkit[{spec.extra}]'" if spec.extra else f"pip install {' '.join(spec.missing())}"
            raise EvalkitError(f"embed.methods: {name!r} needs {', '.join(spec.missing())}, which is not installed; "
                               f"{how}, or leave {name!r} out")
        if spec.fit_sizes is None:
            continue
        try:
            settings, method_notes = spec.fit_sizes(getattr(embed, name), n_samples)
        except EvalkitError as exc:
            raise EvalkitError(f"{exc}{fewer}") from None
        per_method[name] = settings
        notes.extend(method_notes)
    if per_method:
        embed = embed.model_copy(update=per_method)
    return embed, metrics, notes


def evaluate_feature_sets(feature_sets, samples: Samples, *, embed, metrics, checks=(), device=None,
                          config_yaml: str = "", name: str = "evalkit-run", notes=(),
                          provenance: dict | None = None, thumbnails=None) -> Result:
    """Embed and score every feature set, compare them, evaluate the checks.

    Parameters
    ----------
    feature_sets : sequence of FeatureSet
        Features of shape (n_samples, n_features), rows in the order of ``samples``.
    samples : Samples
    embed, metrics : evalkit.config.EmbedConfig, evalkit.config.MetricsConfig
        Already fitted to the data size (:func:`fit_sizes`).
    checks : sequence of evalkit.config.CheckConfig
    device : torch.device, optional
    config_yaml : str
        The resolved settings, written as the run folder's config.yaml.
    notes : sequence of str
        Notes from earlier stages (lowered defaults, classifier widths, ...).
    provenance : dict, optional
        Entries added to the provenance (command, extraction time, ...).
    """
    from evalkit.check import evaluate_checks
    from evalkit.progress import progress_bar
    from evalkit.score import cka_matrix

    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    labels = samples.labels
    for fs in feature_sets:
        check_features(fs, len(labels))
    all_notes = list(dict.fromkeys(notes))
    rows, embeddings, per_class, method_params, stability, undefined = [], [], {}, {}, {}, {}
    predictions, point_scores = {}, {}
    rnx_curves, per_class_interval = {}, {}
    with progress_bar(len(feature_sets), "embedding and scoring", unit="set") as bar:
        for fs, out, seconds in _score_sets(feature_sets, labels, embed=embed, metrics=metrics, device=device):
            rows.extend(out.rows)
            embeddings.extend(out.embeddings)
            per_class[fs.key] = out.per_class_knn
            if out.knn_predictions is not None:
                predictions[fs.key] = out.knn_predictions
            per_class_interval[fs.key] = out.per_class_knn_interval
            method_params.update(out.method_params)
            stability.update(out.stability)
            rnx_curves.update(out.rnx_curves)
            point_scores.update(out.point_scores)
            undefined.update(out.undefined_reasons)
            all_notes.extend(n for n in out.notes if n not in all_notes)
            bar.update(1)
    keys = tuple(fs.key for fs in feature_sets)
    debiased = metrics.cka == "debiased" and len(labels) >= 4
    matrix = cka_matrix([fs.features for fs in feature_sets], debiased=debiased, batch_size=metrics.cka_batch_size)
    cka = CKA(keys, tuple(tuple(float(v) for v in row) for row in matrix),
              estimator="debiased" if debiased else "biased", batch_size=metrics.cka_batch_size)
    check_results = evaluate_checks([dict(r) for r in rows], checks)
    prov = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 2),
        "device": _device_text(device),
        "host": platform.node(),
        "platform": platform.platform(),
        "seeds": list(embed.seeds),
        "data_seed": samples.seed,
        "dataset": samples.name,
        "n_samples": int(len(labels)),
        "n_classes": int(len(samples.label_names)),
        "versions": _versions(),
    }
    prov.update(provenance or {})
    return Result(
        name=name, labels=labels, label_names=tuple(samples.label_names), indices=samples.indices,
        feature_sets=tuple(feature_sets), embeddings=tuple(embeddings), rows=tuple(rows),
        checks=tuple(check_results), provenance=prov, config_yaml=config_yaml, per_class_knn=per_class,
        per_class_knn_interval=per_class_interval, cka=cka,
        method_params=method_params, stability=stability, rnx_curves=rnx_curves, notes=tuple(sorted(all_notes)),
        undefined_reasons=undefined, n_neighbors=metrics.n_neighbors, knn_k=metrics.knn_k or metrics.n_neighbors,
        sample_ids=samples.sample_ids, thumbnails=thumbnails, knn_predictions=predictions,
        point_scores=point_scores)


def _score_sets(feature_sets, labels, *, embed, metrics, device):
    """Yield ``(fs, FeatureSetScores, seconds)`` for every feature set, in order.

    Small feature sets (fewer than :data:`SETS_SIDE_BY_SIDE_BELOW` samples) run side by side,
    one per core, each on its share of the cores (t-SNE on one thread, its methods one after
    the other): at that size one set cannot keep two cores busy (t-SNE on 899 points: 1.6 s
    on two threads; two of them on one thread each, side by side: 2.5 s for both). What they
    import is imported first, in this thread. Larger sets run one after the other, each
    using every core.
    """
    from evalkit.embed import cores_share, n_jobs
    from evalkit.kernels import numba_threadsafe
    from evalkit.scoring import prepare, score_feature_set, side_by_side_jobs

    # a line per stage where a stage takes a while (CI logs show where the time goes)
    stage_log = logger.info if len(labels) >= STAGE_LINES_FROM else logger.debug

    def score(fs, cores):
        t1 = time.perf_counter()
        with cores_share(cores):
            out = score_feature_set(fs, labels, embed=embed, settings=metrics, device=device, log=stage_log)
        seconds = time.perf_counter() - t1
        logger.info(f"  {fs.key}: {fs.features.shape[1]} features, embedded and scored in {seconds:.1f} s")
        return fs, out, seconds

    workers = min(n_jobs(), len(feature_sets))
    side_by_side = len(labels) < SETS_SIDE_BY_SIDE_BELOW and workers > 1
    if side_by_side:
        prepare(embed, len(labels), max(fs.features.shape[1] for fs in feature_sets))
        side_by_side = numba_threadsafe()
    if not side_by_side:
        for fs in feature_sets:
            yield score(fs, n_jobs())
            check_interrupted()
        return
    done: dict = {}
    calls = [functools.partial(score, fs, max(1, n_jobs() // workers)) for fs in feature_sets]
    next_i = 0
    for i, result in side_by_side_jobs(calls, workers, name="evalkit-set"):
        done[i] = result
        while next_i in done:  # in order, as soon as each is ready
            yield done.pop(next_i)
            next_i += 1


def run_report(config, out_dir, *, use_cache: bool = True, argv=None) -> Optional[Result]:
    """``evalkit report``: load the data, extract every model entry, evaluate, write the run folder.

    The folder is checked before any work and written atomically at the end. A Ctrl-C or
    SIGTERM the command line recorded is acted on at every stage boundary
    (:func:`evalkit.interrupt.check_interrupted`). Under torchrun (``WORLD_SIZE > 1``) every
    rank extracts its slice and only rank 0 evaluates and writes; the other ranks return None.
    """
    from evalkit import distributed
    from evalkit.extract import resolve_device
    from evalkit.runfolder import _PROCESS_START, check_out_dir, clean_stale_siblings, write_run

    t0 = time.perf_counter()
    for i, m in enumerate(config.models):
        if m.source and m.source.startswith("memory:"):  # what evalkit.evaluate() records
            raise EvalkitError(f"models[{i}].source: {m.source!r} is a model that was passed in memory to the Python "
                               f"API; a config cannot load it: name a factory (python:module:factory) and a "
                               f"checkpoint, or a features file")
    out_dir = check_out_dir(out_dir)
    if distributed.ranks_from_env().main:
        clean_stale_siblings(out_dir, older_than=_PROCESS_START)
    dataset = load_samples(config)
    check_interrupted()
    n_classes = int(np.unique(dataset.labels).size)
    embed, metrics, notes = fit_sizes(config.embed, config.metrics, len(dataset),
                                      n_total=getattr(dataset, "n_total", None))
    config = config.model_copy(update={"embed": embed, "metrics": metrics})
    logger.info(f"evalkit: {dataset.name}: {len(dataset):,} samples, {n_classes} classes")

    with distributed.session(config.extract.device, timeout_s=config.extract.timeout_s) as session:
        extracted = extract_models(config, dataset, use_cache=use_cache, notes=notes, session=session)
        if extracted is None:  # not rank 0: its slices are in the cache
            return None
        feature_sets = []
        for _mcfg, sets in extracted.items:
            feature_sets.extend(sets)
    device = resolve_device(config.extract.device)
    t_extract = time.perf_counter() - t0
    samples = Samples(dataset.labels, tuple(dataset.label_names), dataset.indices, name=dataset.name,
                      n_total=getattr(dataset, "n_total", None), sample_ids=dataset.sample_ids,
                      seed=config.data.seed if config.data is not None else None)
    thumbnails = None
    if config.report.thumbnails and dataset.load_image is not None:
        from evalkit.explorer import make_thumbnails

        thumbnails = make_thumbnails(dataset.load_image, len(dataset), size=config.report.thumbnail_size,
                                     max_samples=config.report.max_thumbnails)
    result = evaluate_feature_sets(
        feature_sets, samples, embed=embed, metrics=metrics, checks=config.checks, device=device,
        config_yaml=config.to_yaml(), name=config.name, notes=notes, thumbnails=thumbnails,
        provenance={"command": " ".join(argv) if argv else "evalkit report", "extract_s": round(t_extract, 2),
                    **extracted.provenance()})
    result.provenance["duration_s"] = round(time.perf_counter() - t0, 2)
    check_interrupted()
    write_run(Path(out_dir), result)
    return result


def load_samples(config):
    """The dataset of a run (``data:`` or the features files), with OS errors as user errors."""
    from evalkit.data import resolve_dataset

    try:
        return resolve_dataset(config)
    except OSError as exc:  # an unreadable file: a user's problem, named by the OS
        where = exc.filename or (config.data.path if config.data is not None else None)
        key = "data.path" if config.data is not None else "models[].features"
        raise EvalkitError(f"{key}: {where}: cannot read ({exc.strerror or exc})") from exc


@dataclass
class Extracted:
    """What :func:`extract_models` hands on: per model entry, its feature sets or its pieces.

    ``items``: ``[(ModelConfig, list of FeatureSet)]`` (``streamed=False``), or
    ``[(ModelConfig, ModelExtraction or list of FeatureSet)]`` (``streamed=True``: read the
    slices with ``job.pieces(compute=...)``). ``stats``: model name -> ``(images computed,
    seconds)`` summed over ranks (seconds: the slowest rank's).
    """

    items: list
    stats: dict
    world_size: int = 1
    compute: bool = True  # False: rank 0 after a torchrun job reads slices, never computes

    def provenance(self) -> dict:
        rates = {name: round(images / seconds, 1) for name, (images, seconds) in self.stats.items()
                 if images and seconds > 0}
        out = {"images_per_s": rates}
        if self.world_size > 1:
            out["extract_ranks"] = self.world_size
        return out


def extract_models(config, dataset, *, use_cache: bool = True, notes: Optional[list] = None, session=None,
                   streamed: bool = False) -> Optional[Extracted]:
    """Every model entry's features; under torchrun each rank extracts its slice first.

    Single process: each entry is extracted (reusing cached slices). Under torchrun
    (``session``), every rank extracts its contiguous, unpadded slice of every entry into the
    feature cache, all ranks wait for each other (a failure on any rank fails every rank),
    then rank 0 reads the slices back in dataset order; other ranks get None.
    """
    from evalkit.distributed import slice_ranges
    from evalkit.extract import ModelExtraction, extract_model

    ecfg = config.extract
    if session is not None and not ecfg.cache and any(not m.features for m in config.models):
        raise EvalkitError("extract.cache: false cannot run under torchrun: the ranks hand their slices to rank 0 "
                           "through extract.cache_dir; set extract.cache: true")
    jobs, failure = [], None
    try:
        for mcfg in config.models:
            if mcfg.features:
                if session is None or session.ranks.main:
                    jobs.append((mcfg, extract_model(mcfg, dataset, ecfg)))
                continue
            with _named(mcfg):
                job = ModelExtraction(mcfg, dataset, ecfg, use_cache=use_cache, log=logger.info, notes=notes)
                if session is not None and job.cached_full() is None:
                    start, stop = slice_ranges(len(dataset), session.ranks.world_size)[session.ranks.rank]
                    logger.info(f"  {mcfg.name}: {session.ranks}: images {start}-{stop - 1} of {len(dataset)}")
                    job.run(start, stop)
            jobs.append((mcfg, job))
            check_interrupted()
    except Exception as exc:
        if session is None:
            raise
        failure = exc
    stats = {}
    if session is not None:
        mine = {mcfg.name: job.stats() for mcfg, job in jobs if not isinstance(job, list)}
        everyone = session.agree(failure, mine)
        if failure is not None:
            raise failure
        if not session.ranks.main:
            return None
        for per_rank in everyone:
            for name, s in per_rank.items():
                images, seconds = stats.get(name, (0, 0.0))
                stats[name] = (images + s["images"], max(seconds, s["seconds"]))
    compute = session is None
    items = []
    for mcfg, job in jobs:
        if isinstance(job, list) or streamed:
            items.append((mcfg, job))
            continue
        with _named(mcfg):
            items.append((mcfg, job.features(compute=compute)))
        check_interrupted()
        if compute:
            s = job.stats()
            stats[mcfg.name] = (s["images"], s["seconds"])
    for _mcfg, sets in items:
        for fs in [] if streamed else sets:
            check_features(fs, len(dataset))
    return Extracted(items, stats, session.ranks.world_size if session is not None else 1, compute)


@contextmanager
def _named(mcfg):
    """Errors from one model entry's extraction name the entry (a bug stays a bug)."""
    try:
        yield
    except Exception as exc:
        err = _model_error(exc, mcfg)
        if err is None:
            raise
        raise err from exc


def _device_text(device) -> str:
    if device is None:
        return "cpu"
    if device.type == "cuda":
        import torch

        return f"{device} ({torch.cuda.get_device_name(0)})"
    return f"{device} ({platform.processor() or platform.machine()})"


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


