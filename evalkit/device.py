"""The torch device to compute on: one resolver for extraction, neighbours and scores.

torch is imported inside the function so ``import evalkit`` stays light. Messages name the
value, not the config key; callers that know the key (``extract.device``) prefix it.
"""
from __future__ import annotations

from evalkit.errors import InputError


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device=None):
    """The torch device to compute on.

    Parameters
    ----------
    device : None, str or torch.device
        ``None`` or ``"auto"`` picks CUDA, then Apple MPS, then CPU; anything else is passed
        to ``torch.device`` and must be available.

    Returns
    -------
    torch.device

    Raises
    ------
    InputError
        Not a device name, or CUDA / MPS asked for but not available.
    """
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"{device!r} is not a torch device; expected auto, cpu, cuda or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{str(device)!r} asked for but no CUDA device is available; use 'auto' or 'cpu'")
    if dev.type == "mps" and not _mps_available():
        raise InputError(f"{str(device)!r} asked for but Apple MPS is not available; use 'auto' or 'cpu'")
    return dev
