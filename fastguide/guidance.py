"""Guidance specs and the gradients they contribute to a step.

Three methods compose in any combination:

* ``CFG`` — classifier-free guidance (Ho & Salimans 2022): the model runs once on the 2B batch.
* ``ClassifierGuidance`` — ``input="xt"``: ADM (Dhariwal & Nichol 2021), a noisy classifier on x_t;
  ``input="x0"``: Ma et al. 2023, an off-the-shelf classifier on the predicted x0^ with the temperature
  objective ``tau1 l_y - logsumexp(tau2 l)``, and on sigma samplers their EDM recipe.
* ``DiscriminatorGuidance`` — Kim et al. 2022: ``score += w grad_x log(d / (1 - d))``.

A gradient enters a step either as a *score correction* (``eps -= sigma g``; ADM-DDIM, DG) or as a
*mean shift* (``mu += Sigma g``; ADM-DDPM, Ma et al. DDPM, DG-DDPM), see ``fastguide.layout``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import ops
from .samplers import Stage

# d is clipped to [1e-5, 1 - 1e-5] in the DG code: the same as clipping the logit to +-log((1-1e-5)/1e-5).
DG_LOGIT_BOUND = math.log((1 - 1e-5) / 1e-5)


def _finite_nonneg(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")


def _window(name_lo: str, lo: float, name_hi: str, hi: float) -> None:
    for n, v in ((name_lo, lo), (name_hi, hi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{n} must be a float in [0, 1], got {v!r}")
    if lo > hi:
        raise ValueError(f"{name_lo} must be <= {name_hi}, got {lo} > {hi}")


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance ``eps~ = u + scale (c - u)``, optionally rescaled (Lin et al. 2023).

    ``scale`` is a float or a [B] tensor (per-sample scales for mixed batches). The uncond half gets
    ``null_label`` as its label (one model call on the 2B batch); with ``null_label=None`` the uncond half
    is a second call with ``y=None``. Outside the guidance window ``[start, stop)`` (fractions of the
    steps; Kynkäänniemi et al. 2024) only the cond half is evaluated.

    >>> fastguide.sample(model, x_T, schedule=s, sampler="ddim", steps=50, y=y,
    ...                  guidance=[fastguide.CFG(4.0, null_label=10)])
    """

    scale: Union[float, torch.Tensor]
    rescale: float = 0.0
    null_label: Any = None
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self):
        if isinstance(self.scale, torch.Tensor):
            if self.scale.dim() > 1 or not self.scale.is_floating_point():
                raise ValueError("CFG scale must be a float or a [B] floating-point tensor")
        else:
            _finite_nonneg("CFG scale", self.scale)
        if isinstance(self.rescale, bool) or not isinstance(self.rescale, (int, float)) \
                or not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"CFG rescale must be in [0, 1], got {self.rescale!r}")
        _window("CFG start", self.start, "CFG stop", self.stop)

    def active(self, step: int, steps: int) -> bool:
        return self.start <= step / steps < self.stop


