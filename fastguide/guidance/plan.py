"""How guidance specs fold into a sampler plan: the mean-shift columns and per-stage factors they need.

``split_guidance`` is the one parser of guidance lists (the native loop and the drop-in step both use it);
``build_guided_plan`` adds Ma et al.'s extra variance to a native plan's rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from ..core.layout import Col
from ..samplers import native as samplers
from .specs import CFG, ClassifierGuidance, DiscriminatorGuidance


@dataclass
class GuidedPlan:
    """A sampler plan plus the guidance configuration, with the mean-shift columns adjusted."""

    plan: samplers.Plan
    cfg: Optional[CFG]
    classifiers: List[ClassifierGuidance]
    discriminators: List[DiscriminatorGuidance]
    rows: np.ndarray
    # Per stage, the factor multiplying Ma et al.'s x0-gradient so it can share the mean-shift column, and
    # the one spec (gamma > 0) it applies to.
    x0_factor: List[float]
    x0_factor_spec: Optional[ClassifierGuidance] = None

    def uses_mean_shift_x0(self) -> bool:
        """x0 classifiers see x0^ and shift the step's output through the mean-shift column (VP samplers; flow
        samplers, whose D column makes that shift a score correction)."""
        on_x0 = self.plan.sampler in samplers.VP_SAMPLERS or self.plan.schedule.kind == "flow"
        return on_x0 and any(c.input == "x0" for c in self.classifiers)

    def uses_edm_recipe(self) -> bool:
        return self.plan.sampler in samplers.SIGMA_SAMPLERS and self.plan.schedule.kind != "flow" and \
            any(c.input == "x0" for c in self.classifiers)


def split_guidance(guidance) -> Tuple[Optional[CFG], List[ClassifierGuidance], List[DiscriminatorGuidance]]:
    """(the CFG spec or None, classifier specs, discriminator specs) of a guidance spec or list of specs."""
    if isinstance(guidance, (CFG, ClassifierGuidance, DiscriminatorGuidance)):
        guidance = [guidance]
    if not isinstance(guidance, (list, tuple)):
        raise TypeError("guidance must be a sequence of fastguide.CFG / ClassifierGuidance / "
                        "DiscriminatorGuidance specs")
    cfg, clfs, discs = None, [], []
    for g in guidance:
        if isinstance(g, CFG):
            if cfg is not None:
                raise ValueError("guidance holds more than one CFG spec")
            cfg = g
        elif isinstance(g, ClassifierGuidance):
            clfs.append(g)
        elif isinstance(g, DiscriminatorGuidance):
            discs.append(g)
        else:
            raise TypeError(f"guidance entries must be fastguide guidance specs, got {type(g).__name__}")
    return cfg, clfs, discs


def _check_flow_guidance(plan: samplers.Plan, classifiers) -> None:
    """On a flow schedule an x0^ classifier's gradient is a score correction of the stage's velocity,
    ``v -= s/(1-s) g`` (the row's D column), applied to the stage output only: Euler is exact about it, but
    Heun's correction stage recovers the first stage's slope from x_e and x0^_1, which such a shift does not
    reach, and Ma et al.'s gamma is an extra DDPM variance, which flow samplers have none of."""
    x0_specs = [c for c in classifiers if c.input == "x0"]
    if not x0_specs:
        return
    if plan.sampler != "euler":
        raise ValueError(f"ClassifierGuidance(input='x0') on a flow schedule runs with sampler='euler', not "
                         f"{plan.sampler!r}: its gradient shifts a stage's output, and Heun's correction stage "
                         f"cannot separate that shift from the first stage's slope (use input='xt' with heun)")
    if any(c.gamma > 0 for c in x0_specs):
        raise ValueError("ClassifierGuidance(input='x0', gamma > 0) on a flow schedule: gamma is Ma et al.'s "
                         "extra DDPM variance, and a flow sampler has no variance; use gamma=0")


def build_guided_plan(plan: samplers.Plan, guidance) -> GuidedPlan:
    """Fold Ma et al.'s extra variance ``max(0, gamma Sigma_max sin(pi i/N))`` into the mean-shift column."""
    cfg, clfs, discs = split_guidance(guidance)
    if plan.schedule.kind == "flow":
        _check_flow_guidance(plan, clfs)
    rows = plan.rows.copy()
    x0_factor = [1.0] * len(plan.stages)
    x0_specs = [c for c in clfs if c.input == "x0"]
    ma = [c for c in x0_specs if c.gamma > 0]
    if len(ma) > 1:
        raise ValueError("at most one ClassifierGuidance(input='x0') with gamma > 0 per loop")
    spec = None
    if ma and plan.sampler in samplers.VP_SAMPLERS:
        spec = ma[0]
        # Other gradients sharing the mean-shift column must get Sigma_t only, not the extra variance: the
        # other x0 classifiers, and on DDPM the x_t classifiers and discriminators.
        others = len(x0_specs) > 1 or (plan.sampler == "ddpm" and bool(discs or any(c.input == "xt"
                                                                                     for c in clfs)))
        n = plan.steps
        for k, st in enumerate(plan.stages):
            i = n - 1 - st.step  # EluCD counts the respaced step down: N-1 .. 0
            extra = max(0.0, spec.gamma * plan.max_variance * math.sin(math.pi * i / n))
            if not others:
                rows[k, Col.D] += extra
            elif plan.learned_variance:
                raise ValueError("ClassifierGuidance(input='x0', gamma > 0) cannot share the mean shift with "
                                 "other mean-shift guidance under a learned variance; use gamma=0 or one method")
            elif extra > 0:
                x0_factor[k] = (st.variance + extra) / st.variance
    return GuidedPlan(plan, cfg, clfs, discs, rows, x0_factor, spec)
