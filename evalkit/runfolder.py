"""The run folder: out-dir guards, the atomic swap, and the files a run writes.

A run folder holds ``index.html``, ``metrics.json``, ``embeddings.npz`` and ``config.yaml``.
:func:`check_out_dir` refuses, before any work, a folder that cannot become one (a file, a
folder of other things, the working folder); :func:`write_run` renders everything in memory,
writes it into a hidden sibling folder and swaps that into place, so an interrupted or
failing run never leaves a half-written report and never touches the previous one. Files a
user added to an earlier run folder (``notes.md``, ``figs/``) are carried into the new one.
"""
from __future__ import annotations

import io
import json
import math
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.interrupt import check_interrupted

__all__ = ["check_out_dir", "default_out_dir", "clean_stale_siblings", "write_run", "write_folder", "fill_folder",
           "metrics_payload", "embedding_arrays", "RUN_FILES"]


RUN_FILES = ("index.html", "metrics.json")  # every run folder has both
#: Every file a run may write: never carried over from an earlier run as if a user's.
WRITTEN_FILES = frozenset({"index.html", "metrics.json", "embeddings.npz", "config.yaml", "point_scores.npz"})


def default_out_dir(config) -> Path:
    """``reports/out/NAME``; a name that is not a plain folder name needs ``--out``."""
    name = config.name
    if name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("."):
        raise EvalkitError(f"name: {name!r} cannot name a folder under reports/out; pass --out DIR "
                           f"or use a name without '/', '\\' or a leading '.'")
    return Path("reports/out") / name


