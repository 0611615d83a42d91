"""Argument blocks of the compiled kernels (``csrc/fastguide_abi.h``), filled from tensors.

Device-agnostic: the C++ CPU backend and the CUDA C++ backend fill the same pybind11 classes of
``fastguide._C`` and differ only in the kernel they hand them to. Large tensors become ``[rows, N]`` views
with contiguous rows (``fastguide.backends.rows.as_rows``) in one storage dtype (the sample's: fp32, fp16 or bf16;
any other float dtype computes in fp32, as the reference does). Each builder returns a ``Launch`` that
keeps every temporary (casts, copies) alive until the kernel has been issued, and afterwards copies results
that could not be written in place into the caller's tensors.

On CUDA, dropping the temporaries right after an asynchronous launch is safe as long as the kernel runs on
the current stream: the caching allocator reuses their memory only for work ordered after it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import List, Optional, Tuple, Union

import torch

from ..core.args import StepArgs
from .rows import as_rows

# fastguide::DType codes of the storage dtypes the kernels read and write.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_extension: Optional[ModuleType] = None


def extension() -> ModuleType:
    """The compiled module ``fastguide._C`` (raises ImportError when it was not built)."""
    global _extension
    if _extension is None:
        _extension = importlib.import_module("fastguide._C")
    return _extension


def row_length(t: torch.Tensor) -> int:
    """Elements per batch row of ``t``."""
    return t.numel() // t.shape[0] if t.shape[0] else 0


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel stores in for tensors of ``dtype``: itself when supported, else fp32."""
    return dtype if dtype in DTYPE_CODES else torch.float32


class Launch:
    """One kernel call's argument block, the tensors it points into, and the outputs to copy back."""

    def __init__(self, args):
        self.args = args
        self._alive: List[torch.Tensor] = []
        self._copy_back: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def input(self, t: Optional[torch.Tensor], dtype: torch.dtype) -> Tuple[int, int]:
        """(address, row stride) of ``t`` as ``[rows, N]`` in ``dtype``; (0, 0) when absent."""
        if t is None:
            return 0, 0
        if t.dtype == dtype and t.is_contiguous():  # the common case needs no view: rows are back to back
            return t.data_ptr(), row_length(t)
        rows = as_rows(t, dtype)
        self._alive.append(rows)
        return rows.data_ptr(), rows.stride(0)

    def output(self, t: Optional[torch.Tensor], dtype: torch.dtype) -> Tuple[int, int]:
        """(address, row stride) the kernel writes ``t`` through: ``t`` itself when it is contiguous and of
        ``dtype``, else a temporary copied into ``t`` by ``finish``."""
        if t is None:
            return 0, 0
        if t.is_contiguous() and t.dtype == dtype:
            return t.data_ptr(), row_length(t)
        rows = torch.empty((t.shape[0], row_length(t)), dtype=dtype, device=t.device)
        self._copy_back.append((t, rows))
        self._alive.append(rows)
        return rows.data_ptr(), rows.stride(0)

    def vector(self, v: Optional[Union[torch.Tensor, float]], length: int, device: torch.device) -> int:
        """Address of a contiguous fp32 [length] vector (a scalar or one-element tensor is broadcast)."""
        if v is None:
            return 0
        if not isinstance(v, torch.Tensor):
            v = torch.full((length,), float(v), dtype=torch.float32, device=device)
        elif v.dtype == torch.float32 and v.is_contiguous() and v.numel() == length:
            return v.data_ptr()  # the caller's tensor, alive for the whole call
        v = v.to(torch.float32).reshape(-1)
        if v.numel() == 1 and length != 1:
            v = v.expand(length)
        v = v.contiguous()
        self._alive.append(v)
        return v.data_ptr()

    def scale(self, v: Optional[Union[torch.Tensor, float]], device: torch.device) -> Tuple[int, int]:
        """(address, stride) of a guidance scale: stride 0 for a scalar, the [B] tensor's stride otherwise."""
        if v is None:
            return 0, 0
        if not isinstance(v, torch.Tensor):
            v = torch.full((1,), float(v), dtype=torch.float32, device=device)
        if v.dtype != torch.float32:
            v = v.to(torch.float32)
        if v.numel() == 1:
            v = v.reshape(1)
            self._alive.append(v)
            return v.data_ptr(), 0
        self._alive.append(v)
        return v.data_ptr(), v.stride(0)

    def index(self, t: torch.Tensor) -> int:
        """Address of a contiguous int64 copy of an index vector (the tensor itself when it is one)."""
        if t.dtype is not torch.int64 or not t.is_contiguous():
            t = t.to(torch.int64).contiguous()
        return self.keep(t)

    def prefill(self, t: torch.Tensor) -> None:
        """Copy ``t``'s current values into the temporary ``output`` just made for it (an in-out tensor)."""
        dst, rows = self._copy_back[-1]
        assert dst is t
        rows.copy_(t.reshape(rows.shape))

    def keep(self, t: torch.Tensor) -> int:
        self._alive.append(t)
        return t.data_ptr()

    def finish(self) -> None:
        """After the kernel: copy results that went through temporaries into the caller's tensors."""
        for dst, src in self._copy_back:
            dst.copy_(src.view(dst.shape))
        self._copy_back.clear()
        self._alive.clear()


