"""Model sources (``demo:``, ``timm:``, ``torchvision:``, ``python:``) and checkpoint loading.

A registry maps each source prefix to a factory; unknown names raise an error listing the
closest valid ones. Nothing is downloaded: ``pretrained``/``weights`` arguments are refused.
Checkpoints load with ``torch.load(weights_only=True)``: nothing is unpickled unless the
config opts in with ``unsafe_pickle: true``.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from evalkit.errors import EvalkitError, unknown

SOURCES = ("demo", "timm", "torchvision", "python")

# keyword arguments that would make a library fetch weights from the network
_DOWNLOAD_KWARGS = {
    "timm": ("pretrained", "pretrained_cfg_overlay", "checkpoint_path"),
    "torchvision": ("weights", "weights_backbone", "pretrained"),
}


def _create_demo(name: str, kwargs: dict):
    from evalkit.demo_models import DEMO_MODELS

    if name not in DEMO_MODELS:
        raise unknown("demo model", name, DEMO_MODELS)
    return DEMO_MODELS[name](**kwargs)


def _create_timm(name: str, kwargs: dict):
    import timm

    if not timm.is_model(name):
        raise unknown("timm model", name, timm.list_models())
    return timm.create_model(name, pretrained=False, **kwargs)


def _create_torchvision(name: str, kwargs: dict):
    import torchvision.models as tvm

    names = tvm.list_models()
    if name not in names:
        raise unknown("torchvision model", name, names)
    return tvm.get_model(name, weights=None, **kwargs)


def _import_user_module(module_name: str, source: str):
    """Import ``module_name``; the working directory is tried too (as ``python -m`` does)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        if exc.name not in (top, module_name) or cwd in sys.path:
            raise EvalkitError(f"source {source!r}: cannot import {module_name!r} ({exc})") from exc
        sys.path.append(cwd)  # appended, so it never shadows an installed package
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc2:
            raise EvalkitError(
                f"source {source!r}: cannot import {module_name!r} ({exc2}); is it installed, on "
                f"PYTHONPATH, or under the directory evalkit runs in?") from None
    except Exception as exc:  # the module itself failed while importing
        raise EvalkitError(f"source {source!r}: importing {module_name!r} failed "
                           f"({exc.__class__.__name__}: {exc})") from exc


def _create_python(name: str, kwargs: dict):
    source = f"python:{name}"
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise EvalkitError(f"source {source!r}: expected python:package.module:factory "
                           f"(a torch.nn.Module class or a function returning one)")
    module = _import_user_module(module_name, source)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise unknown(f"factory in {module_name}", attr, public)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            accepted = [p for p in signature.parameters if p != "self"]
            raise EvalkitError(f"source {source!r}: kwargs {sorted(kwargs)} do not fit {attr}({', '.join(accepted)}) "
                               f"({exc})") from None
    return factory(**kwargs)


FACTORIES: dict[str, Callable[[str, dict], Any]] = {
    "demo": _create_demo,
    "timm": _create_timm,
    "torchvision": _create_torchvision,
    "python": _create_python,
}


def create_model(source: str, *, kwargs: dict | None = None, seed: int = 0):
    """Build the ``torch.nn.Module`` a ``source`` string names, with seeded initial weights.

    Parameters
    ----------
    source : str
        ``demo:NAME``, ``timm:NAME``, ``torchvision:NAME`` or ``python:package.module:factory``.
    kwargs : dict, optional
        Keyword arguments of the factory (``num_classes``, ``in_chans``, ...).
    seed : int
        Seeds torch before the model is built, so random-init weights are reproducible.

    Returns
    -------
    torch.nn.Module
    """
    import torch

    prefix, sep, name = source.partition(":")
    if not sep:
        raise EvalkitError(f"source {source!r}: expected PREFIX:NAME with PREFIX one of {', '.join(FACTORIES)} "
                           f"(e.g. timm:{source} or torchvision:{source})")
    if prefix == "memory":  # what evalkit.evaluate() records for models that lived in a Python process
        raise EvalkitError(f"source {source!r}: a model passed in memory to the Python API; a config cannot load "
                           f"it: name a factory (python:module:factory) and a checkpoint, or a features file")
    if prefix not in FACTORIES:
        raise unknown("model source prefix", prefix, FACTORIES)
    kwargs = dict(kwargs or {})
    for key in _DOWNLOAD_KWARGS.get(prefix, ()):
        if kwargs.get(key):
            raise EvalkitError(f"source {source!r}: kwargs.{key} would download weights; evalkit never "
                               f"downloads: save the weights to a file and set 'checkpoint:'")
    torch.manual_seed(seed)
    try:
        model = FACTORIES[prefix](name, kwargs)
    except EvalkitError:
        raise
    except TypeError as exc:
        raise EvalkitError(f"source {source!r}: bad kwargs {sorted(kwargs)}: {exc}") from exc
    except Exception as exc:  # a factory rejecting its arguments (timm asserts, ValueError, ...)
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise EvalkitError(f"source {source!r}: building the model failed ({exc.__class__.__name__}: {text})") from exc
    if not isinstance(model, torch.nn.Module):
        raise EvalkitError(f"source {source!r} returned {type(model).__name__}; expected a torch.nn.Module")
    return model


