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
from .checks import (Scale, check_bool, check_clip, check_finite, check_fraction, check_model_output, check_real,
                     check_row_map, check_sample, check_scale, check_table, check_tensor, host_checks_allowed)
from .layout import CLIP_RANGE, CLIP_THRESHOLD


def guided_step(sample: torch.Tensor, model_output: torch.Tensor, table, step: Union[int, torch.Tensor], *,
                scale: Optional[Scale] = None, rescale: float = 0.0,
                g_score: Optional[torch.Tensor] = None, g_mean: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None, x0_prev: Optional[torch.Tensor] = None,
                x0_prev2: Optional[torch.Tensor] = None,
                clip: Optional[Sequence[float]] = None, threshold: Optional[torch.Tensor] = None,
                learned_variance: bool = False, out: Optional[torch.Tensor] = None,
                x0_out: Optional[torch.Tensor] = None, write_out: bool = True,
                check_outputs_finite: bool = False, uncond_rows: Optional[torch.Tensor] = None,
                combine: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None,
                eps_from_uncond: bool = False, backend: str = "auto") -> Optional[torch.Tensor]:
    """One fused guided step over row ``step`` of a coefficient ``table`` (see ``fastguide.core.layout``):
    CFG combine, optional rescale, x0/eps prediction, clipping, guidance terms, noise and the sampler update
    in one kernel.

    Args:
        sample: ``[B, ...]`` floating-point state x (fp32, fp16, bf16 or fp64), at least 2-D.
        model_output: the network output for ``sample``: ``[2B, ...]`` as ``[uncond; cond]`` when ``scale``
            is given, else ``[B, ...]``; the sample's per-row shape (channels doubled with
            ``learned_variance``), on its device.
        table: the sampler's coefficient table, a float32 ``[steps, NUM_COLS]`` tensor on the sample's device
            (``fastguide.samplers.build(...).table`` moved there), or a ``fastguide.samplers.Plan``, whose
            ``plan.table`` is then used, moved to the sample's device on every call: a host-to-device copy per
            step on a GPU, so in a loop pass ``plan.table.to(device)`` once instead.
        step: the row of ``table``: a host int in ``[0, steps)`` (checked) or a one-element int32/int64 tensor
            on the sample's device (e.g. a loop's step counter; trusted, since checking it would sync); or
            a ``[B]`` int32/int64 tensor, one row per sample (a heterogeneous batch whose samples sit at
            different steps of different samplers, their tables stacked into one; values checked on the CPU).
        scale: CFG scale w, ``eps~ = u + w (c - u)``: a float >= 0 or a ``[B]`` float tensor (per-sample
            scales); default None (no CFG: ``model_output`` has B rows).
        rescale: float in [0, 1], default 0: diffusers' ``guidance_rescale`` (Lin et al. 2023); needs
            ``scale``.
        g_score: optional tensor of the sample's shape, default None: a score-correction gradient, already
            scaled (``eps -= sigma g``, guided-diffusion ``condition_score``).
        g_mean: optional tensor of the sample's shape, default None: a mean-shift gradient, already scaled
            (``mu += Sigma g``, guided-diffusion ``condition_mean``).
        noise: optional tensor of the sample's shape, default None: the step's standard-normal noise z (rows
            whose noise column is 0 ignore it; a row that needs noise without it adds none).
        x0_prev: optional tensor of the sample's shape, default None: the previous stage's x0^ (DPM-Solver++
            2M, Heun's second stage), with coefficient ``F``.
        x0_prev2: optional tensor of the sample's shape, default None: the x0^ one step further back
            (DPM-Solver++ 3M, UniPC's corrector), with coefficient ``F2``.
        clip: optional ``(low, high)`` with low < high, default None: clamp x0^ to this range (e.g. (-1, 1)).
        threshold: optional ``[B]`` float tensor, default None: per-sample dynamic threshold s (Saharia et al.
            2022): ``x0^ = clamp(x0^, -s, s) / s``. Not together with ``clip``.
        learned_variance: bool, default False: ``model_output`` carries 2C channels (eps, then the
            learned-range value v in [-1, 1]; the cond half's v is used).
        out: optional tensor of the sample's shape and dtype, default None (allocated): receives the result;
            it may be ``sample`` itself.
        x0_out: optional tensor of the sample's shape and dtype, default None: receives x0^.
        write_out: bool, default True; False computes only x0^ (into ``x0_out``, which is then required) and
            returns None.
        check_outputs_finite: bool, default False: raise ``ValueError`` if ``model_output`` holds NaN/Inf
            (a host read: CPU tensors only).
        uncond_rows: optional ``[B]`` int32/int64 tensor, default None (needs ``scale``): a sparse CFG batch.
            ``model_output`` then holds the B cond rows first and after them only the uncond rows some
            samples need: ``uncond_rows[b]`` is the row of sample b's uncond prediction (in ``[B, rows)``)
            or -1 for none, and such a sample keeps its cond prediction exactly, whatever its scale
            (values checked on the CPU).
        combine: optional ``[B, 3]`` float tensor ``(a, b, d)``, default None, instead of ``scale``: each
            sample's guided prediction is ``a c + b u + d e`` (``model_output`` is ``[uncond; cond]``, 2B rows;
            e is ``extra``). The guidance methods of ``fastguide.guidance.modern`` (CFG-Zero*, APG, MAMBO-G,
            TCFG, perturbed-branch guidance) compute it from ``fastguide.guidance_gram``. Not with ``rescale``.
        extra: optional tensor of the sample's shape, default None (needs ``combine``): the third prediction e.
        eps_from_uncond: bool, default False: eps~ from the uncond prediction u while x0^ uses the guided one
            (CFG++, Chung et al. 2024); needs ``scale`` or ``combine``.
        backend: ``"auto"`` (default: the fastest built backend that runs on the sample's device, C++ then
            torch on the CPU, CUDA then Triton then torch on a GPU), or ``"torch"``, ``"cpp"``, ``"triton"``,
            ``"cuda"`` (an error if that one cannot run here).

    Returns ``out`` (allocated when None), or None when ``write_out`` is False.

    Computation is fp32; the result has the sample's dtype. The compiled backends store every large input
    in the sample's dtype, so a fp32 ``model_output`` with a fp16 ``sample`` is rounded to fp16 first (the
    torch reference reads the fp32 values): results agree to fp16 tolerance. Every argument is checked before
    any kernel runs, so a bad call leaves ``sample`` and ``out`` untouched.

    >>> plan = fastguide.samplers.build("ddim", fastguide.Schedule.ddpm(), steps=50)
    >>> table = plan.table.to(x.device)                                   # once, outside the loop
    >>> x = fastguide.guided_step(x, torch.cat([eps_u, eps_c]), table, 0, scale=7.5)
    >>> x = fastguide.guided_step(x, eps_c, plan, 1)                      # a Plan works too (copied per call)
    """
    batch = check_sample("sample", sample)
    if not isinstance(table, torch.Tensor):
        from ..samplers.native import Plan  # (lazy: the samplers import this package's checks)
        if isinstance(table, Plan):
            table = table.table.to(sample.device)
    if uncond_rows is not None and scale is None:
        raise ValueError("uncond_rows maps each sample to its uncond row for CFG; it needs guidance_scale (scale)")
    combine = _check_combine(combine, extra, scale, rescale, uncond_rows, sample)
    if eps_from_uncond and scale is None and combine is None:
        raise ValueError("eps_from_uncond reads the uncond prediction: it needs scale or combine ([uncond; cond])")
    cfg = scale is not None or combine is not None
    check_model_output(model_output, sample, cfg, learned_variance, sparse=uncond_rows is not None)
    if uncond_rows is not None:
        uncond_rows = check_row_map("uncond_rows", uncond_rows, batch, batch, model_output.shape[0],
                                    sample.device, allow_none_entry=True)
    step_rows = check_table(table, step, sample.device, batch)
    w = check_scale("guidance_scale", scale, batch, sample.device) if scale is not None else None
    rescale = check_fraction("guidance_rescale", rescale)
    if rescale and w is None:
        raise ValueError("guidance_rescale needs guidance_scale (a 2B-row [uncond; cond] model_output)")
    for name, t in (("g_score", g_score), ("g_mean", g_mean), ("noise", noise), ("x0_prev", x0_prev),
                    ("x0_prev2", x0_prev2)):
        check_tensor(name, t, like=sample, allow_none=True)
    if clip is not None and threshold is not None:
        raise ValueError("pass either clip or threshold, not both")
    args = StepArgs(sample, model_output, table.contiguous(), step, scale=w, rescale=rescale, g_score=g_score,
                    g_mean=g_mean, noise=noise, x0_prev=x0_prev, x0_prev2=x0_prev2,
                    learned_variance=bool(learned_variance),
                    out=out, x0_out=x0_out, write_out=write_out, step_rows=step_rows, uncond_rows=uncond_rows,
                    combine=combine, extra=extra, eps_from_uncond=check_bool("eps_from_uncond", eps_from_uncond))
    if step_rows is not None:
        args.step = 0
    set_clip(args, check_clip(clip), threshold)
    check_outputs(args)
    if check_outputs_finite:
        check_finite("model_output", model_output)
    return run_step(args, backend)


