"""Checked entry points of the fused ops: validate every argument, then dispatch to a backend.

Every check runs before any kernel, so a bad call raises ``ValueError``/``TypeError`` naming the argument
and leaves the caller's tensors untouched. Results go to a temporary and are copied into a caller's
``out`` only when the kernel has succeeded (or the kernel writes ``out`` directly when it is safe to).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from . import dispatch as _dispatch
from . import library as _library  # noqa: F401  (registers torch.ops.fastguide)
from .layout import CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD, NUM_COLS

Scale = Union[float, int, torch.Tensor]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


# True: eager calls go through the ``torch.ops.fastguide`` custom ops as traced calls do, so a
# ``TorchDispatchMode`` sees every kernel with its arguments (the CPU stand-in for CUDA graph capture in
# ``tests/graph_replay_emu.py`` records and replays ops this way). False (default): kernels are called
# directly, below the dispatcher, for the lowest per-call overhead.
route_through_torch_ops = False


def _via_torch_ops() -> bool:
    return route_through_torch_ops or _is_compiling()


def _host_checks_allowed(t: torch.Tensor) -> bool:
    """Value checks read tensors on the host: cheap on CPU, but a device sync on CUDA and impossible while
    tracing, so device tensors' values (per-sample scales, labels) are only checked on the CPU. The native
    loop checks its CFG scale once, up front, on any device (``check_scale(..., sync_ok=True)``)."""
    return t.device.type == "cpu" and not _is_compiling()


def check_tensor(name: str, t, *, like: Optional[torch.Tensor] = None, float_only: bool = True,
                 allow_none: bool = False):
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32/float16/bfloat16), got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but sample is on {like.device}")
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"{name} must have the sample's shape {tuple(like.shape)}, got {tuple(t.shape)}")


def check_scale(name: str, scale: Scale, batch: int, device: torch.device, sync_ok: bool = False) -> torch.Tensor:
    """A guidance scale as a [B] fp32 tensor on ``device``; floats and [B] tensors, finite and >= 0.

    A tensor's values are checked when it lives on the CPU, or anywhere with ``sync_ok``."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a [B] tensor, got {type(scale).__name__}")
    if isinstance(scale, torch.Tensor):
        if scale.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor, got {scale.dtype}")
        if scale.dim() == 0:
            scale = scale.reshape(1).expand(batch)
        if scale.dim() != 1 or scale.shape[0] != batch:
            raise ValueError(f"{name} must be a float or a tensor of shape [{batch}], got {tuple(scale.shape)}")
        if scale.device != device:
            raise ValueError(f"{name} is on {scale.device} but sample is on {device}")
        if (sync_ok and not _is_compiling() or _host_checks_allowed(scale)) \
                and not bool(torch.all(torch.isfinite(scale) & (scale >= 0))):
            raise ValueError(f"{name} must be finite and >= 0, got {scale.tolist()}")
        return scale.float()
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {scale}")
    if _is_compiling():
        return torch.full((batch,), float(scale), device=device, dtype=torch.float32)
    return _constant_scale(float(scale), batch, device)


_constant_scales: dict = {}


def _constant_scale(value: float, batch: int, device: torch.device) -> torch.Tensor:
    """A float scale as a [B] view of one cached element (stride 0): no allocation or copy per call."""
    key = (value, batch, device)
    t = _constant_scales.get(key)
    if t is None:
        if len(_constant_scales) > 256:
            _constant_scales.clear()
        t = _constant_scales[key] = torch.full((1,), value, dtype=torch.float32, device=device).expand(batch)
    return t


def check_finite(name: str, t: torch.Tensor) -> None:
    if _host_checks_allowed(t) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_table(table, step, device: torch.device) -> None:
    check_tensor("table", table)
    if table.dim() != 2 or table.shape[1] != NUM_COLS or table.dtype != torch.float32:
        raise ValueError(f"table must be a float32 tensor of shape [steps, {NUM_COLS}], "
                         f"got {table.dtype} {tuple(table.shape)}")
    if table.device != device:
        raise ValueError(f"table is on {table.device} but sample is on {device}")
    if isinstance(step, torch.Tensor):
        if step.dtype not in (torch.int32, torch.int64) or step.numel() != 1:
            raise TypeError(f"step must be an int or a one-element integer tensor, got {step.dtype} "
                            f"{tuple(step.shape)}")
        if step.device != device:
            raise ValueError(f"step is on {step.device} but sample is on {device}")
    elif isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int or a one-element integer tensor, got {type(step).__name__}")
    elif not 0 <= step < table.shape[0]:
        raise ValueError(f"step must be in [0, {table.shape[0]}), got {step}")


