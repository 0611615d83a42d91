"""One drop-in call, checked: which row of its scheduler's coefficient plan it takes, and how the scheduler
advances after it.

The row is found on the host: the timestep's position for DDPM/DDIM (a timestep outside the schedule gets a
one-row plan of its own for DDIM), the scheduler's step counter for the index-based schedulers (fastguide's own
counter inside ``torch.compile``), and for the multistep solvers the order the scheduler's own step would take,
with the history it reads (``scheduler.model_outputs``). ``advance`` then does the scheduler's own bookkeeping
(its step index, the multistep history), for the general path and the repeat lane (``dropin.repeat``) alike.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from ..core.args import StepArgs
from ..samplers.scheduler_tables import DDIM, DPM, FLOW_HEUN, LCM, UNIPC, SchedulerPlan, config, dpm_step_order
from .checked import Checked
from .schedulers import INDEX_BASED, HeunStage, SchedulerState, check_stored, heun_stage, off_schedule_plan

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]


@dataclass
class Call:
    """One drop-in call, checked: the scheduler's state and plan for its options, and its tensors."""

    state: SchedulerState
    plan: SchedulerPlan
    options: tuple        # the plan's step options (``schedulers.variant``)
    args: StepArgs        # sample, model output, [B] fp32 scale, rescale, g_score/g_mean, out, clip
    noise: Optional[torch.Tensor]
    generator: GeneratorArg
    check_finite: bool
    backend: str
    heun: Optional[HeunStage] = None   # FlowMatchHeunDiscreteScheduler: this call's stage
    unipc: Optional[object] = None     # UniPCMultistepScheduler: this call's passes (``dropin.unipc.UniPCStep``)
    impl: Optional[object] = None      # the backend module ``backend`` resolved to (``dispatch.resolve``)
    compiling: bool = False            # traced by torch.compile (asked once per call: ~0.2 us each time)
    memo: Optional[Checked] = None     # the call's entry in ``state.checked`` (a plain call's)


def scalar_timestep(timestep) -> float:
    """The timestep as a host number (one sync for a CUDA tensor, as diffusers' own indexing does).

    ``tolist`` reads a CPU tensor's memory directly, where ``item`` would dispatch an op on every step."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"timestep must be a scalar, got a tensor of shape {tuple(timestep.shape)}")
        value = timestep.tolist()
        while isinstance(value, list):
            value = value[0]
        return value
    if isinstance(timestep, bool) or not isinstance(timestep, numbers.Real):
        raise TypeError(f"timestep must be an int, a float or a one-element tensor, got {type(timestep).__name__}")
    return timestep


# ---------------------------------------------------------------------------------------------------
# Which row


def schedule_row(plan: SchedulerPlan, timestep) -> Optional[int]:
    """The row of a DDPM/DDIM/LCM timestep in ``scheduler.timesteps``, or None for one off the schedule."""
    value = scalar_timestep(timestep)
    return plan.timestep_rows.get(int(value)) if float(value).is_integer() else None


def _vp_row(scheduler, call: Call, timestep) -> int:
    """The row of a DDPM/DDIM timestep. DDIMScheduler.step takes any training timestep (its previous
    timestep is derived from ``t``): one outside ``scheduler.timesteps`` gets a one-row plan of its own,
    built on first use and kept with the scheduler's plans."""
    plan = call.plan
    row = schedule_row(plan, timestep)
    if row is not None:
        return row
    value = scalar_timestep(timestep)
    train = int(config(scheduler, "num_train_timesteps"))
    if call.state.kind == DDIM and float(value).is_integer() and 0 <= int(value) < train:
        call.plan = off_schedule_plan(scheduler, call.state, call.options, int(value))
        call.args.table = call.plan.table(call.args.sample.device)
        return 0
    shown = list(plan.timestep_rows)
    shown = shown if len(shown) <= 12 else shown[:6] + ["..."] + shown[-3:]
    where = (f"scheduler.timesteps {shown} or an integer in [0, {train})" if call.state.kind == DDIM
             else f"scheduler.timesteps {shown}")
    raise ValueError(f"timestep {value!r} is not in {where}")


def indexed_step(scheduler, state: SchedulerState, timestep, compiling: bool) -> Tuple[int, bool]:
    """The step index of an index-based scheduler's call, and whether the scheduler's counter must be initialised
    from ``timestep`` (``compiling``: traced by torch.compile, where fastguide's own counter is read)."""
    integer = isinstance(timestep, int) and not isinstance(timestep, bool) or \
        isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()
    if state.kind not in (DPM, LCM, UNIPC) and integer:
        # As Euler*.step: integer indices (enumerate) are a common mistake; pass a value of scheduler.timesteps.
        raise ValueError("timestep must be a value of scheduler.timesteps, not an integer index")
    n = scheduler.timesteps.shape[0]
    if compiling:
        index, init = state.next_index, False   # see SchedulerState.next_index
    elif scheduler.step_index is not None:
        index, init = int(scheduler.step_index), False
    elif scheduler.begin_index is not None:
        index, init = int(scheduler.begin_index), True
    else:
        scalar_timestep(timestep)
        ts = timestep.to(scheduler.timesteps.device) if isinstance(timestep, torch.Tensor) else timestep
        if not bool((scheduler.timesteps == ts).any()):
            raise ValueError(f"timestep {scalar_timestep(timestep)!r} is not in scheduler.timesteps")
        index, init = int(scheduler.index_for_timestep(ts)), True
    if not 0 <= index < n:
        raise ValueError(f"scheduler: step index {index} is past the end of its {n}-step schedule; call "
                         "scheduler.set_timesteps(...) to start a new loop")
    return index, init