def _check_combine(combine, extra, scale, rescale, uncond_rows, sample: torch.Tensor) -> Optional[torch.Tensor]:
    """``combine``: a [B, 3] float tensor on the sample's device, instead of ``scale``, dense layout, no
    rescale; returned as contiguous fp32. ``extra`` needs it and has the sample's shape."""
    if combine is None:
        if extra is not None:
            raise ValueError("extra is the third prediction of combine (a c + b u + d e); pass combine too")
        return None
    check_tensor("combine", combine)
    if combine.shape != (sample.shape[0], 3) or combine.device != sample.device:
        raise ValueError(f"combine must be a [{sample.shape[0]}, 3] tensor (a, b, d) on {sample.device}, got "
                         f"{tuple(combine.shape)} on {combine.device}")
    if scale is not None or uncond_rows is not None:
        raise ValueError("combine replaces the CFG scale: pass combine or scale (with uncond_rows), not both")
    if rescale:
        raise ValueError("guidance_rescale with combine: fold the rescale factor in (fastguide.guidance.modern)")
    check_tensor("extra", extra, like=sample, allow_none=True)
    return combine.to(torch.float32).contiguous()


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


def run_step(args: StepArgs, backend: str, impl=None) -> Optional[torch.Tensor]:
    """The fused step on arguments already checked (``guided_step``, or once, up front, by a sampling loop):
    ``args.scale`` is the [B] fp32 CFG scale or None, ``args.table`` contiguous fp32. Eager calls run the
    backend kernel directly; traced calls go through the ``torch.ops.fastguide`` custom ops.

    ``args.out2`` (unchecked: the sample's shape, dtype and device) receives a second copy of the result in
    the same kernel pass; it is ignored by an x0-only call. ``impl``: the module ``dispatch.resolve(backend,
    device)`` gave, when the caller resolved it already (the drop-in step, which checks the backend up front)."""
    if hooks.via_torch_ops():
        return _traced_step(args, backend)
    if impl is None:
        impl = _dispatch.resolve(backend, args.sample.device)
    if hooks.observed():
        hooks.report("fastguide.guided_step")
        if args.rescale:
            hooks.report("fastguide.cfg_rescale_factor")
    if args.rescale:
        args.mfactor = _rescale_factor(impl, args)
    sample = args.sample
    if not args.write_out:
        args.out = args.out2 = None  # an x0-only call leaves given outputs alone, as the traced path does
    out, out2, x0_out = args.out, args.out2, args.x0_out
    # Kernels read every input of an element before writing it, so an output may be one of the inputs
    # exactly (out=sample); any other overlap, or a strided output, goes through a temporary.
    fresh = args.write_out and out is None
    if fresh:
        out = args.out = torch.empty_like(sample, memory_format=torch.contiguous_format)  # no overlap
    if not args.outputs_disjoint and (not fresh or out2 is not None or x0_out is not None):
        spans = _spans((sample, args.model_output, args.g_score, args.g_mean, args.noise, args.x0_prev,
                        args.x0_prev2, args.extra))
        if out is not None:
            if not fresh and not _writable_in_place(out, spans):
                args.out = torch.empty_like(sample, memory_format=torch.contiguous_format)
            if out2 is not None or x0_out is not None:
                spans.append((out,) + _span(out))
        if out2 is not None:
            if not _writable_in_place(out2, spans):
                args.out2 = torch.empty_like(sample, memory_format=torch.contiguous_format)
            spans.append((out2,) + _span(out2))
        if x0_out is not None and not _writable_in_place(x0_out, spans):
            args.x0_out = torch.empty_like(sample, memory_format=torch.contiguous_format)
    impl.guided_step(args)
    # Copied back in the kernels' store order (x0, out, out2), so the result wins over x0 here too.
    if args.x0_out is not x0_out:
        x0_out.copy_(args.x0_out)
    if args.out is not out:
        out.copy_(args.out)
    if args.out2 is not out2:
        out2.copy_(args.out2)
    return out


