"""Which diffusers schedulers the drop-in step supports, and what fastguide keeps per scheduler.

A scheduler's config is validated once per schedule; its coefficient plans
(``fastguide.samplers.scheduler_tables``) are built once per set of step options and kept on the scheduler
object itself, rebuilt when ``set_timesteps`` or a config change replaces its arrays.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

import torch

from ..backends import dispatch as _dispatch
from ..core.cache import LRUCache
from ..core.checks import check_device
from ..samplers.scheduler_tables import (BUILDERS, ddim_plan, DDIM, DDPM, DPM, EULER, EULER_ANCESTRAL, FLOW,
                                         FLOW_HEUN, LCM, PREPARE_HELP, UNIPC, SchedulerPlan, config)

# diffusers class name -> the step formula it uses.
KINDS = {
    "DDPMScheduler": DDPM,
    "DDIMScheduler": DDIM,
    "EulerDiscreteScheduler": EULER,
    "EulerAncestralDiscreteScheduler": EULER_ANCESTRAL,
    "DPMSolverMultistepScheduler": DPM,
    "FlowMatchEulerDiscreteScheduler": FLOW,
    "FlowMatchHeunDiscreteScheduler": FLOW_HEUN,
    "LCMScheduler": LCM,
    "UniPCMultistepScheduler": UNIPC,
}
# schedulers that keep a step counter (``_step_index``)
INDEX_BASED = (EULER, EULER_ANCESTRAL, DPM, FLOW, FLOW_HEUN, LCM, UNIPC)
_VP_CLIPPED = (DDPM, DDIM, LCM)  # schedulers with clip_sample / clip_sample_range
_THRESHOLDED = (DDPM, DDIM, DPM, LCM, UNIPC)  # schedulers with dynamic thresholding


def kind_of(scheduler) -> str:
    """The step formula of ``scheduler``; subclasses count only if they keep the parent's ``step``."""
    for cls in type(scheduler).__mro__:
        kind = KINDS.get(cls.__name__)
        if kind is not None and getattr(type(scheduler), "step", None) is getattr(cls, "step", None):
            return kind
    raise ValueError(f"scheduler: {type(scheduler).__name__} is not supported by fastguide.step; supported: "
                     f"{', '.join(KINDS)}")


def _check_choice(scheduler, name: str, allowed: Tuple) -> None:
    value = config(scheduler, name)
    if value not in allowed:
        raise ValueError(f"scheduler.config.{name}={value!r} is not supported by fastguide.step for "
                         f"{type(scheduler).__name__} (supported: {', '.join(map(repr, allowed))})")


_PREDICTION_TYPES = {
    DDPM: ("epsilon", "v_prediction", "sample"),
    DDIM: ("epsilon", "v_prediction", "sample"),
    EULER: ("epsilon", "v_prediction", "sample", "original_sample"),
    EULER_ANCESTRAL: ("epsilon", "v_prediction"),
    DPM: ("epsilon", "v_prediction", "sample"),
    LCM: ("epsilon", "v_prediction", "sample"),
    UNIPC: ("epsilon", "v_prediction", "sample", "flow_prediction"),
}


def _check_flow_config(scheduler) -> None:
    """FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler: every config option is in their
    ``sigmas`` (the model always predicts the velocity; Heun's config is ``shift`` and ``num_train_timesteps``),
    but before ``set_timesteps`` they hold the training sigmas without the final one."""
    if getattr(scheduler, "num_inference_steps", None) is None or \
            len(scheduler.sigmas) != len(scheduler.timesteps) + 1:
        raise ValueError(f"scheduler: {type(scheduler).__name__} has no schedule yet; call "
                         "scheduler.set_timesteps(...) first")


def _check_unipc_config(scheduler) -> None:
    """UniPCMultistepScheduler: the B(h) solvers of order 1 or 2 in x0-prediction form."""
    _check_choice(scheduler, "solver_order", (1, 2))
    _check_choice(scheduler, "solver_type", ("bh1", "bh2"))
    _check_choice(scheduler, "predict_x0", (True,))
    if getattr(scheduler, "solver_p", None) is not None:
        raise ValueError("scheduler.solver_p is not supported by fastguide.step (UniPC's own predictor is)")
    if config(scheduler, "prediction_type") == "flow_prediction" and not config(scheduler, "use_flow_sigmas"):
        raise ValueError("scheduler.config.prediction_type='flow_prediction' needs use_flow_sigmas=True for "
                         "fastguide.step (on VP sigmas diffusers mixes the flow and VP parametrisations)")


