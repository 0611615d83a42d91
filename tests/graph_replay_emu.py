"""A CPU stand-in for CUDA graph capture and replay, so ``fastguide.native.cudagraph`` is tested without a GPU.

``fastguide.native.cudagraph`` talks to the CUDA runtime through one object, ``cudagraph.driver``. ``ReplayDriver``
takes its place for CPU tensors:

* **capture** runs the loop once under a ``TorchDispatchMode`` that records every op with the very tensors it
  read and wrote (fastguide's kernels included: they are routed through ``torch.ops.fastguide`` while
  recording). Ops that would make a GPU stream wait for the host (``.item()``, ``nonzero``, ...) raise, as
  they do inside a real capture. Afterwards every tensor the capture created is poisoned with NaN (a real
  capture runs nothing: its outputs hold garbage until the first replay), and the default random state is
  put back (a real capture draws no numbers from the default generator).
* **replay** re-runs the recorded ops, in order, on those same tensors, copying each result into the tensor
  the op produced at capture. None of the loop's Python runs: a coefficient, counter or input that the
  capture baked in instead of reading from a buffer shows up as a wrong result, as on a GPU. Random ops
  draw from their generators' current states and advance them, like a graph's registered generators.

What it cannot show: CUDA-only failures (host-to-device copies inside a capture, stream and memory-pool
behaviour, kernels that are not capturable); those are covered by the CUDA runs of the same tests.
"""

from __future__ import annotations

import contextlib
from typing import Any, List, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastguide.core import hooks

from fastguide.native import cudagraph
from fastguide.tools.opcount import SYNC_OPS


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class RecordedGraph:
    """The ops of one capture; ``replay()`` runs them again on the same tensors."""

    def __init__(self):
        self.records: List[tuple] = []   # (op, args, kwargs, outputs made at capture)
        self.replays = 0
        self.was_reset = False

    def replay(self) -> None:
        if self.was_reset:
            raise RuntimeError("replay of a graph that was reset")
        with torch.no_grad():
            for func, args, kwargs, outputs in self.records:
                fresh, _ = tree_flatten(func(*args, **kwargs))
                for dst, src in zip(outputs, fresh):
                    # In-place and view ops return (aliases of) memory the capture already owns.
                    if isinstance(dst, torch.Tensor) and _storage(src) != _storage(dst):
                        dst.copy_(src)
        self.replays += 1

    def reset(self) -> None:
        self.records.clear()
        self.was_reset = True

    def poison_outputs(self) -> None:
        """Fill every tensor the capture allocated with NaN (floats) or -1 (integers), as a real capture
        leaves its outputs unwritten. Outputs that alias an op's inputs (views, in-place ops) are left."""
        for _, args, kwargs, outputs in self.records:
            inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for out in outputs:
                if not isinstance(out, torch.Tensor) or _storage(out) in inputs or not out.numel():
                    continue
                if out.is_floating_point():
                    out.fill_(float("nan"))
                elif out.dtype != torch.bool:
                    out.fill_(-1)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: RecordedGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func) in SYNC_OPS:
            raise RuntimeError(f"{func} reads device memory on the host: operation not permitted when stream "
                               f"is capturing (emulated)")
        result = func(*args, **kwargs)
        self.graph.records.append((func, args, kwargs, tree_flatten(result)[0]))
        return result


class ReplayDriver(cudagraph.CudaGraphDriver):
    """``cudagraph.driver`` for CPU tensors: records at capture, re-runs the records at replay."""

    def __init__(self):
        self.graphs: List[RecordedGraph] = []

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def warm_up(self, fn, device: torch.device) -> None:
        state = torch.get_rng_state()
        fn()
        torch.set_rng_state(state)

    def new_graph(self, device: torch.device, generators: Sequence[torch.Generator]) -> Any:
        # Nothing to register: the recorded random ops hold their generator objects themselves.
        graph = RecordedGraph()
        self.graphs.append(graph)
        return graph

    @contextlib.contextmanager
    def capture(self, graph: RecordedGraph, device: torch.device):
        state = torch.get_rng_state()
        try:
            with hooks.routed_through_torch_ops(), _Recorder(graph):
                yield
        finally:
            torch.set_rng_state(state)
        graph.poison_outputs()