def check_out_dir(out_dir, *, overwrite: bool = True, what: str = "--out", marker_files=RUN_FILES,
                  kind: str = "evalkit run folder") -> Path:
    """Fail before any work when ``out_dir`` cannot become the run folder.

    It must be a folder or not exist yet, under a writable folder, and an existing folder must
    be an earlier run folder: the run replaces it as a whole, so any other folder (``--out .``,
    a data folder) is refused rather than deleted. ``overwrite=False`` refuses an earlier run
    folder too. ``what`` names the argument in messages (``--out``, or ``out_dir`` from Python).
    ``marker_files`` and ``kind`` say what an earlier output folder of this kind holds and is
    called (``evalkit compare`` writes ``index.html`` and ``comparison.json``).
    """
    import tempfile

    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise EvalkitError(f"{what} {out_dir}: is a file; expected a run folder (or a path that does not exist yet)")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise EvalkitError(f"{what} {out_dir}: {blocker} is a file; expected a folder there")
    if out.is_dir():
        cwd = Path.cwd().absolute()
        if out == cwd or out in cwd.parents:
            raise EvalkitError(f"{what} {out_dir}: is the working folder or holds it; the run replaces its "
                               f"folder as a whole, so expected a folder of its own (e.g. reports/out/NAME)")
        entries = [e.name for e in out.iterdir()]
        if entries and not overwrite:
            raise EvalkitError(f"{what} {out_dir}: exists; expected a new folder (or pass overwrite=True to replace "
                               f"an earlier run folder)")
        if entries and not all(f in entries for f in marker_files):
            raise EvalkitError(f"{what} {out_dir}: exists and is not an {kind} (no {' and '.join(marker_files)}); "
                               f"the run replaces its folder as a whole, so expected a new or earlier {kind}")
    probe_in = out.parent if out.parent.exists() else existing
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=probe_in)).rmdir()
    except OSError as exc:
        raise EvalkitError(f"{what} {out_dir}: cannot write in {probe_in} ({exc.strerror or exc}); expected a "
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


def write_run(out_dir, result) -> Path:
    """Write the run folder ``out_dir`` atomically and return its path.

    Everything is written into a hidden sibling folder first, which then replaces ``out_dir``
    (an existing folder is moved aside and deleted only after the swap). Whatever the earlier
    folder holds besides the files a run writes (a user's ``notes.md``, ``figs/``) is carried
    into the new folder before the swap, hard-linked where the file system allows, else copied.
    If anything fails, the previous folder stays exactly as it was and no temporary folder is
    left behind.

    Raises
    ------
    EvalkitError
        If ``out_dir`` exists and is not a folder, its parent cannot be created or written, or
        writing fails (a full disk: the message names the folder and the system's reason).
    KeyboardInterrupt, evalkit.interrupt.Terminated
        A signal the command line recorded, checked once more right before the swap.
    """
    out, parent = _prepare_parent(out_dir, "run folder")

    # Render everything before touching the disk: a failing render leaves nothing behind.
    from evalkit.report import render_html

    check_interrupted()

    files = {
        "index.html": render_html(result).encode("utf-8"),
        "metrics.json": (json.dumps(metrics_payload(result), indent=2, allow_nan=False)
                         + "\n").encode("utf-8"),
        "embeddings.npz": _npz_bytes(embedding_arrays(result)),
        "config.yaml": str(result.config_yaml).encode("utf-8"),
    }
    if result.point_scores:  # each point's share of trustworthiness and continuity, as the explorer colours them
        files["point_scores.npz"] = _npz_bytes({f"{key}/{metric}": np.asarray(values, dtype=np.float32)
                                                for key, per in result.point_scores.items()
                                                for metric, values in per.items()})
    check_interrupted()
    return _swap_in(out, parent, files, "run folder")


def write_folder(out_dir, files: Mapping[str, bytes], *, what: str = "output folder") -> Path:
    """Write ``files`` (name -> bytes, already rendered) as the folder ``out_dir``, atomically.

    The same temporary-sibling-and-swap as :func:`write_run` (which uses it): an existing folder
    is replaced as a whole only once every file is written, and kept as it was on any failure.
    ``what`` names the folder in messages (``comparison folder``).
    """
    out, parent = _prepare_parent(out_dir, what)
    return _swap_in(out, parent, {str(k): bytes(v) for k, v in files.items()}, what)


def _prepare_parent(out_dir, what: str) -> tuple[Path, Path]:
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise EvalkitError(f"{what} {out}: exists and is not a folder; expected a folder "
                           "(or a path that does not exist yet)")
    parent = out.parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise EvalkitError(f"{what} {out}: {blocker} is a file; expected a folder there")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvalkitError(f"cannot create the folder {parent} for the {what} {out.name}: "
                           f"{exc.strerror or exc}") from None
    return out, parent


def fill_folder(out_dir, fill, *, what: str = "output folder") -> Path:
    """Like :func:`write_folder`, but ``fill(tmp)`` writes the files (streamed, not in memory).

    ``evalkit extract`` streams features files into the temporary folder this way; the swap,
    and what an earlier folder keeps, are :func:`write_folder`'s.
    """
    out, parent = _prepare_parent(out_dir, what)
    return _swap_in(out, parent, {}, what, fill=fill)


def _swap_in(out: Path, parent: Path, files: Mapping[str, bytes], what: str, fill=None) -> Path:
    """Write ``files`` (and whatever ``fill(tmp)`` writes) into a hidden sibling of ``out``, then
    swap it into place; files a user added to an earlier folder are carried over."""
    tmp = _make_sibling(parent, f".{out.name}.tmp-")
    old: Path | None = None
    existed = out.exists()
    swapped = False
    try:
        for name, data in files.items():
            _write_file(tmp / name, data)
        if fill is not None:
            fill(tmp)
        if existed:
            # hard links only where the earlier folder goes away: a linked-to folder stays, so copies
            _carry_user_files(out, tmp, skip=set(files) | set(os.listdir(tmp))
                              | (WRITTEN_FILES if what == "run folder" else set()), link=not out.is_symlink())
        check_interrupted()  # the last moment a Ctrl-C stops the run: from here the swap goes through
        if existed:
            old = parent / f".{out.name}.old-{secrets.token_hex(4)}"
            os.rename(out, old)
        os.rename(tmp, out)
        swapped = True
    except OSError as exc:  # a full disk, a quota, a read-only file system: the user's to fix
        kept = f"the earlier {what} is left as it was" if existed else "nothing was written"
        raise EvalkitError(f"cannot write the {what} {out}: {_os_reason(exc)}; {kept}; "
                           f"{_os_fix(exc)}") from exc
    finally:
        if not swapped:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not out.exists():
                try:
                    os.rename(old, out)  # put the previous run back
                except OSError as exc:
                    raise EvalkitError(f"cannot put the earlier {what} back: {_os_reason(exc)}; it is "
                                       f"{old}: rename it to {out}") from exc
                old = None
        if old is not None:
            if old.is_symlink():  # out_dir was a link to a folder: drop the link, not its target
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
    return out


def metrics_payload(result) -> dict:
    """The content of ``metrics.json``: strict-JSON-ready (NaN and infinities become None)."""
    return {
        "rows": [_jsonable(dict(r)) for r in result.rows],
        "checks": [_jsonable(c.as_dict()) for c in result.checks],
        "provenance": _jsonable(dict(result.provenance)),
        "extras": _jsonable(extras(result)),
    }


def extras(result) -> dict:
    """The report material beside the rows, as metrics.json's ``extras`` holds it."""
    cka = result.cka
    return {
        "per_class_knn": dict(result.per_class_knn),
        "per_class_knn_interval": {key: [None if b is None else list(b) for b in bounds]
                                   for key, bounds in result.per_class_knn_interval.items()},
        "cka": {"keys": list(cka.keys), "matrix": [list(r) for r in cka.matrix], "estimator": cka.estimator,
                "batch_size": cka.batch_size} if cka is not None else None,
        "method_params": dict(result.method_params),
        "stability": dict(result.stability),
        "rnx_curves": {key: {"k": [int(k) for k in c.k], "r_nx": [float(r) for r in c.r]}
                       for key, c in result.rnx_curves.items()},
        "notes": list(result.notes),
        "undefined_reasons": dict(result.undefined_reasons),
        "n_neighbors": result.n_neighbors,
        "knn_k": result.knn_k,
    }


def embedding_arrays(result) -> dict[str, np.ndarray]:
    """The arrays of ``embeddings.npz``.

    ``MODEL/LAYER/METHOD`` -> float32 (n_samples, 2) for the first seed of each embedding,
    ``MODEL/LAYER/METHOD@seedS`` for the others, plus ``labels``, ``indices`` (int64) and
    ``label_names`` (unicode strings).
    """
    arrays: dict[str, np.ndarray] = {}
    for emb in result.embeddings:
        key = emb.key if emb.key not in arrays else f"{emb.key}@seed{emb.seed}"
        arrays[key] = np.asarray(emb.coords, dtype=np.float32)
    arrays["labels"] = np.asarray(result.labels, dtype=np.int64)
    arrays["indices"] = np.asarray(result.indices, dtype=np.int64)
    arrays["label_names"] = np.array([str(n) for n in result.label_names], dtype=str)
    return arrays


def _carry_user_files(old: Path, new: Path, *, skip, link: bool) -> None:
    """Put everything in ``old`` but the files named in ``skip`` (what the run writes) into ``new``.

    Files are hard-linked when ``link`` (instant, no extra space; ``old`` is deleted after the
    swap), else copied with their times; symbolic links stay links. ``old`` is only read.
    """
    def link_or_copy(src, dst, *, follow_symlinks=True):
        if link:
            try:
                os.link(src, dst, follow_symlinks=False)
                return dst
            except OSError:
                pass  # no hard links on this file system, or not permitted: copy
        return shutil.copy2(src, dst, follow_symlinks=follow_symlinks)

    for entry in sorted(os.scandir(old), key=lambda e: e.name):
        if entry.name in skip:
            continue
        src, dst = Path(entry.path), new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif entry.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(src, dst)


def _os_reason(exc: OSError) -> str:
    """The system's reason, e.g. "No space left on device" (shutil.Error: the first file's)."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        src, _, why = exc.args[0][0]
        return f"{why} (copying {src})"
    return exc.strerror or str(exc) or type(exc).__name__


def _os_fix(exc: OSError) -> str:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space on that disk, or write the run elsewhere (--out DIR)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "expected a writable folder: write the run elsewhere (--out DIR)"
    return "write the run elsewhere (--out DIR), or fix the cause and run again"


def _make_sibling(parent: Path, prefix: str) -> Path:
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()  # default mode, so the final folder gets the usual permissions
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise EvalkitError(f"cannot write in {parent}: {exc.strerror or exc}; expected a "
                               "writable folder for the run") from None
    raise EvalkitError(f"cannot create a temporary folder in {parent}")


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN and infinities become None, numpy values become Python ones."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


