"""Model sources (``demo:``, ``timm:``, ``torchvision:``, ``python:``) and checkpoint loading.

A registry maps each source prefix to a factory; unknown names raise an error listing the
closest valid ones. Checkpoints load with ``torch.load(weights_only=True)``: nothing is
unpickled unless the config opts in with ``unsafe_pickle: true``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from evalkit.errors import EvalkitError, unknown

SOURCES = ("demo", "timm", "torchvision", "python")


def _create_demo(name: str, kwargs: dict):
    from evalkit.demo_models import DEMO_MODELS

    if name not in DEMO_MODELS:
        raise unknown("demo model", name, DEMO_MODELS)
    return DEMO_MODELS[name](**kwargs)


def _create_timm(name: str, kwargs: dict):
    import timm

    if name not in timm.list_models():
        raise unknown("timm model", name, timm.list_models())
    return timm.create_model(name, pretrained=False, **kwargs)


def _create_torchvision(name: str, kwargs: dict):
    import torchvision.models as tvm

    names = tvm.list_models()
    if name not in names:
        raise unknown("torchvision model", name, names)
    return tvm.get_model(name, weights=None, **kwargs)


def _create_python(name: str, kwargs: dict):
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise EvalkitError(f"source 'python:{name}': expected python:package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EvalkitError(f"source 'python:{name}': cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise unknown(f"factory in {module_name}", attr, public)
    return factory(**kwargs)


FACTORIES: dict[str, Callable[[str, dict], Any]] = {
    "demo": _create_demo,
    "timm": _create_timm,
    "torchvision": _create_torchvision,
    "python": _create_python,
}


def create_model(source: str, *, kwargs: dict | None = None, seed: int = 0):
    """Build the ``torch.nn.Module`` a ``source`` string names, with seeded initial weights."""
    import torch

    prefix, sep, name = source.partition(":")
    if not sep or prefix not in FACTORIES:
        raise unknown("model source prefix", prefix if sep else source, FACTORIES)
    torch.manual_seed(seed)
    try:
        model = FACTORIES[prefix](name, dict(kwargs or {}))
    except EvalkitError:
        raise
    except TypeError as exc:
        raise EvalkitError(f"source {source!r}: bad kwargs {sorted(kwargs or {})}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise EvalkitError(f"source {source!r} returned {type(model).__name__}; expected a torch.nn.Module")
    return model


# --- checkpoints ----------------------------------------------------------------------------

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "ema")
PREFIXES = ("module.", "model.", "_orig_mod.", "net.")


def read_checkpoint(path: str | Path, *, unsafe_pickle: bool = False) -> dict:
    """Read a state dict from ``.pt``/``.pth``/``.bin`` (torch) or ``.safetensors``.

    Training-framework checkpoints that wrap the weights (a ``state_dict``/``model`` key) are
    unwrapped; ``module.``/``model.`` prefixes are stripped later, against the model's keys.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise EvalkitError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise EvalkitError(f"checkpoint {path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as exc:  # UnpicklingError, RuntimeError for zip errors, EOFError for truncation
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
            raise EvalkitError(
                f"checkpoint {path} holds pickled Python objects beyond plain tensors; loading it could run "
                f"code. Re-save it as a state dict or safetensors, or set 'unsafe_pickle: true' on this model "
                f"if you trust the file"
            ) from None
        raise EvalkitError(f"checkpoint {path}: cannot read ({exc.__class__.__name__}: {text.splitlines()[0] if text else ''})") from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for _ in range(3):
        if isinstance(obj, dict) and not _looks_like_state_dict(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], (dict, torch.nn.Module))), None)
            if inner is None:
                break
            obj = inner.state_dict() if isinstance(inner, torch.nn.Module) else inner
    if not isinstance(obj, dict) or not _looks_like_state_dict(obj):
        keys = ", ".join(list(obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
        raise EvalkitError(f"checkpoint {path}: no state dict found (top-level keys: {keys}); expected tensors by parameter name or one of the keys {', '.join(WRAPPER_KEYS)}")
    return obj


def _looks_like_state_dict(d: dict) -> bool:
    import torch

    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _strip_prefixes(state: dict, expected: set) -> dict:
    for _ in range(3):
        if set(state) & expected:
            break
        for p in PREFIXES:
            if all(k.startswith(p) for k in state):
                state = {k[len(p):]: v for k, v in state.items()}
                break
        else:
            break
    return state


def load_checkpoint(model, path: str | Path, *, unsafe_pickle: bool = False, strict: bool = True) -> None:
    """Load weights into ``model``; missing, unexpected or mis-shaped keys are named."""
    state = read_checkpoint(path, unsafe_pickle=unsafe_pickle)
    own = model.state_dict()
    state = _strip_prefixes(state, set(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]

    def few(items):
        return ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")

    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {few(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys: {few(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {few(unexpected)}")
    if problems:
        raise EvalkitError(f"checkpoint {path} does not fit the model: {'; '.join(problems)} (set 'strict: false' to load the matching keys only)")
    model.load_state_dict(state, strict=False)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (keys the feature cache)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
