"""What a drop-in call's checks found, kept for the repeat calls of a sampling loop.

A loop calls ``fastguide.step`` with the same shapes, dtypes, devices and scales at every step, so the checks
of ``scheduler_step._check_call`` give the same answer every time. Their outcome (the plan for the step
options, its device table, the [B] scale vector, the rescale factor) is kept in the scheduler's cached state,
keyed by everything those checks read, and a call whose key is there skips them. A new schedule or config
gives a new state, hence an empty memo; only calls that passed every check are kept, so a bad call always
meets the checks. The calls covered are the plain ones: plain tensors, a number (or no) scale, no noise,
gradients or guider combine, not while tracing (whose scale vector differs). A generator is not part of the key:
a repeat call checks it where the checks would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..samplers.scheduler_tables import SchedulerPlan

_NUMBERS = (float, int)  # exact types: a bool (hash(True) == hash(1)) must still meet check_scale's TypeError


@dataclass(eq=False)
class Checked:
    """The outcome of one call's checks that a repeat call can reuse."""

    plan: SchedulerPlan
    table: torch.Tensor              # plan.table(sample.device)
    scale: Optional[torch.Tensor]    # the [B] fp32 CFG scale, None without CFG
    rescale: float
    # ``dropin.repeat.Lane`` once a call of this entry has run on the general path and the entry's calls can
    # take the repeat lane; False when they never can (its scheduler, backend or options need more).
    lane: object = None


def plain_call_key(model_output, sample, out, guidance_scale, guidance_rescale, options: tuple) -> Optional[tuple]:
    """The memo key of a plain call (see the module docstring), or None for any other call. Not for a call
    being traced: the caller asks ``torch.compiler.is_compiling()`` first."""
    if type(model_output) is not torch.Tensor or type(sample) is not torch.Tensor:
        return None
    if out is not None and type(out) is not torch.Tensor:
        return None
    if guidance_scale is not None and type(guidance_scale) not in _NUMBERS or type(guidance_rescale) not in _NUMBERS:
        return None
    out_key = None if out is None else (out.shape, out.dtype, out.device)
    return (options, guidance_scale, guidance_rescale, model_output.shape, model_output.dtype, model_output.device,
            sample.shape, sample.dtype, sample.device, out_key)