def guided_step_args(args: StepArgs) -> Launch:
    """A ``GuidedStepArgs`` launch for ``guided_step``: the kernels' argument block filled from ``args``.

    This runs on every step of a loop, so the common case is kept to a few tensor queries and one call into
    the extension (the block's constructor, given the fields every call sets): contiguous tensors in the
    storage dtype are read where they lie, with row strides from the shapes, and tensors ``args`` holds need
    no keep-alive."""
    sample, model_output, table, step, out = args.sample, args.model_output, args.table, args.step, args.out
    dtype = sample.dtype if sample.dtype in DTYPE_CODES else torch.float32
    batch = sample.shape[0]
    n = sample.numel() // batch if batch else 0
    launch = Launch(None)  # (its block is made below, from the main fields)
    if sample.dtype is dtype and sample.is_contiguous():
        sample_ptr, sample_stride = sample.data_ptr(), n
    else:
        sample_ptr, sample_stride = launch.input(sample, dtype)
    model_ptr, model_stride = launch.input(model_output, dtype)
    scale = args.scale
    if scale is None:
        scale_ptr = scale_stride = 0
    elif scale.dtype is torch.float32 and scale.dim() == 1 and scale.shape[0] == batch and batch > 1:
        scale_ptr, scale_stride = scale.data_ptr(), scale.stride(0)  # a [B] vector (any stride), as given
    else:
        scale_ptr, scale_stride = launch.scale(scale, sample.device)
    if table.dtype is not torch.float32 or not table.is_contiguous():
        table = table.to(torch.float32).contiguous()
        launch.keep(table)
    if isinstance(step, torch.Tensor):
        # A loop's int64 step counter is read where it lies (no view dispatched per step); other index
        # tensors become one contiguous int64 element.
        if step.dtype is not torch.int64 or step.numel() != 1:
            step = step.reshape(1).to(torch.int64).contiguous()
            launch.keep(step)
        step_ptr, step_index = step.data_ptr(), 0
    else:
        step_ptr, step_index = 0, int(step)
    # Outputs registered in the kernels' store order (x0, out, out2), which is also the order ``finish``
    # copies temporaries back in: an output that is x0_out too ends up with the result.
    x0_out = launch.output(args.x0_out, dtype) if args.x0_out is not None else None
    out_ptr = out_stride = out2_ptr = out2_stride = 0
    if out is not None:
        if out.dtype is dtype and out.is_contiguous():
            out_ptr, out_stride = out.data_ptr(), n
        else:
            out_ptr, out_stride = launch.output(out, dtype)
        out2 = args.out2  # written only with out
        if out2 is None:
            pass
        elif out2.dtype is dtype and out2.is_contiguous():
            out2_ptr, out2_stride = out2.data_ptr(), n
        else:
            out2_ptr, out2_stride = launch.output(out2, dtype)
    a = launch.args = extension().GuidedStepArgs(
        batch, n, DTYPE_CODES[dtype], sample_ptr, sample_stride, model_ptr, model_stride, 0 if scale is None else 1,
        scale_ptr, scale_stride, table.data_ptr(), step_ptr, step_index, out_ptr, out_stride, out2_ptr, out2_stride)
    if x0_out is not None:
        a.x0_out, a.x0_out_stride = x0_out
    # Absent inputs keep the struct's null/zero defaults: every skipped pybind assignment saves ~0.3 us of a
    # loop step's host time.
    device = sample.device
    if args.learned_variance:
        a.learned_variance = 1
    if args.mfactor is not None:
        a.mfactor = launch.vector(args.mfactor, batch, device)
    if args.g_score is not None:
        a.g_score, a.g_score_stride = launch.input(args.g_score, dtype)
    if args.g_mean is not None:
        a.g_mean, a.g_mean_stride = launch.input(args.g_mean, dtype)
    if args.noise is not None:
        a.noise, a.noise_stride = launch.input(args.noise, dtype)
    if args.x0_prev is not None:
        a.x0_prev, a.x0_prev_stride = launch.input(args.x0_prev, dtype)
    if args.x0_prev2 is not None:
        a.x0_prev2, a.x0_prev2_stride = launch.input(args.x0_prev2, dtype)
    if args.clip_mode:
        a.clip_mode = int(args.clip_mode)
        a.clip_lo, a.clip_hi = float(args.clip_lo), float(args.clip_hi)
    if args.threshold is not None:
        a.threshold = launch.vector(args.threshold, batch, device)
    if args.step_rows is not None:
        a.step_rows = launch.index(args.step_rows)
    if args.uncond_rows is not None:
        a.uncond_rows = launch.index(args.uncond_rows)
    if args.combine is not None:
        a.has_cfg = 1
        a.combine = launch.keep(args.combine.to(torch.float32).contiguous())
    if args.extra is not None:
        a.extra, a.extra_stride = launch.input(args.extra, dtype)
    if args.eps_from_uncond:
        a.eps_from_uncond = 1
    return launch


