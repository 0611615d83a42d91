"""The C++ CPU backend: the kernels of ``csrc/cpu`` in ``fastguide._C``, with the signatures of
``fastguide.reference``. Arguments arrive validated by ``fastguide.ops``; ``fastguide.abi`` turns them into
the kernels' argument blocks.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import abi
from .layout import CLIP_NONE
from .reference import StepIndex


def unavailable_reason() -> str:
    """"" when the compiled CPU kernels can run here, else why not."""
    try:
        module = importlib.import_module("fastguide._C")
    except ImportError as exc:
        return (f"fastguide._C is not built or cannot be loaded ({exc}); reinstall without "
                f"FASTGUIDE_BUILD_EXT=0 to build it")
    if not hasattr(module, "cpu_guided_step"):
        return "fastguide._C has no CPU kernels"
    return ""


def guided_step(sample: torch.Tensor, model_output: torch.Tensor, table: torch.Tensor, step: StepIndex, *,
                scale: Optional[torch.Tensor] = None, mfactor: Optional[torch.Tensor] = None,
                g_score: Optional[torch.Tensor] = None, g_mean: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None, x0_prev: Optional[torch.Tensor] = None,
                clip_mode: int = CLIP_NONE, clip_lo: float = -1.0, clip_hi: float = 1.0,
                threshold: Optional[torch.Tensor] = None, learned_variance: bool = False,
                out: Optional[torch.Tensor] = None, x0_out: Optional[torch.Tensor] = None) -> None:
    launch = abi.step_args(sample, model_output, table, step, scale=scale, mfactor=mfactor, g_score=g_score,
                           g_mean=g_mean, noise=noise, x0_prev=x0_prev, clip_mode=clip_mode, clip_lo=clip_lo,
                           clip_hi=clip_hi, threshold=threshold, learned_variance=learned_variance, out=out,
                           x0_out=x0_out)
    abi.extension().cpu_guided_step(launch.args)
    launch.finish()


def cfg_rescale_factor(model_output: torch.Tensor, scale: torch.Tensor, rescale: float,
                       learned_variance: bool = False) -> torch.Tensor:
    launch, factor = abi.rescale_args(model_output, scale, rescale, learned_variance)
    abi.extension().cpu_cfg_rescale_factor(launch.args)
    launch.finish()
    return factor


def temperature_lse_grad(logits: torch.Tensor, labels: torch.Tensor, tau1: float, tau2: float,
                         scale: Optional[torch.Tensor], out: torch.Tensor) -> None:
    launch = abi.lse_grad_args(logits, labels, tau1, tau2, scale, out)
    abi.extension().cpu_temperature_lse_grad(launch.args)
    launch.finish()


def per_sample_rms(x: torch.Tensor) -> torch.Tensor:
    launch, out = abi.rms_args(x)
    abi.extension().cpu_per_sample_rms(launch.args)
    launch.finish()
    return out
