"""Whole sampling loops, built once and run without host syncs: eagerly or with ``torch.compile``.

A loop is built from a guided plan (``fastguide.sample.build_guided_plan``) into two parts:

* ``StageKind`` per stage: every fact that changes the *code* a stage runs (CFG on or off, noise drawn,
  which classifier / discriminator runs, whether the next stage needs x0^). Fixed when the loop is built,
  so the loop never branches on a device value.
* ``LoopTables``: every *number* that changes from stage to stage (the coefficient rows, the model's
  timesteps, input scales, guidance weights), packed into device tensors and read at a device step
  counter. Stages of one kind therefore run the same code, which lets ``torch.compile`` compile one body
  per kind and lets a CUDA graph (``fastguide.cudagraph``) replay with any table contents.

Inside the loop there is no ``.item()``, no ``nonzero``, no tensor-valued Python branch and no host-to-device
copy; ``tests/test_loops.py`` audits that with a ``TorchDispatchMode`` over whole loops.

Noise: a stage draws its noise at its start, before any network of the stage runs (the churn noise first,
then the step noise), from the caller's generator(s) exactly as ``fastguide.noise.randn`` draws it. Under
``torch.compile`` the draws stay outside the compiled body and enter it as inputs, so compiled and eager
loops see the same numbers.
"""

from __future__ import annotations

import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import ops
from .guidance import classifier_grad_core, discriminator_grad_core, edm_recipe_weight, edm_shift_core
from .layout import CLIP_NONE, CLIP_RANGE
from .noise import Generator, randn

# Rows of the per-stage scalar table (``LoopTables.scalars``); discriminator weights and EDM-recipe weights
# follow these four rows.
ROW_C_IN, ROW_PRE_NOISE, ROW_GUIDE_IN, ROW_X0_FACTOR = 0, 1, 2, 3
FIXED_SCALAR_ROWS = 4


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

    @property
    def num_stages(self) -> int:
        return len(self.kinds)

    def content_key(self) -> tuple:
        """Everything about the tables and kinds, hashable: equal keys run identical loops."""
        return (tuple(self.kinds), self.rows.tobytes(), self.t_model.tobytes(), self.guide_t.tobytes(),
                self.scalars.tobytes(), self.rows.shape, self.scalars.shape, self.init_scale,
                self.mean_shift, self.learned_model, self.learned_step, self.clip, self.rescale,
                _identity(self.null_label), self.x0_classifier_index, self.factor_spec)


def _identity(obj) -> Any:
    """A hashable stand-in for a callable or value: bound methods by (instance, function), tensors and
    other objects by id, plain numbers by value."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, types.MethodType):
        return ("method", id(obj.__self__), id(obj.__func__))
    return ("id", id(obj))


def build_spec(gp, batch: int, clip: Optional[Tuple[float, float]]) -> LoopSpec:
    """The ``LoopSpec`` of a guided plan (``fastguide.sample.GuidedPlan``) for ``batch`` samples."""
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
    cfg = gp.cfg
    for k, st in enumerate(stages):
        weights = [spec.weight_at(st) for spec in discriminators]
        kinds.append(StageKind(
            cfg=cfg is not None and cfg.active(st.step, n),
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
    return LoopSpec(kinds=kinds, rows=np.ascontiguousarray(gp.rows, dtype=np.float64), t_model=t_model,
                    guide_t=guide_t, scalars=scalars, init_scale=float(plan.init_scale),
                    mean_shift=plan.sampler == "ddpm", learned_model=learned_model,
                    learned_step=learned_model and plan.sampler == "ddpm", clip=clip,
                    rescale=float(cfg.rescale) if cfg is not None else 0.0,
                    null_label=cfg.null_label if cfg is not None else None, x0_classifier_index=x0_index,
                    factor_spec=factor_spec)


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


_TABLE_CACHE: "OrderedDict[tuple, LoopTables]" = OrderedDict()
TABLE_CACHE_SIZE = 16


def cached_tables(spec: LoopSpec, batch: int, device: torch.device) -> LoopTables:
    """``make_tables`` through a small cache keyed by the tables' contents: a repeated loop copies nothing."""
    key = (spec.rows.tobytes(), spec.t_model.tobytes(), spec.guide_t.tobytes(), spec.scalars.tobytes(),
           spec.rows.shape, spec.scalars.shape, batch, device)
    tables = _TABLE_CACHE.get(key)
    if tables is None:
        tables = _TABLE_CACHE[key] = make_tables(spec, batch, device)
        while len(_TABLE_CACHE) > TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    return tables


@dataclass
class LoopInputs:
    """The per-call tensors a stage reads besides the state: labels and the CFG scale."""

    y: Optional[torch.Tensor]          # [B] (or whatever the model takes)
    y_pair: Optional[torch.Tensor]     # [null; y] for a CFG call with a null label
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
        y_pair = torch.cat([null_y, y])
    scales = tuple(torch.full((batch,), float(c.scale), dtype=torch.float32, device=device) for c in classifiers)
    unit = torch.ones(batch, dtype=torch.float32, device=device) if any(k.edm_recipe for k in spec.kinds) else None
    return LoopInputs(y, y_pair, cfg_scale, scales, unit)