def cfg_rescale_factor_args(model_output: torch.Tensor, scale, rescale: float,
                            learned_variance: bool = False) -> Tuple[Launch, torch.Tensor]:
    """A ``CfgRescaleFactorArgs`` launch and the [B] fp32 factor tensor it fills."""
    dtype = storage_dtype(model_output.dtype)
    device = model_output.device
    batch = model_output.shape[0] // 2
    row = row_length(model_output)
    launch = Launch(extension().CfgRescaleFactorArgs())
    a = launch.args
    a.batch = batch
    a.n = row // 2 if learned_variance else row
    a.dtype = DTYPE_CODES[dtype]
    a.model_output, a.model_output_stride = launch.input(model_output, dtype)
    a.scale, a.scale_stride = launch.scale(scale, device)
    a.phi = float(rescale)
    factor = torch.empty(batch, dtype=torch.float32, device=device)
    a.factor = launch.keep(factor)
    return launch, factor


def guidance_gram_args(model_output: torch.Tensor, extra: Optional[torch.Tensor], momentum: Optional[float],
                       learned_variance: bool = False) -> Tuple[Launch, torch.Tensor]:
    """A ``GuidanceGramArgs`` launch and the [B, 9] fp32 tensor it fills; ``extra`` (updated in place with a
    momentum) goes through a temporary copied back when it is not contiguous in the storage dtype."""
    dtype = storage_dtype(model_output.dtype)
    batch = model_output.shape[0] // 2
    row = row_length(model_output)
    launch = Launch(extension().GuidanceGramArgs())
    a = launch.args
    a.batch = batch
    a.n = row // 2 if learned_variance else row
    a.dtype = DTYPE_CODES[dtype]
    a.model_output, a.model_output_stride = launch.input(model_output, dtype)
    if extra is not None:
        if momentum is not None:  # written: in place, or through a temporary holding its current values
            if extra.is_contiguous() and extra.dtype == dtype:
                a.extra, a.extra_stride = extra.data_ptr(), row_length(extra)
            else:
                a.extra, a.extra_stride = launch.output(extra, dtype)
                launch.prefill(extra)
        else:
            a.extra, a.extra_stride = launch.input(extra, dtype)
    if momentum is not None:
        a.has_momentum, a.momentum = 1, float(momentum)
    out = torch.empty((batch, 9), dtype=torch.float32, device=model_output.device)
    a.out = launch.keep(out)
    return launch, out


def temperature_lse_grad_args(logits: torch.Tensor, labels: torch.Tensor, tau1: float, tau2: float, scale,
                              out: torch.Tensor) -> Launch:
    """A ``TemperatureLseGradArgs`` launch writing ``out`` ([B, K], the logits' dtype)."""
    dtype = storage_dtype(logits.dtype)
    launch = Launch(extension().TemperatureLseGradArgs())
    a = launch.args
    a.rows, a.k = logits.shape
    a.dtype = DTYPE_CODES[dtype]
    a.logits, a.logits_stride = launch.input(logits, dtype)
    a.labels = launch.keep(labels.reshape(-1).to(torch.int64).contiguous())
    a.tau1, a.tau2 = float(tau1), float(tau2)
    a.scale = launch.vector(scale, logits.shape[0], logits.device)
    a.out, a.out_stride = launch.output(out, dtype)
    return launch


def per_sample_rms_args(x: torch.Tensor) -> Tuple[Launch, torch.Tensor]:
    """A ``PerSampleRmsArgs`` launch and the [B] fp32 tensor it fills."""
    dtype = storage_dtype(x.dtype)
    launch = Launch(extension().PerSampleRmsArgs())
    a = launch.args
    a.rows = x.shape[0]
    a.n = row_length(x)
    a.dtype = DTYPE_CODES[dtype]
    a.x, a.x_stride = launch.input(x, dtype)
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    a.out = launch.keep(out)
    return launch, out
