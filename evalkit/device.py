"""The torch device to compute on: one resolver for extraction, neighbours and scores.

torch is imported inside the function so ``import evalkit`` stays light. Messages name the
value, not the config key; callers that know the key (``extract.device``) prefix it.
"""
from __future__ import annotations

import os
import sys

from evalkit.errors import InputError

#: Device nodes and driver files whose presence means a GPU torch might use (NVIDIA, ROCm, WSL).
_GPU_MARKERS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


class CPU(str):
    """The CPU as :func:`resolve_device` gives it to a process that has not loaded torch and
    has no GPU to find: the string ``"cpu"`` with a ``type`` attribute, as a
    ``torch.device`` has. torch takes it wherever it takes a device; evalkit's CPU code paths
    (numpy and numba) never import torch for it (1.3 s on this machine)."""

    type = "cpu"
    index = None

    def __new__(cls, *_):
        return super().__new__(cls, "cpu")

    def __reduce__(self):  # pickles (to a DataLoader worker, a spawned process) as itself
        return CPU, ()

    def __repr__(self) -> str:
        return "device(type='cpu')"


def _no_gpu_without_torch() -> bool:
    """True when no GPU can be there, judged without importing torch: torch not loaded yet,
    Linux, and none of the GPU drivers' device nodes present. (Elsewhere, or with any of
    them, torch is asked.)"""
    return "torch" not in sys.modules and sys.platform.startswith("linux") and not any(
        os.path.exists(path) for path in _GPU_MARKERS)


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
    torch.device, or :class:`CPU`
        :class:`CPU` for ``None`` / ``"auto"`` when torch is not loaded and no GPU driver is
        present (Linux): finding that out does not import torch.

    Raises
    ------
    InputError
        Not a device name, or CUDA / MPS asked for but not available.
    """
    auto = device is None or (isinstance(device, str) and device == "auto")
    if (auto and _no_gpu_without_torch()) or (type(device) is str and device == "cpu" and "torch" not in sys.modules):
        return CPU()
    if isinstance(device, CPU):
        return device
    import torch

    if auto:
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
