"""The CUDA C++ backend: the kernels of ``csrc/cuda`` in ``fastguide._C``, with the signatures of
``fastguide.backends.reference``.

Arguments arrive validated by ``fastguide.core.ops``; ``fastguide.backends.abi`` turns them into the kernels' argument
blocks (the same ones the C++ CPU backend fills). Every kernel is enqueued on the current stream of the
tensors' device, so calls are asynchronous, never synchronise with the host, and can be captured in a
CUDA graph (the step index may live on the device).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..core.args import StepArgs
from . import abi

# The kernels are built for sm_80 and sm_90 (plus compute_90 PTX that newer GPUs compile at load time).
MIN_COMPUTE_CAPABILITY = (8, 0)


def unavailable_reason() -> str:
    """"" when the CUDA C++ kernels can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
    try:
        module = abi.extension()
    except ImportError as exc:
        return (f"fastguide._C is not built or cannot be loaded ({exc}); reinstall without "
                f"FASTGUIDE_BUILD_EXT=0 to build it")
    if not getattr(module, "has_cuda", lambda: False)():
        return ("fastguide._C was built without the CUDA kernels (no nvcc at build time, or "
                "FASTGUIDE_CUDA=0); reinstall with FASTGUIDE_CUDA=1 and nvcc on PATH")
    capability = torch.cuda.get_device_capability()
    if capability < MIN_COMPUTE_CAPABILITY:
        need = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        return (f"the CUDA kernels need compute capability >= {need}, the current device has "
                f"{capability[0]}.{capability[1]}")
    return ""


def _run(kernel: Callable, launch: abi.Launch, device: torch.device) -> None:
    """Enqueue ``kernel`` on the current stream of ``device`` with that device current, then copy results
    that went through temporaries back (on the same stream, so after the kernel)."""
    if device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel(launch.args, torch.cuda.current_stream(device).cuda_stream)
            launch.finish()
        return
    kernel(launch.args, torch.cuda.current_stream(device).cuda_stream)
    launch.finish()


def guided_step(args: StepArgs) -> None:
    """One fused guided step (see ``fastguide.backends.reference.guided_step``), written into the outputs."""
    launch = abi.guided_step_args(args)
    _run(abi.extension().cuda_guided_step, launch, args.sample.device)


def cfg_rescale_factor(model_output: torch.Tensor, scale: torch.Tensor, rescale: float,
                       learned_variance: bool = False) -> torch.Tensor:
    """Per-sample CFG-rescale factor (see ``fastguide.backends.reference.cfg_rescale_factor``), [B] fp32."""
    launch, factor = abi.cfg_rescale_factor_args(model_output, scale, rescale, learned_variance)
    _run(abi.extension().cuda_cfg_rescale_factor, launch, model_output.device)
    return factor


def guidance_gram(model_output: torch.Tensor, extra: Optional[torch.Tensor], momentum: Optional[float],
                  learned_variance: bool = False) -> torch.Tensor:
    """Per-sample inner products and sums of cond, uncond and extra (see
    ``fastguide.backends.reference.guidance_gram``), [B, 9] fp32; with ``momentum`` ``extra`` is updated in place
    in the same pass."""
    launch, out = abi.guidance_gram_args(model_output, extra, momentum, learned_variance)
    _run(abi.extension().cuda_guidance_gram, launch, model_output.device)
    return out


def temperature_lse_grad(logits: torch.Tensor, labels: torch.Tensor, tau1: float, tau2: float,
                         scale: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """Temperature log-sum-exp gradient (see ``fastguide.backends.reference.temperature_lse_grad``) into ``out``."""
    launch = abi.temperature_lse_grad_args(logits, labels, tau1, tau2, scale, out)
    _run(abi.extension().cuda_temperature_lse_grad, launch, logits.device)


def per_sample_rms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square (see ``fastguide.backends.reference.per_sample_rms``), [B] fp32."""
    launch, out = abi.per_sample_rms_args(x)
    _run(abi.extension().cuda_per_sample_rms, launch, x.device)
    return out
