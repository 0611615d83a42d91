"""The native guided sampling loop: model calls, guidance gradients and one fused step per stage.

Everything that could make the loop branch on device values is decided when the loop is built: which
stages draw noise, where CFG and each guidance method are active, the coefficient table itself. The loop
reads per-stage numbers from device tables at a device step counter (``fastguide.loop``), so it never
syncs with the host and can be compiled (``compile="inductor"``) or captured as one CUDA graph
(``compile="graph"``, ``fastguide.cudagraph``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import cudagraph as _cudagraph
from . import dispatch as _dispatch
from . import loop as _loop
from . import ops, samplers
from .guidance import CFG, ClassifierGuidance, DiscriminatorGuidance
from .layout import Col
from .noise import Generator, check_generator
from .schedule import Schedule

MEAN_SHIFT_SAMPLERS = ("ddpm",)


@dataclass
class GuidedPlan:
    """A sampler plan plus the guidance configuration, with the mean-shift columns adjusted."""

    plan: samplers.Plan
    cfg: Optional[CFG]
    classifiers: List[ClassifierGuidance]
    discriminators: List[DiscriminatorGuidance]
    rows: np.ndarray
    # Per stage, the factor multiplying Ma et al.'s x0-gradient so it can share the mean-shift column, and
    # the one spec (gamma > 0) it applies to.
    x0_factor: List[float]
    x0_factor_spec: Optional[ClassifierGuidance] = None

    def uses_mean_shift_x0(self) -> bool:
        return self.plan.sampler in samplers.VP_SAMPLERS and any(c.input == "x0" for c in self.classifiers)

    def uses_edm_recipe(self) -> bool:
        return self.plan.sampler in samplers.SIGMA_SAMPLERS and any(c.input == "x0" for c in self.classifiers)


def _split_guidance(guidance) -> Tuple[Optional[CFG], List[ClassifierGuidance], List[DiscriminatorGuidance]]:
    if isinstance(guidance, (CFG, ClassifierGuidance, DiscriminatorGuidance)):
        guidance = [guidance]
    if not isinstance(guidance, (list, tuple)):
        raise TypeError("guidance must be a sequence of fastguide.CFG / ClassifierGuidance / "
                        "DiscriminatorGuidance specs")
    cfg, clfs, discs = None, [], []
    for g in guidance:
        if isinstance(g, CFG):
            if cfg is not None:
                raise ValueError("guidance holds more than one CFG spec")
            cfg = g
        elif isinstance(g, ClassifierGuidance):
            clfs.append(g)
        elif isinstance(g, DiscriminatorGuidance):
            discs.append(g)
        else:
            raise TypeError(f"guidance entries must be fastguide guidance specs, got {type(g).__name__}")
    return cfg, clfs, discs


def build_guided_plan(plan: samplers.Plan, guidance) -> GuidedPlan:
    """Fold Ma et al.'s extra variance ``max(0, gamma Sigma_max sin(pi i/N))`` into the mean-shift column."""
    cfg, clfs, discs = _split_guidance(guidance)
    rows = plan.rows.copy()
    x0_factor = [1.0] * len(plan.stages)
    x0_specs = [c for c in clfs if c.input == "x0"]
    ma = [c for c in x0_specs if c.gamma > 0]
    if len(ma) > 1:
        raise ValueError("at most one ClassifierGuidance(input='x0') with gamma > 0 per loop")
    spec = None
    if ma and plan.sampler in samplers.VP_SAMPLERS:
        spec = ma[0]
        # Other gradients sharing the mean-shift column must get Sigma_t only, not the extra variance: the
        # other x0 classifiers, and on DDPM the x_t classifiers and discriminators.
        others = len(x0_specs) > 1 or (plan.sampler == "ddpm" and bool(discs or any(c.input == "xt"
                                                                                     for c in clfs)))
        n = plan.steps
        for k, st in enumerate(plan.stages):
            i = n - 1 - st.step  # EluCD counts the respaced step down: N-1 .. 0
            extra = max(0.0, spec.gamma * plan.max_variance * math.sin(math.pi * i / n))
            if not others:
                rows[k, Col.D] += extra
            elif plan.learned_variance:
                raise ValueError("ClassifierGuidance(input='x0', gamma > 0) cannot share the mean shift with "
                                 "other mean-shift guidance under a learned variance; use gamma=0 or one method")
            elif extra > 0:
                x0_factor[k] = (st.variance + extra) / st.variance
    return GuidedPlan(plan, cfg, clfs, discs, rows, x0_factor, spec)


