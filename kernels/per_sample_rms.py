"""Per-sample root mean square ``sqrt(mean(x^2))`` over all but the batch dimension, as [B] fp32.

A row is reduced in chunks, one program each, to partial sums of squares (a tree sum in registers); a
tiny kernel adds a row's partials and takes the root. A row that fits one chunk is finished in place.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch_utils import reduction_block, row_slices, warps_for

COMBINE_BLOCK = 256


@triton.jit(do_not_specialize=["row0"])
def per_sample_rms_partial_kernel(x_ptr, x_stride, n, row0, partial_ptr, out_ptr, chunks,
                                  SINGLE_CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64) + row0
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * x_stride + cols, mask=cols < n, other=0.0).to(tl.float32)
    sum_sq = tl.sum(x * x, axis=0)
    if SINGLE_CHUNK:
        # n = 0 gives 0/0 = NaN, as torch's mean of nothing does.
        tl.store(out_ptr + row, tl.sqrt(sum_sq / n))
    else:
        tl.store(partial_ptr + row * chunks + chunk, sum_sq)


@triton.jit
def per_sample_rms_combine_kernel(partial_ptr, out_ptr, n, chunks, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, chunks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + row * chunks + idx, mask=idx < chunks, other=0.0)
    tl.store(out_ptr + row, tl.sqrt(tl.sum(acc, axis=0) / n))


def per_sample_rms(x: torch.Tensor, block: Optional[int] = None) -> torch.Tensor:
    """RMS of each row of a ``[B, n]`` view with unit inner stride; ``block`` overrides the chunk length."""
    batch, n = x.shape
    out = torch.empty(batch, device=x.device, dtype=torch.float32)
    if batch == 0:
        return out
    block = block or reduction_block(n)
    chunks = max(1, triton.cdiv(n, block))
    single = chunks == 1
    partial = out if single else torch.empty(batch * chunks, device=x.device, dtype=torch.float32)
    for row0, rows in row_slices(batch):
        per_sample_rms_partial_kernel[(chunks, rows)](x, x.stride(0), n, row0, partial, out, chunks,
                                                      SINGLE_CHUNK=single, BLOCK=block,
                                                      num_warps=warps_for(block), enable_fp_fusion=True)
    if not single:
        per_sample_rms_combine_kernel[(batch,)](partial, out, n, chunks, BLOCK=COMBINE_BLOCK, num_warps=4,
                                                enable_fp_fusion=True)
    return out
