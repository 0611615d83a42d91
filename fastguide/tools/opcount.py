"""Counting what a piece of code launches: torch ops seen by the dispatcher, plus fastguide's direct kernels.

A ``TorchDispatchMode`` sees every aten op (and every custom op called through ``torch.ops``), but fastguide's
eager path calls its compiled kernels directly, below the dispatcher; those calls report themselves through
``fastguide.core.hooks``. ``OpCounter`` records both, in order, so "ops per step" counts every
launch a step makes. Used by ``tests/test_tools_opcount.py``, the loop tests and ``fastguide bench``.

>>> with OpCounter() as counter:
...     latents = fastguide.step(noise_pred, t, latents, scheduler=scheduler, guidance_scale=7.5)
>>> counter.names        # ['aten.empty_like.default', 'fastguide.guided_step']
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional

from torch.utils._python_dispatch import TorchDispatchMode

from ..core import hooks

# Ops that make the host wait for the device (or read device memory on the host), or whose output shape
# depends on tensor values (which needs such a read). None of them may run inside a sampling loop.
SYNC_OPS = frozenset({
    "aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default", "aten.equal.default",
    "aten.allclose.default", "aten.nonzero.default", "aten.nonzero_static.default", "aten.masked_select.default",
    "aten.unique.default", "aten._unique.default", "aten._unique2.default", "aten.unique_dim.default",
    "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor",
})
# Ops that copy host data into a new tensor (``torch.tensor(...)``): on a GPU, a host-to-device copy. A
# sampling loop takes every per-step number from tables built before it starts. (Fills from a Python number,
# such as ``torch.full`` or autograd's ``scalar_tensor``, are device kernels and are not counted here.)
HOST_VALUE_OPS = frozenset({"aten.lift_fresh.default", "aten.lift_fresh_copy.default"})


class OpCounter(TorchDispatchMode):
    """Records the name of every torch op dispatched inside the context and every direct fastguide kernel
    call (``"fastguide.guided_step"`` ...). Nesting is allowed; the inner counter sees the direct kernels."""

    def __init__(self):
        super().__init__()
        self.names: List[str] = []
        self._inside_custom_op = 0
        self._observing = None

    def __enter__(self):
        self._observing = hooks.observing_kernels(self._record_kernel)
        self._observing.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._observing.__exit__(None, None, None)

    def _record_kernel(self, name: str) -> None:
        if not self._inside_custom_op:  # a fastguide custom op was already recorded by the dispatcher
            self.names.append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.names.append(name)
        if name.startswith("fastguide."):
            self._inside_custom_op += 1
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self._inside_custom_op -= 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return len(self.names)

    def histogram(self) -> Dict[str, int]:
        """How often each op ran, most frequent first."""
        return dict(Counter(self.names).most_common())

    def syncs(self) -> List[str]:
        """The recorded ops that would make a GPU loop wait for the device."""
        return [n for n in self.names if n in SYNC_OPS]

    def host_values(self) -> List[str]:
        """The recorded ops that copy host data into tensors (host-to-device copies on a GPU)."""
        return [n for n in self.names if n in HOST_VALUE_OPS]


def count_ops(fn, *args, **kwargs) -> OpCounter:
    """Run ``fn(*args, **kwargs)`` once under an ``OpCounter`` and return the counter.

    >>> count_ops(fastguide.step, noise_pred, t, latents, scheduler=s, guidance_scale=7.5).count   # 2
    """
    with OpCounter() as counter:
        fn(*args, **kwargs)
    return counter


def ops_per_call(fn, calls: int, *, warmup: Optional[int] = 1) -> float:
    """Mean ops per call of ``fn()`` over ``calls`` calls, after ``warmup`` uncounted calls (caches filled)."""
    for _ in range(warmup or 0):
        fn()
    with OpCounter() as counter:
        for _ in range(calls):
            fn()
    return counter.count / calls
