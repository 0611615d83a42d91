"""Checked entry points of the fused ops: validate every argument, then dispatch to a backend.

Every check runs before any kernel, so a bad call raises ``ValueError``/``TypeError`` naming the argument
and leaves the caller's tensors untouched. Results go to a temporary and are copied into a caller's
``out`` only when the kernel has succeeded (or the kernel writes ``out`` directly when it is safe to).
``run_step`` / ``run_lse_grad`` are the unchecked halves, for callers that validated once up front (the
drop-in step, the native loop).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..backends import dispatch as _dispatch
from . import hooks
from . import library as _library  # noqa: F401  (registers torch.ops.fastguide)
from .args import StepArgs
from .checks import (Scale, check_clip, check_finite, check_fraction, check_model_output, check_real,
                     check_sample, check_scale, check_table, check_tensor, host_checks_allowed)
from .layout import CLIP_RANGE, CLIP_THRESHOLD


def guided_step(sample: torch.Tensor, model_output: torch.Tensor, table: torch.Tensor,
                step: Union[int, torch.Tensor], *, scale: Optional[Scale] = None, rescale: float = 0.0,
                g_score: Optional[torch.Tensor] = None, g_mean: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None, x0_prev: Optional[torch.Tensor] = None,
                clip: Optional[Sequence[float]] = None, threshold: Optional[torch.Tensor] = None,
                learned_variance: bool = False, out: Optional[torch.Tensor] = None,
                x0_out: Optional[torch.Tensor] = None, write_out: bool = True,
                check_outputs_finite: bool = False, backend: str = "auto") -> Optional[torch.Tensor]:
    """One fused guided step over row ``step`` of a coefficient ``table`` (see ``fastguide.core.layout``).

    ``model_output`` is ``[uncond; cond]`` (2B rows) when ``scale`` is given, else B rows; ``rescale`` is
    diffusers' ``guidance_rescale``. Returns ``out`` (allocated when None) or None when ``write_out`` is
    False (x0-only "predict" call, which then needs ``x0_out``).

    Computation is fp32; the result has the sample's dtype. The compiled backends store every large input
    in the sample's dtype, so a fp32 ``model_output`` with a fp16 ``sample`` is rounded to fp16 first (the
    torch reference reads the fp32 values): results agree to fp16 tolerance.

    ``step`` is a host int (checked against the table) or a one-element integer tensor on the sample's
    device, e.g. a loop's step counter; a device index is trusted, since checking it would sync.

    >>> table = fastguide.samplers.build("ddim", fastguide.Schedule.ddpm(), steps=50).table
    >>> x = fastguide.guided_step(x, torch.cat([eps_u, eps_c]), table, 0, scale=7.5)
    """
    batch = check_sample("sample", sample)
    check_model_output(model_output, sample, scale is not None, learned_variance)
    check_table(table, step, sample.device)
    w = check_scale("guidance_scale", scale, batch, sample.device) if scale is not None else None
    rescale = check_fraction("guidance_rescale", rescale)
    if rescale and w is None:
        raise ValueError("guidance_rescale needs guidance_scale (a 2B-row [uncond; cond] model_output)")
    for name, t in (("g_score", g_score), ("g_mean", g_mean), ("noise", noise), ("x0_prev", x0_prev)):
        check_tensor(name, t, like=sample, allow_none=True)
    if clip is not None and threshold is not None:
        raise ValueError("pass either clip or threshold, not both")
    args = StepArgs(sample, model_output, table.contiguous(), step, scale=w, rescale=rescale, g_score=g_score,
                    g_mean=g_mean, noise=noise, x0_prev=x0_prev, learned_variance=bool(learned_variance),
                    out=out, x0_out=x0_out, write_out=write_out)
    set_clip(args, check_clip(clip), threshold)
    check_outputs(args)
    if check_outputs_finite:
        check_finite("model_output", model_output)
    return run_step(args, backend)


def set_clip(args: StepArgs, clip: Optional[Sequence[float]], threshold: Optional[torch.Tensor]) -> None:
    """Set the clip mode of ``args``: a checked (low, high) range, a [B] per-sample threshold, or none."""
    if clip is not None:
        args.clip_mode, args.clip_lo, args.clip_hi = CLIP_RANGE, float(clip[0]), float(clip[1])
    if threshold is not None:
        check_tensor("threshold", threshold)
        if threshold.shape != (args.batch,) or threshold.device != args.sample.device:
            raise ValueError(f"threshold must be a [{args.batch}] tensor on {args.sample.device}, got "
                             f"{tuple(threshold.shape)} on {threshold.device}")
        args.clip_mode, args.threshold = CLIP_THRESHOLD, threshold


def check_outputs(args: StepArgs) -> None:
    """``out`` / ``x0_out``: the sample's shape, device and dtype; an x0-only call needs ``x0_out``."""
    for name, o in (("out", args.out), ("x0_out", args.x0_out)):
        check_tensor(name, o, like=args.sample, allow_none=True, same_dtype=True)
    if not args.write_out and args.x0_out is None:
        raise ValueError("write_out=False computes only x0; pass x0_out")