# ---------------------------------------------------------------------------------------------------
# One stage


_gather = torch.ops.aten.index.Tensor


def _at(table: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Row ``counter`` (a 0-dim int64 device tensor) of ``table``, as one device-side gather. Not
    ``table[counter]``: Python indexing reads a 0-dim integer tensor on the host (a sync per step)."""
    return _gather(table, [counter])


def _check_model_output(out, rows: int, x: torch.Tensor, learned: bool) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a tensor, got {type(out).__name__}")
    expected = (rows, x.shape[1] * (2 if learned else 1)) + tuple(x.shape[2:])
    if tuple(out.shape) != expected:
        raise ValueError(f"model returned shape {tuple(out.shape)}, expected {expected}")
    return out


StageFn = Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor]]]


def make_stage(spec: LoopSpec, kind: StageKind, model: Callable, classifiers: Sequence,
               discriminators: Sequence, backend: str) -> StageFn:
    """The code of one stage kind: ``stage(x, x0_prev, z_pre, z_step, counter, tables, inputs)`` returns
    ``(x_next, x0 or None)``. Every per-stage number is read from ``tables`` at ``counter`` (a 0-dim int64
    device tensor), so one function serves every stage of its kind."""
    clip_mode, lo, hi = (CLIP_RANGE, spec.clip[0], spec.clip[1]) if spec.clip is not None else (CLIP_NONE, -1.0, 1.0)
    rescale = spec.rescale if kind.cfg else 0.0
    disc_row = FIXED_SCALAR_ROWS
    edm_row = FIXED_SCALAR_ROWS + len(discriminators)
    x0_rows = {i: edm_row + j for j, i in enumerate(spec.x0_classifier_index)}
    null_pair = kind.cfg and spec.null_label is not None

    def stage(x, x0_prev, z_pre, z_step, counter, tables, inputs):
        # Nothing flows back into the denoiser (the guidance gradients enable grad for their own networks):
        # no autograd graph is kept for the model, and compiled stages return plain tensors. (An eager
        # ``run_loop`` already runs under no_grad.)
        if not torch.is_grad_enabled():
            return stage_body(x, x0_prev, z_pre, z_step, counter, tables, inputs)
        with torch.no_grad():
            return stage_body(x, x0_prev, z_pre, z_step, counter, tables, inputs)

    def stage_body(x, x0_prev, z_pre, z_step, counter, tables, inputs):
        coeffs, t_model, t_model2, guide_t, scalars = tables
        y, y_pair, cfg_scale, classifier_scales, unit = inputs
        if kind.edm_recipe or kind.xt_classifiers or kind.x0_classifiers or kind.discriminators:
            t_guide = _at(guide_t, counter)
            guide_in = _at(scalars[ROW_GUIDE_IN], counter) if kind.guide_scaled else None
        for i in kind.edm_recipe:
            x = x + edm_shift_core(classifiers[i], x, t_guide, y, _at(scalars[x0_rows[i]], counter), unit, backend)
        if kind.pre_noise:
            x = x + _at(scalars[ROW_PRE_NOISE], counter) * z_pre
        x_in = x * _at(scalars[ROW_C_IN], counter) if kind.scales_input else x
        rows = x.shape[0]
        if kind.cfg:
            if null_pair:
                out = model(torch.cat([x_in, x_in]), _at(t_model2, counter), y_pair)
            else:
                t = _at(t_model, counter)
                out = torch.cat([model(x_in, t, None), model(x_in, t, y)])
            rows *= 2
        else:
            out = model(x_in, _at(t_model, counter), y)
        out = _check_model_output(out, rows, x, spec.learned_model)
        if spec.learned_model and not spec.learned_step:
            out = out[:, : x.shape[1]]  # only DDPM uses the learned variance channels

        state_grad = None
        for i in kind.xt_classifiers:
            g = classifier_grad_core(classifiers[i], x, t_guide, y, classifier_scales[i], guide_in, backend)
            state_grad = g if state_grad is None else state_grad + g
        for j in kind.discriminators:
            g = discriminator_grad_core(discriminators[j], x, t_guide, guide_in, y,
                                        _at(scalars[disc_row + j], counter))
            state_grad = g if state_grad is None else state_grad + g
        g_score, g_mean = (None, state_grad) if spec.mean_shift else (state_grad, None)
        step_args = (cfg_scale if kind.cfg else None, rescale)
        tail = (clip_mode, lo, hi, None, spec.learned_step)
        if kind.x0_classifiers:
            # Ma et al.: the classifier sees x0^ (clipped like the step clips it); no backprop into the model.
            x0_hat = torch.empty_like(x)
            ops.run_step(x, out, coeffs, counter, *step_args, None, None, z_step,
                         x0_prev if kind.uses_x0_prev else None, *tail, None, x0_hat, False, backend)
            for i in kind.x0_classifiers:
                g = classifier_grad_core(classifiers[i], x0_hat, t_guide, y, classifier_scales[i], None, backend)
                if kind.x0_factor and i == spec.factor_spec:
                    g = g * _at(scalars[ROW_X0_FACTOR], counter)
                g_mean = g if g_mean is None else g_mean + g
        x0_next = torch.empty_like(x) if kind.writes_x0 else None
        x_next = ops.run_step(x, out, coeffs, counter, *step_args, g_score, g_mean, z_step,
                              x0_prev if kind.uses_x0_prev else None, *tail, None, x0_next, True, backend)
        return x_next, x0_next

    return stage


# ---------------------------------------------------------------------------------------------------
# Driving a whole loop


class NoiseSource:
    """Where a loop's noise comes from: drawn per stage from generator(s), or read from pre-drawn buffers."""

    def __init__(self, generator: Generator = None, predrawn: Optional[torch.Tensor] = None):
        self.generator = generator
        self.predrawn = predrawn
        self.index = 0

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        if self.predrawn is not None:
            z = self.predrawn[self.index]
            self.index += 1
            return z
        return randn(like.shape, self.generator, like.device, like.dtype)


def count_draws(spec: LoopSpec) -> int:
    """How many noise tensors of the sample's shape a loop draws."""
    return sum(int(k.pre_noise) + int(k.noise) for k in spec.kinds)


def predraw(spec: LoopSpec, generator: Generator, shape, device: torch.device,
            dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Every draw of a loop, in the loop's order, as one ``[draws, *shape]`` tensor on ``device``
    (what a CUDA graph reads when the caller's generators live on the CPU)."""
    draws = count_draws(spec)
    if not draws:
        return None
    return torch.stack([randn(shape, generator, device, dtype) for _ in range(draws)])


def run_loop(stages: Sequence[StageFn], spec: LoopSpec, x_T: torch.Tensor, tables: LoopTables,
             inputs: LoopInputs, noise: NoiseSource, counter: Optional[torch.Tensor] = None,
             progress: Optional[Callable] = None) -> torch.Tensor:
    """Run every stage: ``stages[k]`` is stage k's function (shared between stages of one kind).

    The step counter starts at 0 on the device and advances in place after each stage; ``counter`` may be
    a caller's buffer (a CUDA graph's), else a fresh one."""
    if counter is None:
        counter = torch.zeros((), dtype=torch.int64, device=x_T.device)
    else:
        counter.zero_()
    x = x_T * spec.init_scale
    x0_prev = None
    table_args, input_args = tables.as_tuple(), inputs.as_tuple()
    order = range(spec.num_stages)
    if progress is not None:
        order = progress(order)
    kinds = spec.kinds
    with torch.no_grad():
        for k in order:
            kind = kinds[k]
            z_pre = noise.draw(x) if kind.pre_noise else None
            z_step = noise.draw(x) if kind.noise else None
            x, x0_prev = stages[k](x, x0_prev, z_pre, z_step, counter, table_args, input_args)
            counter.add_(1)
    return x


# ---------------------------------------------------------------------------------------------------
# torch.compile of the stage bodies


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


_COMPILED: "OrderedDict[tuple, CompiledStages]" = OrderedDict()
COMPILED_CACHE_SIZE = 8


def compiled_stages(key: tuple, spec: LoopSpec, model, classifiers, discriminators, backend: str,
                    options: Optional[Dict[str, Any]]) -> CompiledStages:
    """The compiled bodies for a loop configuration (``key``), reused across calls (LRU of 8)."""
    entry = _COMPILED.get(key)
    if entry is None:
        entry = _COMPILED[key] = CompiledStages(spec, model, classifiers, discriminators, backend, options)
        while len(_COMPILED) > COMPILED_CACHE_SIZE:
            _COMPILED.popitem(last=False)
    else:
        _COMPILED.move_to_end(key)
    return entry


def stage_key(spec: LoopSpec) -> tuple:
    """What the stage code closes over (not the table contents, which it reads at run time)."""
    return (tuple(sorted(set(spec.kinds), key=repr)), spec.mean_shift, spec.learned_model, spec.learned_step,
            spec.clip, spec.rescale, _identity(spec.null_label), spec.x0_classifier_index, spec.factor_spec,
            spec.scalars.shape[0])


def guidance_key(classifiers, discriminators) -> tuple:
    """The guidance networks by identity and their static settings by value."""
    return (tuple((_identity(c.classifier), c.input, c.tau1, c.tau2) for c in classifiers),
            tuple(_identity(d.discriminator) for d in discriminators))


def clear_caches() -> None:
    """Forget compiled stage bodies and cached device tables (and CUDA graphs, see ``fastguide.cudagraph``)."""
    _COMPILED.clear()
    _TABLE_CACHE.clear()
    from . import cudagraph
    cudagraph.clear_graph_cache()
