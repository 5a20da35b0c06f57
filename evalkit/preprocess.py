"""Image preprocessing for a model: from the config, else the model's metadata, else a default.

Order of precedence, per model entry:

1. ``preprocess:`` in the config, used as written (unset keys mean "don't"); only the channel
   count falls back to the model's.
2. The model's own metadata: timm's ``resolve_model_data_config`` (corrected for models built
   with a custom ``in_chans``/``img_size``, whose metadata still describes ImageNet), or the
   transforms of a torchvision architecture's default weights (read without downloading).
3. Plain tensors at the images' own size, with the channel count of the model's first conv.
"""
from __future__ import annotations

import math
from typing import Optional

from evalkit.errors import EvalkitError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def first_conv_channels(model) -> Optional[int]:
    """Input channels of the model's first convolution (timm's ``first_conv`` when named)."""
    import torch

    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("first_conv")
    modules = dict(model.named_modules())
    for name in [names] if isinstance(names, str) else list(names or ()):
        conv = modules.get(name)
        if isinstance(conv, torch.nn.modules.conv._ConvNd):
            return int(conv.in_channels)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return None


def fixed_input_size(model) -> Optional[tuple]:
    """``(H, W)`` a model insists on (a timm ViT's patch embedding), or None."""
    patch = getattr(model, "patch_embed", None)
    size = getattr(patch, "img_size", None)
    if size is None or getattr(patch, "dynamic_img_size", False) or getattr(patch, "strict_img_size", True) is False:
        return None
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return tuple(int(s) for s in size)


def _size(h_w):
    """An int for a square size, else ``[H, W]`` (JSON-friendly for the cache key)."""
    h, w = h_w
    return int(h) if h == w else [int(h), int(w)]


def _from_timm(model, channels: Optional[int]) -> Optional[dict]:
    if not getattr(model, "pretrained_cfg", None):
        return None
    try:
        from timm.data import resolve_model_data_config

        dc = resolve_model_data_config(model)
    except Exception:
        return None
    meta_c, meta_h, meta_w = (int(v) for v in dc["input_size"])
    c = channels or meta_c
    fixed = fixed_input_size(model)
    if fixed is not None and fixed != (meta_h, meta_w):
        # built with a custom img_size: the metadata's crop_pct describes ImageNet, not this model
        resize = crop = _size(fixed)
    else:
        crop_pct = dc.get("crop_pct") or 1.0
        crop = _size((meta_h, meta_w))
        resize = int(math.floor(min(meta_h, meta_w) / crop_pct))
    mean, std = tuple(dc["mean"]), tuple(dc["std"])
    if len(mean) != c:  # custom in_chans: ImageNet's per-channel statistics do not apply
        mean, std = (sum(mean) / len(mean),) * c, (sum(std) / len(std),) * c
    interp = dc.get("interpolation", "bilinear")
    return {"resize": resize, "crop": crop, "mean": mean, "std": std, "channels": c,
            "interpolation": interp if interp in INTERPOLATIONS else "bilinear"}


def _from_torchvision(name: str) -> Optional[dict]:
    try:
        import torchvision.models as tvm

        t = tvm.get_model_weights(name).DEFAULT.transforms()
        crop, resize = t.crop_size[0], t.resize_size[0]
        mean, std, interp = tuple(t.mean), tuple(t.std), t.interpolation.value
    except Exception:  # no weights enum, or not an image-classification transform
        return None
    return {"resize": int(resize), "crop": int(crop), "mean": mean, "std": std, "channels": 3,
            "interpolation": interp if interp in INTERPOLATIONS else "bilinear"}


