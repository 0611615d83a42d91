"""The drop-in step for diffusers loops: ``fastguide.step`` in place of CFG + ``scheduler.step``.

* ``scheduler_step``: the step itself (checks, row selection, guidance terms, noise, advancing the scheduler);
* ``schedulers``: supported schedulers, their config checks and the state kept per scheduler;
* ``guidance``: classifier / discriminator guidance inside a diffusers loop.
* ``guiders``: diffusers guider instances (CFG, CFG-Zero*, APG, APG-mix, MAMBO-G, TCFG) fused into the step
  (``fastguide.step(..., guider=g)``).

>>> scheduler.set_timesteps(50)
>>> fastguide.dropin.prepare(scheduler, "cpu")     # optional: build the tables now (needed for torch.compile)
"""

from ..samplers.scheduler_tables import SchedulerPlan
from .schedulers import plan_for, prepare
from .scheduler_step import StepOutput, step

__all__ = ["SchedulerPlan", "StepOutput", "plan_for", "prepare", "step"]
