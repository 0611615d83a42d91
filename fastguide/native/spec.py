"""A loop's static description, built once: stage kinds, coefficient rows and per-stage numbers.

A loop is built from a guided plan (``fastguide.guidance.plan.build_guided_plan``) into two parts:

* ``StageKind`` per stage: every fact that changes the *code* a stage runs (CFG on or off, noise drawn,
  which classifier / discriminator runs, whether the next stage needs x0^). Fixed when the loop is built,
  so the loop never branches on a device value.
* ``LoopTables``: every *number* that changes from stage to stage (the coefficient rows, the model's
  timesteps, input scales, guidance weights), packed into device tensors and read at a device step
  counter. Stages of one kind therefore run the same code, which lets ``torch.compile`` compile one body
  per kind and lets a CUDA graph (``fastguide.native.cudagraph``) replay with any table contents.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.cache import LRUCache
from ..guidance.gradients import edm_recipe_weight

# Rows of the per-stage scalar table (``LoopTables.scalars``); discriminator weights and EDM-recipe weights
# follow these four rows.
ROW_C_IN, ROW_PRE_NOISE, ROW_GUIDE_IN, ROW_X0_FACTOR = 0, 1, 2, 3
FIXED_SCALAR_ROWS = 4

# Whether ``build_spec`` lets a stage write its result straight into both halves of the next stage's
# ``[x; x]`` model input (``LoopSpec.pair_out``). Private: the tests switch it off to compare against the
# plain loop (``fastguide.native.sampling.clear_caches()`` afterwards: built loops are cached).
_PAIR_INPUTS = True


@dataclass(frozen=True)
class StageKind:
    """What one stage does, as static facts; stages with equal kinds run the same code."""

    cfg: bool = False                     # the model runs on [uncond; cond]
    scales_input: bool = False            # the model sees c_in * x (c_in != 1)
    pre_noise: bool = False               # EDM churn: x += pre_noise * z before the model
    noise: bool = False                   # the step draws fresh noise
    uses_x0_prev: bool = False            # 2nd-order update reads the previous stage's x0^
    writes_x0: bool = False               # the next stage needs this stage's x0^
    xt_classifiers: Tuple[int, ...] = ()  # ADM classifiers on x_t (indices into the classifier specs)
    x0_classifiers: Tuple[int, ...] = ()  # Ma et al. classifiers on x0^ (VP samplers: mean shift)
    x0_factor: bool = False               # the gamma spec's gradient is scaled by the stage's factor
    discriminators: Tuple[int, ...] = ()  # active discriminators (indices into the discriminator specs)
    edm_recipe: Tuple[int, ...] = ()      # Ma et al.'s EDM recipe shifts x before the denoiser
    guide_scaled: bool = False            # guidance networks see guide_in * x (guide_in != 1)
    # With ``cfg``, how the predictions combine (``fastguide.guidance.plan.GuidanceMethod``): "" CFG's scale,
    # "cfgpp" (eps~ from u), "gram" (a ``guidance.modern`` method's combine); and where the perturbed
    # prediction of ``PerturbedGuidance`` comes from: "" none, "model" (its perturbed_model), "batch" (a third
    # block of the model's forward).
    combine: str = ""
    perturbed: str = ""
    zero_init: bool = False               # CFG-Zero*'s zero-init: the prediction is 0 and no network runs


def takes_pair(kind: StageKind, null_label) -> bool:
    """Whether a stage's model input is exactly ``[x; x]``, with ``x`` the state the stage receives: CFG as one
    2B call (a null label; not a 3B call with a perturbed block), and nothing changes x before the model (no
    input scale c_in != 1, no churn noise, no EDM-recipe shift). Then the previous stage may write that input
    directly."""
    return (kind.cfg and null_label is not None and not kind.scales_input and not kind.pre_noise
            and not kind.edm_recipe and kind.perturbed != "batch")


def paired_stages(kinds: Sequence[StageKind], null_label) -> Tuple[bool, ...]:
    """Per stage, whether it writes its result into both halves of the next stage's ``[x; x]`` model input:
    every stage followed by one that ``takes_pair`` (the first stage's input, x_T, is always concatenated)."""
    return tuple(k + 1 < len(kinds) and takes_pair(kinds[k + 1], null_label) for k in range(len(kinds)))


@dataclass
class LoopSpec:
    """A loop's static description: stage kinds, the host tables and everything the stage code closes over."""

    kinds: List[StageKind]
    rows: np.ndarray          # [S, NUM_COLS] coefficient rows (float64)
    t_model: np.ndarray       # [S] the model's timestep per stage
    guide_t: np.ndarray       # [S] the guidance networks' timestep per stage
    scalars: np.ndarray       # [FIXED_SCALAR_ROWS + discriminators + EDM specs, S]
    init_scale: float
    mean_shift: bool          # state gradients shift the mean (DDPM) instead of correcting the score
    learned_model: bool       # the model outputs 2C channels (learned-range variance)
    learned_step: bool        # ... and the step uses them (DDPM)
    clip: Optional[Tuple[float, float]]
    rescale: float            # CFG rescale phi
    null_label: Any           # CFG null label, or None (uncond is a second call with y=None)
    x0_classifier_index: Tuple[int, ...]  # classifier specs with input="x0", in the scalar-table order
    factor_spec: Optional[int]            # index of the spec the x0 factor applies to
    # Per stage: the fused step also writes the next stage's [x; x] model input (``paired_stages``). Not a
    # StageKind field: it changes no code a compiled body runs (compiled loops run unpaired, see
    # ``fastguide.native.loop.run_loop``), so it must not multiply the compiled bodies.
    pair_out: Tuple[bool, ...] = ()
    method: Any = None        # the CFG-like spec's ``GuidanceMethod`` (None without one)
    # x0^ classifiers' gradients correct the score (``g_score``: flow schedules, where x0^ = x - s v) instead of
    # shifting the mean, so that x0_out carries the corrected x0^ a Heun correction stage reads.
    x0_score: bool = False

    @property
    def num_stages(self) -> int:
        return len(self.kinds)

    def content_key(self) -> tuple:
        """Everything about the tables and kinds, hashable: equal keys run identical loops."""
        return (tuple(self.kinds), self.rows.tobytes(), self.t_model.tobytes(), self.guide_t.tobytes(),
                self.scalars.tobytes(), self.rows.shape, self.scalars.shape, self.init_scale,
                self.mean_shift, self.learned_model, self.learned_step, self.clip, self.rescale,
                identity(self.null_label), self.x0_classifier_index, self.factor_spec, self.pair_out,
                method_key(self.method), self.x0_score)


def identity(obj) -> Any:
    """A hashable stand-in for a callable or value: bound methods by (instance, function), tensors and
    other objects by id, plain numbers by value."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, types.MethodType):
        return ("method", id(obj.__self__), id(obj.__func__))
    return ("id", id(obj))


def method_key(method) -> tuple:
    """A ``GuidanceMethod``'s static settings, hashable: the spec's type and every field but its scale (read
    per call), by value, networks and labels by identity. The stage code bakes them in (``coefficients``
    reads them while it is traced), so they key the compiled bodies and graphs."""
    if method is None:
        return ()
    spec = method.spec
    return (type(spec).__name__,) + tuple((f.name, identity(getattr(spec, f.name)))
                                          for f in dataclasses.fields(spec) if f.name != "scale")


def _guide_facts(method, st, n: int) -> dict:
    """The CFG-like spec's StageKind fields of one stage."""
    if method is None:
        return dict(cfg=False)
    zero = st.step < method.zero_init_steps
    active = not zero and method.spec.active(st.step, n)
    return dict(cfg=active, zero_init=zero, combine=method.combine if active else "",
                perturbed=method.perturbed if active else "")


def build_spec(gp, batch: int, clip: Optional[Tuple[float, float]]) -> LoopSpec:
    """The ``LoopSpec`` of a guided plan (``fastguide.guidance.plan.GuidedPlan``) for ``batch`` samples."""
    plan = gp.plan
    stages = plan.stages
    n = plan.steps
    count = len(stages)
    classifiers, discriminators = gp.classifiers, gp.discriminators
    xt_index = tuple(i for i, c in enumerate(classifiers) if c.input == "xt")
    x0_index = tuple(i for i, c in enumerate(classifiers) if c.input == "x0")
    mean_shift_x0, edm = gp.uses_mean_shift_x0(), gp.uses_edm_recipe()
    factor_spec = None
    if gp.x0_factor_spec is not None:
        factor_spec = next(i for i, c in enumerate(classifiers) if c is gp.x0_factor_spec)
    scalars = np.zeros((FIXED_SCALAR_ROWS + len(discriminators) + len(x0_index), count))
    t_model, guide_t = np.zeros(count), np.zeros(count)
    kinds = []
    method = gp.method
    for k, st in enumerate(stages):
        weights = [spec.weight_at(st.vp_time, st.second_stage) for spec in discriminators]
        kinds.append(StageKind(
            **_guide_facts(method, st, n),
            scales_input=st.c_in != 1.0,
            pre_noise=bool(st.pre_noise),
            noise=bool(st.noise),
            uses_x0_prev=st.uses_x0_prev,
            writes_x0=k + 1 < count and stages[k + 1].uses_x0_prev,
            xt_classifiers=() if st.second_stage else xt_index,
            x0_classifiers=x0_index if mean_shift_x0 else (),
            x0_factor=factor_spec is not None and gp.x0_factor[k] != 1.0,
            discriminators=tuple(j for j, w in enumerate(weights) if w),
            edm_recipe=x0_index if edm and not st.second_stage else (),
            guide_scaled=st.guide_in != 1.0))
        t_model[k], guide_t[k] = st.t_model, st.guide_t
        scalars[ROW_C_IN, k] = st.c_in
        scalars[ROW_PRE_NOISE, k] = st.pre_noise
        scalars[ROW_GUIDE_IN, k] = st.guide_in
        scalars[ROW_X0_FACTOR, k] = gp.x0_factor[k]
        for j, w in enumerate(weights):
            scalars[FIXED_SCALAR_ROWS + j, k] = w
        for j, i in enumerate(x0_index):
            scalars[FIXED_SCALAR_ROWS + len(discriminators) + j, k] = edm_recipe_weight(classifiers[i], st.step, n)
    learned_model = plan.schedule.kind == "vp" and plan.schedule.variance_type == "learned_range"
    null_label = method.null_label if method is not None else None
    pair_out = paired_stages(kinds, null_label) if _PAIR_INPUTS else ()
    return LoopSpec(kinds=kinds, rows=np.ascontiguousarray(gp.rows, dtype=np.float64), t_model=t_model,
                    guide_t=guide_t, scalars=scalars, init_scale=float(plan.init_scale),
                    mean_shift=plan.sampler == "ddpm", learned_model=learned_model,
                    learned_step=learned_model and plan.sampler == "ddpm", clip=clip,
                    rescale=method.rescale if method is not None else 0.0,
                    null_label=null_label, x0_classifier_index=x0_index,
                    factor_spec=factor_spec, pair_out=pair_out if any(pair_out) else (), method=method,
                    x0_score=plan.schedule.kind == "flow")


@dataclass
class LoopTables:
    """A loop's device tables, read at the device step counter (all fp32)."""

    coeffs: torch.Tensor      # [S, NUM_COLS]
    t_model: torch.Tensor     # [S, B]  (model timesteps, one row per stage)
    t_model2: torch.Tensor    # [S, 2B] (the same for the [uncond; cond] batch)
    guide_t: torch.Tensor     # [S, B]
    scalars: Tuple[torch.Tensor, ...]  # R tables of [S] (views of one buffer)

    def as_tuple(self) -> tuple:
        return (self.coeffs, self.t_model, self.t_model2, self.guide_t, self.scalars)


def make_tables(spec: LoopSpec, batch: int, device: torch.device) -> LoopTables:
    """Copy a spec's tables to ``device`` in one host-to-device copy (before the loop starts)."""
    count = spec.num_stages
    packed = np.concatenate([spec.rows.reshape(-1), np.repeat(spec.t_model, batch),
                             np.repeat(spec.t_model, 2 * batch), np.repeat(spec.guide_t, batch),
                             spec.scalars.reshape(-1)]).astype(np.float32)
    flat = torch.from_numpy(packed).to(device)
    sizes = [spec.rows.size, count * batch, count * 2 * batch, count * batch, spec.scalars.size]
    coeffs, t1, t2, g, s = torch.split(flat, sizes)
    return LoopTables(coeffs.view(spec.rows.shape), t1.view(count, batch), t2.view(count, 2 * batch),
                      g.view(count, batch), tuple(s.view(spec.scalars.shape).unbind(0)))


TABLE_CACHE = LRUCache(16)


def cached_tables(spec: LoopSpec, batch: int, device: torch.device) -> LoopTables:
    """``make_tables`` through a small cache keyed by the tables' contents: a repeated loop copies nothing."""
    key = (spec.rows.tobytes(), spec.t_model.tobytes(), spec.guide_t.tobytes(), spec.scalars.tobytes(),
           spec.rows.shape, spec.scalars.shape, batch, device)
    return TABLE_CACHE.get_or_build(key, lambda: make_tables(spec, batch, device))


@dataclass
class LoopInputs:
    """The per-call tensors a stage reads besides the state: labels and the CFG scale."""

    y: Optional[torch.Tensor]          # [B] (or whatever the model takes)
    y_pair: Optional[torch.Tensor]     # [null; y] for a CFG call with a null label ([null; y; y] when the
                                       # model's forward holds a perturbed block)
    cfg_scale: Optional[torch.Tensor]  # [B] fp32
    classifier_scales: Tuple[torch.Tensor, ...]  # [B] fp32 per classifier spec
    unit_scale: Optional[torch.Tensor]           # [B] fp32 ones (the EDM recipe's unit-scale gradient)

    def as_tuple(self) -> tuple:
        return (self.y, self.y_pair, self.cfg_scale, self.classifier_scales, self.unit_scale)


def make_inputs(spec: LoopSpec, classifiers: Sequence, y: Optional[torch.Tensor],
                cfg_scale: Optional[torch.Tensor], batch: int, device: torch.device) -> LoopInputs:
    """The per-call tensors, built once before the loop (the null labels and scale vectors included)."""
    y_pair = None
    if any(k.cfg for k in spec.kinds) and spec.null_label is not None:
        null = spec.null_label
        null_y = null.to(device).expand_as(y) if isinstance(null, torch.Tensor) else torch.full_like(y, null)
        triple = any(k.perturbed == "batch" for k in spec.kinds)  # [uncond; cond; perturbed] in one forward
        y_pair = torch.cat([null_y, y, y] if triple else [null_y, y])
    scales = tuple(torch.full((batch,), float(c.scale), dtype=torch.float32, device=device) for c in classifiers)
    unit = torch.ones(batch, dtype=torch.float32, device=device) if any(k.edm_recipe for k in spec.kinds) else None
    return LoopInputs(y, y_pair, cfg_scale, scales, unit)


def stage_key(spec: LoopSpec) -> tuple:
    """What the stage code closes over (not the table contents, which it reads at run time)."""
    return (tuple(sorted(set(spec.kinds), key=repr)), spec.mean_shift, spec.learned_model, spec.learned_step,
            spec.clip, spec.rescale, identity(spec.null_label), spec.x0_classifier_index, spec.factor_spec,
            spec.scalars.shape[0], method_key(spec.method))


def guidance_key(classifiers, discriminators) -> tuple:
    """The guidance networks by identity and their static settings by value."""
    return (tuple((identity(c.classifier), c.input, c.tau1, c.tau2) for c in classifiers),
            tuple(identity(d.discriminator) for d in discriminators))