def resolve_preprocess(model, pre=None, *, source: Optional[str] = None) -> dict:
    """The preprocessing spec for ``model``: keys resize, crop, mean, std, channels, interpolation.

    Parameters
    ----------
    model : torch.nn.Module
    pre : evalkit.config.PreprocessConfig or None
        The model entry's ``preprocess:``; when given it wins.
    source : str, optional
        The model's source string; ``torchvision:NAME`` enables torchvision's metadata.

    Returns
    -------
    dict
        Plain JSON-friendly values (it is part of the feature-cache key); ``origin`` says
        where it came from (``config``, ``timm``, ``torchvision`` or ``default``).
    """
    channels = first_conv_channels(model)
    spec = None
    if pre is not None:
        spec = dict(pre.model_dump(), origin="config")
    else:
        spec = _from_timm(model, channels)
        if spec is not None:
            spec["origin"] = "timm"
        elif source and source.startswith("torchvision:"):
            spec = _from_torchvision(source.partition(":")[2])
            if spec is not None:
                spec["origin"] = "torchvision"
    if spec is None:
        spec = {"resize": None, "crop": None, "mean": None, "std": None, "channels": None,
                "interpolation": "bilinear", "origin": "default"}
    if spec["channels"] is None:
        spec["channels"] = channels if channels in (1, 3) else None
    for key in ("mean", "std"):
        values = spec[key]
        if values is None:
            continue
        spec[key] = [float(v) for v in values]
        c = spec["channels"]
        if c is not None and len(values) not in (1, c):
            raise EvalkitError(f"preprocess.{key}: {len(values)} values for a {c}-channel input; expected 1 or {c}")
    if (spec["mean"] is None) != (spec["std"] is None):
        raise EvalkitError("preprocess: give both 'mean' and 'std', or neither")
    return spec


def _depth_scale(im):
    """``(scale, rule)`` for a high-bit-depth image: a factor, or None for per-image min-max."""
    import numpy as np

    mode = im.mode
    if mode.startswith("I;16"):
        return 1 / 257, f"mode {mode} (16-bit): divided by 257"
    if mode not in ("I", "F"):
        return 1.0, None
    a = np.asarray(im)
    finite = a[np.isfinite(a)] if mode == "F" else a
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode == "I" and lo >= 0 and hi <= 65535:
        return 1 / 257, "mode I (integer, values within 0..65535): read as 16-bit, divided by 257"
    if mode == "F" and lo >= 0 and hi <= 1:
        return 255.0, "mode F (float, values within 0..1): multiplied by 255"
    return None, f"mode {mode} (values {lo:g}..{hi:g}, outside the mode's usual range): min-max scaled per image"


def depth_rule(im) -> Optional[str]:
    """How :func:`to_8bit` maps ``im`` to 0..255, in words; None for 8-bit modes."""
    return _depth_scale(im)[1]


def to_8bit(im):
    """A PIL image of mode ``I;16*``, ``I`` or ``F`` as an 8-bit ``L`` image, scaled, not clipped.

    PIL's ``convert("L")`` clips these modes (a 16-bit image turns white), so values are scaled
    by the mode's full range, the same for every image of a dataset: ``I;16`` divided by 257;
    ``I`` divided by 257 when its values lie within 0..65535 (how PIL opens 16-bit PNG/TIFF);
    ``F`` multiplied by 255 when its values lie within 0..1. Anything else is min-max scaled
    per image (:func:`depth_rule` says which rule applied). Other modes are returned as they are.
    """
    import numpy as np
    from PIL import Image

    scale, rule = _depth_scale(im)
    if rule is None:
        return im
    a = np.asarray(im).astype(np.float64)
    a[~np.isfinite(a)] = 0.0
    if scale is None:
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    else:
        a = a * scale
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


class _ToMode:
    """Convert a PIL image to ``L`` (1 channel) or ``RGB`` (3); picklable for DataLoader workers.

    High-bit-depth images (``I;16``, ``I``, ``F``) are first scaled to 8 bits by :func:`to_8bit`.
    """

    def __init__(self, channels: Optional[int]):
        self.channels = channels

    def __call__(self, im):
        im = to_8bit(im)
        if self.channels == 1:
            return im if im.mode == "L" else im.convert("L")
        if self.channels == 3 or im.mode not in ("L", "RGB"):
            return im if im.mode == "RGB" else im.convert("RGB")
        return im

    def __repr__(self):
        return f"{type(self).__name__}(channels={self.channels})"


def build_transform(spec: dict):
    """A torchvision transform (PIL image -> float tensor (C, H, W)) from a preprocessing spec."""
    from torchvision import transforms as T

    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
              "nearest": T.InterpolationMode.NEAREST}.get(spec.get("interpolation"), T.InterpolationMode.BILINEAR)

    def size(v):
        return tuple(v) if isinstance(v, (list, tuple)) else v

    steps = [_ToMode(spec.get("channels"))]
    if spec.get("resize"):
        steps.append(T.Resize(size(spec["resize"]), interpolation=interp))
    if spec.get("crop"):
        steps.append(T.CenterCrop(size(spec["crop"])))
    steps.append(T.ToTensor())
    if spec.get("mean") is not None and spec.get("std") is not None:
        steps.append(T.Normalize(spec["mean"], spec["std"]))
    return T.Compose(steps)