def check_config(scheduler, kind: str) -> None:
    """Reject every config option whose step the coefficient rows cannot reproduce."""
    if kind in (FLOW, FLOW_HEUN):
        _check_flow_config(scheduler)
        return
    _check_choice(scheduler, "prediction_type", _PREDICTION_TYPES[kind])
    if kind == DDPM:
        if config(scheduler, "variance_type") == "fixed_large_log":
            # DDPMScheduler.step takes sqrt(log beta_t) for this type, so its own result is NaN.
            raise ValueError("scheduler.config.variance_type='fixed_large_log' is not supported: diffusers' "
                             "DDPMScheduler.step returns NaN for it (it takes the square root of log beta_t); "
                             "'fixed_large' is the intended variance")
        # None behaves as fixed_small in DDPMScheduler.step.
        _check_choice(scheduler, "variance_type", (None, "fixed_small", "fixed_small_log", "fixed_large",
                                                   "learned_range"))
    elif kind == DPM:
        _check_choice(scheduler, "algorithm_type", ("dpmsolver++", "sde-dpmsolver++"))
        _check_choice(scheduler, "solver_order", (1, 2, 3))
        _check_choice(scheduler, "solver_type", ("midpoint", "heun"))
        _check_choice(scheduler, "variance_type", (None,))
        if config(scheduler, "use_flow_sigmas", False):
            raise ValueError("scheduler.config.use_flow_sigmas=True is not supported by fastguide.step")
    elif kind == UNIPC:
        _check_unipc_config(scheduler)
    if kind in _THRESHOLDED and config(scheduler, "thresholding", False):
        ratio = config(scheduler, "dynamic_thresholding_ratio")
        if not isinstance(ratio, numbers.Real) or not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"scheduler.config.dynamic_thresholding_ratio must be in [0, 1], got {ratio!r}")
    elif kind in _VP_CLIPPED and config(scheduler, "clip_sample", False):
        rng = config(scheduler, "clip_sample_range", 1.0)
        if not isinstance(rng, numbers.Real) or not float(rng) > 0.0 or not math.isfinite(float(rng)):
            raise ValueError(f"scheduler.config.clip_sample_range must be a finite float > 0, got {rng!r}")
    if kind in (DDIM, DPM, LCM, UNIPC) and getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(f"scheduler: {type(scheduler).__name__} has no schedule yet; call "
                         "scheduler.set_timesteps(...) first")


@dataclass
class SchedulerState:
    """What fastguide knows about one scheduler's current schedule and config (validated once)."""

    refs: tuple                               # the objects it was built from, compared by identity
    kind: str
    clip: Optional[Tuple[float, float]]       # clip_sample range, DDPM/DDIM/LCM
    threshold: Optional[Tuple[float, float]]  # (dynamic_thresholding_ratio, sample_max_value)
    solver_order: int = 1                     # DPM-Solver++, UniPC
    plans: Dict[tuple, SchedulerPlan] = field(default_factory=dict)
    # Index-based schedulers: the step index of the next call. Compiled calls read it instead of the
    # scheduler's ``_step_index`` (None before the first step, and an int that dynamo specialises on when the
    # scheduler is a global: one graph per step, then a hard failure at the recompile limit with
    # fullgraph=True). Dynamo traces this attribute as a symbolic integer (see STEP_COUNTER_SOURCE).
    next_index: int = 0
    # FlowMatchHeunDiscreteScheduler: (the ``dt`` tensor fastguide stored on the scheduler, the plan and step of
    # that first stage), so the second stage knows its row without reading ``dt`` on the host.
    heun_record: Optional[tuple] = None
    # What the checks of repeat plain calls found (``dropin.checked``): it goes with the state it was checked on.
    checked: LRUCache = field(default_factory=lambda: LRUCache(8))


# The cached state lives on the scheduler object itself: it dies with it, copies carry it along, and
# torch.compile guards on a plain attribute (a module-level WeakKeyDictionary made dynamo guard on the
# position of entries that garbage collection may remove, which broke guard building).
STATE_ATTR = "_fastguide_state"
_KIND_OF_TYPE: Dict[type, str] = {}