@dataclass(frozen=True)
class ClassifierGuidance:
    """Classifier guidance with ``classifier(x, t) -> logits [B, K]`` towards the labels ``y``.

    ``input="xt"`` (ADM): the classifier sees the noisy state (its VP view and timestep); DDPM shifts the
    mean by ``scale * Sigma * g`` (guided-diffusion ``condition_mean``), the other samplers correct the
    score (``condition_score``). Objective ``tau1 l_y - logsumexp(tau2 l)``; tau1 = tau2 = 1 is
    log-softmax.

    ``input="x0"`` (Ma et al. 2023): on DDPM/DDIM the classifier sees the predicted x0^ (clipped when the
    loop clips) and ``g = scale * grad_{x0^} J`` shifts the mean by
    ``(Sigma_t + max(0, gamma * Sigma_max * sin(pi i / N))) g`` with i = N-1 .. 0 the step counted down
    (EluCD) — DDIM has no model variance, so Sigma_t is the DDPM posterior variance of the step pair.
    On sigma samplers it follows their EDM recipe: the classifier sees ``x / max(1, rms(x))``, and
    ``g / rms(g) * rms(x) * w_i * scale`` with ``w_i = max(g_max/(N+1) (N+1-i), 1e-5) + sin(pi i/N) g_max add``
    is added to the state before the denoiser (the Heun correction is unguided).
    ImageNet-128 defaults of the paper: scale=1, tau1=1, tau2=0.5, gamma=0.3 with ``smooth(clf, 3.0)``;
    EDM: tau1=1, tau2=0, g_max=0.004, add=0.3 with ``smooth(clf, 5.0)``.
    """

    classifier: Callable[..., torch.Tensor]
    scale: float = 1.0
    input: str = "xt"
    tau1: float = 1.0
    tau2: float = 1.0
    gamma: float = 0.0
    g_max: float = 0.004
    add: float = 0.3

    def __post_init__(self):
        if not callable(self.classifier):
            raise TypeError("classifier must be callable as classifier(x, t) -> logits [B, K]")
        if self.input not in ("xt", "x0"):
            raise ValueError(f"ClassifierGuidance input must be 'xt' or 'x0', got {self.input!r}")
        for name in ("scale", "gamma", "g_max", "add"):
            _finite_nonneg(f"ClassifierGuidance {name}", getattr(self, name))
        for name in ("tau1", "tau2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"ClassifierGuidance {name} must be a finite float, got {v!r}")


@dataclass(frozen=True)
class DiscriminatorGuidance:
    """Discriminator guidance (Kim et al. 2022) with ``discriminator(x, t, y) -> logit [B]``.

    Adds ``weight * grad_x log(d / (1 - d))`` (d clipped to [1e-5, 1 - 1e-5]) to the score: on EDM Heun
    ``D' = D + weight sigma^2 c`` in the first stage and ``weight2`` in the second; on DDPM a mean shift
    ``Sigma * weight * c``; on other samplers a score correction. Only where the VP time (t/T for VP
    schedules, tau(sigma) with beta0=0.1, beta1=20 for EDM) lies in ``[t_min, t_max]``. The
    discriminator sees the VP view of the state (x / sqrt(1 + sigma^2) for EDM) and the VP time tau for
    EDM schedules, the training timestep for VP schedules. Papers' recipes: EDM ``weight=2`` (uncond) or
    1 (cond), ``t_min=0.01``; DiT/ADM DDPM ``t_min=0.101`` (t > 100 of 1000).
    """

    discriminator: Callable[..., torch.Tensor]
    weight: float = 1.0
    weight2: float = 0.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self):
        if not callable(self.discriminator):
            raise TypeError("discriminator must be callable as discriminator(x, t, y) -> logit [B]")
        _finite_nonneg("DiscriminatorGuidance weight", self.weight)
        _finite_nonneg("DiscriminatorGuidance weight2", self.weight2)
        _window("DiscriminatorGuidance t_min", self.t_min, "DiscriminatorGuidance t_max", self.t_max)

    def weight_at(self, stage: Stage) -> float:
        if not self.t_min <= stage.vp_time <= self.t_max:
            return 0.0
        return self.weight2 if stage.second_stage else self.weight


def smooth(classifier: nn.Module, beta: float) -> nn.Module:
    """A copy of ``classifier`` with every ``nn.ReLU`` module replaced by ``nn.Softplus(beta)`` (Ma et al.).

    Functional ``F.relu`` calls inside ``forward`` cannot be found this way and stay ReLU.

    >>> guided_clf = fastguide.smooth(resnet, beta=3.0)
    """
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
    _finite_nonneg("beta", beta)
    if beta == 0:
        raise ValueError("beta must be > 0")
    smoothed = copy.deepcopy(classifier)
    _replace_relus(smoothed, float(beta))
    return smoothed


def _replace_relus(module: nn.Module, beta: float) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Softplus(beta=beta))
        else:
            _replace_relus(child, beta)


# ---------------------------------------------------------------------------------------------------
# Gradients. Each returns a tensor of the state's shape and dtype; networks run in autograd on a detached
# leaf, so nothing flows back into the denoiser (Ma et al.: no backprop through the denoiser).
#
# The ``*_core`` functions take the timestep, weights and input scale as tensors (or floats) and read no
# tensor value on the host, so the native sampling loop (``fastguide.loop``) calls them with device tensors
# and stays free of syncs; the float-taking functions below them build those tensors for one call.

def _timesteps(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), value, device=like.device, dtype=torch.float32)


def check_labels(y: torch.Tensor, classes: int) -> None:
    """Labels must index the classifier's logits. CPU labels are read through numpy (a memory read, no
    dispatched op); device labels would need a sync, so they are trusted, as ``fastguide.ops`` does."""
    if y.device.type != "cpu" or not y.numel():
        return
    if torch.compiler.is_compiling():
        # Traced code cannot raise on values; an async assert keeps the C++ kernel's indexing safe.
        torch._assert_async(((y >= 0) & (y < classes)).all(), "y holds labels outside the classifier's classes")
        return
    values = y.detach().numpy()
    if values.min() < 0 or values.max() >= classes:
        raise ValueError(f"y holds labels outside the classifier's {classes} classes: {values.tolist()}")