def run_step(args: StepArgs, backend: str) -> Optional[torch.Tensor]:
    """The fused step on arguments already checked (``guided_step``, or once, up front, by a sampling loop):
    ``args.scale`` is the [B] fp32 CFG scale or None, ``args.table`` contiguous fp32. Eager calls run the
    backend kernel directly; traced calls go through the ``torch.ops.fastguide`` custom ops."""
    if hooks.via_torch_ops():
        return _traced_step(args, backend)
    impl = _dispatch.resolve(backend, args.sample.device)
    if hooks.observed():
        hooks.report("fastguide.guided_step")
        if args.rescale:
            hooks.report("fastguide.cfg_rescale_factor")
    if args.rescale:
        args.mfactor = impl.cfg_rescale_factor(args.model_output, args.scale, args.rescale,
                                               args.learned_variance)
    sample = args.sample
    out, x0_out = args.out, args.x0_out
    # Kernels read every input of an element before writing it, so an output may be one of the inputs
    # exactly (out=sample); any other overlap, or a strided output, goes through a temporary.
    inputs = (sample, args.model_output, args.g_score, args.g_mean, args.noise, args.x0_prev)
    if args.write_out and out is None:
        out = args.out = torch.empty_like(sample, memory_format=torch.contiguous_format)  # fresh: no overlap
    elif out is not None and not _writable_in_place(out, inputs):
        args.out = torch.empty_like(sample, memory_format=torch.contiguous_format)
    if x0_out is not None and not _writable_in_place(x0_out, inputs + (out,)):
        args.x0_out = torch.empty_like(sample, memory_format=torch.contiguous_format)
    impl.guided_step(args)
    if args.x0_out is not x0_out:
        x0_out.copy_(args.x0_out)
    if args.out is not out:
        out.copy_(args.out)
    return out


def _traced_step(args: StepArgs, backend: str) -> Optional[torch.Tensor]:
    """The step as seen by torch.compile: functional custom ops, then copies into the caller's outputs."""
    ops = torch.ops.fastguide
    a = args
    mfactor = ops.cfg_rescale_factor(a.model_output, a.scale, a.rescale, a.learned_variance, backend) \
        if a.rescale else None
    step_tensor = a.step if isinstance(a.step, torch.Tensor) else None
    res, x0 = ops.guided_step(a.sample, a.model_output, a.table, 0 if step_tensor is not None else a.step,
                              step_tensor, a.scale, mfactor, a.g_score, a.g_mean, a.noise, a.x0_prev,
                              a.clip_mode, a.clip_lo, a.clip_hi, a.threshold, a.learned_variance, a.write_out,
                              a.x0_out is not None, backend)
    if a.x0_out is not None:
        a.x0_out.copy_(x0)
    if not a.write_out:
        return None
    if a.out is None:
        return res
    a.out.copy_(res)
    return a.out


def _writable_in_place(dst: torch.Tensor, inputs) -> bool:
    """True when a kernel may write ``dst`` directly: contiguous and no partial overlap with any input."""
    if not dst.is_contiguous():
        return False
    storage = dst.untyped_storage().data_ptr()
    for t in inputs:
        if t is None or t.untyped_storage().data_ptr() != storage:
            continue
        exact = t.data_ptr() == dst.data_ptr() and t.shape == dst.shape and t.stride() == dst.stride() \
            and t.dtype == dst.dtype
        if not exact:
            return False
    return True


def temperature_lse_grad(logits: torch.Tensor, labels: torch.Tensor, tau1: float = 1.0, tau2: float = 1.0,
                         scale: Optional[Scale] = None, backend: str = "auto") -> torch.Tensor:
    """Gradient of ``J = tau1 * l_y - logsumexp(tau2 * l)`` w.r.t. logits ``l`` ([B, K]), times ``scale``.

    Feed it to autograd to get the classifier-guidance gradient without building J:

    >>> logits = classifier(x)
    >>> g = torch.autograd.grad(logits, x, grad_outputs=fastguide.temperature_lse_grad(logits, y, 1.0, 0.5))[0]
    """
    check_tensor("logits", logits)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape [B, K], got {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer tensor of shape [B], got {type(labels).__name__}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (logits.shape[0],) or labels.device != logits.device:
        raise ValueError(f"labels must be a [{logits.shape[0]}] tensor on {logits.device}, got "
                         f"{tuple(labels.shape)} on {labels.device}")
    if host_checks_allowed(labels) and labels.numel() and \
            not bool(((labels >= 0) & (labels < logits.shape[1])).all()):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got {labels.tolist()}")
    tau1, tau2 = check_real("tau1", tau1), check_real("tau2", tau2)
    w = check_scale("scale", scale, logits.shape[0], logits.device) if scale is not None else None
    return run_lse_grad(logits, labels, float(tau1), float(tau2), w, backend)


def run_lse_grad(logits: torch.Tensor, labels: torch.Tensor, tau1: float, tau2: float,
                 w: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """``temperature_lse_grad`` on arguments already checked (labels in range, ``w`` a [B] fp32 tensor or
    None); a sampling loop checks its labels once instead of on every step."""
    if hooks.via_torch_ops():
        return torch.ops.fastguide.temperature_lse_grad(logits, labels, tau1, tau2, w, backend)
    impl = _dispatch.resolve(backend, logits.device)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if hooks.observed():
        hooks.report("fastguide.temperature_lse_grad")
    impl.temperature_lse_grad(logits, labels, tau1, tau2, w, out)
    return out


def per_sample_rms(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``sqrt(mean(x**2))`` over all but the batch dimension, as a [B] fp32 tensor (Ma et al.'s EDM recipe
    normalises the classifier input and gradient by it).

    ``x``: any ``[B, ...]`` floating-point tensor; ``backend``: ``"auto"`` (the fastest built backend that
    runs on ``x``'s device), or ``"torch"``, ``"cpp"``, ``"triton"``, ``"cuda"``.

    >>> fastguide.per_sample_rms(torch.ones(2, 3, 8, 8))
    tensor([1., 1.])
    """
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got {tuple(x.shape)}")
    if hooks.via_torch_ops():
        return torch.ops.fastguide.per_sample_rms(x, backend)
    if hooks.observed():
        hooks.report("fastguide.per_sample_rms")
    return _dispatch.resolve(backend, x.device).per_sample_rms(x)