# --- checkpoints ----------------------------------------------------------------------------

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "ema", "state_dict_ema")
PREFIXES = ("module.", "model.", "_orig_mod.", "net.")  # preferred on a tie
# buffers older checkpoints lack and that do not change inference
_OPTIONAL_KEYS = re.compile(r"(^|\.)num_batches_tracked$")


def read_checkpoint(path: str | Path, *, unsafe_pickle: bool = False) -> dict:
    """Read a state dict from ``.pt``/``.pth``/``.bin``/``.ckpt`` (torch) or ``.safetensors``.

    Training-framework checkpoints that wrap the weights (``{"state_dict": ..., "epoch": 3,
    "optimizer_states": [...]}``) are unwrapped; values that are not tensors are dropped.
    ``module.``/``model.`` prefixes are stripped later, against the model's keys.

    Parameters
    ----------
    path : str or Path
    unsafe_pickle : bool
        Load with ``weights_only=False`` (runs code in the file); only for trusted files.

    Returns
    -------
    dict of str to torch.Tensor
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise EvalkitError(f"checkpoint {path} not found")
    if not path.is_file():
        raise EvalkitError(f"checkpoint {path} is not a file; expected a .pt, .pth, .ckpt or .safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:
            raise EvalkitError(f"checkpoint {path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
        except Exception as exc:  # UnpicklingError, RuntimeError for zip errors, EOFError for truncation
            text = str(exc)
            if re.search(r"unsupported global", text, re.I):
                found = re.search(r"GLOBAL:? (\S+)", text)
                what = f" ({found.group(1)})" if found else ""
                raise EvalkitError(
                    f"checkpoint {path} holds pickled Python objects{what} beyond tensors and plain "
                    f"containers; loading it could run code. Re-save it as a state dict or safetensors, "
                    f"or set 'unsafe_pickle: true' on this model if you trust the file") from None
            first = next((line for line in text.splitlines() if line.strip()), "")
            first = re.split(r"(?<=[.!?])\s", first, maxsplit=1)[0]  # the first sentence, whole
            raise EvalkitError(f"checkpoint {path}: cannot read, truncated or not a torch file "
                               f"({exc.__class__.__name__}: {first})") from None
    state = _find_state_dict(obj)
    if state is None:
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise EvalkitError(f"checkpoint {path}: no state dict found (top level: {keys}); expected tensors by "
                           f"parameter name, or one of the keys {', '.join(WRAPPER_KEYS)} holding them")
    return state


def _find_state_dict(obj, depth: int = 0):
    """The ``{name: tensor}`` mapping inside ``obj`` (a module, a state dict or a wrapper)."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if not isinstance(obj, dict) or depth > 3:
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    nested = [k for k, v in obj.items() if isinstance(v, (dict, torch.nn.Module))]
    if tensors and not nested:
        return tensors
    for key in [k for k in WRAPPER_KEYS if k in obj] + nested:
        found = _find_state_dict(obj[key], depth + 1)
        if found:
            return found
    return tensors or None


