"""How guidance specs fold into a sampler plan: the mean-shift columns and per-stage factors they need.

``split_guidance`` is the one parser of guidance lists (the native loop and the drop-in step both use it);
``build_guided_plan`` adds Ma et al.'s extra variance to a native plan's rows and CFG++'s update to the
rows where it is active; ``method_of`` says how the native loop runs a list's CFG-like spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np

from ..core.layout import Col
from ..samplers import native as samplers
from . import modern
from .specs import CFG, CFGPlusPlus, ClassifierGuidance, DiscriminatorGuidance

# The specs that decide how the model's [uncond; cond] predictions combine: at most one per loop.
CFG_LIKE = (CFG, CFGPlusPlus) + tuple(modern.SPECS)
SPEC_TYPES = CFG_LIKE + (ClassifierGuidance, DiscriminatorGuidance)


@dataclass(frozen=True, eq=False)
class GuidanceMethod:
    """How the native loop runs a CFG-like spec (fixed when the loop is built):

    * ``combine``: ``""`` CFG's ``u + w (c - u)`` (the step's ``scale``, with CFG rescale); ``"cfgpp"`` the
      same combine with eps~ from u (CFG++, ``StepArgs.eps_from_uncond``, on the rows of
      ``samplers.native.cfg_pp_rows``); ``"gram"`` a ``fastguide.guidance.modern`` method: the step's
      ``combine`` from ``modern.coefficients`` (its CFG rescale folded in), after ``guidance_gram`` when
      ``gram``.
    * ``momentum``: APG's beta; the loop keeps the running average as a device buffer (``extra``).
    * ``extra``: the combine has an e term (APG's running average, the perturbed prediction).
    * ``perturbed``: ``"model"`` (``PerturbedGuidance.perturbed_model(x, t, y)``, a second network) or
      ``"batch"`` (no perturbed model: the model's own forward gets a third block, ``[uncond; cond;
      perturbed]`` with labels ``[null; y; y]``, as diffusers' PAG pipelines batch it, and perturbs it
      itself; this needs a null label).
    * ``zero_init_steps``: CFG-Zero*'s steps with prediction 0 (no network runs on them).
    """

    spec: Any
    combine: str = ""
    null_label: Any = None
    rescale: float = 0.0
    gram: bool = False
    momentum: Optional[float] = None
    extra: bool = False
    perturbed: str = ""
    zero_init_steps: int = 0


def method_of(spec) -> Optional[GuidanceMethod]:
    """The ``GuidanceMethod`` of a CFG-like spec (None: no CFG-like guidance). The specs of
    ``fastguide.guidance.modern`` carry no null label (yet): their uncond half is then a second call
    ``model(x, t, None)``; one with a ``null_label`` attribute gets the one-call ``[null; y]`` batch."""
    if spec is None:
        return None
    if isinstance(spec, CFG):
        return GuidanceMethod(spec, "", spec.null_label, float(spec.rescale))
    if isinstance(spec, CFGPlusPlus):
        return GuidanceMethod(spec, "cfgpp", spec.null_label)
    perturbed, null_label = "", getattr(spec, "null_label", None)
    if isinstance(spec, modern.PerturbedGuidance):
        perturbed = "model" if spec.perturbed_model is not None else "batch"
        if perturbed == "batch" and null_label is None:
            raise ValueError("PerturbedGuidance without a perturbed_model batches the perturbed branch into the "
                             "model's forward as [uncond; cond; perturbed] with labels [null; y; y], which needs "
                             "a null label; pass perturbed_model (called as perturbed_model(x, t, y)) instead")
    zero = int(spec.zero_init_steps) if isinstance(spec, modern.CFGZeroStar) else 0
    return GuidanceMethod(spec, "gram", null_label, 0.0, modern.needs_gram(spec),
                          modern.momentum_of(spec), modern.needs_extra(spec), perturbed, zero)


@dataclass
class GuidedPlan:
    """A sampler plan plus the guidance configuration, with the mean-shift columns adjusted."""

    plan: samplers.Plan
    cfg: Optional[Any]                # the CFG-like spec (one of CFG_LIKE) or None
    classifiers: List[ClassifierGuidance]
    discriminators: List[DiscriminatorGuidance]
    rows: np.ndarray
    # Per stage, the factor multiplying Ma et al.'s x0-gradient so it can share the mean-shift column, and
    # the one spec (gamma > 0) it applies to.
    x0_factor: List[float]
    x0_factor_spec: Optional[ClassifierGuidance] = None
    method: Optional[GuidanceMethod] = None  # how the loop runs ``cfg`` (``method_of``)

    def uses_mean_shift_x0(self) -> bool:
        """x0 classifiers see x0^ in an x0-only pre-pass (VP samplers: their gradient shifts the mean; flow
        samplers: it corrects the score, ``LoopSpec.x0_score``)."""
        on_x0 = self.plan.sampler in samplers.VP_SAMPLERS or self.plan.schedule.kind == "flow"
        return on_x0 and any(c.input == "x0" for c in self.classifiers)

    def uses_edm_recipe(self) -> bool:
        return self.plan.sampler in samplers.SIGMA_SAMPLERS and self.plan.schedule.kind != "flow" and \
            any(c.input == "x0" for c in self.classifiers)


def split_guidance(guidance) -> Tuple[Optional[Any], List[ClassifierGuidance], List[DiscriminatorGuidance]]:
    """(the CFG-like spec or None, classifier specs, discriminator specs) of a guidance spec or list of specs;
    CFG-like: ``CFG``, ``CFGPlusPlus`` or a ``fastguide.guidance.modern`` spec, at most one."""
    if isinstance(guidance, SPEC_TYPES):
        guidance = [guidance]
    if not isinstance(guidance, (list, tuple)):
        raise TypeError("guidance must be a sequence of fastguide guidance specs (CFG or another CFG-like "
                        "spec, ClassifierGuidance, DiscriminatorGuidance)")
    cfg, clfs, discs = None, [], []
    for g in guidance:
        if isinstance(g, CFG_LIKE):
            if cfg is not None:
                raise ValueError(f"guidance holds more than one CFG-like spec ({type(cfg).__name__} and "
                                 f"{type(g).__name__}): CFG, CFGPlusPlus, CFGZeroStar, APG, MamboG, TCFG and "
                                 f"PerturbedGuidance each decide how the predictions combine; pass one")
            cfg = g
        elif isinstance(g, ClassifierGuidance):
            clfs.append(g)
        elif isinstance(g, DiscriminatorGuidance):
            discs.append(g)
        else:
            raise TypeError(f"guidance entries must be fastguide guidance specs, got {type(g).__name__}")
    return cfg, clfs, discs


def _check_flow_guidance(classifiers) -> None:
    """On a flow schedule an x0^ classifier's gradient is a score correction of the stage's velocity,
    ``v -= s/(1-s) g`` (Euler, and both Heun stages: Heun on the guided ODE); Ma et al.'s gamma is an extra
    DDPM variance, which flow samplers have none of."""
    if any(c.input == "x0" and c.gamma > 0 for c in classifiers):
        raise ValueError("ClassifierGuidance(input='x0', gamma > 0) on a flow schedule: gamma is Ma et al.'s "
                         "extra DDPM variance, and a flow sampler has no variance; use gamma=0")


def build_guided_plan(plan: samplers.Plan, guidance) -> GuidedPlan:
    """Fold Ma et al.'s extra variance ``max(0, gamma Sigma_max sin(pi i/N))`` into the mean-shift column."""
    cfg, clfs, discs = split_guidance(guidance)
    if plan.schedule.kind == "flow":
        _check_flow_guidance(clfs)
    rows = plan.rows.copy()
    if isinstance(cfg, CFGPlusPlus):
        rows = samplers.cfg_pp_rows(plan, rows, [cfg.active(st.step, plan.steps) for st in plan.stages])
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
    return GuidedPlan(plan, cfg, clfs, discs, rows, x0_factor, spec, method_of(cfg))