def _check_lcm_timestep(call: Call, index: int, timestep) -> None:
    """LCMScheduler.step takes abar_t and c_skip/c_out from the timestep it is given but the previous timestep
    from its step index, so the row of step ``index`` is its step only for ``scheduler.timesteps[index]``.
    Checked where that reads nothing from a device (numbers and CPU tensors, outside torch.compile)."""
    if call.compiling or isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
        return
    value = scalar_timestep(timestep)
    if not float(value).is_integer() or call.plan.timestep_rows.get(int(value)) != index:
        raise ValueError(f"timestep {value!r} is not scheduler.timesteps[{index}] (the scheduler's step index); "
                         "LCMScheduler steps through its timesteps in order")


def select_row(scheduler, call: Call, timestep) -> Tuple[Optional[int], bool]:
    """Point ``call.args`` at this step's row (and the previous x0 for DPM-Solver++ 2M); returns (host step
    index or None when found on the device, whether the scheduler's counter must be initialised)."""
    state, plan, args = call.state, call.plan, call.args
    init_index = False
    if state.kind in INDEX_BASED:
        index, init_index = indexed_step(scheduler, state, timestep, call.compiling)
        if state.kind == LCM:
            _check_lcm_timestep(call, index, timestep)
    elif call.compiling and isinstance(timestep, torch.Tensor):
        index = None  # found on the device: reading the timestep on the host would break the graph
    else:
        index = _vp_row(scheduler, call, timestep)
        plan = call.plan
    args.step = index if index is not None else plan.row_of_timestep(timestep).to(args.sample.device)
    if state.kind == FLOW_HEUN:
        stage = call.heun = heun_stage(scheduler, state, plan, index, args.sample)
        args.table, args.step = stage.plan.table(args.sample.device), stage.row
        if stage.second:  # the update starts from the stored sample, with the stored derivative as x0_prev
            args.sample, args.x0_prev = stage.sample, stage.derivative
        return index, init_index
    if state.kind == DPM and state.solver_order > 1:
        order = dpm_step_order(scheduler, index, plan.num_steps)
        args.step = (order - 1) * plan.num_steps + index
        # The previous steps' x0 are the newest entries until this step shifts the list.
        if order >= 2:
            args.x0_prev = history(scheduler, 1, args.sample)
        if order == 3:
            args.x0_prev2 = history(scheduler, 2, args.sample)
    return index, init_index


def history(scheduler, back: int, sample: torch.Tensor) -> torch.Tensor:
    """``scheduler.model_outputs[-back]``, the x0 of ``back`` steps ago, checked against the sample."""
    return check_stored(f"scheduler.model_outputs[-{back}]", f"the x0 of {back} step(s) ago,",
                        scheduler.model_outputs[-back], sample)


def push_history(scheduler, order: int, x0: torch.Tensor) -> None:
    """What the multistep schedulers' ``step`` does with this step's x0: shift ``model_outputs`` and put it
    last, and count the warm-up (``lower_order_nums``, up to the solver order)."""
    for i in range(order - 1):
        scheduler.model_outputs[i] = scheduler.model_outputs[i + 1]
    scheduler.model_outputs[-1] = x0
    if scheduler.lower_order_nums < order:
        scheduler.lower_order_nums += 1


# diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler ``step`` log this (``logger.warning``, on
# every call) while ``scale_model_input`` has never been called on the scheduler (``is_scale_input_called``).
SCALE_INPUT_WARNING = ("The `scale_model_input` function should be called before `step` to ensure correct "
                       "denoising. See `StableDiffusionPipeline` for a usage example.")


def warn_if_input_not_scaled(scheduler) -> None:
    """Log diffusers' warning, with diffusers' logger of the scheduler's ``step`` (so diffusers' verbosity
    settings apply alike), for schedulers that track ``is_scale_input_called`` and have not scaled yet."""
    # (the instance dict: for schedulers without the flag, getattr goes through diffusers' slow __getattr__)
    if vars(scheduler).get("is_scale_input_called", True):
        return
    module = getattr(getattr(type(scheduler), "step", None), "__module__", None) or __name__
    logging.getLogger(module).warning(SCALE_INPUT_WARNING)


def advance(scheduler, state: SchedulerState, index: int, init_index: bool, timestep, x0: Optional[torch.Tensor],
            compiling: bool) -> None:
    """Advance the scheduler exactly as its step() does (``index``, ``init_index``: ``select_row``'s)."""
    if state.kind not in INDEX_BASED:
        return
    if init_index and not compiling:  # (it sets the index that the next line overwrites)
        scheduler._init_step_index(timestep)
    if state.kind == DPM:
        push_history(scheduler, state.solver_order, x0)
    scheduler._step_index = index + 1
    state.next_index = index + 1