# Dynamo specialises on integers read from globals (and on a first trace, on every integer), so a step
# counter would compile one graph per step. torch.compile's ``dynamic_sources`` marks sources by name as
# symbolic; fastguide adds the name of its own counter (and nothing else) to it, keeping the user's entries.
STEP_COUNTER_SOURCE = rf".*\.{STATE_ATTR}\.next_index$"


def _mark_step_counter_dynamic() -> None:
    current = torch.compiler.config.dynamic_sources
    if STEP_COUNTER_SOURCE not in current.split(","):
        torch.compiler.config.dynamic_sources = f"{current},{STEP_COUNTER_SOURCE}" if current else \
            STEP_COUNTER_SOURCE


_mark_step_counter_dynamic()


def _state_refs(scheduler, kind: str) -> tuple:
    """set_timesteps assigns new ``timesteps``/``sigmas`` tensors and a config change a new config object;
    holding them makes identity a safe key."""
    arrays = (scheduler.sigmas,) if kind in INDEX_BASED and kind != LCM else (scheduler.alphas_cumprod,)
    return (scheduler.timesteps, scheduler.config) + arrays


def scheduler_state(scheduler) -> SchedulerState:
    """The cached state of ``scheduler``, rebuilt (and its config re-validated) when its arrays changed."""
    kind = _KIND_OF_TYPE.get(type(scheduler))
    if kind is None:
        kind = _KIND_OF_TYPE[type(scheduler)] = kind_of(scheduler)
    refs = _state_refs(scheduler, kind)
    state = getattr(scheduler, STATE_ATTR, None)
    if state is not None and len(state.refs) == len(refs) and all(map(operator.is_, state.refs, refs)):
        return state
    if torch.compiler.is_compiling():
        raise RuntimeError(PREPARE_HELP)
    check_config(scheduler, kind)
    clip = threshold = None
    if kind in _THRESHOLDED and config(scheduler, "thresholding", False):
        threshold = (float(config(scheduler, "dynamic_thresholding_ratio")),
                     float(config(scheduler, "sample_max_value")))
    elif kind in _VP_CLIPPED and config(scheduler, "clip_sample", False):
        r = float(config(scheduler, "clip_sample_range", 1.0))
        clip = (-r, r)
    order = int(config(scheduler, "solver_order")) if kind in (DPM, UNIPC) else 1
    state = SchedulerState(refs, kind, clip, threshold, order)
    setattr(scheduler, STATE_ATTR, state)
    return state


