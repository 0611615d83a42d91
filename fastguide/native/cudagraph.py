"""``fastguide.sample(..., compile="graph")``: the whole sampling loop captured once as one CUDA graph.

Everything a loop does between taking ``x_T`` and returning the samples — the model calls with CFG batching,
the classifier / discriminator gradients through autograd, the noise draws and the fused steps of every
stage — is captured into one ``torch.cuda.CUDAGraph`` and replayed on later calls. The loop code is the
eager loop's (``fastguide.native.loop``): per-stage numbers come from device tables read at a device step counter,
so a replay never bakes in a stale coefficient.

**Static buffers.** ``x_T``, the labels ``y`` and the CFG-like spec's scale are copied into buffers the graph
reads; the result is copied out of the graph's output buffer (a replay overwrites it). APG's running average
is allocated and zeroed inside the captured loop, so each replay starts it from zeros.

**Cache.** One graph per configuration: the model and guidance networks (by identity), the guidance
settings, the loop's tables and stage kinds (by content: rebuilding an equal schedule hits the cache),
the sample's shape, dtype and device, the labels' shape and dtype, the backend and the kind of generator.
At most ``GRAPH_CACHE_SIZE`` graphs are kept (least recently used first out); each holds its own memory
pool of about one eager loop's peak activations. The cache keeps its models alive; ``clear_graph_cache()``
frees everything. The graph reads the networks' parameters where they lie: changing their values is
seen by the next replay, replacing a parameter tensor needs ``clear_graph_cache()``.

**Random numbers: same seed, same samples as eager.** A stage draws its noise exactly as the eager loop does;
which way depends on where the generators live:

* ``generator=None``: the device's default CUDA generator, which every graph registers. A replay draws
  from the generator's current state and advances it as the eager loop would.
* CUDA generator(s), one or one per sample: the graph owns private generators of the same structure,
  registered with it at capture. Before a replay each takes the caller's generator's state, afterwards the
  caller's generator takes the advanced state back, so the caller's generators behave as in eager mode
  and fresh generator objects with the same seeds replay the same graph. No extra memory.
* CPU generator(s) (reproducible across devices): the draws happen on the host, in the loop's order, before
  the replay and go to the device in one copy per call; the graph reads them from a static buffer of
  ``draws x B x sample size`` elements (one draw per noisy stage, two with EDM churn), e.g. 250 DDPM steps
  of 8 x 3 x 256 x 256 fp32 samples hold 1.5 GB, 50 DDIM(eta>0) steps of 8 x 4 x 64 x 64 fp16 latents 13 MB.

**What cannot be captured.** The model and guidance networks must be capturable: no host syncs (``.item()``,
``.cpu()``, printing tensors, ``nonzero`` or boolean-mask indexing), no CPU tensors, no data-dependent
Python branches on tensor values. A capture failure is re-raised as a ``RuntimeError`` that says so;
``compile="inductor"`` or ``compile=None`` run such models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch

from ..core.cache import LRUCache
from ..core.noise import Generator
from .loop import NoiseSource, count_draws, make_stage, predraw, run_loop
from .spec import LoopSpec, LoopTables, guidance_key, identity, make_inputs, make_tables

GRAPH_CACHE_SIZE = 4


@dataclass
class GraphEntry:
    """One captured loop and the buffers it reads and writes."""

    graph: Any                         # torch.cuda.CUDAGraph
    x_T: torch.Tensor
    y: Optional[torch.Tensor]
    cfg_scale: Optional[torch.Tensor]
    noise: Optional[torch.Tensor]      # pre-drawn noise (CPU generators only)
    private_generators: List[torch.Generator]
    output: torch.Tensor
    tables: LoopTables
    keep_alive: tuple                  # the networks the graph calls, a perturbed model's through the
                                       # guidance method (keeps their ids unique while cached)


_GRAPHS = LRUCache(GRAPH_CACHE_SIZE, on_evict=lambda entry: entry.graph.reset())


def clear_graph_cache() -> None:
    """Drop every cached graph and its memory pool."""
    _GRAPHS.clear()


def cached_graph_count() -> int:
    return len(_GRAPHS)


def generator_mode(generator: Generator, device: torch.device) -> tuple:
    """How a loop's noise is drawn under a graph: ('default',), ('device', n) for n generators on the
    sample's device (a list of one counts as one), or ('host',) when any generator lives elsewhere (the CPU
    generators of a CUDA sample)."""
    if generator is None:
        return ("default",)
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if any(g.device.type != device.type for g in gens):
        return ("host",)
    return ("device", len(gens) if isinstance(generator, (list, tuple)) and len(gens) > 1 else 0)


def _private_generators(generator: Generator) -> List[torch.Generator]:
    return [torch.Generator(device=g.device) for g in _caller_generators(generator)]


def _noise_source(mode: tuple, privates: List[torch.Generator], noise: Optional[torch.Tensor]):
    if mode[0] == "default":
        return NoiseSource(None)
    if mode[0] == "host":
        return NoiseSource(predrawn=noise)
    return NoiseSource(privates if mode[1] else privates[0])


def _caller_generators(generator: Generator) -> List[torch.Generator]:
    return list(generator) if isinstance(generator, (list, tuple)) else [generator]


class CudaGraphDriver:
    """The CUDA runtime calls a capture makes, in one place. ``run`` drives real CUDA graphs through
    ``driver``; the tests drive the same capture / cache / replay logic on the CPU by swapping in a stand-in
    that records the captured ops and replays them (``tests/graph_replay_emu.py``)."""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def warm_up(self, fn: Callable[[], Any], device: torch.device) -> None:
        """Run ``fn`` once on a side stream (lazy initialisation of libraries, autograd's device threads and
        kernels' first launches must not happen during capture), leaving the random state as it was."""
        rng_state = torch.cuda.get_rng_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.set_rng_state(rng_state, device)

    def new_graph(self, device: torch.device, generators: Sequence[torch.Generator]) -> Any:
        """An empty graph whose replays draw from ``generators`` (advancing them) besides the default one."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device):
            for gen in generators:
                graph.register_generator_state(gen)
        return graph

    def capture(self, graph: Any, device: torch.device):
        """A context in which the current stream's work is captured into ``graph`` instead of running."""
        return torch.cuda.graph(graph)


driver = CudaGraphDriver()


CAPTURE_HELP = (
    "fastguide.sample(compile='graph') could not capture the sampling loop as one CUDA graph: {error}\n"
    "Everything the loop calls is captured, so the model, classifier and discriminator must be capturable: "
    "no host synchronisation (.item(), .cpu(), .tolist(), printing a tensor, bool(tensor), nonzero or "
    "boolean-mask indexing), no CPU tensors or host-to-device copies, and no Python branches on tensor "
    "values. Run this model with compile='inductor' or compile=None instead.")


def run(model: Callable, spec: LoopSpec, classifiers: Sequence, discriminators: Sequence, backend: str,
        x_T: torch.Tensor, y: Optional[torch.Tensor], cfg_scale: Optional[torch.Tensor],
        generator: Generator) -> torch.Tensor:
    """Replay (capturing on first use) the graph of this loop; returns a fresh tensor with the samples."""
    mode = generator_mode(generator, x_T.device)
    key = (identity(model), guidance_key(classifiers, discriminators),
           tuple(float(c.scale) for c in classifiers), spec.content_key(), tuple(x_T.shape), x_T.dtype,
           x_T.device, backend, mode,
           None if y is None else (tuple(y.shape), y.dtype), cfg_scale is None)
    entry = _GRAPHS.get_or_build(key, lambda: _capture(model, spec, classifiers, discriminators, backend, x_T, y,
                                                       cfg_scale, generator, mode))
    _fill(entry, spec, x_T, y, cfg_scale, generator, mode)
    callers = _caller_generators(generator) if mode[0] == "device" else []
    for private, caller in zip(entry.private_generators, callers):
        private.set_state(caller.get_state())
    entry.graph.replay()
    for private, caller in zip(entry.private_generators, callers):
        caller.set_state(private.get_state())
    return entry.output.clone()


def _fill(entry: GraphEntry, spec: LoopSpec, x_T, y, cfg_scale, generator, mode) -> None:
    """Copy this call's inputs into the graph's static buffers."""
    entry.x_T.copy_(x_T)
    if entry.y is not None:
        entry.y.copy_(y)
    if entry.cfg_scale is not None:
        entry.cfg_scale.copy_(cfg_scale)
    if entry.noise is not None:
        host = predraw(spec, generator, tuple(x_T.shape), torch.device("cpu"), x_T.dtype)
        entry.noise.copy_(host)


def _capture(model, spec: LoopSpec, classifiers, discriminators, backend: str, x_T, y, cfg_scale,
             generator, mode: tuple) -> GraphEntry:
    device = x_T.device
    batch = x_T.shape[0]
    static_x = x_T.clone()
    static_y = y.clone() if y is not None else None
    static_scale = cfg_scale.clone().contiguous() if cfg_scale is not None else None
    static_noise = None
    draws = count_draws(spec)
    if mode[0] == "host" and draws:
        # Filled with this call's draws by _fill, after the capture: drawing here too would consume the
        # caller's generators twice on the first call.
        static_noise = torch.zeros((draws,) + tuple(x_T.shape), dtype=x_T.dtype, device=device)
    privates = _private_generators(generator) if mode[0] == "device" else []
    for private, caller in zip(privates, _caller_generators(generator) if privates else []):
        private.set_state(caller.get_state())
    if isinstance(spec.null_label, torch.Tensor):  # moved once here: a copy from the host cannot be captured
        spec = dataclasses.replace(spec, null_label=spec.null_label.to(device))
    tables = make_tables(spec, batch, device)
    counter = torch.zeros((), dtype=torch.int64, device=device)
    bodies = {kind: make_stage(spec, kind, model, classifiers, discriminators, backend)
              for kind in set(spec.kinds)}
    stages = [bodies[kind] for kind in spec.kinds]

    def whole_loop():
        inputs = make_inputs(spec, classifiers, static_y, static_scale, batch, device)
        return run_loop(stages, spec, static_x, tables, inputs, _noise_source(mode, privates, static_noise),
                              counter)

    driver.warm_up(whole_loop, device)
    graph = driver.new_graph(device, privates)
    try:
        with driver.capture(graph, device):
            output = whole_loop()
    except Exception as exc:  # the capture is abandoned; say why in terms of the model
        graph.reset()
        raise RuntimeError(CAPTURE_HELP.format(error=f"{type(exc).__name__}: {exc}")) from exc
    return GraphEntry(graph, static_x, static_y, static_scale, static_noise, privates, output, tables,
                      (model, tuple(classifiers), tuple(discriminators), spec.method))