def classifier_grad_core(spec: ClassifierGuidance, inp: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         w: Union[torch.Tensor, float], input_scale: Union[torch.Tensor, float, None] = None,
                         backend: str = "auto", checked: bool = False) -> torch.Tensor:
    """``w * grad_inp J``, ``J = tau1 l_y - logsumexp(tau2 l)`` of ``classifier(input_scale * inp, t)``.

    ``t`` is the classifier's timestep tensor, ``w`` a [B] fp32 tensor (or a float with ``checked``), and
    ``input_scale`` None for none. ``checked`` sends the logits' gradient through the public
    ``fastguide.temperature_lse_grad`` (argument checks included); else ``w`` and ``y`` must already have
    been checked, as the sampling loop does once before its steps."""
    with torch.enable_grad():
        leaf = inp.detach().requires_grad_(True)
        logits = spec.classifier(leaf * input_scale if input_scale is not None else leaf, t)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != inp.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"classifier must return logits of shape [{inp.shape[0]}, K], got {got}")
        check_labels(y, logits.shape[1])
        lse_grad = ops.temperature_lse_grad if checked else ops.run_lse_grad
        dlogits = lse_grad(logits.detach(), y, float(spec.tau1), float(spec.tau2), w, backend)
        (grad,) = torch.autograd.grad(logits, leaf, grad_outputs=dlogits.to(logits.dtype))
    return grad


def classifier_grad(spec: ClassifierGuidance, inp: torch.Tensor, t: float, y: torch.Tensor,
                    input_scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """``scale * grad_inp J`` for ``J = tau1 l_y - logsumexp(tau2 l)`` of ``classifier(input_scale * inp, t)``."""
    return classifier_grad_core(spec, inp, _timesteps(t, inp), y, spec.scale,
                                input_scale if input_scale != 1.0 else None, backend, checked=True)


def edm_shift_core(spec: ClassifierGuidance, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                   weight: Union[torch.Tensor, float], unit: Union[torch.Tensor, float], backend: str = "auto",
                   checked: bool = False) -> torch.Tensor:
    """Ma et al.'s EDM recipe with ``weight = w_i * scale`` given: the classifier (timestep tensor ``t``) sees
    ``x / max(1, rms(x))``; its unit-weight gradient (``unit``: ones, as ``w`` of ``classifier_grad_core``)
    is renormalised to ``rms(x) * weight``."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    rms_x = ops.per_sample_rms(x, backend=backend)
    normalised = x / rms_x.clamp_min(1.0).reshape(shape).to(x.dtype)
    g = classifier_grad_core(spec, normalised, t, y, unit, None, backend, checked)
    factor = rms_x / ops.per_sample_rms(g, backend=backend).clamp_min(1e-30) * weight
    return g * factor.reshape(shape).to(g.dtype)


def edm_recipe_weight(spec: ClassifierGuidance, step: int, steps: int) -> float:
    """Ma et al.'s EDM recipe weight of ``step`` of ``steps``, times the spec's scale:
    ``(max(g_max/(N+1) (N+1-i), 1e-5) + sin(pi i/N) g_max add) * scale`` (the shift at that step is
    ``edm_shift_core(..., weight=edm_recipe_weight(...))``)."""
    n = steps
    w = max(spec.g_max / (n + 1) * (n + 1 - step), 1e-5) + math.sin(math.pi * step / n) * spec.g_max * spec.add
    return w * spec.scale


def discriminator_grad_core(spec: DiscriminatorGuidance, x: torch.Tensor, t: torch.Tensor,
                            input_scale: Union[torch.Tensor, float, None], y: Optional[torch.Tensor],
                            weight: Union[torch.Tensor, float]) -> torch.Tensor:
    """``weight * grad_x log(d / (1 - d))`` of ``discriminator(input_scale * x, t, y)`` (``input_scale`` None
    for none), with the timestep ``t`` and ``weight`` as tensors (or floats)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        logit = spec.discriminator(leaf * input_scale if input_scale is not None else leaf, t, y)
        if logit.dim() != 1 or logit.shape[0] != x.shape[0]:
            raise ValueError(f"discriminator must return a logit of shape [{x.shape[0]}], got {tuple(logit.shape)}")
        clipped = logit.float().clamp(-DG_LOGIT_BOUND, DG_LOGIT_BOUND)
        (grad,) = torch.autograd.grad(clipped.sum() * weight, leaf)
    return grad


def discriminator_grad(spec: DiscriminatorGuidance, x: torch.Tensor, stage: Stage, y: Optional[torch.Tensor],
                       weight: float) -> torch.Tensor:
    """``weight * grad_x log(d / (1 - d))`` of the discriminator on the VP view of the state."""
    return discriminator_grad_core(spec, x, _timesteps(stage.guide_t, x),
                                   stage.guide_in if stage.guide_in != 1.0 else None, y, weight)
