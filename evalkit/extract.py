"""Feature extraction: one forward pass per batch captures every requested layer.

Layers are any ``named_modules`` name, captured with forward hooks (no tracing, so models
whose forward has control flow work). ``penultimate`` names the input of the final
classifier. Outputs are pooled to one vector per sample and cached by content.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from evalkit.errors import EvalkitError, unknown
from evalkit.results import FeatureSet

PENULTIMATE = "penultimate"


# --- device ---------------------------------------------------------------------------------


def resolve_device(name: str = "auto"):
    """``auto``: CUDA, then Apple MPS, then CPU."""
    import torch

    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalkitError("extract.device: 'cuda' asked for but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EvalkitError("extract.device: 'mps' asked for but Apple MPS is not available; use 'auto' or 'cpu'")
    return torch.device(name)


# --- layers ---------------------------------------------------------------------------------


def classifier_name(model) -> Optional[str]:
    """Name of the final classifier module: timm's ``get_classifier()``, else the last Linear."""
    import torch

    names = {id(m): n for n, m in model.named_modules()}
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:
            head = None
        if isinstance(head, torch.nn.Module) and id(head) in names and names[id(head)]:
            return names[id(head)]
    last = None
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            last = n
    return last


def resolve_layers(model, layers) -> dict:
    """Map each requested layer to ``(module_name, "output" | "input")``."""
    names = [n for n, _ in model.named_modules() if n]
    out = {}
    for layer in layers:
        if layer == PENULTIMATE:
            head = classifier_name(model)
            if head is None:
                raise EvalkitError(
                    f"layer 'penultimate': this model has no final Linear classifier; name a layer "
                    f"(`evalkit layers SOURCE` lists them)"
                )
            out[layer] = (head, "input")
        elif layer in names:
            out[layer] = (layer, "output")
        else:
            err = unknown("layer", layer, names + [PENULTIMATE])
            raise EvalkitError(f"{err} — run `evalkit layers SOURCE` to list every name")
    return out


# --- pooling --------------------------------------------------------------------------------


def num_prefix_tokens(model) -> int:
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    return 1 if getattr(model, "cls_token", None) is not None or getattr(model, "class_token", None) is not None else 0


def pool(t, *, spatial: str = "avg", tokens: str = "cls", prefix_tokens: int = 0):
    """Reduce one layer's batch output to ``(batch, n_features)``.

    4-D ``(B, C, H, W)`` maps: global ``avg``/``max`` pooling or ``flatten``.
    3-D ``(B, T, D)`` token sequences: the class token (``cls``, when the model has one; else
    the mean), the ``mean`` of patch tokens, or ``flatten``.
    """
    import torch

    if isinstance(t, (tuple, list)):
        t = next((x for x in t if isinstance(x, torch.Tensor)), None)
    if isinstance(t, dict):
        t = next((x for x in t.values() if isinstance(x, torch.Tensor)), None)
    if t is None:
        raise EvalkitError("layer output holds no tensor; choose another layer")
    t = t.float()
    if t.ndim == 1:
        return t[:, None]
    if t.ndim == 2:
        return t
    if t.ndim == 4:
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


# --- preprocessing --------------------------------------------------------------------------


def _first_conv_channels(model) -> Optional[int]:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return m.in_channels
    return None


def resolve_preprocess(model, pre) -> dict:
    """Preprocessing from the config, else the model's own metadata (timm), else plain tensors."""
    spec = {"resize": None, "crop": None, "mean": None, "std": None, "channels": None, "interpolation": "bilinear"}
    cfg = getattr(model, "pretrained_cfg", None)
    if pre is None and cfg:
        try:
            from timm.data import resolve_model_data_config

            dc = resolve_model_data_config(model)
            size = dc["input_size"][-1]
            crop_pct = dc.get("crop_pct") or 1.0
            spec.update(
                resize=int(round(size / crop_pct)), crop=int(size), mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                channels=int(dc["input_size"][0]), interpolation=dc.get("interpolation", "bilinear"),
            )
        except Exception:
            pass
    elif pre is not None:
        spec.update(pre.model_dump())
    if spec["channels"] is None:
        spec["channels"] = _first_conv_channels(model)
    if spec["mean"] is not None and spec["channels"] and len(spec["mean"]) not in (1, spec["channels"]):
        spec["mean"] = tuple(spec["mean"][:1] * spec["channels"]) if spec["channels"] == 1 else spec["mean"]
        spec["std"] = tuple(spec["std"][:1] * spec["channels"]) if spec["channels"] == 1 else spec["std"]
    return spec


