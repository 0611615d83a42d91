"""How eager kernel calls are observed or routed, switched only through context managers.

Eager calls run the backend kernels directly, below the torch dispatcher, for the lowest per-call cost.
Two tools need to see them: ``fastguide.tools.opcount.OpCounter`` counts each direct kernel call, and the
CPU stand-in for CUDA graph capture (``tests/graph_replay_emu.py``) routes them through the
``torch.ops.fastguide`` custom ops so a ``TorchDispatchMode`` records them with their arguments.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List

import torch

_observers: List[Callable[[str], None]] = []
_routing_depth = 0


def via_torch_ops() -> bool:
    """Whether kernel calls go through ``torch.ops.fastguide`` (while tracing, or while routed)."""
    return _routing_depth > 0 or torch.compiler.is_compiling()


def observed() -> bool:
    return bool(_observers)


def report(op_name: str) -> None:
    """Tell the innermost observer that a kernel ran directly (``fastguide.<op>``)."""
    if _observers:
        _observers[-1](op_name)


@contextmanager
def observing_kernels(observer: Callable[[str], None]) -> Iterator[None]:
    """Call ``observer("fastguide.<op>")`` for every kernel run directly inside the block (nested blocks:
    the innermost observer is called).

    >>> with observing_kernels(names.append):
    ...     fastguide.guided_step(x, m, table, 0)
    """
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


@contextmanager
def routed_through_torch_ops() -> Iterator[None]:
    """Inside the block, eager kernel calls go through the ``torch.ops.fastguide`` custom ops."""
    global _routing_depth
    _routing_depth += 1
    try:
        yield
    finally:
        _routing_depth -= 1
