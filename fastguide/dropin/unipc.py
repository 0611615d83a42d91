"""UniPCMultistepScheduler's step as fused passes (Zhao et al. 2023, UniPC: a unified predictor-corrector).

A diffusers UniPC step at index i takes the model output at x_i (the previous predictor's output) and

1. converts it to x0^ m_i (the prediction type, CFG and thresholding: ``convert_model_output``);
2. unless this is the first step (or ``disable_corrector`` holds i - 1), corrects the *last* sample
   ``scheduler.last_sample`` with m_i and the stored x0s (UniC, of the previous step's order);
3. advances the corrected sample with m_i and m_{i-1} (UniP, order 1 or 2), and keeps the corrected sample as
   ``last_sample``.

Without the corrector that is one fused pass (the plan's predictor row, x0^ written on the way). With it,
three: the x0-only pass of the model output, the corrector (the last sample and m_i, m_{i-1}, m_{i-2} in one
pass: x0_prev, x0_prev2) and the predictor from the corrected sample. The rows are
``fastguide.samplers.scheduler_tables.unipc_plan``'s; the scheduler's state (``model_outputs``,
``timestep_list``, ``this_order``, ``last_sample``, ``lower_order_nums``) advances as its own ``step`` does.
Guidance networks correct the score of the model output (``eps -= sigma g``) in the x0 the step stores, so the
next corrector reads the corrected x0, as diffusers' own step on the corrected prediction would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..core import ops as _ops
from ..core.args import StepArgs
from ..samplers.scheduler_tables import UNIPC_CORRECT, UNIPC_PREDICT, UNIPC_PREDICT_FROM_X0, config
from .call import Call, history, push_history
from .schedulers import check_stored


@dataclass
class UniPCStep:
    """The passes of one UniPC call: whether the corrector runs (of ``corrector_order``) and the predictor's
    order, as ``UniPCMultistepScheduler.step`` decides them from the scheduler's state."""

    index: int
    predictor_order: int
    corrector_order: Optional[int]      # None: no corrector on this call
    last_sample: Optional[torch.Tensor]  # the corrector's start
    x0_prev: Optional[torch.Tensor]     # m_{i-1}: read by the corrector and by an order-2 predictor
    x0_prev2: Optional[torch.Tensor]    # m_{i-2}: read by an order-2 corrector


def _row(block: int, order: int, index: int, n: int) -> int:
    return (block + order - 1) * n + index


def select(scheduler, call: Call, index: int) -> UniPCStep:
    """This call's passes, and ``call.args`` pointed at the predictor row (the x0 pass reads its prediction
    columns); the stored sample and x0s it reads are checked first."""
    if call.compiling:
        raise RuntimeError("fastguide.step does not trace UniPCMultistepScheduler inside torch.compile (its "
                           "corrector state lives on the scheduler); call it eagerly")
    n, order, sample = call.plan.num_steps, call.state.solver_order, call.args.sample
    this_order = min(order, n - index) if config(scheduler, "lower_order_final") else order
    predictor = min(this_order, int(scheduler.lower_order_nums) + 1)
    corrector = last = None
    if index > 0 and index - 1 not in scheduler.disable_corrector and scheduler.last_sample is not None:
        corrector = int(scheduler.this_order)
        last = check_stored("scheduler.last_sample", "the previous step's sample", scheduler.last_sample, sample)
    m1 = history(scheduler, 1, sample) if corrector is not None or predictor == 2 else None
    m2 = history(scheduler, 2, sample) if corrector == 2 else None
    if predictor == 2:
        call.args.x0_prev = m1
    call.args.step = _row(UNIPC_PREDICT, predictor, index, n)
    return UniPCStep(index, predictor, corrector, last, m1, m2)


def run(scheduler, call: Call, predicted_x0: Callable[[], torch.Tensor], timestep, backend: str) -> torch.Tensor:
    """The step's passes; returns prev_sample (``call.args.out`` when given) and advances the scheduler's
    UniPC state (not its step index: the caller's ``_advance``)."""
    st, a, n = call.unipc, call.args, call.plan.num_steps
    if st.corrector_order is None:
        # diffusers keeps the step's input sample as last_sample: copy it if out= is about to overwrite it.
        kept = a.sample
        if a.out is not None and a.out.untyped_storage().data_ptr() == a.sample.untyped_storage().data_ptr():
            kept = a.sample.clone()
        x0 = a.x0_out = torch.empty_like(a.sample, memory_format=torch.contiguous_format)
        prev = _ops.run_step(a, backend, call.impl)
        _advance(scheduler, call, x0, kept, timestep)
        return prev
    x0 = predicted_x0()
    corrected = torch.empty_like(a.sample, memory_format=torch.contiguous_format)
    _ops.run_step(StepArgs(st.last_sample, x0, a.table, _row(UNIPC_CORRECT, st.corrector_order, st.index, n),
                           x0_prev=st.x0_prev, x0_prev2=st.x0_prev2, out=corrected), backend, call.impl)
    prev = _ops.run_step(StepArgs(corrected, x0, a.table, _row(UNIPC_PREDICT_FROM_X0, st.predictor_order,
                                                                st.index, n),
                                  x0_prev=st.x0_prev if st.predictor_order == 2 else None, out=a.out), backend,
                        call.impl)
    _advance(scheduler, call, x0, corrected, timestep)
    return prev


def _advance(scheduler, call: Call, x0: torch.Tensor, last: torch.Tensor, timestep) -> None:
    """``UniPCMultistepScheduler.step``'s bookkeeping: the x0 history and warm-up count (as DPM-Solver's), the
    timestep list, the order taken and the sample the next corrector starts from."""
    order = call.state.solver_order
    push_history(scheduler, order, x0)
    for i in range(order - 1):
        scheduler.timestep_list[i] = scheduler.timestep_list[i + 1]
    scheduler.timestep_list[-1] = timestep
    scheduler.this_order = call.unipc.predictor_order
    scheduler.last_sample = last