def guided_step(sample: torch.Tensor, model_output: torch.Tensor, table: torch.Tensor,
                step: Union[int, torch.Tensor], *, scale: Optional[Scale] = None, rescale: float = 0.0,
                g_score: Optional[torch.Tensor] = None, g_mean: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None, x0_prev: Optional[torch.Tensor] = None,
                clip: Optional[Sequence[float]] = None, threshold: Optional[torch.Tensor] = None,
                learned_variance: bool = False, out: Optional[torch.Tensor] = None,
                x0_out: Optional[torch.Tensor] = None, write_out: bool = True,
                check_outputs_finite: bool = False, backend: str = "auto") -> Optional[torch.Tensor]:
    """One fused guided step over row ``step`` of a coefficient ``table`` (see ``fastguide.layout``).

    ``model_output`` is ``[uncond; cond]`` (2B rows) when ``scale`` is given, else B rows; ``rescale`` is
    diffusers' ``guidance_rescale``. Returns ``out`` (allocated when None) or None when ``write_out`` is
    False (x0-only "predict" call, which then needs ``x0_out``).

    Computation is fp32; the result has the sample's dtype. The compiled backends store every large input
    in the sample's dtype, so a fp32 ``model_output`` with a fp16 ``sample`` is rounded to fp16 first (the
    torch reference reads the fp32 values): results agree to fp16 tolerance.

    ``step`` is a host int (checked against the table) or a one-element integer tensor on the sample's
    device, e.g. a loop's step counter; a device index is trusted, since checking it would sync.

    >>> table = fastguide.samplers.build("ddim", fastguide.Schedule.ddpm(), steps=50).table
    >>> x = fastguide.ops.guided_step(x, torch.cat([eps_u, eps_c]), table, 0, scale=7.5)
    """
    check_tensor("sample", sample)
    if sample.dim() < 2:
        raise ValueError(f"sample must have a batch dimension and at least one more, got {tuple(sample.shape)}")
    batch = sample.shape[0]
    check_tensor("model_output", model_output)
    if model_output.device != sample.device:
        raise ValueError(f"model_output is on {model_output.device} but sample is on {sample.device}")
    rows = 2 * batch if scale is not None else batch
    if model_output.shape[0] != rows:
        what = "2B rows [uncond; cond] because guidance_scale is given" if scale is not None else \
            "B rows (no guidance scale given)"
        raise ValueError(f"model_output must have {what}: expected {rows} rows, got {model_output.shape[0]}")
    expected = list(sample.shape[1:])
    if learned_variance:
        expected[0] *= 2
    if list(model_output.shape[1:]) != expected:
        extra = " (channels doubled for the learned variance)" if learned_variance else ""
        raise ValueError(f"model_output must have per-sample shape {tuple(expected)}{extra}, "
                         f"got {tuple(model_output.shape[1:])}")
    check_table(table, step, sample.device)
    table = table.contiguous()  # the C++/CUDA kernels read rows of NUM_COLS floats (a no-op when it is)
    w = check_scale("guidance_scale", scale, batch, sample.device) if scale is not None else None
    if not isinstance(rescale, (int, float)) or isinstance(rescale, bool) or not math.isfinite(rescale) \
            or not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be a float in [0, 1], got {rescale!r}")
    if rescale and w is None:
        raise ValueError("guidance_rescale needs guidance_scale (a 2B-row [uncond; cond] model_output)")
    for name, t in (("g_score", g_score), ("g_mean", g_mean), ("noise", noise), ("x0_prev", x0_prev)):
        check_tensor(name, t, like=sample, allow_none=True)
    clip_mode, lo, hi = CLIP_NONE, -1.0, 1.0
    if clip is not None and threshold is not None:
        raise ValueError("pass either clip or threshold, not both")
    if clip is not None:
        if len(clip) != 2 or not all(isinstance(v, (int, float)) for v in clip) or not clip[0] < clip[1]:
            raise ValueError(f"clip must be a (low, high) pair with low < high, got {clip!r}")
        clip_mode, lo, hi = CLIP_RANGE, float(clip[0]), float(clip[1])
    if threshold is not None:
        check_tensor("threshold", threshold)
        if threshold.shape != (batch,) or threshold.device != sample.device:
            raise ValueError(f"threshold must be a [{batch}] tensor on {sample.device}, got "
                             f"{tuple(threshold.shape)} on {threshold.device}")
        clip_mode = CLIP_THRESHOLD
    for name, o in (("out", out), ("x0_out", x0_out)):
        check_tensor(name, o, like=sample, allow_none=True)
        if o is not None and o.dtype != sample.dtype:
            raise TypeError(f"{name} must have the sample's dtype {sample.dtype}, got {o.dtype}")
    if not write_out and x0_out is None:
        raise ValueError("write_out=False computes only x0; pass x0_out")
    if check_outputs_finite:
        check_finite("model_output", model_output)
    return run_step(sample, model_output, table, step, w, float(rescale), g_score, g_mean, noise, x0_prev,
                    clip_mode, lo, hi, threshold, learned_variance, out, x0_out, write_out, backend)


# Set by ``fastguide.opcount.OpCounter`` while it counts: kernels called directly (not through the torch
# dispatcher) are invisible to a TorchDispatchMode, so each direct call reports its name here.
kernel_observer: Optional[Callable[[str], None]] = None


