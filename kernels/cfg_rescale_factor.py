"""Per-sample CFG-rescale factor ``r_b = phi * std(c_b) / std(g_b) + (1 - phi)``, ``g = u + w_b (c - u)``.

Lin et al. 2023 / diffusers ``rescale_noise_cfg`` with the unbiased std. One sample can be millions of
elements, so a row is split into chunks: each program reduces its chunk to (mean, sum of squared
deviations) of c and g, exactly, from values in registers; a tiny kernel merges the chunks with Chan et
al.'s pairwise formula. Neither pass forms a raw sum of squares, so large means do not cancel away the
variance. A row that fits one chunk is finished by its single program (one launch).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch_utils import reduction_block, row_slices, warps_for

# Per-chunk statistics stored for the combine: mean_c, m2_c, mean_g, m2_g.
NUM_STATS = tl.constexpr(4)
COMBINE_BLOCK = 256


@triton.jit
def _rescale_factor(m2_c, m2_g, n, phi):
    # std_c / std_g with the unbiased divisor n - 1 on both sides (n = 1 gives NaN, as torch.std does).
    std_c = tl.sqrt(m2_c / (n - 1.0))
    std_g = tl.sqrt(m2_g / (n - 1.0))
    return phi * (std_c / std_g) + (1.0 - phi)


@triton.jit(do_not_specialize=["row0"])
def cfg_rescale_factor_partial_kernel(
    m_ptr, m_stride, n, batch, row0, scale_ptr, scale_stride, phi, stats_ptr, factor_ptr, chunks,
    SINGLE_CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64) + row0
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    u = tl.load(m_ptr + row * m_stride + cols, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(m_ptr + (row + batch) * m_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
    g = u + w * (c - u)
    count = tl.minimum(n - chunk * BLOCK, BLOCK).to(tl.float32)
    mean_c = tl.sum(c, axis=0) / count
    mean_g = tl.sum(g, axis=0) / count
    dc = tl.where(mask, c - mean_c, 0.0)
    dg = tl.where(mask, g - mean_g, 0.0)
    m2_c = tl.sum(dc * dc, axis=0)
    m2_g = tl.sum(dg * dg, axis=0)
    if SINGLE_CHUNK:
        tl.store(factor_ptr + row, _rescale_factor(m2_c, m2_g, n, phi))
    else:
        base = stats_ptr + (row * chunks + chunk) * NUM_STATS
        tl.store(base + 0, mean_c)
        tl.store(base + 1, m2_c)
        tl.store(base + 2, mean_g)
        tl.store(base + 3, m2_g)


@triton.jit
def cfg_rescale_factor_combine_kernel(stats_ptr, factor_ptr, n, chunks, phi, CHUNK: tl.constexpr,
                                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = stats_ptr + row * chunks * NUM_STATS
    # Pass 1: the row means, weighted by each chunk's element count (only the last chunk is short).
    sum_c = tl.zeros((BLOCK,), tl.float32)
    sum_g = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, chunks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        valid = idx < chunks
        count = tl.where(valid, tl.minimum(n - idx * CHUNK, CHUNK), 0).to(tl.float32)
        sum_c += count * tl.load(base + idx * NUM_STATS + 0, mask=valid, other=0.0)
        sum_g += count * tl.load(base + idx * NUM_STATS + 2, mask=valid, other=0.0)
    mean_c = tl.sum(sum_c, axis=0) / n
    mean_g = tl.sum(sum_g, axis=0) / n
    # Pass 2: M2 = sum_i [M2_i + count_i * (mean_i - mean)^2] (Chan, Golub & LeVeque).
    acc_c = tl.zeros((BLOCK,), tl.float32)
    acc_g = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, chunks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        valid = idx < chunks
        count = tl.where(valid, tl.minimum(n - idx * CHUNK, CHUNK), 0).to(tl.float32)
        dc = tl.load(base + idx * NUM_STATS + 0, mask=valid, other=0.0) - mean_c
        dg = tl.load(base + idx * NUM_STATS + 2, mask=valid, other=0.0) - mean_g
        acc_c += tl.load(base + idx * NUM_STATS + 1, mask=valid, other=0.0) + count * dc * dc
        acc_g += tl.load(base + idx * NUM_STATS + 3, mask=valid, other=0.0) + count * dg * dg
    tl.store(factor_ptr + row, _rescale_factor(tl.sum(acc_c, axis=0), tl.sum(acc_g, axis=0), n, phi))


def cfg_rescale_factor(model_output: torch.Tensor, n: int, scale: torch.Tensor, phi: float,
                       block: Optional[int] = None) -> torch.Tensor:
    """The [B] fp32 factors for a ``[2B, >= n]`` row view ``model_output`` (unit inner stride) whose first
    ``n`` elements per row are the prediction; ``scale`` is a [B] vector with any stride.
    ``block`` overrides the chunk length (a power of two)."""
    batch = model_output.shape[0] // 2
    factor = torch.empty(batch, device=model_output.device, dtype=torch.float32)
    if batch == 0:
        return factor
    block = block or reduction_block(n)
    chunks = max(1, triton.cdiv(n, block))
    single = chunks == 1
    stats = factor if single else torch.empty(batch * chunks * NUM_STATS.value, device=factor.device,
                                             dtype=torch.float32)
    for row0, rows in row_slices(batch):
        cfg_rescale_factor_partial_kernel[(chunks, rows)](
            model_output, model_output.stride(0), n, batch, row0, scale, scale.stride(0), float(phi),
            stats, factor, chunks, SINGLE_CHUNK=single, BLOCK=block, num_warps=warps_for(block),
            enable_fp_fusion=True)
    if not single:
        cfg_rescale_factor_combine_kernel[(batch,)](stats, factor, n, chunks, float(phi), CHUNK=block,
                                                    BLOCK=COMBINE_BLOCK, num_warps=4, enable_fp_fusion=True)
    return factor
