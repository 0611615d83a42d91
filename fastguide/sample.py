"""The native guided sampling loop: model calls, guidance gradients and one fused step per stage.

Everything that could make the loop branch on device values is decided when the loop is built: which
stages draw noise, where CFG and each guidance method are active, the coefficient table itself. The loop
only indexes that static plan, so it never syncs with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import dispatch as _dispatch
from . import ops, samplers
from .guidance import (CFG, ClassifierGuidance, DiscriminatorGuidance, classifier_grad, discriminator_grad,
                       edm_recipe_shift)
from .layout import Col
from .noise import Generator, check_generator, randn
from .schedule import Schedule

MEAN_SHIFT_SAMPLERS = ("ddpm",)


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
        return self.plan.sampler in samplers.VP_SAMPLERS and any(c.input == "x0" for c in self.classifiers)

    def uses_edm_recipe(self) -> bool:
        return self.plan.sampler in samplers.SIGMA_SAMPLERS and any(c.input == "x0" for c in self.classifiers)


def _split_guidance(guidance) -> Tuple[Optional[CFG], List[ClassifierGuidance], List[DiscriminatorGuidance]]:
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


def build_guided_plan(plan: samplers.Plan, guidance) -> GuidedPlan:
    """Fold Ma et al.'s extra variance ``max(0, gamma Sigma_max sin(pi i/N))`` into the mean-shift column."""
    cfg, clfs, discs = _split_guidance(guidance)
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


def _check_model_output(out, rows: int, x: torch.Tensor, learned: bool) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a tensor, got {type(out).__name__}")
    expected = (rows, x.shape[1] * (2 if learned else 1)) + tuple(x.shape[2:])
    if tuple(out.shape) != expected:
        raise ValueError(f"model returned shape {tuple(out.shape)}, expected {expected}")
    return out


