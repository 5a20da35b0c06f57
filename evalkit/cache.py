"""The feature cache: content keys, and files verified by digest on every read.

A model entry's features are stored in ``extract.cache_dir`` under a key made of everything
that can change them (for a ``python:`` model also its code and initial weights), so
re-running after changing one model recomputes only that model. Files are written
atomically (temp file + rename) and never served when truncated or altered.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np


def cache_key(mcfg, dataset, spec: dict, checkpoint_digest: str, *, bf16: bool = False) -> str:
    """Content key of one model entry's features (everything that can change them)."""
    import evalkit

    payload = {
        "source": mcfg.source, "kwargs": mcfg.kwargs, "checkpoint": checkpoint_digest,
        "layers": list(mcfg.layers), "pooling": mcfg.pooling.model_dump(), "preprocess": spec,
        "data": dataset.fingerprint, "indices": hashlib.sha256(np.ascontiguousarray(dataset.indices).tobytes()).hexdigest(),
        "bf16": bool(bf16), "version": evalkit.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def python_model_digest(source: str, model) -> str:
    """What a ``python:module:factory`` model is made of, beyond its source string.

    The contents of the module's file and of the file defining the model's class (editing
    either changes the key), and a digest of the state_dict as the factory created it (seeded
    random weights, or weights the factory loaded itself).
    """
    import inspect
    import sys

    import torch

    h = hashlib.sha256()
    module_name = source.split(":")[1] if source.count(":") >= 2 else ""
    files = [getattr(sys.modules.get(module_name), "__file__", None)]
    try:
        files.append(inspect.getsourcefile(type(model)))
    except (TypeError, OSError):
        pass
    for f in dict.fromkeys(f for f in files if f):
        try:
            h.update(f"{f}|".encode() + hashlib.sha256(Path(f).read_bytes()).digest())
        except OSError:
            h.update(f"{f}|unreadable".encode())
    for name, t in model.state_dict().items():
        h.update(f"|{name}|{type(t).__name__}".encode())
        try:
            h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        except Exception:  # lazy (uninitialized), meta or quantized tensors: their name and type only
            pass
    return h.hexdigest()[:32]


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cache_read(path: Path) -> Optional[dict]:
    """Cached arrays, or None when absent, truncated or not matching their stored digest."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "__digest__"}
            digest = str(z["__digest__"])
    except Exception:
        return None
    return arrays if _digest(arrays) == digest else None


def cache_write(path: Path, arrays: dict) -> None:
    """Write atomically (temp file + rename) with a digest verified on read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, __digest__=np.array(_digest(arrays)), **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