def _strip_prefixes(state: dict, expected: set) -> dict:
    """Drop the wrapper prefix (``module.``, ``model.``, ``module.model.``...) that best matches the model.

    Keys outside the chosen prefix (a Lightning module's loss, a teacher network) are dropped.
    """
    from collections import Counter

    direct = len(set(state) & expected)
    if direct == len(state):
        return state
    votes: Counter = Counter()  # prefix -> how many keys it turns into one of the model's keys
    for k in state:
        parts = k.split(".")
        for j in range(1, min(len(parts), 4)):
            if ".".join(parts[j:]) in expected:
                votes[".".join(parts[:j]) + "."] += 1
    if not votes:
        return state
    prefix, score = max(votes.items(), key=lambda kv: (kv[1], kv[0] in PREFIXES))
    if score <= direct:
        return state
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _differs_in_width_only(a, b) -> bool:
    """Shapes ``a`` (checkpoint) and ``b`` (model) that differ in dim 0 (the output width) only."""
    return len(a) == len(b) >= 1 and a[0] != b[0] and tuple(a[1:]) == tuple(b[1:])


def classifier_width_mismatch(model, state: dict) -> tuple | None:
    """``(head, checkpoint width, model width)`` when the final classifier's output width is all
    that keeps ``state`` from fitting ``model``'s shapes; else None.

    ``head`` is :func:`evalkit.extract.classifier_name`; its ``weight`` must differ in dim 0
    only, and its ``bias`` (if any) in the same way; no other key may be mis-shaped.
    """
    from evalkit.extract import classifier_name

    own = model.state_dict()
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    head = classifier_name(model) if mismatched else None
    if head is None:
        return None
    weight, bias = f"{head}.weight", f"{head}.bias"
    if weight not in mismatched or not set(mismatched) <= {weight, bias}:
        return None
    if bias in own and bias in state and bias not in mismatched:
        return None  # a weight of another width with a bias of the model's width: not a width change
    if not all(_differs_in_width_only(tuple(state[k].shape), tuple(own[k].shape)) for k in mismatched):
        return None
    widths = {int(state[k].shape[0]) for k in mismatched}
    if len(widths) != 1:
        return None
    return head, widths.pop(), int(own[weight].shape[0])


def with_classifier_width(model, head: str, width: int, *, source: str | None = None, kwargs: dict | None = None):
    """``model`` with ``width`` outputs in its final classifier ``head``.

    timm and torchvision models are built again by their factory with ``num_classes=width``
    (both take it, and some size more than the last Linear from it); any other model gets its
    final ``Linear`` replaced in place by one of the same input width.
    """
    import torch

    prefix = (source or "").partition(":")[0]
    if prefix in ("timm", "torchvision"):
        return create_model(source, kwargs={**(kwargs or {}), "num_classes": width})
    parent_name, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if not isinstance(old, torch.nn.Linear):
        raise EvalkitError(f"the classifier {head!r} is a {type(old).__name__}, not a Linear; build the model "
                           f"with the checkpoint's {width} classes (kwargs: {{num_classes: {width}}})")
    new = torch.nn.Linear(old.in_features, width, bias=old.bias is not None,
                          device=old.weight.device, dtype=old.weight.dtype)
    setattr(parent, attr, new)
    return model


def _takes_num_classes(source: str) -> bool:
    """Whether the factory of ``source`` accepts ``num_classes`` (timm, torchvision and demo models do)."""
    prefix, _, name = source.partition(":")
    if prefix != "python":
        return True
    module_name, _, attr = name.partition(":")
    try:
        params = inspect.signature(getattr(importlib.import_module(module_name), attr)).parameters
    except Exception:  # the model was built from it, so this is only a builtin without a signature
        return False
    return "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _flow(kwargs: dict) -> str:
    """``kwargs`` as a one-line YAML mapping, the way a config spells it."""
    import yaml

    return yaml.safe_dump(dict(kwargs), default_flow_style=True, sort_keys=False, width=10**6).strip()


