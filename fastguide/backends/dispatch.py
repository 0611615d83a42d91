"""Which kernel backends exist, which can run here, and which one a call uses.

A backend is a module of this package exposing the functions of ``fastguide.backends.reference`` with the
same signatures: ``guided_step(StepArgs)``, ``cfg_rescale_factor``, ``temperature_lse_grad`` and
``per_sample_rms``. Arguments arrive checked by ``fastguide.core.ops``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, Tuple, Union

import torch

BACKEND_NAMES = ("torch", "cpp", "triton", "cuda")

# Module implementing each backend, relative to this package.
_MODULES = {
    "torch": ".reference",
    "cpp": ".cpp",
    "triton": ".triton",
    "cuda": ".cuda",
}


def _probe(name: str) -> Tuple[bool, str, ModuleType | None]:
    try:
        module = importlib.import_module(_MODULES[name], __package__)
    except ImportError as exc:  # a backend that was not built or whose toolkit is missing
        return False, f"cannot import: {exc}", None
    why_not = getattr(module, "unavailable_reason", lambda: "")()
    return (not why_not), why_not, module


_cache: Dict[str, Tuple[bool, str, ModuleType | None]] = {}


def _status(name: str) -> Tuple[bool, str, ModuleType | None]:
    if name not in _cache:
        _cache[name] = _probe(name)
    return _cache[name]


def backends(reasons: bool = False) -> Union[Dict[str, bool], Dict[str, str]]:
    """Report which backends can run here.

    >>> fastguide.backends()                 # {'torch': True, 'cpp': True, 'triton': False, 'cuda': False}
    >>> fastguide.backends(reasons=True)     # {'triton': 'no CUDA device (set TRITON_INTERPRET=1 ...)', ...}

    With ``reasons=True`` each value is ``""`` for an available backend, else why it is missing.
    """
    if reasons:
        return {name: _status(name)[1] for name in BACKEND_NAMES}
    return {name: _status(name)[0] for name in BACKEND_NAMES}


def runs_on(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on tensors of ``device`` (whether it is built is ``backends()``)."""
    return _runs_on_type(name, device.type)


def _runs_on_type(name: str, device_type: str) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return device_type == "cpu"
    if name == "cuda":
        return device_type == "cuda"
    if name == "triton":
        return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return False


# Preference order of ``backend="auto"`` per device type. CPU: measured (benchmarks/results/step_cpu.csv: the
# C++ kernel at 1.2x torch's copy bandwidth). CUDA: provisional, not yet measured (no GPU has been available):
# the hand-written kernel first for its lower launch cost, Triton next; benchmarks/step_gpu.py measures both
# against copy bandwidth and this order is to follow its results.
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}


_DEVICE_TYPES: Dict[torch.device, str] = {}


def resolve(backend: str, device: torch.device) -> ModuleType:
    """The module of the backend a call on ``device`` uses; raises if a forced one cannot run here."""
    if backend == "auto":
        device_type = _DEVICE_TYPES.get(device)
        if device_type is None:  # (device.type makes a new str on every read: ~1 us of every step)
            device_type = _DEVICE_TYPES[device] = device.type
        for name in _AUTO_ORDER.get(device_type, ("torch",)):
            ok, _, module = _status(name)
            if ok and _runs_on_type(name, device_type):
                return module
        return _status("torch")[2]
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    ok, why, module = _status(backend)
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available here: {why}")
    if not runs_on(backend, device):
        raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors")
    return module
