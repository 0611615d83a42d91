"""Samplers as coefficient tables.

* ``schedule``: noise schedules (``Schedule``: VP/DDPM, EDM and rectified flow) and their timestep spacings;
* ``rows``: the row primitives every table is built from (prediction-type conversion, score correction,
  Euler / DDPM / DDIM updates);
* ``native``: the native samplers of ``fastguide.sample`` (``build("ddim", schedule, steps)``; on a flow
  schedule ``FLOW_SAMPLERS``, Euler and Heun on the velocity ODE);
* ``scheduler_tables``: the same rows read from a diffusers scheduler's own state, for ``fastguide.step``.

>>> plan = fastguide.samplers.build("heun", fastguide.Schedule.edm(), steps=18)
>>> x = fastguide.guided_step(x, d, plan.table, 0)      # the fused op reads the plan's table
"""

from .native import (FLOW_SAMPLERS, SAMPLERS, SIGMA_SAMPLERS, VP_SAMPLERS, Plan, Stage, build, sigma_schedule,
                     with_rows)
from .rows import prediction_coeffs
from .schedule import Schedule

__all__ = ["FLOW_SAMPLERS", "SAMPLERS", "SIGMA_SAMPLERS", "VP_SAMPLERS", "Plan", "Schedule", "Stage", "build",
           "prediction_coeffs", "sigma_schedule", "with_rows"]
