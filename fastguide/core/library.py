"""The fused ops as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` sees them whole.

Traced code (torch.compile, export) goes through these functional ops and their fake implementations;
eager calls skip the dispatcher and call the backend directly (``fastguide.core.ops``), which keeps the
per-call overhead of a drop-in step low.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import dispatch
from .args import StepArgs


def _empty(sample: Tensor, wanted: bool) -> Tensor:
    return torch.empty_like(sample, memory_format=torch.contiguous_format) if wanted else sample.new_empty(0)


def _result(sample: Tensor, wanted: bool, doubled: bool) -> Tensor:
    if wanted and doubled:  # the result twice, stacked: [2B, ...]
        return sample.new_empty((2 * sample.shape[0],) + tuple(sample.shape[1:]))
    return _empty(sample, wanted)


@torch.library.custom_op("fastguide::guided_step", mutates_args=())
def guided_step(sample: Tensor, model_output: Tensor, table: Tensor, step: int, step_tensor: Optional[Tensor],
                scale: Optional[Tensor], mfactor: Optional[Tensor], g_score: Optional[Tensor],
                g_mean: Optional[Tensor], noise: Optional[Tensor], x0_prev: Optional[Tensor], clip_mode: int,
                clip_lo: float, clip_hi: float, threshold: Optional[Tensor], learned_variance: bool,
                write_out: bool, write_x0: bool, backend: str, write_out2: bool = False,
                step_rows: Optional[Tensor] = None, uncond_rows: Optional[Tensor] = None,
                combine: Optional[Tensor] = None, extra: Optional[Tensor] = None,
                eps_from_uncond: bool = False, x0_prev2: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Functional fused step: returns (out, x0); an output not asked for is an empty tensor. With
    ``write_out2``, ``out`` holds the result twice, stacked (``[2B, ...]``: rows ``[:B]`` and ``[B:]``),
    written by one kernel pass through ``StepArgs.out`` / ``StepArgs.out2``. ``step_rows`` /
    ``uncond_rows``: a heterogeneous batch (``StepArgs``)."""
    doubled = write_out and write_out2
    res, x0 = _result(sample, write_out, doubled), _empty(sample, write_x0)
    rows = sample.shape[0]
    dispatch.resolve(backend, sample.device).guided_step(StepArgs(
        sample, model_output, table, step_tensor if step_tensor is not None else step, scale=scale,
        mfactor=mfactor, g_score=g_score, g_mean=g_mean, noise=noise, x0_prev=x0_prev, clip_mode=clip_mode,
        clip_lo=clip_lo, clip_hi=clip_hi, threshold=threshold, learned_variance=learned_variance,
        out=(res[:rows] if doubled else res) if write_out else None, x0_out=x0 if write_x0 else None,
        write_out=write_out, out2=res[rows:] if doubled else None, step_rows=step_rows, uncond_rows=uncond_rows,
        combine=combine, extra=extra, eps_from_uncond=eps_from_uncond, x0_prev2=x0_prev2))
    return res, x0


@guided_step.register_fake
def _(sample, model_output, table, step, step_tensor, scale, mfactor, g_score, g_mean, noise, x0_prev,
      clip_mode, clip_lo, clip_hi, threshold, learned_variance, write_out, write_x0, backend, write_out2=False,
      step_rows=None, uncond_rows=None, combine=None, extra=None, eps_from_uncond=False, x0_prev2=None):
    return _result(sample, write_out, write_out and write_out2), _empty(sample, write_x0)


@torch.library.custom_op("fastguide::guidance_gram", mutates_args=("extra",))
def guidance_gram(model_output: Tensor, extra: Optional[Tensor], momentum: Optional[float], learned_variance: bool,
                  backend: str) -> Tensor:
    """[B, 9] per-sample inner products; with ``momentum``, ``extra`` is updated in place first."""
    return dispatch.resolve(backend, model_output.device).guidance_gram(model_output, extra, momentum,
                                                                         learned_variance).float()


@guidance_gram.register_fake
def _(model_output, extra, momentum, learned_variance, backend):
    return model_output.new_empty((model_output.shape[0] // 2, 9), dtype=torch.float32)


@torch.library.custom_op("fastguide::cfg_rescale_factor", mutates_args=())
def cfg_rescale_factor(model_output: Tensor, scale: Tensor, rescale: float, learned_variance: bool,
                       backend: str) -> Tensor:
    return dispatch.resolve(backend, model_output.device).cfg_rescale_factor(
        model_output, scale, rescale, learned_variance).float()


@cfg_rescale_factor.register_fake
def _(model_output, scale, rescale, learned_variance, backend):
    return model_output.new_empty((model_output.shape[0] // 2,), dtype=torch.float32)


@torch.library.custom_op("fastguide::temperature_lse_grad", mutates_args=())
def temperature_lse_grad(logits: Tensor, labels: Tensor, tau1: float, tau2: float, scale: Optional[Tensor],
                         backend: str) -> Tensor:
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    dispatch.resolve(backend, logits.device).temperature_lse_grad(logits, labels, tau1, tau2, scale, out)
    return out


@temperature_lse_grad.register_fake
def _(logits, labels, tau1, tau2, scale, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastguide::per_sample_rms", mutates_args=())
def per_sample_rms(x: Tensor, backend: str) -> Tensor:
    return dispatch.resolve(backend, x.device).per_sample_rms(x).float()


@per_sample_rms.register_fake
def _(x, backend):
    return x.new_empty((x.shape[0],), dtype=torch.float32)