def load_checkpoint(model, path: str | Path, *, unsafe_pickle: bool = False, strict: bool = True,
                    source: str | None = None, kwargs: dict | None = None, name: str | None = None) -> dict:
    """Load weights into ``model``; missing, unexpected or mis-shaped keys are named with shapes.

    A checkpoint whose only difference is the final classifier's output width (a model
    fine-tuned on 3 classes, built with the source's default 1000) loads: the classifier gets
    the checkpoint's width (see :func:`with_classifier_width`) and a note says so, unless
    ``kwargs`` sets ``num_classes`` explicitly to another width, which is an error.

    Parameters
    ----------
    model : torch.nn.Module
    path : str or Path
    unsafe_pickle : bool
        See :func:`read_checkpoint`.
    strict : bool
        ``True``: every key must match by name and shape. ``False``: load the keys that
        match and skip the rest (at least one must match).
    source, kwargs : optional
        How ``model`` was built (:func:`create_model`): a timm or torchvision model is built
        again for a classifier of another width; the messages name the kwargs.
    name : str, optional
        The model entry's name, for the note.

    Returns
    -------
    dict
        ``loaded`` (count), ``missing``, ``unexpected``, ``mismatched`` (lists of key names),
        ``notes`` (one-line notes for the run's report), ``model`` (the module that holds the
        weights: ``model`` itself, or a rebuilt one; use this one).
    """
    state = read_checkpoint(path, unsafe_pickle=unsafe_pickle)
    kwargs = dict(kwargs or {})
    state = _strip_prefixes(state, set(model.state_dict()))
    notes: list = []
    width = classifier_width_mismatch(model, state)
    if width is not None and "num_classes" not in kwargs:
        head, new, old = width
        model = with_classifier_width(model, head, new, source=source, kwargs=kwargs)
        who = f"model {name!r}: " if name else ""
        if source is None:
            why = f"the model had {old}"
        elif _takes_num_classes(source):
            why = f"the source builds {old} by default; set kwargs: {{num_classes: {new}}} to silence this"
        else:
            why = f"the source builds {old} and its factory takes no num_classes"
        notes.append(f"{who}classifier width {new} taken from the checkpoint ({why})")
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _OPTIONAL_KEYS.search(k)]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]

    def few(items, shapes=False):
        shown = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})" if shapes
                 else f"{k} {tuple((own.get(k) if k in own else state[k]).shape)}" for k in items[:4]]
        return ", ".join(shown) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")

    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {few(mismatched, shapes=True)}")
    if missing:
        problems.append(f"missing keys: {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {few(unexpected)}")
    usable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if problems and (strict or not usable):
        raise EvalkitError(f"checkpoint {path} does not fit the model: {'; '.join(problems)}"
                           f"{_fit_hint(usable, mismatched, width, kwargs)}")
    model.load_state_dict(usable, strict=False)
    return {"loaded": len(usable), "missing": missing, "unexpected": unexpected, "mismatched": mismatched,
            "notes": notes, "model": model}


def _fit_hint(usable, mismatched, width, kwargs) -> str:
    """The likely fix of a checkpoint that does not fit, most likely first."""
    if not usable:
        return " (no key matches: is this the checkpoint of another model?)"
    partial = "; 'strict: false' loads only the keys that match"
    if width is not None and "num_classes" in kwargs:
        return (f"; likely fix: kwargs has num_classes: {kwargs['num_classes']} but the checkpoint's classifier "
                f"has {width[1]} outputs; set num_classes: {width[1]} in kwargs (or drop it)")
    now = f"this model sets {_flow(kwargs)}" if kwargs else "this model sets none"
    if mismatched:
        return (f"; likely fix: set kwargs to the ones it was trained with (e.g. in_chans, width, num_classes; "
                f"{now}), or the source it was trained as{partial}")
    return (f"; likely fix: the source it was trained as (another variant has other layers), or the kwargs it was "
            f"trained with ({now}){partial}")


# --- file digests ---------------------------------------------------------------------------

_DIGEST_INDEX = "file-digests.json"


def file_digest(path: str | Path, *, cache_dir: str | Path | None = None) -> str:
    """SHA-256 of a file's bytes (keys the feature cache).

    Hashing a multi-gigabyte checkpoint takes seconds, so with ``cache_dir`` the digest is
    remembered by (absolute path, size, modification time in ns, inode) in
    ``cache_dir/file-digests.json``; a rewritten file changes its mtime and is hashed again.
    """
    import hashlib

    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    index_path = Path(cache_dir) / _DIGEST_INDEX if cache_dir is not None else None
    index = _read_digest_index(index_path)
    if key in index:
        return index[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if index_path is not None:
        stale = str(path.resolve()) + "|"
        index = {k: v for k, v in index.items() if not k.startswith(stale)}
        index[key] = digest
        _write_digest_index(index_path, index)
    return digest


def _read_digest_index(index_path) -> dict:
    if index_path is None:
        return {}
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)}


def _write_digest_index(index_path: Path, index: dict) -> None:
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(f".{index_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=0, sort_keys=True), encoding="utf-8")
        os.replace(tmp, index_path)
    except OSError:  # a read-only cache folder only costs a re-hash next time
        pass
