"""The C++ CPU backend: the kernels of ``csrc/cpu`` in ``fastguide._C``, with the signatures of
``fastguide.backends.reference``. Arguments arrive validated by ``fastguide.core.ops``;
``fastguide.backends.abi`` turns them into the kernels' argument blocks.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from ..core.args import StepArgs
from . import abi


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


def guided_step(args: StepArgs) -> None:
    launch = abi.guided_step_args(args)
    abi.extension().cpu_guided_step(launch.args)
    launch.finish()


def cfg_rescale_factor(model_output: torch.Tensor, scale: torch.Tensor, rescale: float,
                       learned_variance: bool = False) -> torch.Tensor:
    launch, factor = abi.cfg_rescale_factor_args(model_output, scale, rescale, learned_variance)
    abi.extension().cpu_cfg_rescale_factor(launch.args)
    launch.finish()
    return factor


def guidance_gram(model_output: torch.Tensor, extra: Optional[torch.Tensor], momentum: Optional[float],
                  learned_variance: bool = False) -> torch.Tensor:
    launch, out = abi.guidance_gram_args(model_output, extra, momentum, learned_variance)
    abi.extension().cpu_guidance_gram(launch.args)
    launch.finish()
    return out


def temperature_lse_grad(logits: torch.Tensor, labels: torch.Tensor, tau1: float, tau2: float,
                         scale: Optional[torch.Tensor], out: torch.Tensor) -> None:
    launch = abi.temperature_lse_grad_args(logits, labels, tau1, tau2, scale, out)
    abi.extension().cpu_temperature_lse_grad(launch.args)
    launch.finish()


def per_sample_rms(x: torch.Tensor) -> torch.Tensor:
    launch, out = abi.per_sample_rms_args(x)
    abi.extension().cpu_per_sample_rms(launch.args)
    launch.finish()
    return out
