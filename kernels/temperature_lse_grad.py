"""Gradient of ``J = tau1 * l_y - logsumexp(tau2 * l)`` w.r.t. the logits, times a per-sample scale.

``dJ/dl = tau1 * onehot(y) - tau2 * softmax(tau2 * l)`` (Ma et al. 2023). One program per row walks K in
blocks twice: first an online max / rescaled sum of ``exp(tau2 * l - max)`` (so K = 21,843 ImageNet-21k
logits in fp16/bf16 never overflow, and the row never has to fit in registers), then the gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch_utils import REDUCTION_MAX_BLOCK, pow2_at_least, warps_for


@triton.jit
def temperature_lse_grad_kernel(
    logits_ptr, logits_stride, labels_ptr, labels_stride, scale_ptr, scale_stride, out_ptr, out_stride,
    k, tau1, tau2, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    src = logits_ptr + row * logits_stride
    offs = tl.arange(0, BLOCK)

    # The first block is peeled so the running max starts finite (K >= 1): no -inf - -inf = NaN.
    mask = offs < k
    t = tl.where(mask, tau2 * tl.load(src + offs, mask=mask, other=0.0).to(tl.float32), float("-inf"))
    run_max = tl.max(t, axis=0)
    run_sum = tl.sum(tl.exp(t - run_max), axis=0)
    for start in range(BLOCK, k, BLOCK):
        cols = start + offs
        mask = cols < k
        t = tl.where(mask, tau2 * tl.load(src + cols, mask=mask, other=0.0).to(tl.float32), float("-inf"))
        new_max = tl.maximum(run_max, tl.max(t, axis=0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(t - new_max), axis=0)
        run_max = new_max

    label = tl.load(labels_ptr + row * labels_stride).to(tl.int64)
    if HAS_SCALE:
        w = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
    dst = out_ptr + row * out_stride
    for start in range(0, k, BLOCK):
        cols = start + offs
        mask = cols < k
        t = tau2 * tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        grad = -tau2 * (tl.exp(t - run_max) / run_sum)
        grad = tl.where(cols == label, grad + tau1, grad)
        if HAS_SCALE:
            grad = grad * w
        tl.store(dst + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)


def temperature_lse_grad(logits: torch.Tensor, labels: torch.Tensor, tau1: float, tau2: float,
                         scale: Optional[torch.Tensor], out: torch.Tensor, block: Optional[int] = None) -> None:
    """Write the gradient of ``[B, K]`` ``logits`` (unit inner stride) into ``out`` ([B, K], unit inner
    stride); ``labels`` and ``scale`` are [B] vectors with any stride. ``block`` overrides the K block."""
    rows, k = logits.shape
    if rows == 0 or k == 0:
        return
    block = block or min(REDUCTION_MAX_BLOCK, pow2_at_least(k))
    temperature_lse_grad_kernel[(rows,)](
        logits, logits.stride(0), labels, labels.stride(0),
        scale if scale is not None else out, scale.stride(0) if scale is not None else 0,
        out, out.stride(0), k, float(tau1), float(tau2),
        HAS_SCALE=scale is not None, BLOCK=block, num_warps=warps_for(block), enable_fp_fusion=True)
