"""Classifier and discriminator guidance inside a diffusers loop (``fastguide.step(..., guidance=[...])``).

The gradients are the native loop's (``fastguide.guidance.gradients``); what differs is where the per-step facts come
from: the drop-in plan of the scheduler (its state parametrisation ``x = alpha x0 + sigma eps`` and, for
DDPM, the variance). DDPMScheduler takes mean shifts (ADM ``condition_mean``, Ma et al. on x0^, DG);
every other scheduler takes score corrections (ADM ``condition_score``, DG). Ma et al.'s x0-input recipe
is a DDPM mean shift, so it needs DDPMScheduler here (``fastguide.sample`` also has it for DDIM, EDM and flow).

Flow matching (``FlowMatchEulerDiscreteScheduler``): the state ``x = (1 - s) x0 + s eps`` is one of the form
``alpha x0 + sigma eps`` (alpha = 1 - s, sigma = s), so the score correction ``eps -= sigma g`` is exact
Bayes there too (``E[eps | x] = -sigma grad log p``): the velocity becomes ``v - s/(1-s) g``. The networks see
the state itself (a flow classifier is trained on the flow's own noisy states) and ``t = s T``; an x0 classifier
(Ma et al.) sees ``x0^ = x - s v`` and its gradient enters the same way, as ``fastguide.sample``'s flow Euler
takes it (``gamma`` is refused: there is no variance to add to). The step at
s = 1 (pure noise) is not guided and runs no network: there ``s/(1-s)`` is infinite and the gradient of
``log p(y | x) = log p(y)`` is 0, a product whose finite limit no network gives (``rows.score_cols``).
``FlowMatchHeunDiscreteScheduler`` takes the same correction of the velocity in each stage, on the state the
model sees (the derivative row's ``P_G`` carries it, so the stored derivative is the corrected one: Heun on the
guided ODE); x0 classifiers are refused there (its rows carry the derivative, not x0^).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..core.checks import check_labels_tensor
from ..core.layout import Col
from ..guidance.gradients import classifier_grad, discriminator_grad
from ..guidance.plan import split_guidance
from ..samplers.scheduler_tables import FLOW, FLOW_HEUN


def split_specs(guidance: Sequence):
    """(classifier specs, discriminator specs) of a drop-in ``guidance`` list; CFG belongs in guidance_scale."""
    cfg, classifiers, discriminators = split_guidance(guidance)
    if cfg is not None:
        raise ValueError(f"guidance: {type(cfg).__name__} is not a drop-in guidance spec: pass CFG as guidance_scale / "
                         "guidance_rescale, and CFG-Zero*, APG, MAMBO-G or TCFG as a diffusers guider (guider=)")
    return classifiers, discriminators


def check(classifiers, discriminators, y, sample: torch.Tensor, mean_shift_capable: bool,
          scheduler_name: str, x0_as_score: bool = False) -> None:
    """Everything about the guidance arguments that can be checked before any network runs. ``x0_as_score``:
    the scheduler takes an x0^ classifier's gradient as a score correction (flow matching)."""
    if classifiers and y is None:
        raise ValueError("y (target labels) is required by ClassifierGuidance")
    if y is not None:
        check_labels_tensor("y", y, sample.shape[0], sample.device)
    x0_specs = [c for c in classifiers if c.input == "x0"]
    if x0_specs and not (mean_shift_capable or x0_as_score):
        raise ValueError(f"guidance: ClassifierGuidance(input='x0') is a DDPM mean shift; {scheduler_name} has "
                         "none (use DDPMScheduler, or fastguide.sample for the DDIM, EDM and flow recipes)")
    if x0_as_score and any(c.gamma > 0 for c in x0_specs):
        raise ValueError(f"guidance: ClassifierGuidance(input='x0', gamma > 0): gamma is Ma et al.'s extra DDPM "
                         f"variance, and {scheduler_name} has no variance; use gamma=0")
    if any(c.gamma > 0 for c in x0_specs) and (len(x0_specs) > 1 or len(x0_specs) < len(classifiers)
                                                 or discriminators):
        raise ValueError("guidance: ClassifierGuidance(input='x0', gamma > 0) must be the only mean-shift "
                         "guidance of the step (its extra variance applies to the whole shift)")


def _extra_variance_table(plan, gamma: float, device: torch.device) -> torch.Tensor:
    """The plan's table with Ma et al.'s ``max(0, gamma Sigma_max sin(pi i/N))`` added to the mean-shift
    column, i = N-1 .. 0 counted down as in EluCD; cached on the plan."""
    def build() -> np.ndarray:
        n = plan.num_steps
        if plan.learned_variance:
            sigma_max = float(np.exp(plan.rows[:n, Col.LV_MAX].max()))  # learned range's upper end, beta_t
        else:
            sigma_max = float(np.max(plan.variance))
        rows = plan.rows.copy()
        for index in range(n):
            rows[index, Col.D] += max(0.0, gamma * sigma_max * math.sin(math.pi * (n - 1 - index) / n))
        return rows
    return plan.device_tensor(("x0-gamma", gamma), device, build)


def make_guide(classifiers, discriminators, y, sample: torch.Tensor, timestep: float, num_train_timesteps: int,
               backend: str) -> Callable:
    """The ``guide(plan, index, predicted_x0)`` hook of ``fastguide.dropin.scheduler_step.scheduler_step``."""

    def guide(plan, index: int, predicted_x0: Callable[[], torch.Tensor]):
        alpha, sigma = float(plan.alpha[index]), float(plan.sigma[index])
        if plan.kind in (FLOW, FLOW_HEUN):
            if alpha == 0.0:           # s = 1: not guided (rows.score_cols is 0 there too)
                return None, None, None
            view = 1.0                 # flow networks see the flow state
        else:
            view = 1.0 / math.sqrt(alpha * alpha + sigma * sigma)  # guidance networks see the VP view
        total: Optional[torch.Tensor] = None
        table = None
        for spec in classifiers:
            if spec.input == "xt":
                g = classifier_grad(spec, sample, timestep, y, input_scale=view, backend=backend)
            else:
                g = classifier_grad(spec, predicted_x0(), timestep, y, backend=backend)
                if spec.gamma > 0:
                    table = _extra_variance_table(plan, spec.gamma, sample.device)
            total = g if total is None else total + g
        for spec in discriminators:
            w = spec.weight_at(timestep / num_train_timesteps)
            if w:
                g = discriminator_grad(spec, sample, timestep, y, w, input_scale=view)
                total = g if total is None else total + g
        if plan.supports_mean_shift:
            return None, total, table
        return total, None, table

    return guide
