"""The repeat lane of ``fastguide.step``: a sampling loop's plain step, once checked, in one compiled call.

A loop calls the drop-in with the same shapes, dtypes, scale and scheduler at every step. The general path
(``scheduler_step``) builds a ``Call``, a ``StepArgs`` and the kernel's argument block on every call, and on a
CPU whose caches the step's own stream has just flushed that host code costs more than the kernel at SD3's
latent (~65 us against ~75 us on two cores). Once a call has passed the checks (its ``dropin.checked`` memo
entry) and run on the general path, the entry gets a ``Lane``: the argument block filled for that call. A
repeat call that finds one does only what changes from step to step: it finds the step's row, checks that its
three tensors can be read and written where they lie, runs a copy of the block pointed at them
(``fastguide._C.cpu_guided_step_at``), and advances the scheduler.

Lanes exist for the steps that are one fused pass and nothing else: no noise on any step, no CFG rescale, no
dynamic thresholding, no solver history (DDIMScheduler with eta 0, EulerDiscreteScheduler without churn,
FlowMatchEulerDiscreteScheduler without stochastic sampling), on the C++ CPU backend, for calls with neither
``guider``, ``guidance``, ``noise`` nor ``check_finite``. A ``generator`` is checked and, these steps drawing
nothing, left alone; with ``return_dict``, x0 comes from the same pass where the scheduler's tuple has it. A call
the lane cannot take as it comes (a strided tensor, an output overlapping an input other than ``out=sample``, a
timestep off the schedule, a traced or routed call, another backend) takes the general path, which computes the
same bits; so does every call before its entry has a lane.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..backends import abi
from ..backends import cpp as _cpp
from ..backends import dispatch as _dispatch
from ..core import hooks
from ..core import noise as _noise
from ..core import ops as _ops
from ..core.args import StepArgs
from ..samplers.scheduler_tables import DDIM, DDPM, EULER, EULER_ANCESTRAL, FLOW, SchedulerPlan
from .call import Call, advance, indexed_step, schedule_row, warn_if_input_not_scaled
from .checked import plain_call_key
from .schedulers import INDEX_BASED, SchedulerState

# Schedulers whose step is the fused pass alone (with no noise drawn: the plan says which).
_SINGLE_PASS = (DDPM, DDIM, EULER, EULER_ANCESTRAL, FLOW)


def _single_pass(state: SchedulerState, plan: Optional[SchedulerPlan]) -> bool:
    """Whether steps of ``plan`` (a plan of ``state``; None: not built yet) are one fused pass and nothing else."""
    return state.kind in _SINGLE_PASS and plan is not None and not plan.any_noise and state.threshold is None


class Lane:
    """A memo entry's filled argument block (for the C++ backend), and what a repeat call checks before it
    runs it."""

    def __init__(self, kernel, launch: abi.Launch, sample: torch.Tensor, model_output: torch.Tensor):
        self.kernel = kernel            # fastguide._C.cpu_guided_step_at
        self.launch = launch            # the block, and any fp32 copy of the table or scale it points into
        self.sample_bytes = sample.nbytes          # (the memo key fixes shapes and dtypes)
        self.model_output_bytes = model_output.nbytes

    def __reduce__(self):
        # A copied or unpickled memo entry starts without a lane: this block points into this entry's table.
        return _no_lane, ()

    def writable(self, out: int, sample: int, model_output: int) -> bool:
        """Whether the kernel may write ``out`` (addresses of contiguous tensors): ``sample`` itself, element for
        element, or no memory of either input."""
        n = self.sample_bytes
        return (out == sample or out + n <= sample or out >= sample + n) and \
            (out + n <= model_output or out >= model_output + self.model_output_bytes)


def _no_lane() -> None:
    return None


def lane_for(call: Call) -> Union[Lane, bool, None]:
    """The lane of ``call``'s memo entry, built from this call (which ran on the general path): False when the
    entry's calls can never take one, None when this call's tensors cannot make it (a later call's may)."""
    state, memo, a = call.state, call.memo, call.args
    if memo.rescale or call.impl is not _cpp or not _single_pass(state, memo.plan):
        return False
    kernel = getattr(abi.extension(), "cpu_guided_step_at", None)
    if kernel is None:  # (an extension built before the lane existed)
        return False
    tensors = (a.sample, a.model_output, a.out)
    if call.plan is not memo.plan or not all(t.dtype in abi.DTYPE_CODES and t.is_contiguous() for t in tensors):
        return None  # an off-schedule DDIM row, or tensors read through temporaries
    args = StepArgs(a.sample, a.model_output, memo.table, 0, scale=memo.scale,
                    learned_variance=memo.plan.learned_variance, out=a.out)
    _ops.set_clip(args, state.clip, None)
    return Lane(kernel, abi.guided_step_args(args), a.sample, a.model_output)


def run(model_output: torch.Tensor, timestep, sample: torch.Tensor, scheduler, state: SchedulerState,
        options: tuple, guidance_scale, guidance_rescale, generator, out: Optional[torch.Tensor], want_x0: bool,
        backend: str) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The step on the lane: ``(prev_sample, x0 or None)``, or None when the call takes the general path.
    Nothing is touched before the lane is sure to run; a bad generator, backend or timestep raises what the
    general path raises (the lane's steps draw no noise, so a generator is only checked)."""
    # (before the memo key: the calls of a scheduler or options that never get a lane compute it only once,
    # on the general path)
    if not _single_pass(state, state.plans.get(options)) or hooks.via_torch_ops():
        return None
    key = plain_call_key(model_output, sample, out, guidance_scale, guidance_rescale, options)
    memo = state.checked.get(key) if key is not None else None
    lane = memo.lane if memo is not None else None
    if not lane:
        return None
    if generator is not None:
        _noise.check_generator(generator, sample.shape[0], sample.device)
    if _dispatch.resolve(backend, sample.device) is not _cpp:
        return None
    if state.kind in INDEX_BASED:
        index, init_index = indexed_step(scheduler, state, timestep, False)
    else:
        index, init_index = schedule_row(memo.plan, timestep), False
        if index is None:
            return None
    if not (sample.is_contiguous() and model_output.is_contiguous()):
        return None
    s, m = sample.data_ptr(), model_output.data_ptr()
    if out is None:
        out = torch.empty_like(sample)
    elif not (out.is_contiguous() and lane.writable(out.data_ptr(), s, m)):
        return None
    x0 = torch.empty_like(sample) if want_x0 else None
    if hooks.observed():
        hooks.report("fastguide.guided_step")
    warn_if_input_not_scaled(scheduler)
    lane.kernel(lane.launch.args, s, m, out.data_ptr(), 0 if x0 is None else x0.data_ptr(), index)
    advance(scheduler, state, index, init_index, timestep, x0, False)
    return out, x0
