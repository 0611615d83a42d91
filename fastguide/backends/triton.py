"""The Triton backend: the functions of ``fastguide.backends.reference`` with the same signatures, run by
the kernels in ``fastguide.kernels`` on CUDA tensors (or on CPU tensors under ``TRITON_INTERPRET=1``).

Tensors arrive checked by ``fastguide.core.ops``; here they only become ``[rows, N]`` views with a unit
inner stride (``fastguide.backends.rows.as_rows``), which keeps ``[uncond; cond]`` halves and batch slices
as views.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from ..core.args import StepArgs
from .rows import as_rows

try:
    import triton  # noqa: F401
except ImportError as exc:  # the backend reports itself unavailable instead of failing dispatch's import
    _IMPORT_ERROR: Optional[str] = f"triton is not installed ({exc})"
else:
    _IMPORT_ERROR = None

_kernels = None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason() -> str:
    """"" when the kernels can run here, else why not."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if not (torch.cuda.is_available() or _interpret_env()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the interpreter on CPU)"
    return ""


def _load_kernels():
    """Import the kernels on first use: triton decides at decoration time whether to interpret."""
    global _kernels
    if _kernels is None:
        from ..kernels import cfg_rescale_factor, guidance_gram, guided_step, per_sample_rms, temperature_lse_grad
        _kernels = (guided_step, cfg_rescale_factor, temperature_lse_grad, per_sample_rms, guidance_gram)
    return _kernels


def _check_runnable(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(_load_kernels()[0].guided_step_kernel, InterpretedFunction):
        raise RuntimeError("the Triton kernels were imported without TRITON_INTERPRET=1, so they cannot run on "
                           f"{t.device.type} tensors; set TRITON_INTERPRET=1 before importing fastguide.kernels")


def _output_rows(t: Optional[torch.Tensor], like: torch.Tensor):
    """(row view the kernel writes, needs copy-back) for an output; core.ops hands over contiguous outputs, a
    strided one (a direct backend call) goes through a temporary."""
    if t is None:
        return None, False
    if t.is_contiguous():
        return as_rows(t), False
    return torch.empty(like.shape[0], like[0].numel(), device=t.device, dtype=t.dtype), True


def guided_step(args: StepArgs) -> None:
    _check_runnable(args.sample)
    step_kernels = _load_kernels()[0]
    out_rows, copy_out = _output_rows(args.out, args.sample)
    out2_rows, copy_out2 = _output_rows(args.out2 if args.out is not None else None, args.sample)
    x0_rows, copy_x0 = _output_rows(args.x0_out, args.sample)
    step_kernels.guided_step(dataclasses.replace(
        args, sample=as_rows(args.sample), model_output=as_rows(args.model_output), g_score=as_rows(args.g_score),
        g_mean=as_rows(args.g_mean), noise=as_rows(args.noise), x0_prev=as_rows(args.x0_prev),
        x0_prev2=as_rows(args.x0_prev2), extra=as_rows(args.extra), out=out_rows, x0_out=x0_rows, out2=out2_rows))
    # In the kernel's store order (x0, out, out2): an output that is x0_out too ends up with the result.
    if copy_x0:
        args.x0_out.copy_(x0_rows.view(args.x0_out.shape))
    if copy_out:
        args.out.copy_(out_rows.view(args.out.shape))
    if copy_out2:
        args.out2.copy_(out2_rows.view(args.out2.shape))


def cfg_rescale_factor(model_output: torch.Tensor, scale: torch.Tensor, rescale: float,
                       learned_variance: bool = False) -> torch.Tensor:
    _check_runnable(model_output)
    rows = as_rows(model_output)
    # With a learned variance each row is [prediction | variance]; the std covers the prediction only.
    n = rows.shape[1] // 2 if learned_variance else rows.shape[1]
    return _load_kernels()[1].cfg_rescale_factor(rows, n, scale, float(rescale))


def _written_rows(t: torch.Tensor):
    """(row view the kernel updates in place, needs copy-back): a view of ``t`` itself when ``as_rows`` gives
    one with non-overlapping rows (contiguous, or a slice of a wider tensor), else a temporary."""
    rows = as_rows(t)
    view = rows.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() and rows.data_ptr() == t.data_ptr()
    if view and (rows.shape[0] <= 1 or rows.stride(0) >= rows.shape[1]):
        return rows, False
    return rows.contiguous() if view else rows, True


def guidance_gram(model_output: torch.Tensor, extra: Optional[torch.Tensor], momentum: Optional[float],
                  learned_variance: bool = False) -> torch.Tensor:
    _check_runnable(model_output)
    rows = as_rows(model_output)
    # With a learned variance each row is [prediction | variance]; only the prediction is reduced.
    n = rows.shape[1] // 2 if learned_variance else rows.shape[1]
    copy_back = False
    extra_rows = as_rows(extra)
    if extra is not None and momentum is not None:  # written in place: a view of extra, or a temporary
        extra_rows, copy_back = _written_rows(extra)
    gram = _load_kernels()[4].guidance_gram(rows, n, extra_rows, momentum)
    if copy_back:
        extra.copy_(extra_rows.view(extra.shape))
    return gram


def temperature_lse_grad(logits: torch.Tensor, labels: torch.Tensor, tau1: float, tau2: float,
                         scale: Optional[torch.Tensor], out: torch.Tensor) -> None:
    _check_runnable(logits)
    lse = _load_kernels()[2]
    if out.stride(-1) == 1 or out.shape[-1] <= 1:
        lse.temperature_lse_grad(as_rows(logits), labels, tau1, tau2, scale, out)
        return
    tmp = torch.empty(out.shape, device=out.device, dtype=out.dtype)
    lse.temperature_lse_grad(as_rows(logits), labels, tau1, tau2, scale, tmp)
    out.copy_(tmp)


def per_sample_rms(x: torch.Tensor) -> torch.Tensor:
    _check_runnable(x)
    return _load_kernels()[3].per_sample_rms(as_rows(x))