def run_step(sample: torch.Tensor, model_output: torch.Tensor, table: torch.Tensor,
             step: Union[int, torch.Tensor], w: Optional[torch.Tensor], rescale: float,
             g_score: Optional[torch.Tensor], g_mean: Optional[torch.Tensor], noise: Optional[torch.Tensor],
             x0_prev: Optional[torch.Tensor], clip_mode: int, lo: float, hi: float,
             threshold: Optional[torch.Tensor], learned_variance: bool, out: Optional[torch.Tensor],
             x0_out: Optional[torch.Tensor], write_out: bool, backend: str) -> Optional[torch.Tensor]:
    """The fused step on arguments already checked by ``guided_step`` (or once, up front, by a sampling
    loop): ``w`` is the [B] fp32 CFG scale or None, ``table`` contiguous fp32. Eager calls run the backend
    kernel directly; traced calls go through the ``torch.ops.fastguide`` custom ops."""
    if _via_torch_ops():
        return _traced_step(sample, model_output, table, step, w, rescale, g_score, g_mean, noise,
                            x0_prev, clip_mode, lo, hi, threshold, learned_variance, out, x0_out, write_out,
                            backend)
    impl = _dispatch.resolve(backend, sample.device)
    if kernel_observer is not None:
        kernel_observer("fastguide.guided_step")
        if rescale:
            kernel_observer("fastguide.cfg_rescale_factor")
    mfactor = impl.cfg_rescale_factor(model_output, w, float(rescale), learned_variance) if rescale else None
    # Kernels read every input of an element before writing it, so an output may be one of the inputs
    # exactly (out=sample); any other overlap, or a strided output, goes through a temporary.
    inputs = (sample, model_output, g_score, g_mean, noise, x0_prev)
    if write_out and out is None:
        out = out_buf = torch.empty_like(sample, memory_format=torch.contiguous_format)  # fresh: no overlap
    else:
        out_buf = out if out is None or _writable_in_place(out, inputs) else torch.empty_like(
            sample, memory_format=torch.contiguous_format)
    x0_buf = x0_out if x0_out is None or _writable_in_place(x0_out, inputs + (out,)) else torch.empty_like(
        sample, memory_format=torch.contiguous_format)
    impl.guided_step(sample, model_output, table, step, scale=w, mfactor=mfactor, g_score=g_score,
                     g_mean=g_mean, noise=noise, x0_prev=x0_prev, clip_mode=clip_mode, clip_lo=lo,
                     clip_hi=hi, threshold=threshold, learned_variance=learned_variance, out=out_buf,
                     x0_out=x0_buf)
    if x0_buf is not x0_out:
        x0_out.copy_(x0_buf)
    if out_buf is not out:
        out.copy_(out_buf)
    return out


def _traced_step(sample, model_output, table, step, w, rescale, g_score, g_mean, noise, x0_prev, clip_mode,
                 lo, hi, threshold, learned_variance, out, x0_out, write_out, backend):
    """The step as seen by torch.compile: functional custom ops, then copies into the caller's outputs."""
    ops = torch.ops.fastguide
    mfactor = ops.cfg_rescale_factor(model_output, w, rescale, learned_variance, backend) if rescale else None
    step_tensor = step if isinstance(step, torch.Tensor) else None
    res, x0 = ops.guided_step(sample, model_output, table, 0 if step_tensor is not None else step, step_tensor,
                              w, mfactor, g_score, g_mean, noise, x0_prev, clip_mode, lo, hi, threshold,
                              learned_variance, write_out, x0_out is not None, backend)
    if x0_out is not None:
        x0_out.copy_(x0)
    if not write_out:
        return None
    if out is None:
        return res
    out.copy_(res)
    return out


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
    if _host_checks_allowed(labels) and labels.numel() and \
            not bool(((labels >= 0) & (labels < logits.shape[1])).all()):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got {labels.tolist()}")
    for name, tau in (("tau1", tau1), ("tau2", tau2)):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
            raise ValueError(f"{name} must be a finite float, got {tau!r}")
    w = check_scale("scale", scale, logits.shape[0], logits.device) if scale is not None else None
    return run_lse_grad(logits, labels, float(tau1), float(tau2), w, backend)


def run_lse_grad(logits: torch.Tensor, labels: torch.Tensor, tau1: float, tau2: float,
                 w: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """``temperature_lse_grad`` on arguments already checked (labels in range, ``w`` a [B] fp32 tensor or
    None); a sampling loop checks its labels once instead of on every step."""
    if _via_torch_ops():
        return torch.ops.fastguide.temperature_lse_grad(logits, labels, tau1, tau2, w, backend)
    impl = _dispatch.resolve(backend, logits.device)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if kernel_observer is not None:
        kernel_observer("fastguide.temperature_lse_grad")
    impl.temperature_lse_grad(logits, labels, tau1, tau2, w, out)
    return out


def per_sample_rms(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``sqrt(mean(x**2))`` over all but the batch dimension, as a [B] fp32 tensor."""
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got {tuple(x.shape)}")
    if _via_torch_ops():
        return torch.ops.fastguide.per_sample_rms(x, backend)
    if kernel_observer is not None:
        kernel_observer("fastguide.per_sample_rms")
    return _dispatch.resolve(backend, x.device).per_sample_rms(x)
