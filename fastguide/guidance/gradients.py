"""The gradients guidance methods contribute to a step.

Each returns a tensor of the state's shape and dtype; networks run in autograd on a detached leaf, so
nothing flows back into the denoiser (Ma et al.: no backprop through the denoiser).

The ``*_core`` functions take the timestep, weights and input scale as tensors (or floats) and read no
tensor value on the host, so the native sampling loop (``fastguide.native.loop``) calls them with device
tensors and stays free of syncs; the float-taking functions below them build those tensors for one call
(the drop-in step).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..core import ops
from .specs import ClassifierGuidance, DiscriminatorGuidance

# d is clipped to [1e-5, 1 - 1e-5] in the DG code: the same as clipping the logit to +-log((1-1e-5)/1e-5).
DG_LOGIT_BOUND = math.log((1 - 1e-5) / 1e-5)


def _timesteps(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), value, device=like.device, dtype=torch.float32)


def check_labels(y: torch.Tensor, classes: int) -> None:
    """Labels must index the classifier's logits. CPU labels are read through numpy (a memory read, no
    dispatched op); device labels would need a sync, so they are trusted, as ``fastguide.core.ops`` does."""
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
        if not isinstance(logit, torch.Tensor) or logit.dim() != 1 or logit.shape[0] != x.shape[0]:
            got = tuple(logit.shape) if isinstance(logit, torch.Tensor) else type(logit).__name__
            raise ValueError(f"discriminator must return a logit of shape [{x.shape[0]}], got {got}")
        clipped = logit.float().clamp(-DG_LOGIT_BOUND, DG_LOGIT_BOUND)
        # weight: a number, a 0-dim tensor or one weight per sample ([B], a serving engine's mixed batch).
        (grad,) = torch.autograd.grad((clipped * weight).sum(), leaf)
    return grad


def discriminator_grad(spec: DiscriminatorGuidance, x: torch.Tensor, t: float, y: Optional[torch.Tensor],
                       weight: float, input_scale: float = 1.0) -> torch.Tensor:
    """``weight * grad_x log(d / (1 - d))`` of ``discriminator(input_scale * x, t, y)`` (the VP view of the
    state)."""
    return discriminator_grad_core(spec, x, _timesteps(t, x), input_scale if input_scale != 1.0 else None, y,
                                   weight)