def check_stored(label: str, what: str, t, sample: torch.Tensor, note: str = "") -> torch.Tensor:
    """``t``, a tensor the scheduler keeps between calls (``label``, e.g. ``scheduler.last_sample``), checked
    against the sample: a ``ValueError`` saying it must be ``what`` otherwise (``note`` explains why it is
    read)."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(sample.shape) or t.device != sample.device:
        got = f"{tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{label} must be {what} of the sample's shape {tuple(sample.shape)} on "
                         f"{sample.device}{note}, got {got}")
    return t


@dataclass
class HeunStage:
    """One FlowMatchHeunDiscreteScheduler call: which stage, the row (of ``plan``'s table) and, for a second
    stage, the stored sample and derivative it reads (in the sample's dtype)."""

    second: bool
    plan: SchedulerPlan
    row: int
    index: int
    draws: bool                                 # diffusers draws churn noise on this call
    sample: Optional[torch.Tensor] = None
    derivative: Optional[torch.Tensor] = None


def heun_stage(scheduler, state: SchedulerState, plan: SchedulerPlan, index: int,
               sample: torch.Tensor) -> HeunStage:
    """The stage of this call, as ``FlowMatchHeunDiscreteScheduler.step`` decides it (a second stage while the
    scheduler holds a ``dt``), checked before anything changes. A second stage after fastguide's own first stage
    takes the row that stage recorded; after diffusers' first stage, it reads ``scheduler.dt`` once on the host
    (one sync on CUDA, as diffusers' own step makes several) and checks it is this step's first-stage ``dt`` under
    the call's churn options."""
    if torch.compiler.is_compiling():
        raise RuntimeError("fastguide.step does not trace FlowMatchHeunDiscreteScheduler inside torch.compile "
                           "(its stage state lives on the scheduler); call it eagerly")
    if getattr(scheduler, "dt", None) is None:
        return HeunStage(False, plan, index, index, bool(plan.draws_noise[index]))
    stored = []
    for name in ("sample", "prev_derivative"):
        t = check_stored(f"scheduler.{name}", f"the first stage's {name}", getattr(scheduler, name, None), sample,
                         " (scheduler.dt is set, so this call is a second stage)")
        stored.append(t if t.dtype == sample.dtype else t.to(sample.dtype))
    record = state.heun_record
    if record is not None and record[0] is scheduler.dt:
        if record[2] != index - 1:
            raise ValueError(f"scheduler: its first stage was step {record[2]}, but its step index is now {index}; "
                             "a Heun second stage follows its first stage directly")
        use = record[1]
    else:
        dt, want = float(scheduler.dt), float(plan.heun_dt[index - 1]) if index > 0 else math.nan
        if not abs(dt - want) <= 1e-6 * abs(want):
            raise ValueError(f"scheduler.dt={dt!r} is not the first-stage dt of step {index - 1} under this call's "
                             f"s_churn/s_tmin/s_tmax ({want!r}); pass the same churn options to both stages")
        use = plan
    return HeunStage(True, use, use.num_steps + index, index, bool(plan.heun_second_draws[index]), *stored)


def heun_store(scheduler, state: SchedulerState, stage: HeunStage, sample: Optional[torch.Tensor],
               derivative: Optional[torch.Tensor]) -> None:
    """What ``FlowMatchHeunDiscreteScheduler.step`` keeps: after a first stage the derivative, ``dt`` (a 0-dim
    float32 tensor on the sigmas' device, bit-identical to diffusers') and the (churned) sample; after a second
    stage nothing (back to first order)."""
    if stage.second:
        scheduler.prev_derivative = scheduler.dt = scheduler.sample = None
        state.heun_record = None
        return
    plan = stage.plan
    dt = plan.device_tensor(("heun_dt",), scheduler.sigmas.device, lambda: plan.heun_dt)[stage.index]
    scheduler.prev_derivative, scheduler.dt, scheduler.sample = derivative, dt, sample
    state.heun_record = (dt, plan, stage.index)


def variant(kind: str, eta, use_clipped, s_churn, s_tmin, s_tmax, s_noise) -> tuple:
    """The step options a scheduler's rows depend on (the key of its plan)."""
    if kind == DDIM:
        return (float(eta), bool(use_clipped))
    if kind in (EULER, FLOW_HEUN):
        return (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
    return ()


def plan_of(scheduler, state: SchedulerState, options: tuple) -> SchedulerPlan:
    """The plan of ``scheduler`` for step options ``options`` (``variant``), built on first use."""
    plan = state.plans.get(options)
    if plan is None:
        if torch.compiler.is_compiling():
            raise RuntimeError(PREPARE_HELP)
        plan = state.plans[options] = BUILDERS[state.kind](scheduler, *options)
    return plan


def off_schedule_plan(scheduler, state: SchedulerState, options: tuple, timestep: int) -> SchedulerPlan:
    """A one-row DDIM plan for a training timestep outside ``scheduler.timesteps`` (cached with the plans;
    not available inside ``torch.compile``, where timesteps are looked up on the device)."""
    key = ("timestep", timestep) + options
    plan = state.plans.get(key)
    if plan is None:
        if torch.compiler.is_compiling():
            raise RuntimeError(PREPARE_HELP)
        plan = state.plans[key] = ddim_plan(scheduler, *options, timesteps=[timestep])
    return plan


# diffusers' output class of each scheduler's step(), and the fields of its return_dict=False tuple.
_OUTPUTS = {
    DDPM: ("DDPMSchedulerOutput", ("prev_sample", "pred_original_sample")),
    DDIM: ("DDIMSchedulerOutput", ("prev_sample", "pred_original_sample")),
    EULER: ("EulerDiscreteSchedulerOutput", ("prev_sample", "pred_original_sample")),
    EULER_ANCESTRAL: ("EulerAncestralDiscreteSchedulerOutput", ("prev_sample", "pred_original_sample")),
    DPM: ("SchedulerOutput", ("prev_sample",)),
    FLOW: ("FlowMatchEulerDiscreteSchedulerOutput", ("prev_sample",)),
    FLOW_HEUN: ("FlowMatchHeunDiscreteSchedulerOutput", ("prev_sample",)),
    LCM: ("LCMSchedulerOutput", ("prev_sample", "denoised")),
    UNIPC: ("SchedulerOutput", ("prev_sample",)),
}


def output_of(scheduler, kind: str) -> Tuple[Optional[type], Tuple[str, ...]]:
    """(the output class ``scheduler.step`` returns, found in the module of the diffusers class that defines
    the step, or None; the fields of its tuple form)."""
    name, fields = _OUTPUTS[kind]
    for cls in type(scheduler).__mro__:
        if KINDS.get(cls.__name__) == kind:
            module = sys.modules.get(cls.__module__)
            return getattr(module, name, None), fields
    return None, fields


def plan_for(scheduler, *, eta: float = 0.0, use_clipped_model_output: bool = False, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> SchedulerPlan:
    """The coefficient plan of ``scheduler``'s current schedule for these step options (cached).

    >>> plan = fastguide.dropin.plan_for(scheduler)     # after scheduler.set_timesteps(...)
    >>> plan.sigma[i], plan.variance[i]                 # state parametrisation / DDPM variance of step i
    """
    state = scheduler_state(scheduler)
    return plan_of(scheduler, state, variant(state.kind, eta, use_clipped_model_output, s_churn, s_tmin, s_tmax,
                                             s_noise))


def prepare(scheduler, device: Union[None, str, torch.device] = None, **step_options) -> SchedulerPlan:
    """Build and cache everything ``fastguide.step`` needs for ``scheduler``'s current schedule on ``device``,
    so that ``fastguide.step`` runs inside ``torch.compile(fullgraph=True)`` without graph breaks.

    Call it after ``set_timesteps`` (and ``set_begin_index``, if any) and outside the compiled function, once
    per sampling loop: it also sets the step counter that compiled calls of index-based schedulers read, and
    probes the kernel backends (an import cannot be traced). An eager ``fastguide.step`` call prepares the
    same way.

    Args:
        scheduler: a supported diffusers scheduler (``DDPMScheduler``, ``DDIMScheduler``,
            ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``, ``DPMSolverMultistepScheduler``,
            ``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``, ``LCMScheduler``,
            ``UniPCMultistepScheduler``) after ``set_timesteps``; its config is validated here.
        device: where the samples will live: a device string (``"cuda"``, ``"cuda:1"``, ``"cpu"``), a
            ``torch.device`` or an index; default None: where ``scheduler.timesteps`` lives (the tables are
            built there too in any case). It must be usable here: an invalid string or an accelerator that
            torch reports unavailable (``"cuda"`` without CUDA) is a ``ValueError`` naming ``device``, raised
            before anything is built or changed.
        **step_options: the step options the loop will pass to ``fastguide.step``: ``eta`` and
            ``use_clipped_model_output`` (DDIMScheduler), ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``
            (EulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler); defaults as in ``fastguide.step``.

    Returns the scheduler's coefficient plan for those options (``fastguide.dropin.SchedulerPlan``).

    >>> scheduler.set_timesteps(50)
    >>> fastguide.dropin.prepare(scheduler, latents.device)
    >>> denoise = torch.compile(lambda x, t: fastguide.step(unet(torch.cat([x] * 2), t, encoder_hidden_states=emb)
    ...                                                     .sample, t, x, scheduler=scheduler, guidance_scale=7.5),
    ...                         fullgraph=True)
    >>> latents = denoise(latents, scheduler.timesteps[0])
    """
    target = check_device("device", device) if device is not None else None
    plan = plan_for(scheduler, **step_options)
    if plan.kind in INDEX_BASED:
        start = scheduler.step_index if scheduler.step_index is not None else scheduler.begin_index
        scheduler_state(scheduler).next_index = int(start or 0)
    _dispatch.backends()  # probe the backends now: importing one is not traceable
    devices = {target if target is not None else scheduler.timesteps.device, scheduler.timesteps.device}
    for d in devices:
        plan.table(d)
        if plan.kind in (DDPM, DDIM):
            plan.timestep_values(d)
    return plan
