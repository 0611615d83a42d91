"""``fastguide.sample``: the native guided sampling loop, checked, built once and run in the asked mode.

Everything that could make the loop branch on device values is decided when the loop is built
(``fastguide.native.spec``): which stages draw noise, where CFG and each guidance method are active, the
coefficient table itself. The loop (``fastguide.native.loop``) reads per-stage numbers from device tables at
a device step counter, so it never syncs with the host and can be compiled (``compile="inductor"``,
``fastguide.native.inductor``) or captured as one CUDA graph (``compile="graph"``,
``fastguide.native.cudagraph``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from ..backends import dispatch as _dispatch
from ..core.cache import LRUCache
from ..core.checks import check_bool, check_labels_tensor, check_nonneg, check_range, check_sample
from ..core.noise import Generator, check_generator
from ..guidance.plan import GuidedPlan, build_guided_plan, method_of, split_guidance
from ..samplers import native as samplers
from ..samplers.schedule import Schedule
from . import cudagraph as _cudagraph
from . import guide as _guide
from . import inductor as _inductor
from . import loop as _loop
from . import spec as _spec


def sample(model: Callable[..., torch.Tensor], x_T: torch.Tensor, *, schedule: Schedule, sampler: str,
           steps: int, y: Optional[torch.Tensor] = None, guidance: Sequence = (), generator: Generator = None,
           eta: Optional[float] = None, clip_denoised: Optional[Tuple[float, float]] = None,
           compile: Optional[str] = None, compile_options: Optional[dict] = None, progress: bool = False,
           backend: str = "auto", **sampler_options) -> torch.Tensor:
    """Run a whole guided sampling loop and return the samples.

    Args:
        model: callable ``model(x, t, y)`` returning the schedule's prediction type (eps, v or x0; for EDM the
            denoised D or eps) of x's shape (2C channels for a ``learned_range`` DDPM variance). ``t`` is a
            ``[B]`` (``[2B]`` with a CFG null label) float32 tensor: training timesteps on VP schedules
            (fractional for sigma samplers with ``linspace`` spacing or Karras sigmas), sigmas on EDM; ``y`` is
            the labels (``[null; y]`` with CFG's ``null_label``, None for a label-free uncond call).
        x_T: ``[B, ...]`` floating-point unit-Gaussian noise of the sample shape, at least 2-D;
            scaled here to the sampler's starting noise level (``plan.init_scale``). Never modified.
        schedule: keyword only; a ``fastguide.Schedule`` (``Schedule.ddpm``, ``Schedule.edm``,
            ``Schedule.from_diffusers``).
        sampler: ``"ddpm"``, ``"ddim"`` (VP schedules only), ``"euler"``, ``"euler_ancestral"``, ``"heun"`` or
            ``"dpmpp_2m"`` (EDM or VP schedules). On a VP schedule the sigma samplers run on the sigma state
            ``x = x0 + sigma eps``, the model seeing ``x / sqrt(1 + sigma^2)`` and its training timestep:
            ``heun`` there is Heun's 2nd-order method on the probability-flow ODE, as k-diffusion's
            ``sample_heun`` with a VP denoiser wrapper and diffusers' ``HeunDiscreteScheduler``
            (``fastguide.samplers.native.heun``).
        steps: int >= 1, the number of sampling steps (at most ``num_train_timesteps`` on VP schedules). Heun
            makes ``2 steps - 1`` model calls.
        y: optional ``[B]`` tensor (labels, or any per-sample condition the model takes) on x_T's device,
            default None. Required by ``ClassifierGuidance`` (int32/int64 class labels) and by CFG with a
            ``null_label``.
        guidance: sequence of guidance specs, default ``()`` (unguided): at most one CFG-like spec (``CFG``,
            ``CFGPlusPlus`` (``euler`` / ``euler_ancestral`` only), or one of ``fastguide.guidance.modern``:
            ``CFGZeroStar``, ``APG``, ``MamboG``, ``TCFG``, ``PerturbedGuidance``), with any
            ``ClassifierGuidance`` and ``DiscriminatorGuidance`` specs. A CFG-like spec's scale may be a
            ``[B]`` tensor (per-sample scales); it is read on every call, its other settings are fixed when
            the loop is built (see ``fastguide.native.guide`` for how each method runs).
        generator: None (default; torch's global RNG), a ``torch.Generator`` or a list of B generators, for
            the noise the sampler draws.
        eta: optional float >= 0, default None (the sampler's own default: 0 for ``ddim``, 1 for
            ``euler_ancestral``); only those two take it.
        clip_denoised: optional ``(low, high)`` with low < high, default None: clamp x0^ to the range, e.g.
            ``(-1, 1)`` (``ddim`` then re-derives eps from the clipped x0^, as guided-diffusion).
        compile: None (default), ``"inductor"`` or ``"graph"``, see below.
        compile_options: optional dict of ``torch.compile`` keywords, for ``compile="inductor"`` only.
        progress: bool, default False: show a tqdm bar (eager mode).
        backend: ``"auto"`` (default: the fastest built backend that runs on x_T's device, C++ then torch on
            the CPU, CUDA then Triton then torch on a GPU), or ``"torch"``, ``"cpp"``, ``"triton"``,
            ``"cuda"``; an unknown or unusable one is reported before any model call.
        **sampler_options: the sampler's other keywords, passed to ``fastguide.samplers.build``: ``s_churn``,
            ``s_tmin``, ``s_tmax``, ``s_noise`` (``euler``, ``heun``; sigma units), ``s_noise``
            (``euler_ancestral``).

    Returns the samples x_0, x_T's shape, dtype and device. Every argument is checked before the model runs
    (``ValueError``/``TypeError`` naming it); a network output of the wrong shape is reported naming the
    network and the expected shape.

    ``compile`` runs the same loop three ways, with the same samples for the same seed (to rounding):

    * ``None``: eagerly, stage by stage, without a host sync; ``progress=True`` shows a tqdm bar.
    * ``"inductor"``: each kind of stage (network, guidance gradients and fused step) compiled once with
      ``torch.compile(fullgraph=True)`` (``fullgraph=False`` with a warning if the network breaks the
      graph); ``compile_options`` go to ``torch.compile``, e.g. ``{"mode": "reduce-overhead"}``. The noise
      is drawn outside the compiled code, exactly as eager draws it.
    * ``"graph"``: the whole loop captured once as one CUDA graph and replayed on later calls with the same
      configuration (``x_T`` on a CUDA device; see ``fastguide.native.cudagraph`` for the cache and how seeded
      generators are honoured).

    Compiled bodies and graphs are cached per model / guidance-network object: pass the same callable on
    every call (a lambda created anew per call compiles anew).

    Noise is drawn at the start of each stage, before the stage's networks run; with a list of one
    generator per sample, a sample's noise does not depend on how the batch is split, in every mode.

    >>> x = fastguide.sample(model, torch.randn(4, 1, 16, 16), schedule=fastguide.Schedule.ddpm(),
    ...                      sampler="ddim", steps=50, y=labels,
    ...                      guidance=[fastguide.CFG(3.0, null_label=10)])
    """
    if compile not in (None, "graph", "inductor"):
        raise ValueError(f"compile must be None, 'graph' or 'inductor', got {compile!r}")
    if compile_options is not None:
        if not isinstance(compile_options, dict):
            raise TypeError(f"compile_options must be a dict of torch.compile keywords, got "
                            f"{type(compile_options).__name__}")
        if compile != "inductor":
            raise ValueError(f"compile_options apply to compile='inductor' (torch.compile), not compile={compile!r}")
    if not callable(model):
        raise TypeError("model must be callable as model(x, t, y)")
    batch = check_sample("x_T", x_T)
    if compile == "graph" and not _cudagraph.driver.supports(x_T.device):
        raise ValueError(f"compile='graph' captures a CUDA graph and needs x_T on a CUDA device, got "
                         f"{x_T.device}; use compile='inductor' or None on {x_T.device.type}")
    if y is not None:
        check_labels_tensor("y", y, batch, x_T.device)
    check_generator(generator, batch, x_T.device)
    clip_denoised = None if clip_denoised is None else check_range("clip_denoised", clip_denoised)
    check_bool("progress", progress)
    _dispatch.resolve(backend, x_T.device)  # an unknown or unusable backend is reported before any model call
    gp, spec = build_loop(sampler, schedule, steps, guidance, batch, clip_denoised, eta, **sampler_options)
    if (gp.classifiers or (gp.method is not None and gp.method.null_label is not None)) and y is None:
        raise ValueError("y (labels) is required by classifier guidance and by CFG with a null_label")
    if gp.classifiers and (y.dim() != 1 or y.dtype not in (torch.int32, torch.int64)):
        raise TypeError(f"y must be a [{batch}] integer tensor of class labels for classifier guidance, got "
                        f"{y.dtype} {tuple(y.shape)}")
    cfg_scale = None
    if gp.cfg is not None:  # this call's scale: a cached plan may hold an equal spec with another scale
        cfg_scale = _guide.call_scale(split_guidance(guidance)[0], batch, x_T.device)
    if gp.classifiers and y.device.type == "cpu" and y.numel() and int(y.detach().numpy().min()) < 0:
        raise ValueError(f"y holds negative labels: {y.tolist()}")
    return _run(model, x_T, gp, spec, y, generator, cfg_scale, progress, backend, compile, compile_options)


BUILT = LRUCache(512)  # a serving engine sees hundreds of configurations


def _guidance_static_key(guidance, steps) -> tuple:
    """The guidance settings a loop's tables and stage kinds depend on (the CFG-like spec's scale is not one
    of them: it is read at run time; where it is active is, since a modern spec is off where its float scale
    is the identity), networks by identity."""
    cfg, classifiers, discriminators = split_guidance(guidance)
    ident = _spec.identity
    method = None
    if cfg is not None:
        method = (_spec.method_key(method_of(cfg)), tuple(bool(cfg.active(i, steps)) for i in range(steps)))
    return (method,
            tuple((ident(c.classifier), c.scale, c.input, c.tau1, c.tau2, c.gamma, c.g_max, c.add)
                  for c in classifiers),
            tuple((ident(d.discriminator), d.weight, d.weight2, d.t_min, d.t_max) for d in discriminators))


def build_loop(sampler: str, schedule: Schedule, steps: int, guidance: Sequence, batch: int,
               clip: Optional[Tuple[float, float]] = None, eta: Optional[float] = None,
               **sampler_options) -> Tuple[GuidedPlan, _spec.LoopSpec]:
    """The guided plan and loop spec ``sample`` runs for these settings (``clip`` already checked), built
    once and cached: what a serving engine steps each request through, row by row.

    >>> gp, spec = build_loop("ddim", fastguide.Schedule.ddpm(), 50, [fastguide.CFG(3.0, null_label=10)], 1)
    """
    options = dict(sampler_options)
    if eta is not None:
        if sampler not in ("ddim", "euler_ancestral"):
            raise ValueError(f"eta applies to 'ddim' and 'euler_ancestral', not {sampler!r}")
        options["eta"] = check_nonneg("eta", eta)
    if sampler == "ddim" and clip is not None:
        options["clipped"] = True  # guided-diffusion re-derives eps from the clipped x0^
    return _built_loop(sampler, schedule, steps, options, guidance, batch, clip)


def _built_loop(sampler, schedule, steps, options, guidance, batch, clip) -> Tuple[GuidedPlan, _spec.LoopSpec]:
    """The guided plan and loop spec of a configuration, built once: a repeated call (same schedule object,
    sampler, options and guidance settings) skips rebuilding the coefficient rows in Python."""
    try:
        key = (id(schedule), sampler, steps, tuple(sorted(options.items())), _guidance_static_key(guidance, steps),
               batch, clip)
        hash(key)
    except TypeError:  # an unhashable option or bad guidance: build, and let the builders report it
        key = None
    hit = BUILT.get(key) if key is not None else None
    if hit is not None and hit[0] is schedule:
        return hit[1], hit[2]
    plan = samplers.build(sampler, schedule, steps, **options)
    gp = build_guided_plan(plan, guidance)
    spec = _spec.build_spec(gp, batch, clip)
    if key is not None:
        BUILT.put(key, (schedule, gp, spec))  # holds the schedule, so its id stays unique while cached
    return gp, spec


def _run(model, x_T, gp: GuidedPlan, spec, y, generator, cfg_scale, progress, backend, compile,
         compile_options) -> torch.Tensor:
    """Run the built loop (``fastguide.native.loop``) in the asked mode."""
    batch, device = x_T.shape[0], x_T.device
    classifiers, discriminators = tuple(gp.classifiers), tuple(gp.discriminators)
    if compile == "graph":
        return _cudagraph.run(model, spec, classifiers, discriminators, backend, x_T, y, cfg_scale, generator)
    if compile == "inductor":
        key = (_spec.identity(model), _spec.guidance_key(classifiers, discriminators), _spec.stage_key(spec),
               backend, device, repr(sorted((compile_options or {}).items())))
        bodies = _inductor.compiled_stages(key, spec, model, classifiers, discriminators, backend, compile_options)
        if device.type == "cuda":
            # CUDA graphs of mode="reduce-overhead" start a new generation per loop (a no-op otherwise).
            torch.compiler.cudagraph_mark_step_begin()
    else:
        bodies = {kind: _loop.make_stage(spec, kind, model, classifiers, discriminators, backend)
                  for kind in set(spec.kinds)}
    stages = [bodies[kind] for kind in spec.kinds]
    tables = _spec.cached_tables(spec, batch, device)
    inputs = _spec.make_inputs(spec, classifiers, y, cfg_scale, batch, device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        def bar(order):
            return tqdm(order, total=len(stages), desc=f"fastguide {gp.plan.sampler}")
    return _loop.run_loop(stages, spec, x_T, tables, inputs, _loop.NoiseSource(generator), progress=bar)


def clear_caches() -> None:
    """Forget built loops, compiled stage bodies, cached device tables and CUDA graphs."""
    BUILT.clear()
    _inductor.COMPILED.clear()
    _spec.TABLE_CACHE.clear()
    _cudagraph.clear_graph_cache()