def build_transform(spec: dict):
    """A torchvision transform (PIL image -> float tensor) from a preprocessing spec."""
    from torchvision import transforms as T

    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
              "nearest": T.InterpolationMode.NEAREST}.get(spec.get("interpolation"), T.InterpolationMode.BILINEAR)
    steps = []
    channels = spec.get("channels")
    if channels == 1:
        steps.append(T.Grayscale(1))
    elif channels == 3:
        steps.append(T.Lambda(lambda im: im.convert("RGB")))
    if spec.get("resize"):
        steps.append(T.Resize(spec["resize"], interpolation=interp))
    if spec.get("crop"):
        steps.append(T.CenterCrop(spec["crop"]))
    steps.append(T.ToTensor())
    if spec.get("mean") is not None and spec.get("std") is not None:
        steps.append(T.Normalize(spec["mean"], spec["std"]))
    return T.Compose(steps)


# --- extraction -----------------------------------------------------------------------------


class _Images:
    """A torch-style dataset over ``Dataset.load_image`` with a transform."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.transform(self.dataset.load_image(i))


def run_layers(model, loader, layer_map: dict, *, device, pooling, bf16: bool = False, progress: bool = False):
    """Run ``model`` over ``loader`` once, returning ``{layer: (n_samples, n_features) float32}``."""
    import torch

    modules = dict(model.named_modules())
    captured: dict = {}
    prefix = num_prefix_tokens(model)
    handles = []

    def make_hook(layer, kind):
        def hook_out(_m, _inp, out):
            captured[layer] = pool(out, spatial=pooling.spatial, tokens=pooling.tokens, prefix_tokens=prefix)

        def hook_in(_m, inp):
            captured[layer] = pool(inp[0], spatial=pooling.spatial, tokens=pooling.tokens, prefix_tokens=prefix)

        return hook_in if kind == "input" else hook_out

    for layer, (name, kind) in layer_map.items():
        mod = modules[name]
        hook = make_hook(layer, kind)
        handles.append(mod.register_forward_pre_hook(hook) if kind == "input" else mod.register_forward_hook(hook))
    chunks = {layer: [] for layer in layer_map}
    model.eval().to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and device.type == "cuda") else _null()
    done, start = 0, time.perf_counter()
    bar = _progress(len(loader.dataset)) if progress else None
    try:
        with torch.inference_mode(), autocast:
            for batch in loader:
                captured.clear()
                model(batch.to(device, non_blocking=True))
                for layer in layer_map:
                    if layer not in captured:
                        raise EvalkitError(f"layer {layer!r} was not run by the model's forward; choose another layer")
                    chunks[layer].append(captured[layer].float().cpu().numpy())
                done += batch.shape[0]
                if bar is not None:
                    bar.update(batch.shape[0])
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    return {layer: np.concatenate(c).astype(np.float32) for layer, c in chunks.items()}, done / max(time.perf_counter() - start, 1e-9)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _progress(total: int):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="img", leave=False, disable=not sys.stderr.isatty() or total < 2000)


def _cache_key(mcfg, dataset, spec: dict, checkpoint_digest: str) -> str:
    import evalkit

    payload = {
        "source": mcfg.source, "kwargs": mcfg.kwargs, "checkpoint": checkpoint_digest,
        "layers": list(mcfg.layers), "pooling": mcfg.pooling.model_dump(), "preprocess": spec,
        "data": dataset.fingerprint, "indices": hashlib.sha256(dataset.indices.tobytes()).hexdigest(),
        "version": evalkit.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
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


def extract_model(mcfg, dataset, ecfg, *, use_cache: bool = True, log=None) -> list:
    """Features of every requested layer of one model entry, as :class:`FeatureSet` objects."""
    from evalkit.data import read_feature_file

    if mcfg.features:
        feats, labels, _ = read_feature_file(mcfg.features)
        if feats.shape[0] != dataset.indices.max() + 1 and feats.shape[0] < dataset.indices.max() + 1:
            raise EvalkitError(f"{mcfg.features}: {feats.shape[0]} rows, but the dataset has more samples; expected one row per sample")
        if dataset.features is not None and feats.shape[0] != dataset.features.shape[0] and labels is not None:
            pass
        return [FeatureSet(mcfg.name, mcfg.layers[0] if mcfg.layers != (PENULTIMATE,) else "features", feats[dataset.indices])]
    if dataset.load_image is None:
        raise EvalkitError(f"model {mcfg.name!r}: data.kind 'features' has no images; give this model 'features: FILE'")

    import torch

    from evalkit.models import create_model, file_digest, load_checkpoint

    model = create_model(mcfg.source, kwargs=mcfg.kwargs)
    digest = "random-init"
    if mcfg.checkpoint:
        load_checkpoint(model, mcfg.checkpoint, unsafe_pickle=mcfg.unsafe_pickle, strict=mcfg.strict)
        digest = file_digest(mcfg.checkpoint)
    layer_map = resolve_layers(model, mcfg.layers)
    spec = resolve_preprocess(model, mcfg.preprocess)
    cache_path = Path(ecfg.cache_dir) / f"{mcfg.name}-{_cache_key(mcfg, dataset, spec, digest)}.npz"
    if use_cache and ecfg.cache:
        hit = cache_read(cache_path)
        if hit is not None and set(hit) == set(mcfg.layers):
            if log:
                log(f"  {mcfg.name}: features from cache")
            return [FeatureSet(mcfg.name, layer, hit[layer]) for layer in mcfg.layers]
    device = resolve_device(ecfg.device)
    loader = torch.utils.data.DataLoader(
        _Images(dataset, build_transform(spec)), batch_size=ecfg.batch_size, shuffle=False,
        num_workers=ecfg.num_workers, pin_memory=device.type == "cuda",
    )
    feats, rate = run_layers(model, loader, layer_map, device=device, pooling=mcfg.pooling, bf16=ecfg.bf16, progress=True)
    if log:
        log(f"  {mcfg.name}: {len(dataset)} images on {device} at {rate:,.0f} img/s")
    if ecfg.cache and use_cache is not None:
        cache_write(cache_path, feats)
    return [FeatureSet(mcfg.name, layer, feats[layer]) for layer in mcfg.layers]


def list_layers(source: str, *, kwargs: dict | None = None, input_size=None) -> list:
    """``[(name, type, output shape)]`` for every module, from one dummy forward pass."""
    import torch

    from evalkit.models import create_model

    model = create_model(source, kwargs=kwargs).eval()
    spec = resolve_preprocess(model, None)
    if input_size is None:
        c = spec.get("channels") or 3
        s = spec.get("crop") or spec.get("resize") or 224
        input_size = (1, c, s, s)
    shapes: dict = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, o, n=n: shapes.__setitem__(n, _shape(o)))
        for n, m in model.named_modules() if n
    ]
    try:
        with torch.inference_mode():
            model(torch.zeros(*input_size))
    finally:
        for h in handles:
            h.remove()
    head = classifier_name(model)
    rows = [(n, type(m).__name__, shapes.get(n, "not run")) for n, m in model.named_modules() if n]
    if head is not None:
        rows.append((PENULTIMATE, f"input of {head}", "(features)"))
    return rows


def _shape(o):
    import torch

    if isinstance(o, torch.Tensor):
        return tuple(o.shape)
    if isinstance(o, (tuple, list)) and o and isinstance(o[0], torch.Tensor):
        return tuple(o[0].shape)
    return type(o).__name__