def _rescale_factor(impl, args: StepArgs) -> torch.Tensor:
    """The CFG-rescale pre-pass; a sparse CFG batch runs the reference's torch ops (a [B] reduction the
    compiled pre-pass kernels do not map), on any device and without a sync."""
    if args.uncond_rows is not None:
        from ..backends import reference
        return reference.cfg_rescale_factor(args.model_output, args.scale, args.rescale, args.learned_variance,
                                            args.uncond_rows)
    return impl.cfg_rescale_factor(args.model_output, args.scale, args.rescale, args.learned_variance)


def _traced_step(args: StepArgs, backend: str) -> Optional[torch.Tensor]:
    """The step as seen by torch.compile: functional custom ops, then copies into the caller's outputs."""
    ops = torch.ops.fastguide
    a = args
    if a.rescale and a.uncond_rows is not None:
        mfactor = _rescale_factor(None, a)  # torch ops: traced as they are
    elif a.rescale:
        mfactor = ops.cfg_rescale_factor(a.model_output, a.scale, a.rescale, a.learned_variance, backend)
    else:
        mfactor = a.mfactor  # a caller's factor (the guidance layer's), or None
    step_tensor = a.step if isinstance(a.step, torch.Tensor) else None
    # With a second destination the op returns the result twice, stacked ([2B] rows) from one kernel pass.
    doubled = a.write_out and a.out is not None and a.out2 is not None
    res, x0 = ops.guided_step(a.sample, a.model_output, a.table, 0 if step_tensor is not None else a.step,
                              step_tensor, a.scale, mfactor, a.g_score, a.g_mean,
                              a.noise, a.x0_prev, a.clip_mode, a.clip_lo, a.clip_hi, a.threshold,
                              a.learned_variance, a.write_out, a.x0_out is not None, backend, doubled,
                              a.step_rows, a.uncond_rows, a.combine, a.extra, a.eps_from_uncond, a.x0_prev2)
    if a.x0_out is not None:
        a.x0_out.copy_(x0)
    if not a.write_out:
        return None
    if a.out is None:
        if a.out2 is not None:
            a.out2.copy_(res)
        return res
    if doubled:
        rows = a.sample.shape[0]
        a.out.copy_(res[:rows])
        a.out2.copy_(res[rows:])
    else:
        a.out.copy_(res)
    return a.out