def sample(model: Callable[..., torch.Tensor], x_T: torch.Tensor, *, schedule: Schedule, sampler: str,
           steps: int, y: Optional[torch.Tensor] = None, guidance: Sequence = (), generator: Generator = None,
           eta: Optional[float] = None, clip_denoised: Optional[Tuple[float, float]] = None,
           compile: Optional[str] = None, compile_options: Optional[dict] = None, progress: bool = False,
           backend: str = "auto", **sampler_options) -> torch.Tensor:
    """Run a whole guided sampling loop and return the samples.

    ``model(x, t, y)`` returns the schedule's prediction type (2C channels for a learned-range DDPM
    variance); ``t`` is a [B] tensor of training timesteps (VP schedules) or sigmas (EDM). ``x_T`` is
    unit Gaussian noise of the sample shape (scaled to the sampler's starting noise level here).
    ``clip_denoised=(-1, 1)`` clips x0^; ``None`` leaves it alone. ``eta`` applies to ``ddim`` and
    ``euler_ancestral``; other sampler keywords (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``) pass
    through to ``fastguide.samplers``.

    ``compile`` runs the same loop three ways, with the same samples for the same seed (to rounding):

    * ``None``: eagerly, stage by stage, without a host sync; ``progress=True`` shows a tqdm bar.
    * ``"inductor"``: each kind of stage (network, guidance gradients and fused step) compiled once with
      ``torch.compile(fullgraph=True)`` (``fullgraph=False`` with a warning if the network breaks the
      graph); ``compile_options`` go to ``torch.compile``, e.g. ``{"mode": "reduce-overhead"}``. The noise
      is drawn outside the compiled code, exactly as eager draws it.
    * ``"graph"``: the whole loop captured once as one CUDA graph and replayed on later calls with the same
      configuration (``x_T`` on a CUDA device; see ``fastguide.cudagraph`` for the cache and how seeded
      generators are honoured).

    Compiled bodies and graphs are cached per model / guidance-network object: pass the same callable on
    every call (a lambda created anew per call compiles anew).

    Noise is drawn at the start of each stage, before the stage's networks run; with a list of one
    generator per sample, a sample's noise does not depend on how the batch is split, in every mode.

    >>> x = fastguide.sample(model, torch.randn(8, 1, 16, 16), schedule=fastguide.Schedule.ddpm(),
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
    ops.check_tensor("x_T", x_T)
    if x_T.dim() < 2:
        raise ValueError(f"x_T must be [B, C, ...], got shape {tuple(x_T.shape)}")
    batch = x_T.shape[0]
    if compile == "graph" and not _cudagraph.driver.supports(x_T.device):
        raise ValueError(f"compile='graph' captures a CUDA graph and needs x_T on a CUDA device, got "
                         f"{x_T.device}; use compile='inductor' or None on {x_T.device.type}")
    if y is not None:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a tensor of labels, got {type(y).__name__}")
        if y.shape[:1] != (batch,) or y.device != x_T.device:
            raise ValueError(f"y must have {batch} rows on {x_T.device}, got {tuple(y.shape)} on {y.device}")
    check_generator(generator, batch, x_T.device)
    if clip_denoised is not None:
        pair = tuple(clip_denoised) if isinstance(clip_denoised, (tuple, list)) else None
        if pair is None or len(pair) != 2 or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair) or \
                not pair[0] < pair[1]:
            raise ValueError(f"clip_denoised must be None or a (low, high) pair of numbers with low < high, "
                             f"got {clip_denoised!r}")
        clip_denoised = (float(pair[0]), float(pair[1]))
    if not isinstance(progress, bool):
        raise TypeError("progress must be a bool")
    _dispatch.resolve(backend, x_T.device)  # an unknown or unusable backend is reported before any model call
    options = dict(sampler_options)
    if eta is not None:
        if sampler not in ("ddim", "euler_ancestral"):
            raise ValueError(f"eta applies to 'ddim' and 'euler_ancestral', not {sampler!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
        options["eta"] = eta
    if sampler == "ddim" and clip_denoised is not None:
        options["clipped"] = True
    gp, spec = _built_loop(sampler, schedule, steps, options, guidance, batch, clip_denoised)
    if (gp.classifiers or (gp.cfg is not None and gp.cfg.null_label is not None)) and y is None:
        raise ValueError("y (labels) is required by classifier guidance and by CFG with a null_label")
    if gp.classifiers and (y.dim() != 1 or y.dtype not in (torch.int32, torch.int64)):
        raise TypeError(f"y must be a [{batch}] integer tensor of class labels for classifier guidance, got "
                        f"{y.dtype} {tuple(y.shape)}")
    cfg_scale = None
    if gp.cfg is not None:  # this call's scale: a cached plan may hold an equal spec with another scale
        cfg = _split_guidance(guidance)[0]
        cfg_scale = ops.check_scale("CFG scale", cfg.scale, batch, x_T.device, sync_ok=True)
    if gp.classifiers and y.device.type == "cpu" and y.numel() and int(y.detach().numpy().min()) < 0:
        raise ValueError(f"y holds negative labels: {y.tolist()}")
    return _run(model, x_T, gp, spec, y, generator, cfg_scale, progress, backend, compile, compile_options)


_BUILT: "OrderedDict[tuple, tuple]" = OrderedDict()
BUILT_CACHE_SIZE = 32


def _guidance_static_key(guidance) -> tuple:
    """The guidance settings a loop's tables and stage kinds depend on (CFG's scale is not one of them: it is
    read at run time), networks by identity."""
    cfg, classifiers, discriminators = _split_guidance(guidance)
    ident = _loop._identity
    return (None if cfg is None else (cfg.rescale, ident(cfg.null_label), cfg.start, cfg.stop),
            tuple((ident(c.classifier), c.scale, c.input, c.tau1, c.tau2, c.gamma, c.g_max, c.add)
                  for c in classifiers),
            tuple((ident(d.discriminator), d.weight, d.weight2, d.t_min, d.t_max) for d in discriminators))


def _built_loop(sampler, schedule, steps, options, guidance, batch, clip) -> Tuple[GuidedPlan, "_loop.LoopSpec"]:
    """The guided plan and loop spec of a configuration, built once: a repeated call (same schedule object,
    sampler, options and guidance settings) skips rebuilding the coefficient rows in Python."""
    try:
        key = (id(schedule), sampler, steps, tuple(sorted(options.items())), _guidance_static_key(guidance),
               batch, clip)
        hash(key)
    except TypeError:  # an unhashable option or bad guidance: build, and let the builders report it
        key = None
    hit = _BUILT.get(key) if key is not None else None
    if hit is not None and hit[0] is schedule:
        _BUILT.move_to_end(key)
        return hit[1], hit[2]
    plan = samplers.build(sampler, schedule, steps, **options)
    gp = build_guided_plan(plan, guidance)
    spec = _loop.build_spec(gp, batch, clip)
    if key is not None:
        _BUILT[key] = (schedule, gp, spec)  # holds the schedule, so its id stays unique while cached
        while len(_BUILT) > BUILT_CACHE_SIZE:
            _BUILT.popitem(last=False)
    return gp, spec


def _run(model, x_T, gp: GuidedPlan, spec, y, generator, cfg_scale, progress, backend, compile,
         compile_options) -> torch.Tensor:
    """Run the built loop (``fastguide.loop``) in the asked mode."""
    batch, device = x_T.shape[0], x_T.device
    classifiers, discriminators = tuple(gp.classifiers), tuple(gp.discriminators)
    if compile == "graph":
        return _cudagraph.run(model, spec, classifiers, discriminators, backend, x_T, y, cfg_scale, generator)
    if compile == "inductor":
        key = (_loop._identity(model), _loop.guidance_key(classifiers, discriminators), _loop.stage_key(spec),
               backend, device, repr(sorted((compile_options or {}).items())))
        bodies = _loop.compiled_stages(key, spec, model, classifiers, discriminators, backend, compile_options)
        if device.type == "cuda":
            # CUDA graphs of mode="reduce-overhead" start a new generation per loop (a no-op otherwise).
            torch.compiler.cudagraph_mark_step_begin()
    else:
        bodies = {kind: _loop.make_stage(spec, kind, model, classifiers, discriminators, backend)
                  for kind in set(spec.kinds)}
    stages = [bodies[kind] for kind in spec.kinds]
    tables = _loop.cached_tables(spec, batch, device)
    inputs = _loop.make_inputs(spec, classifiers, y, cfg_scale, batch, device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        def bar(order):
            return tqdm(order, total=len(stages), desc=f"fastguide {gp.plan.sampler}")
    return _loop.run_loop(stages, spec, x_T, tables, inputs, _loop.NoiseSource(generator), progress=bar)
