"""Guidance methods beyond plain CFG, each a per-sample linear combination of the predictions.

Every method here guides with ``m = a c + b u + d e`` (c the cond and u the uncond prediction, e a third
one: APG's momentum running average or a perturbed branch), where the per-sample ``(a, b, d)`` are
functions of a handful of inner products and sums only: ``fastguide.guidance_gram`` computes them in one
pass over the predictions (``[B, 9]``: ``c.c, c.u, u.u, c.e, u.e, e.e, sum c, sum u, sum e``) and
``coefficients`` turns them into the ``combine`` of ``fastguide.guided_step`` with ``[B]``-sized torch ops
only (no host sync, traceable by ``torch.compile(fullgraph=True)``). diffusers' ``guidance_rescale``
(Lin et al. 2023) is one more per-sample factor ``r`` on m, from the same numbers; since ``r m`` is again
a linear combination, a caller may fold it into the combine (``combine * r[:, None]``).

The specs are named and parametrised as the diffusers guiders (``diffusers.guiders``), with diffusers'
window ``int(start N) <= step < int(stop N)`` and its "scale is the identity" test (``active``):

==========================  =====================================================
``CFGZeroStar``             ``ClassifierFreeZeroStarGuidance``
``APG``                     ``AdaptiveProjectedGuidance`` (``norm_dim=None`` only)
``MamboG``                  ``MagnitudeAwareGuidance``
``TCFG``                    ``TangentialClassifierFreeGuidance``
``PerturbedGuidance``       ``PerturbedAttentionGuidance`` / ``SkipLayerGuidance``
                            (one window for both terms), autoguidance
==========================  =====================================================

Norms and standard deviations are over all non-batch elements of a sample (n of them). ``null_label`` (every
spec, default None) is what ``fastguide.sample`` gives the uncond half, as ``CFG``'s: with it the loop makes
one ``[uncond; cond]`` model call per stage, without it an extra call ``model(x, t, None)``. On a pipeline,
``fastguide.step(..., guider=g)`` (``fastguide.dropin.guiders``) translates a diffusers guider instance to
these specs and combines.

>>> spec = fastguide.guidance.modern.APG(7.5, momentum=-0.5, norm_threshold=15.0)
>>> gram = fastguide.guidance_gram(torch.cat([u, c]), extra=buf, momentum=momentum_of(spec))
>>> combine, r = coefficients(spec, gram, torch.full((B,), 7.5), n=c[0].numel(), step=i)
>>> x = fastguide.guided_step(x, torch.cat([u, c]), table, i, combine=combine, extra=buf)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

import torch

from ..core.checks import check_bool, check_fraction, check_int, check_nonneg, check_real, check_spec_scale_tensor

Scale = Union[float, torch.Tensor]

__all__ = ["CFGZeroStar", "APG", "MamboG", "TCFG", "PerturbedGuidance", "coefficients", "needs_gram",
           "needs_extra", "momentum_of", "rescale_factor", "cfg_combine"]


# ---------------------------------------------------------------------------------------------------
# Shared checks


def _check_scale(name: str, scale) -> Scale:
    if isinstance(scale, torch.Tensor):
        return check_spec_scale_tensor(name, scale)
    return check_real(name, scale)


def _check_common(spec, label: str) -> None:
    """scale, rescale, use_original_formulation and diffusers' window checks (``0 <= start < 1``,
    ``start <= stop <= 1``)."""
    _check_scale(f"{label} scale", spec.scale)
    check_fraction(f"{label} rescale", spec.rescale)
    check_bool(f"{label} use_original_formulation", spec.use_original_formulation)
    start, stop = check_fraction(f"{label} start", spec.start), check_fraction(f"{label} stop", spec.stop)
    if start >= 1.0:
        raise ValueError(f"{label} start must be in [0, 1), got {spec.start!r}")
    if stop < start:
        raise ValueError(f"{label} stop must be in [start, 1] = [{start}, 1], got {spec.stop!r}")


def _in_window(spec, step: int, steps: int) -> bool:
    """diffusers' ``_is_*_enabled``: ``int(start N) <= step < int(stop N)`` and the scale is not the
    identity (1, or 0 with ``use_original_formulation``; a tensor scale is never the identity)."""
    if not int(spec.start * steps) <= step < int(spec.stop * steps):
        return False
    if isinstance(spec.scale, torch.Tensor):
        return True
    return not math.isclose(spec.scale, 0.0 if spec.use_original_formulation else 1.0)


# ---------------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class CFGZeroStar:
    """CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models",
    arXiv:2503.18886; diffusers ``ClassifierFreeZeroStarGuidance``).

    Per sample, the uncond prediction is first scaled by the optimised ``alpha = c.u / (u.u + 1e-8)``:
    ``m = alpha u + w (c - alpha u)`` (``use_original_formulation``: ``m = c + w (c - alpha u)``); on the
    first ``zero_init_steps`` steps ``m = 0`` (zero-init, Sec. 4.2), whatever the window.

    Args:
        scale: finite float (or a [B] tensor), default 7.5: w.
        zero_init_steps: int >= 0, default 1: steps with m = 0 (``active`` is True on them, so the
            native loop reproduces diffusers' zeros).
        use_original_formulation: bool, default False.
        rescale: float in [0, 1], default 0: diffusers' ``guidance_rescale`` phi.
        start, stop: the window fractions (diffusers': ``int(start N) <= step < int(stop N)``).
    """

    scale: Scale = 7.5
    zero_init_steps: int = 1
    use_original_formulation: bool = False
    rescale: float = 0.0
    start: float = 0.0
    stop: float = 1.0
    null_label: Any = None                 # the uncond half's label in one [uncond; cond] call (as CFG's)

    def __post_init__(self):
        _check_common(self, "CFGZeroStar")
        check_int("CFGZeroStar zero_init_steps", self.zero_init_steps, minimum=0)

    def active(self, step: int, steps: int) -> bool:
        return step < self.zero_init_steps or _in_window(self, step, steps)


@dataclass(frozen=True)
class APG:
    """Adaptive Projected Guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High
    Guidance Scales in Diffusion Models", arXiv:2410.02416; diffusers ``AdaptiveProjectedGuidance`` with
    ``adaptive_projected_guidance_norm_dim=None``).

    ``D = c - u``; with ``momentum`` beta, ``D`` is the running average ``e <- D + beta e`` (e starts at 0,
    updated on the active steps only, diffusers' ``MomentumBuffer``). With ``norm_threshold`` r > 0,
    ``D <- D min(1, r / ||D||)``. Projected on c: ``D_par = (D.c / max(||c||, 1e-12)^2) c``,
    ``D_perp = D - D_par``, and ``m = u + w (D_perp + eta D_par)`` (``use_original_formulation``: c + ...).
    That is a combination of (c, u) without momentum and of (c, u, e) with it.

    Args:
        scale: finite float (or a [B] tensor), default 7.5: w.
        eta: finite float, default 1.0: the weight of the parallel component (0 drops it).
        momentum: finite float or None (default): beta; None keeps no running average.
        norm_threshold: float >= 0, default 15.0 (diffusers' ``adaptive_projected_guidance_rescale``);
            0 disables the clamp.
        use_original_formulation, rescale, start, stop: as ``CFGZeroStar``.
    """

    scale: Scale = 7.5
    eta: float = 1.0
    momentum: Optional[float] = None
    norm_threshold: float = 15.0
    use_original_formulation: bool = False
    rescale: float = 0.0
    start: float = 0.0
    stop: float = 1.0
    null_label: Any = None                 # the uncond half's label in one [uncond; cond] call (as CFG's)

    def __post_init__(self):
        _check_common(self, "APG")
        check_real("APG eta", self.eta)
        if self.momentum is not None:
            check_real("APG momentum", self.momentum)
        check_nonneg("APG norm_threshold", self.norm_threshold)

    def active(self, step: int, steps: int) -> bool:
        return _in_window(self, step, steps)


@dataclass(frozen=True)
class MamboG:
    """MAMBO-G, magnitude-aware mitigation for boosted guidance (arXiv:2508.03442; diffusers
    ``MagnitudeAwareGuidance``).

    ``ratio = ||c - u|| / ||u||`` per sample, ``w' = 1 + (w - 1) exp(-alpha ratio)`` and
    ``m = u + w' (c - u)`` (``use_original_formulation``: ``w' = w exp(-alpha ratio)``, ``m = c + w' (c - u)``).
    The norms are over all non-batch elements, for any sample shape (diffusers' ``mambo_guidance`` takes
    ``torch.norm`` over ``dim=range(1, ndim)``, which raises for 4-D latents; it works on [B, L, D] tokens).

    Args:
        scale: finite float (or a [B] tensor), default 10.0: w.
        alpha: float >= 0, default 8.0: how strongly a large update damps the scale.
        use_original_formulation, rescale, start, stop: as ``CFGZeroStar``.
    """

    scale: Scale = 10.0
    alpha: float = 8.0
    use_original_formulation: bool = False
    rescale: float = 0.0
    start: float = 0.0
    stop: float = 1.0
    null_label: Any = None                 # the uncond half's label in one [uncond; cond] call (as CFG's)

    def __post_init__(self):
        _check_common(self, "MamboG")
        check_nonneg("MamboG alpha", self.alpha)

    def active(self, step: int, steps: int) -> bool:
        return _in_window(self, step, steps)


@dataclass(frozen=True)
class TCFG:
    """Tangential damping CFG (Kwon et al. 2025, "TCFG: Tangential Damping Classifier-free Guidance",
    arXiv:2503.18137; diffusers ``TangentialClassifierFreeGuidance``).

    The uncond prediction is replaced by its projection on the top right-singular vector v1 of the stacked
    ``[c; u]`` (per sample, a 2 x n matrix): ``u' = (u.v1) v1``, ``m = u' + w (c - u')``
    (``use_original_formulation``: ``m = c + w (c - u')``). v1 = (q1 c + q2 u) / sigma1 with q the top
    eigenvector of the 2x2 Gram matrix ``[[c.c, c.u], [c.u, u.u]]``, so ``u' = q2 q1 c + q2^2 u``: a
    combination of c and u from three inner products, no SVD.

    Args:
        scale: finite float (or a [B] tensor), default 7.5: w.
        use_original_formulation, rescale, start, stop: as ``CFGZeroStar``.
    """

    scale: Scale = 7.5
    use_original_formulation: bool = False
    rescale: float = 0.0
    start: float = 0.0
    stop: float = 1.0
    null_label: Any = None                 # the uncond half's label in one [uncond; cond] call (as CFG's)

    def __post_init__(self):
        _check_common(self, "TCFG")

    def active(self, step: int, steps: int) -> bool:
        return _in_window(self, step, steps)


@dataclass(frozen=True)
class PerturbedGuidance:
    """CFG plus a perturbed-branch term: ``m = u + w (c - u) + s (c - p)`` (``use_original_formulation``:
    ``m = c + ...``), p = ``extra``, the prediction of a perturbed model: PAG (Ahn et al. 2024, "Self-
    Rectifying Diffusion Sampling with Perturbed-Attention Guidance", arXiv:2403.17377), skip-layer guidance
    (SD3.5), or a weaker model (autoguidance, Karras et al. 2024, arXiv:2406.02507). diffusers'
    ``PerturbedAttentionGuidance`` / ``SkipLayerGuidance`` with the same window for both terms.

    Args:
        scale: finite float (or a [B] tensor), default 7.5: w.
        perturbed_scale: finite float, default 2.8: s (diffusers' ``perturbed_guidance_scale``).
        perturbed_model: optional callable, default None: the model producing p (None: the caller passes
            p as ``extra``).
        rescale, start, stop, use_original_formulation: as ``CFGZeroStar``.

    Inactive when w is the identity and s is 0.
    """

    scale: Scale = 7.5
    perturbed_scale: float = 2.8
    perturbed_model: Optional[Callable[..., Any]] = None
    rescale: float = 0.0
    start: float = 0.0
    stop: float = 1.0
    null_label: Any = None                 # the uncond half's label in one [uncond; cond] call (as CFG's)
    use_original_formulation: bool = False

    def __post_init__(self):
        _check_common(self, "PerturbedGuidance")
        check_real("PerturbedGuidance perturbed_scale", self.perturbed_scale)
        if self.perturbed_model is not None and not callable(self.perturbed_model):
            raise TypeError(f"PerturbedGuidance perturbed_model must be callable or None, got "
                            f"{type(self.perturbed_model).__name__}")

    def active(self, step: int, steps: int) -> bool:
        if not int(self.start * steps) <= step < int(self.stop * steps):
            return False
        return _in_window(self, step, steps) or not math.isclose(self.perturbed_scale, 0.0)


SPECS = (CFGZeroStar, APG, MamboG, TCFG, PerturbedGuidance)


def needs_gram(spec) -> bool:
    """Whether ``coefficients`` reads the gram: every method but ``PerturbedGuidance`` without rescale."""
    _check_spec(spec)
    return not isinstance(spec, PerturbedGuidance) or spec.rescale > 0


def needs_extra(spec) -> bool:
    """Whether the combine has an e term: APG with momentum (the running average) and PerturbedGuidance."""
    _check_spec(spec)
    return isinstance(spec, PerturbedGuidance) or momentum_of(spec) is not None


def momentum_of(spec) -> Optional[float]:
    """APG's momentum beta when it keeps a running average (pass it with the buffer to
    ``fastguide.guidance_gram(..., extra=buf, momentum=beta)`` on the active steps only; the buffer starts
    at zeros), else None."""
    _check_spec(spec)
    return float(spec.momentum) if isinstance(spec, APG) and spec.momentum is not None else None


def _check_spec(spec) -> None:
    if not isinstance(spec, SPECS):
        raise TypeError(f"spec must be one of {', '.join(s.__name__ for s in SPECS)}, got {type(spec).__name__}")


# ---------------------------------------------------------------------------------------------------
# Coefficients


def _dtype(gram: torch.Tensor) -> torch.dtype:
    """[B]-sized arithmetic in fp64 where the device has it."""
    return torch.float64 if gram.device.type in ("cpu", "cuda") else torch.float32


def cfg_combine(w: torch.Tensor, original: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of ``u + w (c - u)`` (``original``: ``c + w (c - u)``)."""
    return (1.0 + w, -w) if original else (w, 1.0 - w)


def rescale_factor(gram: torch.Tensor, combine: torch.Tensor, phi: float, n: int) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg`` factor ``r = phi std(c) / std(m) + 1 - phi`` of ``m = a c + b u + d e``
    (``combine`` [B, 3]) from the gram, as [B] fp32: ``sum m`` and ``m.m`` are linear and quadratic in the
    gram's columns, and ``var = (x.x - (sum x)^2 / n) / (n - 1)`` (the n - 1 cancels in the ratio).

    Precision: the gram's fp32 rounding gives r a relative error of about ``6e-8 (1 + mean^2 / var)`` per
    standard deviation, fine for eps / velocity predictions (mean small against the spread); a prediction
    whose mean is 100x its std loses about 3 more digits than diffusers' two-pass ``std``."""
    g, k = gram.to(_dtype(gram)), combine.to(_dtype(gram))
    cc, cu, uu, ce, ue, ee, sc, su, se = g.unbind(1)
    a, b, d = k.unbind(1)
    sm = a * sc + b * su + d * se
    mm = a * a * cc + b * b * uu + d * d * ee + 2.0 * (a * b * cu + a * d * ce + b * d * ue)
    var_c = (cc - sc * sc / n).clamp_min(0.0)
    var_m = (mm - sm * sm / n).clamp_min(0.0)
    return (phi * torch.sqrt(var_c / var_m) + (1.0 - phi)).float()


def _cfg_zero_star(spec: CFGZeroStar, g, w, step):
    cu, uu = g[:, 1], g[:, 2]
    alpha = cu / (uu + 1e-8)
    if spec.use_original_formulation:
        a, b = 1.0 + w, -w * alpha
    else:
        a, b = w, alpha * (1.0 - w)
    zero = None
    if isinstance(step, torch.Tensor):
        zero = step.reshape(()).to(g.device) < spec.zero_init_steps
        a, b = torch.where(zero, 0.0, a), torch.where(zero, 0.0, b)
    elif step < spec.zero_init_steps:
        a, b = torch.zeros_like(a), torch.zeros_like(b)
        zero = True
    return a, b, torch.zeros_like(a), zero


def _apg(spec: APG, g, w):
    cc, cu, _, ce, _, ee = g[:, :6].unbind(1)
    momentum = spec.momentum is not None
    # D = e (the updated running average) with momentum, else c - u: its norm^2 and its product with c.
    dd = ee if momentum else (cc - 2.0 * cu + g[:, 2])
    dc = ce if momentum else (cc - cu)
    s = torch.ones_like(cc)
    if spec.norm_threshold > 0:
        s = torch.clamp_max(spec.norm_threshold / torch.sqrt(dd.clamp_min(0.0)), 1.0)
    # F.normalize: c / max(||c||, 1e-12); D_par = (D.c) c / max(||c||, 1e-12)^2, D_perp + eta D_par.
    k = s * dc / torch.sqrt(cc).clamp_min(1e-12) ** 2 * (spec.eta - 1.0)
    base = 1.0 if spec.use_original_formulation else 0.0
    if momentum:
        return base + w * k, 1.0 - base + torch.zeros_like(w), w * s
    return base + w * (s + k), 1.0 - base - w * s, torch.zeros_like(w)


def _mambo(spec: MamboG, g, w):
    cc, cu, uu = g[:, 0], g[:, 1], g[:, 2]
    ratio = torch.sqrt((cc - 2.0 * cu + uu).clamp_min(0.0)) / torch.sqrt(uu)
    damp = torch.exp(-spec.alpha * ratio)
    if spec.use_original_formulation:
        w2 = w * damp
    else:
        w2 = 1.0 + (w - 1.0) * damp
    a, b = cfg_combine(w2, spec.use_original_formulation)
    return a, b, torch.zeros_like(a)


def _tcfg(spec: TCFG, g, w):
    p, r, s = g[:, 0], g[:, 1], g[:, 2]
    # Top eigenvector of [[p, r], [r, s]]: lambda1 - s >= 0 when p >= s (and lambda1 - p >= 0 otherwise)
    # carries no cancellation.
    half = 0.5 * (p - s)
    root = torch.sqrt(half * half + r * r)
    big = p >= s
    v1 = torch.where(big, half + root, r)
    v2 = torch.where(big, r, root - half)
    norm2 = v1 * v1 + v2 * v2
    ok = norm2 > 0
    norm2 = torch.where(ok, norm2, 1.0)
    q12 = torch.where(ok, v1 * v2 / norm2, 0.0)
    q22 = torch.where(ok, v2 * v2 / norm2, 0.0)
    # u' = q1 q2 c + q2^2 u; m = u' + w (c - u')  (original: c + w (c - u')).
    if spec.use_original_formulation:
        a, b = 1.0 + w - w * q12, -w * q22
    else:
        a, b = w + (1.0 - w) * q12, (1.0 - w) * q22
    return a, b, torch.zeros_like(a)


def _perturbed(spec: PerturbedGuidance, w):
    a, b = cfg_combine(w, spec.use_original_formulation)
    s2 = float(spec.perturbed_scale)
    return a + s2, b, torch.full_like(w, -s2)


def coefficients(spec, gram: torch.Tensor, scale: torch.Tensor, n: int,
                 step: Union[int, torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The ``combine`` ([B, 3] fp32 ``(a, b, d)``: ``m = a c + b u + d e``) of ``spec`` on an active step,
    and the CFG-rescale factor ([B] fp32, or None when ``spec.rescale`` is 0) to multiply m with.

    Args:
        spec: a ``CFGZeroStar``, ``APG``, ``MamboG``, ``TCFG`` or ``PerturbedGuidance``.
        gram: the ``[B, 9]`` fp32 output of ``fastguide.guidance_gram`` for this step's ``[uncond; cond]``, or
            None for a spec that reads none (``needs_gram(spec)`` False)
            (with APG momentum: after the buffer update, ``momentum=momentum_of(spec)``; for
            ``PerturbedGuidance`` with rescale: with ``extra`` = the perturbed prediction).
        scale: ``[B]`` fp32 per-sample guidance scale w (``spec.scale`` broadcast, or per-sample scales).
        n: elements per sample (``c[0].numel()``), for the standard deviations of ``rescale``.
        step: the step index, a host int or a 0-d/one-element integer device tensor (CFG-Zero*'s zero-init
            compares it with ``zero_init_steps``; a tensor keeps that on the device).

    Only [B]-sized torch ops: no host sync, no data-dependent Python branch (``torch.compile`` fullgraph).
    On CFG-Zero*'s zero-init steps the combine is 0 and the rescale factor 1 (diffusers divides by the
    zero std there and gets NaN).
    """
    _check_spec(spec)
    if gram is None:  # a method that reads no inner products (needs_gram False)
        if needs_gram(spec):
            raise ValueError(f"{type(spec).__name__} needs the gram (fastguide.guidance_gram) of this step")
        ref = scale.reshape(-1)
        dt = _dtype(ref)
        g, w = None, ref.to(dt)
    else:
        dt = _dtype(gram)
        g = gram.to(dt)
        w = scale.to(device=gram.device, dtype=dt).reshape(-1).expand(gram.shape[0])
    zero = None
    if isinstance(spec, CFGZeroStar):
        a, b, d, zero = _cfg_zero_star(spec, g, w, step)
    elif isinstance(spec, APG):
        a, b, d = _apg(spec, g, w)
    elif isinstance(spec, MamboG):
        a, b, d = _mambo(spec, g, w)
    elif isinstance(spec, TCFG):
        a, b, d = _tcfg(spec, g, w)
    else:
        a, b, d = _perturbed(spec, w)
    combine = torch.stack([a, b, d], dim=1)
    if spec.rescale <= 0:
        return combine.float(), None
    r = rescale_factor(g, combine, float(spec.rescale), n)
    if zero is True:
        r = torch.ones_like(r)
    elif zero is not None:
        r = torch.where(zero, 1.0, r)
    return combine.float(), r