def _writable_in_place(dst: torch.Tensor, spans) -> bool:
    """True when a kernel may write ``dst`` directly: contiguous, and each input in ``spans`` (``_spans``)
    either is ``dst`` exactly or shares none of its memory. A disjoint view of the same storage, such as the
    other half of one buffer, is fine: kernels write only ``dst``'s own elements. Address ranges, not
    storages, are compared, so two storages over the same memory count as overlapping too."""
    if not dst.is_contiguous():
        return False
    lo = dst.data_ptr()
    hi = lo + dst.nbytes
    for t, t_lo, t_hi in spans:
        if t is dst or t_hi <= lo or t_lo >= hi or lo == hi:
            continue
        if not (t_lo == lo and t.shape == dst.shape and t.stride() == dst.stride() and t.dtype == dst.dtype):
            return False
    return True


def _span(t: torch.Tensor):
    """The address range ``[first, end)`` of ``t``'s elements (a strided view's holes included)."""
    lo = t.data_ptr()
    if t.is_contiguous():
        return lo, lo + t.nbytes
    if t.numel() == 0:
        return lo, lo
    return lo, lo + (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()


def _spans(tensors) -> list:
    """``(tensor, first, end)`` for each tensor present, for ``_writable_in_place``."""
    return [(t,) + _span(t) for t in tensors if t is not None]


def temperature_lse_grad(logits: torch.Tensor, labels: torch.Tensor, tau1: float = 1.0, tau2: float = 1.0,
                         scale: Optional[Scale] = None, backend: str = "auto") -> torch.Tensor:
    """Gradient of ``J = tau1 * l_y - logsumexp(tau2 * l)`` w.r.t. logits ``l``, times ``scale``, in one kernel
    (tau1 = tau2 = 1: the log-softmax of ADM classifier guidance; Ma et al. 2023's temperature objective).

    Args:
        logits: ``[B, K]`` floating-point classifier logits.
        labels: ``[B]`` int32/int64 tensor of target classes in ``[0, K)``, on the logits' device (values
            checked on the CPU only: reading device labels would sync).
        tau1: finite float, default 1.0: the weight of the target logit.
        tau2: finite float, default 1.0: the temperature inside the logsumexp (0 drops that term's gradient).
        scale: optional float >= 0 or ``[B]`` float tensor, default None (1): multiplies each row's gradient
            (the guidance scale).
        backend: ``"auto"`` (default: the fastest built backend that runs on the logits' device, C++ then
            torch on the CPU, CUDA then Triton then torch on a GPU), or ``"torch"``, ``"cpp"``, ``"triton"``,
            ``"cuda"``.

    Returns ``dJ/dl``, ``[B, K]`` in the logits' dtype: ``scale * (tau1 onehot(y) - tau2 softmax(tau2 l))``,
    computed stably in fp32. Feed it to autograd to get the classifier-guidance gradient without building J:

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


def guidance_gram(model_output: torch.Tensor, extra: Optional[torch.Tensor] = None, momentum: Optional[float] = None,
                  learned_variance: bool = False, backend: str = "auto") -> torch.Tensor:
    """Per-sample inner products and sums of the cond c, uncond u and extra e predictions in one pass: the
    reductions every guidance method of ``fastguide.guidance.modern`` needs (CFG-Zero*'s optimised scale,
    APG's projection and norm threshold, MAMBO-G's magnitude ratio, TCFG's 2x2 Gram matrix, CFG rescale's
    standard deviations).

    Args:
        model_output: ``[2B, ...]`` floating-point ``[uncond; cond]`` predictions (channels doubled with
            ``learned_variance``: only the prediction half is reduced).
        extra: optional tensor of a half's shape (``[B, ...]``), default None: a third prediction e (APG's
            running average, a perturbed branch).
        momentum: optional finite float beta, default None (needs ``extra``): first update ``extra`` in place
            to ``(c - u) + beta e`` (APG's momentum buffer), then reduce the new e.
        learned_variance: bool, default False.
        backend: ``"auto"`` (default), ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.

    Returns a ``[B, 9]`` float32 tensor, columns ``c.c, c.u, u.u, c.e, u.e, e.e, sum c, sum u, sum e``
    (``fastguide.backends.reference.GRAM_COLUMNS``; the e columns are 0 without ``extra``).

    >>> gram = fastguide.guidance_gram(torch.cat([eps_u, eps_c]))
    >>> alpha = gram[:, 1] / (gram[:, 2] + 1e-8)          # CFG-Zero*'s optimised scale per sample
    """
    check_tensor("model_output", model_output)
    if model_output.dim() < 2 or model_output.shape[0] % 2 or model_output.shape[0] == 0:
        raise ValueError(f"model_output must be [uncond; cond] with 2B >= 2 rows, got {tuple(model_output.shape)}")
    half = list(model_output.shape)
    half[0] //= 2
    if check_bool("learned_variance", learned_variance):
        if half[1] % 2:
            raise ValueError(f"learned_variance needs an even channel count, got {half[1]}")
        half[1] //= 2
    if extra is not None:
        check_tensor("extra", extra)
        if list(extra.shape) != half or extra.device != model_output.device:
            raise ValueError(f"extra must have shape {tuple(half)} on {model_output.device}, got "
                             f"{tuple(extra.shape)} on {extra.device}")
    if momentum is not None:
        momentum = check_real("momentum", momentum)
        if extra is None:
            raise ValueError("momentum updates extra (the running average) in place: pass extra")
    return run_gram(model_output, extra, momentum, bool(learned_variance), backend)


def run_gram(model_output: torch.Tensor, extra: Optional[torch.Tensor], momentum: Optional[float],
             learned_variance: bool, backend: str) -> torch.Tensor:
    """``guidance_gram`` on checked arguments (a sampling loop checks once)."""
    if hooks.via_torch_ops():
        if extra is None:
            # The op may mutate extra; inductor cannot lower it with extra=None. A zero e gives the same gram.
            half = model_output[: model_output.shape[0] // 2]
            extra = torch.zeros_like(half[:, : half.shape[1] // 2] if learned_variance else half)
        return torch.ops.fastguide.guidance_gram(model_output, extra, momentum, learned_variance, backend)
    if hooks.observed():
        hooks.report("fastguide.guidance_gram")
    return _dispatch.resolve(backend, model_output.device).guidance_gram(model_output, extra, momentum,
                                                                          learned_variance)


def per_sample_rms(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``sqrt(mean(x**2))`` over all but the batch dimension, as a [B] fp32 tensor (Ma et al.'s EDM recipe
    normalises the classifier input and gradient by it).

    Args:
        x: any ``[B, ...]`` floating-point tensor with B >= 1 (a 1-D ``[B]`` tensor gives ``|x|``).
        backend: ``"auto"`` (default: the fastest built backend that runs on ``x``'s device, C++ then torch
            on the CPU, CUDA then Triton then torch on a GPU), or ``"torch"``, ``"cpp"``, ``"triton"``,
            ``"cuda"``.

    Returns a ``[B]`` float32 tensor on ``x``'s device, accumulated in fp32 whatever ``x``'s dtype.

    >>> fastguide.per_sample_rms(torch.ones(2, 3, 8, 8))
    tensor([1., 1.])
    >>> fastguide.per_sample_rms(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), backend="torch")
    tensor([3.5355, 0.0000])
    """
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got {tuple(x.shape)}")
    if hooks.via_torch_ops():
        return torch.ops.fastguide.per_sample_rms(x, backend)
    if hooks.observed():
        hooks.report("fastguide.per_sample_rms")
    return _dispatch.resolve(backend, x.device).per_sample_rms(x)
