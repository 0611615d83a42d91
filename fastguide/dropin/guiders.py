"""diffusers guiders in the fused drop-in step: ``fastguide.step(..., guider=g)``.

``g`` is a diffusers guider instance (``diffusers.guiders``) whose state the caller set with
``g.set_state(step=i, num_inference_steps=N, timestep=t)``, as a modular pipeline does. The call returns
what ``scheduler.step(g.forward(pred_cond=c, pred_uncond=u).pred, t, sample)`` returns, and leaves the
guider's own state (APG's ``momentum_buffer.running_average``) as ``g.forward`` leaves it, so a pipeline may
alternate between the two paths. Whether the guider guides this step is the guider's own decision (its
``_is_*_enabled``, window and "scale is the identity" test): then ``model_output`` is ``[uncond; cond]``
(2B rows), otherwise B cond rows (or 2B rows, whose cond half is used, as ``g.forward`` ignores u then).

Every guider's ``pred`` is a per-sample linear combination ``a c + b u + d e`` (e: APG's running average)
whose coefficients come from a one-pass ``fastguide.guidance_gram`` (``fastguide.guidance.modern``), so
the step stays one fused kernel plus one reduction pass; ``guidance_rescale`` is folded into the
coefficients (``r m`` is again such a combination).

==========================================  ================================================================
``ClassifierFreeGuidance``                  ``u + w (c - u)`` (no gram unless ``guidance_rescale``)
``ClassifierFreeZeroStarGuidance``          ``modern.CFGZeroStar``; zero-init steps give m = 0
``AdaptiveProjectedGuidance``               ``modern.APG``; ``adaptive_projected_guidance_norm_dim`` must be
                                            None (another is a per-channel norm: ``ValueError``)
``AdaptiveProjectedMixGuidance``            CFG with ``guidance_scale`` up to step
                                            ``adaptive_projected_guidance_start_step`` (the momentum buffer
                                            updated meanwhile), then ``modern.APG`` with
                                            ``adaptive_projected_guidance_scale`` (HunyuanImage-2.1)
``MagnitudeAwareGuidance``                  ``modern.MamboG``
``TangentialClassifierFreeGuidance``        ``modern.TCFG`` (the 2x2 Gram eigenvector instead of an SVD)
==========================================  ================================================================

Differences from diffusers, all documented at the methods:

* ``MagnitudeAwareGuidance``: norms over all non-batch elements for any latent shape; diffusers 0.42's
  ``mambo_guidance`` calls ``torch.norm`` over ``dim=range(1, ndim)``, which raises for 4-D ``[B, C, H, W]``
  latents (it works for token-shaped ``[B, L, D]`` ones, where the two agree).
* ``ClassifierFreeZeroStarGuidance`` with ``guidance_rescale > 0`` on a zero-init step: diffusers rescales
  the zero prediction by ``std(c) / std(0)`` and gets NaN; fastguide gives 0.
* Precision: the combine is computed in fp32 from gram sums (diffusers' APG projects in fp64, TCFG takes an
  fp32 SVD), so results agree to fp32 rounding, not bit for bit. ``guidance_rescale``'s standard deviations
  come from sums and sums of squares (one pass), whose rounding grows with ``(mean / std)^2`` of the
  predictions (``modern.rescale_factor``): negligible for eps / velocity outputs.
* Half-precision predictions are combined in fp32 (diffusers rounds after every op), and APG's running
  average is stored in the predictions' dtype as there.
* With DDPMScheduler ``variance_type="learned_range"`` the combine applies to the prediction channels and the
  variance is the cond half's, as with ``guidance_scale``.

Any other guider (perturbed-branch guiders need a third prediction) or a subclass overriding ``forward``
raises ``ValueError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..core import ops as _ops
from ..core.checks import check_fraction, check_int, check_model_output, check_real, check_sample
from ..guidance import modern
from ..samplers.scheduler_tables import DDPM, config
from .schedulers import scheduler_state

CFG_ = "ClassifierFreeGuidance"
ZERO_STAR = "ClassifierFreeZeroStarGuidance"
APG_ = "AdaptiveProjectedGuidance"
APG_MIX = "AdaptiveProjectedMixGuidance"
MAMBO = "MagnitudeAwareGuidance"
TCFG_ = "TangentialClassifierFreeGuidance"
SUPPORTED = (CFG_, ZERO_STAR, APG_, APG_MIX, MAMBO, TCFG_)
# the guider's own "does it guide this step" test (diffusers' name for it)
_ENABLED = {CFG_: "_is_cfg_enabled", ZERO_STAR: "_is_cfg_enabled", APG_: "_is_apg_enabled",
            APG_MIX: "_is_cfg_enabled", MAMBO: "_is_mambo_g_enabled", TCFG_: "_is_tcfg_enabled"}


@dataclass
class Fused:
    """A guider's step, translated: what the fused step reads, and the guider state update to make after it.

    ``model_output`` is the 2B-row ``[uncond; cond]`` output with ``combine`` ([B, 3] fp32) and ``extra``
    (APG's new running average, or None), or B rows (cond, or zeros) with ``combine=None``."""

    model_output: torch.Tensor
    combine: Optional[torch.Tensor] = None
    extra: Optional[torch.Tensor] = None
    buffer: object = None                   # the guider's MomentumBuffer, or None
    running: Optional[torch.Tensor] = None  # its new running average (a fresh tensor)

    def commit(self) -> None:
        """Leave the guider as ``g.forward`` leaves it (called once the step has succeeded)."""
        if self.buffer is not None:
            self.buffer.running_average = self.running


def guider_kind(guider) -> str:
    """The supported diffusers guider class ``guider`` is (or subclasses without its own ``forward``)."""
    for cls in type(guider).__mro__:
        if cls.__name__ in SUPPORTED and cls.__module__.startswith("diffusers."):
            if getattr(type(guider), "forward", None) is not getattr(cls, "forward", None):
                break
            return cls.__name__
    raise ValueError(f"guider: {type(guider).__name__} is not supported by fastguide.step (supported diffusers "
                     f"guiders: {', '.join(SUPPORTED)})")


def _check_options(guider, kind: str) -> None:
    """The guider options fastguide fuses, with ValueError/TypeError naming the one it does not."""
    name = type(guider).__name__
    check_real(f"{name}.guidance_scale", guider.guidance_scale)
    check_fraction(f"{name}.guidance_rescale", guider.guidance_rescale)
    if not isinstance(guider.use_original_formulation, bool):
        raise TypeError(f"{name}.use_original_formulation must be a bool, got {guider.use_original_formulation!r}")
    if kind == ZERO_STAR:
        check_int(f"{name}.zero_init_steps", guider.zero_init_steps)
    if kind in (APG_, APG_MIX):
        check_real(f"{name}.eta", guider.eta)
        check_real(f"{name}.adaptive_projected_guidance_rescale", guider.adaptive_projected_guidance_rescale)
        buffer = guider.momentum_buffer
        if buffer is not None:
            check_real(f"{name}.momentum_buffer.momentum", buffer.momentum)
    if kind == APG_ and guider.adaptive_projected_guidance_norm_dim is not None:
        raise ValueError(f"{name}.adaptive_projected_guidance_norm_dim="
                         f"{guider.adaptive_projected_guidance_norm_dim!r} is not supported by fastguide.step (a "
                         "norm and projection per slice, not per sample); use None (all non-batch dimensions)")
    if kind == APG_MIX:
        check_real(f"{name}.adaptive_projected_guidance_scale", guider.adaptive_projected_guidance_scale)
        check_int(f"{name}.adaptive_projected_guidance_start_step", guider.adaptive_projected_guidance_start_step)
    if kind == MAMBO:
        check_real(f"{name}.alpha", guider.alpha, minimum=0.0)
    if getattr(guider, "_num_inference_steps", None) is not None and guider._step is None or \
            kind == ZERO_STAR and guider._step is None:
        raise ValueError(f"guider: {name} has no step; call guider.set_state(step=i, num_inference_steps=N, "
                         "timestep=t) before each step")


def _apg_spec(guider, scale: float, buffer) -> modern.APG:
    """diffusers' ``normalized_guidance`` of an APG guider (norm threshold <= 0 disables the clamp)."""
    return modern.APG(scale, eta=float(guider.eta), momentum=None if buffer is None else float(buffer.momentum),
                      norm_threshold=max(0.0, float(guider.adaptive_projected_guidance_rescale)),
                      use_original_formulation=guider.use_original_formulation,
                      rescale=float(guider.guidance_rescale))


def _spec(guider, kind: str):
    """(the guided step's spec or None for plain CFG, its scale, the momentum buffer to update or None)."""
    w = float(guider.guidance_scale)
    orig, phi = guider.use_original_formulation, float(guider.guidance_rescale)
    if kind in (APG_, APG_MIX):
        buffer = guider.momentum_buffer
        if kind == APG_MIX:
            if not guider._is_apg_enabled():
                return None, w, buffer          # CFG, the momentum buffer updated all the same
            w = float(guider.adaptive_projected_guidance_scale)
        return _apg_spec(guider, w, buffer), w, buffer
    if kind == ZERO_STAR:
        return modern.CFGZeroStar(w, zero_init_steps=0, use_original_formulation=orig, rescale=phi), w, None
    if kind == MAMBO:
        return modern.MamboG(w, alpha=float(guider.alpha), use_original_formulation=orig, rescale=phi), w, None
    if kind == TCFG_:
        return modern.TCFG(w, use_original_formulation=orig, rescale=phi), w, None
    return None, w, None


def _running_average(buffer, sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh copy of the buffer's running average (the number 0 before its first update: then a tensor
    of the predictions' dtype, as ``c - u + 0`` is), for the gram to update in place: the guider's own
    tensor is replaced, never written, as ``MomentumBuffer.update`` does."""
    ra = buffer.running_average
    if isinstance(ra, torch.Tensor):
        if tuple(ra.shape) != tuple(sample.shape) or ra.device != sample.device:
            raise ValueError(f"guider.momentum_buffer.running_average must have shape {tuple(sample.shape)} on "
                             f"{sample.device}, got {tuple(ra.shape)} on {ra.device}")
        return ra.clone(memory_format=torch.contiguous_format)
    value = check_real("guider.momentum_buffer.running_average", ra)
    return torch.full(sample.shape, value, dtype=dtype, device=sample.device)


def _guided(guider, kind: str, model_output: torch.Tensor, sample: torch.Tensor, learned: bool,
            backend: str) -> Fused:
    """The combine of a guided step, from one gram pass (skipped for plain CFG without rescale)."""
    spec, w, buffer = _spec(guider, kind)
    batch, n, phi = sample.shape[0], sample[0].numel(), float(guider.guidance_rescale)
    running = momentum = None
    if buffer is not None:
        running, momentum = _running_average(buffer, sample, model_output.dtype), float(buffer.momentum)
    scale = torch.full((batch,), w, dtype=torch.float32, device=sample.device)
    gram = None
    if spec is not None or running is not None or phi > 0:
        # (with momentum, the gram first updates ``running`` in place to (c - u) + beta e)
        gram = _ops.guidance_gram(model_output, extra=running, momentum=momentum, learned_variance=learned,
                                  backend=backend)
    if spec is None:        # classifier-free guidance (AdaptiveProjectedMixGuidance before its APG steps)
        a, b = modern.cfg_combine(scale, guider.use_original_formulation)
        combine = torch.stack([a, b, torch.zeros_like(a)], dim=1)
        r = modern.rescale_factor(gram, combine, phi, n) if phi > 0 else None
        extra = None        # the running average is updated, not used
    else:
        combine, r = modern.coefficients(spec, gram, scale, n, guider._step if guider._step is not None else 0)
        extra = running
    if r is not None:
        combine = combine * r[:, None]
    return Fused(model_output, combine, extra, buffer, running)


def translate(guider, model_output: torch.Tensor, sample: torch.Tensor, scheduler, backend: str) -> Fused:
    """What the fused step reads for ``guider`` at the step its state is set to; checks everything first
    (the guider's options, the row count its ``num_conditions`` asks for) and touches nothing of the
    caller's (APG's new running average is a fresh tensor, handed to the guider by ``Fused.commit``)."""
    kind = guider_kind(guider)
    _check_options(guider, kind)
    batch = check_sample("sample", sample)
    state = scheduler_state(scheduler)
    learned = state.kind == DDPM and config(scheduler, "variance_type") == "learned_range"
    if not isinstance(model_output, torch.Tensor) or model_output.dim() < 1 or \
            model_output.shape[0] not in (batch, 2 * batch):
        got = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
        raise ValueError(f"model_output must have {2 * batch} rows [uncond; cond] (or {batch} cond rows when the "
                         f"guider does not guide the step), got {got}")
    check_model_output(model_output, sample, model_output.shape[0] == 2 * batch, learned)
    enabled = bool(getattr(guider, _ENABLED[kind])())
    cond = model_output[model_output.shape[0] - batch:]
    if kind == ZERO_STAR and guider._enabled and guider._step < guider.zero_init_steps:
        zero = torch.zeros_like(cond)
        if learned:     # the zero prediction; the variance stays the cond half's
            zero[:, sample.shape[1]:] = cond[:, sample.shape[1]:]
        return Fused(zero)
    if not enabled:
        return Fused(cond)
    if model_output.shape[0] != 2 * batch:
        raise ValueError(f"guider: {type(guider).__name__} guides step {guider._step} (num_conditions="
                         f"{guider.num_conditions}): model_output must be [uncond; cond] with {2 * batch} rows, "
                         f"got {model_output.shape[0]}")
    return _guided(guider, kind, model_output, sample, learned, backend)
