"""The fused guided sampler step: the row formula of ``fastguide.core.layout`` in one pass over memory.

Every input element is read once and every output element written once; everything between is fp32 in
registers. Absent tensors are switched off by constexpr flags, so their loads and arithmetic are not even
compiled. The coefficient row is read from the device table at a step index that is a launch argument
or is itself read from device memory, so a CUDA graph replaying this launch always sees the current step.

Heterogeneous batches (``StepArgs.step_rows`` / ``uncond_rows``) are two more constexpr flags: STEP_ROWS
reads each sample's table row from a [B] index vector, SPARSE_CFG takes the cond prediction from row b and
the uncond one from the row a [B] map names (none where it is negative: m = c). Each program reads its
sample's entries once, as scalars; without the flags the kernel compiles exactly as before.

Guidance beyond CFG (``StepArgs.combine`` / ``extra`` / ``eps_from_uncond``) is three more: COMBINE replaces
``u + w (c - u)`` by the sample's ``a c + b u`` (its three coefficients read once, as scalars), HAS_EXTRA adds
``d e`` from a third [B, n] stream, and EPS_FROM_UNCOND computes eps~ from u while x0^ keeps m (CFG++).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastguide.core.args import StepArgs
from fastguide.core.layout import CLIP_RANGE, CLIP_THRESHOLD, Col

from .launch_utils import elementwise_block, row_slices, warps_for

# Column indices as compile-time constants (jit code may only read constexpr globals).
P_X = tl.constexpr(int(Col.P_X))
P_M = tl.constexpr(int(Col.P_M))
P_G = tl.constexpr(int(Col.P_G))
P_Z = tl.constexpr(int(Col.P_Z))
Q_X = tl.constexpr(int(Col.Q_X))
Q_M = tl.constexpr(int(Col.Q_M))
Q_G = tl.constexpr(int(Col.Q_G))
Q_Z = tl.constexpr(int(Col.Q_Z))
C_A = tl.constexpr(int(Col.A))
C_B = tl.constexpr(int(Col.B))
C_C = tl.constexpr(int(Col.C))
C_D = tl.constexpr(int(Col.D))
C_E = tl.constexpr(int(Col.E))
C_F = tl.constexpr(int(Col.F))
C_F2 = tl.constexpr(int(Col.F2))
C_DV = tl.constexpr(int(Col.DV))
C_EV = tl.constexpr(int(Col.EV))
LV_MAX = tl.constexpr(int(Col.LV_MAX))
LV_MIN = tl.constexpr(int(Col.LV_MIN))
MODE_RANGE = tl.constexpr(CLIP_RANGE)
MODE_THRESHOLD = tl.constexpr(CLIP_THRESHOLD)


@triton.jit
def _guided_prediction(m_ptr, m_stride, row, batch, n, cols, mask, scale_ptr, scale_stride, uncond_rows_ptr,
                       uncond_rows_stride, combine_ptr, extra_ptr, extra_stride, HAS_CFG: tl.constexpr,
                       SPARSE_CFG: tl.constexpr, COMBINE: tl.constexpr, HAS_EXTRA: tl.constexpr,
                       EPS_FROM_UNCOND: tl.constexpr):
    """This sample's model prediction m after the CFG (or linear) combine, its uncond prediction u (the
    eps source with EPS_FROM_UNCOND; m itself without CFG) and its cond row (the learned variance's)."""
    if SPARSE_CFG:
        # [cond (B rows); uncond (K rows)]: row b is the cond prediction, uncond_rows[b] the uncond one or
        # negative for none, where m = c exactly (whatever the scale) and the uncond load is masked off.
        cond_row = m_ptr + row * m_stride
        c = tl.load(cond_row + cols, mask=mask, other=0.0).to(tl.float32)
        u_idx = tl.load(uncond_rows_ptr + row * uncond_rows_stride).to(tl.int64)
        has_u = u_idx >= 0
        u_row = m_ptr + tl.where(has_u, u_idx, row) * m_stride  # never an address before the tensor
        # (one comparison rather than mask & has_u: the interpreter turns a block & scalar mask into int32)
        u = tl.load(u_row + cols, mask=cols < tl.where(has_u, n, 0), other=0.0).to(tl.float32)
        w = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        m = tl.where(has_u, u + w * (c - u), c)
        if EPS_FROM_UNCOND:  # a sample without an uncond row renoises with its cond prediction
            u = tl.where(has_u, u, c)
    elif HAS_CFG:
        # [uncond; cond]: this sample's cond row is `batch` rows below its uncond row.
        cond_row = m_ptr + (row + batch) * m_stride
        u = tl.load(m_ptr + row * m_stride + cols, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cond_row + cols, mask=mask, other=0.0).to(tl.float32)
        if COMBINE:  # m = a c + b u (+ d e): the sample's (a, b, d), read once as scalars
            k = combine_ptr + row * 3
            m = tl.load(k) * c + tl.load(k + 1) * u
            if HAS_EXTRA:
                e = tl.load(extra_ptr + row * extra_stride + cols, mask=mask, other=0.0).to(tl.float32)
                m = m + tl.load(k + 2) * e
        else:
            w = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
            m = u + w * (c - u)
    else:
        cond_row = m_ptr + row * m_stride
        m = tl.load(cond_row + cols, mask=mask, other=0.0).to(tl.float32)
        u = m
    return m, u, cond_row


@triton.jit
def _x0_history(res, coef, table_stride_col, row, cols, mask, x0_prev_ptr, x0_prev_stride, x0_prev2_ptr,
                x0_prev2_stride, HAS_X0_PREV: tl.constexpr, HAS_X0_PREV2: tl.constexpr):
    """res + F x0_prev + F2 x0_prev2: the multistep history terms, each only with its tensor."""
    if HAS_X0_PREV:
        xp = tl.load(x0_prev_ptr + row * x0_prev_stride + cols, mask=mask, other=0.0).to(tl.float32)
        res = res + tl.load(coef + C_F * table_stride_col) * xp
    if HAS_X0_PREV2:
        xp2 = tl.load(x0_prev2_ptr + row * x0_prev2_stride + cols, mask=mask, other=0.0).to(tl.float32)
        res = res + tl.load(coef + C_F2 * table_stride_col) * xp2
    return res


@triton.jit(do_not_specialize=["step", "row0"])
def guided_step_kernel(
    x_ptr, x_stride, m_ptr, m_stride, n, batch, row0,
    scale_ptr, scale_stride, mfactor_ptr, mfactor_stride,
    g_score_ptr, g_score_stride, g_mean_ptr, g_mean_stride,
    noise_ptr, noise_stride, x0_prev_ptr, x0_prev_stride, x0_prev2_ptr, x0_prev2_stride,
    clip_lo, clip_hi, threshold_ptr, threshold_stride,
    table_ptr, table_stride_row, table_stride_col, step_ptr, step,
    step_rows_ptr, step_rows_stride, uncond_rows_ptr, uncond_rows_stride, combine_ptr, extra_ptr, extra_stride,
    out_ptr, out_stride, x0_out_ptr, x0_out_stride, out2_ptr, out2_stride,
    HAS_CFG: tl.constexpr, HAS_MFACTOR: tl.constexpr, HAS_G_SCORE: tl.constexpr, HAS_G_MEAN: tl.constexpr,
    HAS_NOISE: tl.constexpr, HAS_X0_PREV: tl.constexpr, HAS_X0_PREV2: tl.constexpr, LEARNED_VARIANCE: tl.constexpr,
    CLIP_MODE: tl.constexpr, STEP_FROM_PTR: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_X0: tl.constexpr,
    WRITE_OUT2: tl.constexpr, STEP_ROWS: tl.constexpr, SPARSE_CFG: tl.constexpr, COMBINE: tl.constexpr,
    HAS_EXTRA: tl.constexpr, EPS_FROM_UNCOND: tl.constexpr, BLOCK: tl.constexpr,
):
    # Grid: (chunks of a row, rows). Row offsets in int64: a [2B, 2n] model output can pass 2**31.
    # `row` is the absolute sample index (row0: the first row of this launch's slice of the batch).
    row = tl.program_id(1).to(tl.int64) + row0
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n

    if STEP_ROWS:  # one table row per sample (a stack of several samplers' tables); overrides step
        step_idx = tl.load(step_rows_ptr + row * step_rows_stride).to(tl.int64)
    elif STEP_FROM_PTR:
        step_idx = tl.load(step_ptr).to(tl.int64)
    else:
        step_idx = step.to(tl.int64)
    coef = table_ptr + step_idx * table_stride_row

    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    m, u, cond_row = _guided_prediction(m_ptr, m_stride, row, batch, n, cols, mask, scale_ptr, scale_stride,
                                        uncond_rows_ptr, uncond_rows_stride, combine_ptr, extra_ptr, extra_stride,
                                        HAS_CFG, SPARSE_CFG, COMBINE, HAS_EXTRA, EPS_FROM_UNCOND)
    if HAS_MFACTOR:
        m = m * tl.load(mfactor_ptr + row * mfactor_stride).to(tl.float32)
    eps_m = m
    if EPS_FROM_UNCOND:  # CFG++: x0^ from the guided prediction, eps~ from the uncond one
        eps_m = u

    x0 = tl.load(coef + P_X * table_stride_col) * x + tl.load(coef + P_M * table_stride_col) * m
    eps = tl.load(coef + Q_X * table_stride_col) * x + tl.load(coef + Q_M * table_stride_col) * eps_m
    if HAS_NOISE:
        z = tl.load(noise_ptr + row * noise_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x0 = x0 + tl.load(coef + P_Z * table_stride_col) * z
        eps = eps + tl.load(coef + Q_Z * table_stride_col) * z
    # NaN must survive clipping (a NaN model output may never turn into a finite sample).
    if CLIP_MODE == MODE_RANGE:
        x0 = tl.clamp(x0, clip_lo, clip_hi, propagate_nan=tl.PropagateNan.ALL)
    elif CLIP_MODE == MODE_THRESHOLD:
        s = tl.load(threshold_ptr + row * threshold_stride).to(tl.float32)
        x0 = tl.clamp(x0, -s, s, propagate_nan=tl.PropagateNan.ALL) / s
    # The score correction enters after clipping (guided-diffusion's condition_score).
    if HAS_G_SCORE:
        g = tl.load(g_score_ptr + row * g_score_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x0 = x0 + tl.load(coef + P_G * table_stride_col) * g
        eps = eps + tl.load(coef + Q_G * table_stride_col) * g

    if WRITE_OUT:
        res = (tl.load(coef + C_A * table_stride_col) * x + tl.load(coef + C_B * table_stride_col) * x0
               + tl.load(coef + C_C * table_stride_col) * eps)
        if LEARNED_VARIANCE and (HAS_G_MEAN or HAS_NOISE):
            # learned_range: the cond row is [prediction (n) | v (n)]; log Sigma interpolates in f=(v+1)/2.
            v = tl.load(cond_row + n + cols, mask=mask, other=0.0).to(tl.float32)
            frac = (v + 1.0) * 0.5
            variance = tl.exp(frac * tl.load(coef + LV_MAX * table_stride_col)
                              + (1.0 - frac) * tl.load(coef + LV_MIN * table_stride_col))
        if HAS_G_MEAN:
            gm = tl.load(g_mean_ptr + row * g_mean_stride + cols, mask=mask, other=0.0).to(tl.float32)
            shift = tl.load(coef + C_D * table_stride_col)
            if LEARNED_VARIANCE:
                shift = shift + tl.load(coef + C_DV * table_stride_col) * variance
            res = res + shift * gm
        if HAS_NOISE:
            amp = tl.load(coef + C_E * table_stride_col)
            if LEARNED_VARIANCE:
                amp = amp + tl.load(coef + C_EV * table_stride_col) * tl.sqrt(variance)
            res = res + amp * z
        res = _x0_history(res, coef, table_stride_col, row, cols, mask, x0_prev_ptr, x0_prev_stride,
                          x0_prev2_ptr, x0_prev2_stride, HAS_X0_PREV, HAS_X0_PREV2)
    # All loads of this program's elements are above, so an output may be an input exactly (out=sample).
    # x0 is stored first: should x0_out be out or out2, the result wins, as in the reference.
    if WRITE_X0:
        tl.store(x0_out_ptr + row * x0_out_stride + cols, x0.to(x0_out_ptr.dtype.element_ty), mask=mask)
    if WRITE_OUT:
        tl.store(out_ptr + row * out_stride + cols, res.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_OUT2:  # the second copy (a loop's next [x; x] model input), from the same registers
            tl.store(out2_ptr + row * out2_stride + cols, res.to(out2_ptr.dtype.element_ty), mask=mask)


def _stride(t: Optional[torch.Tensor]) -> int:
    return t.stride(0) if t is not None else 0


def guided_step(args: StepArgs, block: Optional[int] = None) -> None:
    """Launch the fused step on row views: ``sample``, ``out``, ``out2``, ``x0_out``, ``g_*``, ``noise``,
    ``x0_prev``, ``x0_prev2`` are ``[B, n]``, ``model_output`` is ``[B or 2B, n or 2n]`` (``[B + K, ...]`` with
    ``uncond_rows``), each with unit inner stride (``as_rows``).

    ``scale`` (or ``combine``, [B, 3] fp32 with the dense layout, and then ``extra`` a [B, n] row view too) is
    required exactly when ``model_output`` has 2B rows or ``uncond_rows`` is given; ``scale``,
    ``mfactor`` and ``threshold`` are [B] vectors with any stride (0 for a broadcast scalar), ``step_rows``
    and ``uncond_rows`` [B] int32/int64 vectors (``StepArgs``). ``block`` overrides the
    elements per program (a power of two; tests use small ones to cross chunk boundaries).
    """
    x, model_output, step, out, x0_out = args.sample, args.model_output, args.step, args.out, args.x0_out
    batch, n = x.shape
    if batch == 0 or n == 0 or (out is None and x0_out is None):
        return
    sparse_cfg = args.uncond_rows is not None
    if sparse_cfg and args.scale is None:
        raise ValueError("uncond_rows (a sparse CFG batch) needs scale")
    has_cfg = sparse_cfg or model_output.shape[0] == 2 * batch
    combine = args.combine.to(torch.float32).contiguous() if args.combine is not None else None
    if combine is not None and (sparse_cfg or not has_cfg):
        raise ValueError("combine needs the dense [uncond; cond] layout (2B rows, no uncond_rows)")
    if args.eps_from_uncond and not has_cfg:
        raise ValueError("eps_from_uncond needs an uncond prediction (scale or combine)")
    extra = args.extra if combine is not None else None
    step_rows = args.step_rows
    block = block or elementwise_block(n, batch, x.device)
    step_from_ptr = step_rows is None and isinstance(step, torch.Tensor)
    out2 = args.out2 if out is not None else None  # written only with out
    optional = {name: getattr(args, name) for name in ("scale", "mfactor", "g_score", "g_mean", "noise",
                                                        "x0_prev", "x0_prev2", "threshold", "out", "x0_out")}
    optional["out2"] = out2
    # Absent pointers are never dereferenced (their flags compile the loads out); any tensor will do.
    ptr = {name: t if t is not None else x for name, t in optional.items()}
    stride = {name: _stride(t) for name, t in optional.items()}
    for row0, rows in row_slices(batch):
        grid = (triton.cdiv(n, block), rows)
        guided_step_kernel[grid](
            x, x.stride(0), model_output, model_output.stride(0), n, batch, row0,
            ptr["scale"], stride["scale"], ptr["mfactor"], stride["mfactor"],
            ptr["g_score"], stride["g_score"], ptr["g_mean"], stride["g_mean"],
            ptr["noise"], stride["noise"], ptr["x0_prev"], stride["x0_prev"],
            ptr["x0_prev2"], stride["x0_prev2"],
            float(args.clip_lo), float(args.clip_hi), ptr["threshold"], stride["threshold"],
            args.table, args.table.stride(0), args.table.stride(1),
            step if step_from_ptr else args.table, 0 if step_from_ptr or step_rows is not None else int(step),
            step_rows if step_rows is not None else x, _stride(step_rows),
            args.uncond_rows if sparse_cfg else x, _stride(args.uncond_rows),
            combine if combine is not None else x, extra if extra is not None else x, _stride(extra),
            ptr["out"], stride["out"], ptr["x0_out"], stride["x0_out"], ptr["out2"], stride["out2"],
            HAS_CFG=has_cfg, HAS_MFACTOR=args.mfactor is not None, HAS_G_SCORE=args.g_score is not None,
            HAS_G_MEAN=args.g_mean is not None, HAS_NOISE=args.noise is not None,
            HAS_X0_PREV=args.x0_prev is not None, HAS_X0_PREV2=args.x0_prev2 is not None,
            LEARNED_VARIANCE=bool(args.learned_variance), CLIP_MODE=int(args.clip_mode),
            STEP_FROM_PTR=step_from_ptr, WRITE_OUT=out is not None, WRITE_X0=x0_out is not None,
            WRITE_OUT2=out2 is not None, STEP_ROWS=step_rows is not None, SPARSE_CFG=sparse_cfg,
            COMBINE=combine is not None, HAS_EXTRA=extra is not None,
            EPS_FROM_UNCOND=bool(args.eps_from_uncond), BLOCK=block, num_warps=warps_for(block),
            enable_fp_fusion=True,
        )
