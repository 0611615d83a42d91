"""``fastguide.sample(..., compile="inductor")``: one ``torch.compile``d body per stage kind."""

from __future__ import annotations

import types
import warnings
from typing import Any, Callable, Dict, Optional

import torch

from ..core.cache import LRUCache
from .loop import make_stage
from .spec import LoopSpec, StageKind, identity


class CompiledStages:
    """One ``torch.compile``d body per stage kind of a loop, compiled on first use.

    Each body gets a code object of its own, so dynamo's per-code-object cache (and its recompile limit)
    is never shared between kinds, models or loops. ``options`` go to ``torch.compile``; with no explicit
    ``fullgraph``, a body is compiled with ``fullgraph=True`` and, if the network itself breaks the graph,
    once more without it (with a warning naming the break)."""

    def __init__(self, spec: LoopSpec, model, classifiers, discriminators, backend: str,
                 options: Optional[Dict[str, Any]] = None):
        self.spec, self.model, self.classifiers, self.discriminators, self.backend = \
            spec, model, classifiers, discriminators, backend
        self.options = dict(options or {})
        self._bodies: Dict[StageKind, Callable] = {}

    def __getitem__(self, kind: StageKind) -> Callable:
        body = self._bodies.get(kind)
        if body is None:
            body = self._bodies[kind] = self._compile(kind)
        return body

    def _compile(self, kind: StageKind) -> Callable:
        eager = make_stage(self.spec, kind, self.model, self.classifiers, self.discriminators, self.backend)
        # A fresh code object: dynamo caches compiled code per code object.
        fresh = types.FunctionType(eager.__code__.replace(co_name=f"fastguide_stage_{id(self)}_{len(self._bodies)}"),
                                   eager.__globals__, None, eager.__defaults__, eager.__closure__)
        explicit = "fullgraph" in self.options
        options = dict(self.options)
        fullgraph = options.pop("fullgraph", True)
        compiled = torch.compile(fresh, fullgraph=fullgraph, **options)
        needs_autograd = bool(kind.xt_classifiers or kind.x0_classifiers or kind.discriminators or kind.edm_recipe)

        def call(*args):
            nonlocal compiled, fullgraph
            try:
                with _autograd_tracing(needs_autograd):
                    return compiled(*args)
            except torch._dynamo.exc.Unsupported as exc:
                if explicit or not fullgraph:
                    raise
                warnings.warn(f"fastguide.sample(compile='inductor'): the network breaks the graph, so this "
                              f"stage is compiled with fullgraph=False ({str(exc).splitlines()[0]})",
                              stacklevel=3)
                fullgraph = False
                compiled = torch.compile(fresh, fullgraph=False, **options)
                with _autograd_tracing(needs_autograd):
                    return compiled(*args)

        return call


class _autograd_tracing:
    """Let dynamo trace ``torch.autograd.grad`` (the guidance gradients) inside a compiled stage."""

    def __init__(self, enabled: bool):
        self.patch = torch._dynamo.config.patch(trace_autograd_ops=True) if enabled else None

    def __enter__(self):
        if self.patch is not None:
            self.patch.__enter__()

    def __exit__(self, *exc):
        if self.patch is not None:
            self.patch.__exit__(*exc)


COMPILED = LRUCache(8)


def compiled_stages(key: tuple, spec: LoopSpec, model, classifiers, discriminators, backend: str,
                    options: Optional[Dict[str, Any]]) -> CompiledStages:
    """The compiled bodies for a loop configuration (``key``), reused across calls (LRU of 8)."""
    return COMPILED.get_or_build(key, lambda: CompiledStages(spec, model, classifiers, discriminators, backend,
                                                               options))