def sample(model: Callable[..., torch.Tensor], x_T: torch.Tensor, *, schedule: Schedule, sampler: str,
           steps: int, y: Optional[torch.Tensor] = None, guidance: Sequence = (), generator: Generator = None,
           eta: Optional[float] = None, clip_denoised: Optional[Tuple[float, float]] = None,
           compile: Optional[str] = None, progress: bool = False, backend: str = "auto",
           **sampler_options) -> torch.Tensor:
    """Run a whole guided sampling loop and return the samples.

    ``model(x, t, y)`` returns the schedule's prediction type (2C channels for a learned-range DDPM
    variance); ``t`` is a [B] tensor of training timesteps (VP schedules) or sigmas (EDM). ``x_T`` is
    unit Gaussian noise of the sample shape (scaled to the sampler's starting noise level here).
    ``clip_denoised=(-1, 1)`` clips x0^; ``None`` leaves it alone. ``eta`` applies to ``ddim`` and
    ``euler_ancestral``; other sampler keywords (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``) pass
    through to ``fastguide.samplers``.

    >>> x = fastguide.sample(model, torch.randn(8, 1, 16, 16), schedule=fastguide.Schedule.ddpm(),
    ...                      sampler="ddim", steps=50, y=labels,
    ...                      guidance=[fastguide.CFG(3.0, null_label=10)])
    """
    if compile is not None:
        if compile in ("graph", "inductor"):
            raise NotImplementedError(f"compile={compile!r} is not available yet; use compile=None")
        raise ValueError(f"compile must be None, 'graph' or 'inductor', got {compile!r}")
    if not callable(model):
        raise TypeError("model must be callable as model(x, t, y)")
    ops.check_tensor("x_T", x_T)
    if x_T.dim() < 2:
        raise ValueError(f"x_T must be [B, C, ...], got shape {tuple(x_T.shape)}")
    batch = x_T.shape[0]
    if y is not None:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a tensor of labels, got {type(y).__name__}")
        if y.shape[:1] != (batch,) or y.device != x_T.device:
            raise ValueError(f"y must have {batch} rows on {x_T.device}, got {tuple(y.shape)} on {y.device}")
    check_generator(generator, batch, x_T.device)
    if clip_denoised is not None:
        pair = tuple(clip_denoised) if isinstance(clip_denoised, (tuple, list)) else None
        if pair is None or len(pair) != 2 or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair) or \
                not pair[0] < pair[1]:
            raise ValueError(f"clip_denoised must be None or a (low, high) pair of numbers with low < high, "
                             f"got {clip_denoised!r}")
        clip_denoised = (float(pair[0]), float(pair[1]))
    if not isinstance(progress, bool):
        raise TypeError("progress must be a bool")
    _dispatch.resolve(backend, x_T.device)  # an unknown or unusable backend is reported before any model call
    options = dict(sampler_options)
    if eta is not None:
        if sampler not in ("ddim", "euler_ancestral"):
            raise ValueError(f"eta applies to 'ddim' and 'euler_ancestral', not {sampler!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
        options["eta"] = eta
    if sampler == "ddim" and clip_denoised is not None:
        options["clipped"] = True
    plan = samplers.build(sampler, schedule, steps, **options)
    gp = build_guided_plan(plan, guidance)
    if (gp.classifiers or (gp.cfg is not None and gp.cfg.null_label is not None)) and y is None:
        raise ValueError("y (labels) is required by classifier guidance and by CFG with a null_label")
    if gp.classifiers and (y.dim() != 1 or y.dtype not in (torch.int32, torch.int64)):
        raise TypeError(f"y must be a [{batch}] integer tensor of class labels for classifier guidance, got "
                        f"{y.dtype} {tuple(y.shape)}")
    cfg_scale = None
    if gp.cfg is not None:
        cfg_scale = ops.check_scale("CFG scale", gp.cfg.scale, batch, x_T.device, sync_ok=True)
    return _run(model, x_T, gp, y, generator, clip_denoised, cfg_scale, progress, backend)


def _run(model, x_T, gp: GuidedPlan, y, generator, clip, cfg_scale, progress, backend) -> torch.Tensor:
    plan = gp.plan
    device, dtype = x_T.device, x_T.dtype
    table = torch.from_numpy(gp.rows).float().to(device)
    learned_model = plan.schedule.kind == "vp" and plan.schedule.variance_type == "learned_range"
    learned_step = learned_model and plan.sampler == "ddpm"
    cfg, n = gp.cfg, plan.steps
    null_y = None
    if cfg is not None and cfg.null_label is not None:
        null_y = torch.full_like(y, cfg.null_label) if not isinstance(cfg.null_label, torch.Tensor) \
            else cfg.null_label.to(device).expand_as(y)
    mean_shift = plan.sampler in MEAN_SHIFT_SAMPLERS
    x = x_T * plan.init_scale
    x0_prev: Optional[torch.Tensor] = None
    stages = plan.stages
    it = range(len(stages))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, total=len(stages), desc=f"fastguide {plan.sampler}")
    for k in it:
        st = stages[k]
        # Ma et al.'s EDM recipe moves the state before the denoiser (first stage of each step only).
        if gp.uses_edm_recipe() and not st.second_stage:
            for spec in gp.classifiers:
                if spec.input == "x0":
                    x = x + edm_recipe_shift(spec, x, st.step, n, st.guide_t, y, backend=backend)
        if st.pre_noise:
            x = x + st.pre_noise * randn(x.shape, generator, device, dtype)

        x_in = x * st.c_in if st.c_in != 1.0 else x
        t = torch.full((x.shape[0],), st.t_model, device=device, dtype=torch.float32)
        with_cfg = cfg is not None and cfg.active(st.step, n)
        if with_cfg:
            if null_y is not None:
                out = model(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([null_y, y]))
            else:
                out = torch.cat([model(x_in, t, None), model(x_in, t, y)])
        else:
            out = model(x_in, t, y)
        out = _check_model_output(out, x.shape[0] * (2 if with_cfg else 1), x, learned_model)
        if learned_model and not learned_step:
            out = out[:, : x.shape[1]]  # only DDPM uses the learned variance channels
        noise = randn(x.shape, generator, device, dtype) if st.noise else None

        g_score, g_mean = _state_gradients(gp, x, st, y, mean_shift, backend)
        step_kwargs = dict(scale=cfg_scale if with_cfg else None, rescale=cfg.rescale if with_cfg else 0.0,
                           noise=noise, x0_prev=x0_prev if st.uses_x0_prev else None, clip=clip,
                           learned_variance=learned_step, backend=backend)
        if gp.uses_mean_shift_x0():
            # Ma et al.: the classifier sees x0^ (clipped like the step clips it); no backprop into the model.
            x0_hat = torch.empty_like(x)
            ops.guided_step(x, out, table, k, write_out=False, x0_out=x0_hat, **step_kwargs)
            for spec in gp.classifiers:
                if spec.input == "x0":
                    g = classifier_grad(spec, x0_hat, st.guide_t, y, backend=backend)
                    if spec is gp.x0_factor_spec and gp.x0_factor[k] != 1.0:
                        g = g * gp.x0_factor[k]
                    g_mean = g if g_mean is None else g_mean + g
        needs_x0 = k + 1 < len(stages) and stages[k + 1].uses_x0_prev
        x0_next = torch.empty_like(x) if needs_x0 else None
        x = ops.guided_step(x, out, table, k, g_score=g_score, g_mean=g_mean, x0_out=x0_next, **step_kwargs)
        x0_prev = x0_next
    return x


def _state_gradients(gp: GuidedPlan, x: torch.Tensor, st: samplers.Stage, y, mean_shift: bool, backend: str):
    """Gradients w.r.t. the state: ADM classifiers on x_t and discriminators. On DDPM they shift the mean,
    elsewhere they correct the score."""
    total = None
    for spec in gp.classifiers:
        if spec.input == "xt" and not st.second_stage:
            g = classifier_grad(spec, x, st.guide_t, y, input_scale=st.guide_in, backend=backend)
            total = g if total is None else total + g
    for spec in gp.discriminators:
        w = spec.weight_at(st)
        if w:
            g = discriminator_grad(spec, x, st, y, w)
            total = g if total is None else total + g
    if total is None:
        return None, None
    return (None, total) if mean_shift else (total, None)
