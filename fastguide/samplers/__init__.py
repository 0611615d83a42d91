"""Samplers as coefficient tables.

* ``schedule``: noise schedules (``Schedule``: VP/DDPM and EDM) and their timestep spacings;
* ``rows``: the row primitives every table is built from (prediction-type conversion, score correction,
  Euler / DDPM / DDIM updates);
* ``native``: the native samplers of ``fastguide.sample`` (``build("ddim", schedule, steps)``);
* ``scheduler_tables``: the same rows read from a diffusers scheduler's own state, for ``fastguide.step``.

>>> plan = fastguide.samplers.build("heun", fastguide.Schedule.edm(), steps=18)
>>> x = fastguide.guided_step(x, d, plan.table, 0)      # the fused op reads the plan's table
"""

from .native import SAMPLERS, SIGMA_SAMPLERS, VP_SAMPLERS, Plan, Stage, build, sigma_schedule, with_rows
from .rows import prediction_coeffs
from .schedule import Schedule

__all__ = ["SAMPLERS", "SIGMA_SAMPLERS", "VP_SAMPLERS", "Plan", "Schedule", "Stage", "build", "prediction_coeffs",
           "sigma_schedule", "with_rows"]
