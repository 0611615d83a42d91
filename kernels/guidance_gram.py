"""Per-sample inner products and sums of the cond c, uncond u and extra e predictions (``guidance_gram``).

The nine numbers ``c.c, c.u, u.u, c.e, u.e, e.e, sum c, sum u, sum e`` per sample
(``fastguide.backends.reference.GRAM_COLUMNS``) are what every guidance method beyond CFG needs to build its
per-sample linear combine. One sample can be millions of elements, so a row is split into chunks: each
program reduces its chunk to the nine fp32 partial sums from values in registers, and a tiny kernel adds
up the chunks. With a momentum beta the first pass also updates e in place to ``(c - u) + beta e`` (APG's
running average), stored in e's dtype, and reduces the stored values. A row that fits one chunk is
finished by its single program (one launch): its partials are the result.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch_utils import reduction_block, row_slices, warps_for

# Columns of the result (and of each chunk's partials).
NUM_GRAM = tl.constexpr(9)
GRAM_PAD = tl.constexpr(16)  # the columns as a power-of-two block in the combine
COMBINE_BLOCK = 64           # chunks per iteration of the combine ([64, 16] fp32 partials)


@triton.jit
def _store_gram(base, cc, cu, uu, ce, ue, ee, sum_c, sum_u, sum_e):
    tl.store(base + 0, cc)
    tl.store(base + 1, cu)
    tl.store(base + 2, uu)
    tl.store(base + 3, ce)
    tl.store(base + 4, ue)
    tl.store(base + 5, ee)
    tl.store(base + 6, sum_c)
    tl.store(base + 7, sum_u)
    tl.store(base + 8, sum_e)


@triton.jit(do_not_specialize=["row0"])
def guidance_gram_partial_kernel(
    m_ptr, m_stride, n, batch, row0, extra_ptr, extra_stride, momentum, partial_ptr, chunks,
    HAS_EXTRA: tl.constexpr, MOMENTUM: tl.constexpr, BLOCK: tl.constexpr,
):
    # Grid: (chunks of a row, rows); model_output is [uncond (B rows); cond (B rows)].
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64) + row0
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    u = tl.load(m_ptr + row * m_stride + cols, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(m_ptr + (row + batch) * m_stride + cols, mask=mask, other=0.0).to(tl.float32)
    # partials [B, chunks, 9]; with one chunk that is the [B, 9] result itself.
    base = partial_ptr + (row * chunks + chunk) * NUM_GRAM
    if HAS_EXTRA:
        e_ptrs = extra_ptr + row * extra_stride + cols
        e = tl.load(e_ptrs, mask=mask, other=0.0).to(tl.float32)
        if MOMENTUM:
            # e <- (c - u) + beta e, stored in e's dtype; the products are those of the stored values.
            e_new = ((c - u) + momentum * e).to(extra_ptr.dtype.element_ty)
            tl.store(e_ptrs, e_new, mask=mask)
            e = e_new.to(tl.float32)
        _store_gram(base, tl.sum(c * c, axis=0), tl.sum(c * u, axis=0), tl.sum(u * u, axis=0),
                    tl.sum(c * e, axis=0), tl.sum(u * e, axis=0), tl.sum(e * e, axis=0), tl.sum(c, axis=0),
                    tl.sum(u, axis=0), tl.sum(e, axis=0))
    else:
        _store_gram(base, tl.sum(c * c, axis=0), tl.sum(c * u, axis=0), tl.sum(u * u, axis=0), 0.0, 0.0, 0.0,
                    tl.sum(c, axis=0), tl.sum(u, axis=0), 0.0)


@triton.jit
def guidance_gram_combine_kernel(partial_ptr, out_ptr, chunks, BLOCK: tl.constexpr):
    # One program per row: the sum over its chunks of each of the nine partials.
    row = tl.program_id(0).to(tl.int64)
    base = partial_ptr + row * chunks * NUM_GRAM
    col = tl.arange(0, GRAM_PAD)
    acc = tl.zeros((BLOCK, GRAM_PAD), tl.float32)
    for start in range(0, chunks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        valid = (idx[:, None] < chunks) & (col[None, :] < NUM_GRAM)
        acc += tl.load(base + idx[:, None] * NUM_GRAM + col[None, :], mask=valid, other=0.0)
    tl.store(out_ptr + row * NUM_GRAM + col, tl.sum(acc, axis=0), mask=col < NUM_GRAM)


def guidance_gram(model_output: torch.Tensor, n: int, extra: Optional[torch.Tensor] = None,
                  momentum: Optional[float] = None, block: Optional[int] = None) -> torch.Tensor:
    """The [B, 9] fp32 sums for a ``[2B, >= n]`` row view ``model_output`` (unit inner stride) whose first
    ``n`` elements per row are the prediction, and an optional ``[B, n]`` row view ``extra`` (updated in
    place with ``momentum``: it must not overlap itself). ``block`` overrides the chunk length (a power of
    two)."""
    batch = model_output.shape[0] // 2
    out = torch.empty(batch, NUM_GRAM.value, device=model_output.device, dtype=torch.float32)
    if batch == 0:
        return out
    if momentum is not None and extra is None:
        raise ValueError("momentum updates extra in place: pass extra")
    block = block or reduction_block(n)
    chunks = max(1, triton.cdiv(n, block))
    partial = out if chunks == 1 else torch.empty(batch * chunks * NUM_GRAM.value, device=out.device,
                                                  dtype=torch.float32)
    for row0, rows in row_slices(batch):
        guidance_gram_partial_kernel[(chunks, rows)](
            model_output, model_output.stride(0), n, batch, row0, extra if extra is not None else model_output,
            extra.stride(0) if extra is not None else 0, float(momentum or 0.0), partial, chunks,
            HAS_EXTRA=extra is not None, MOMENTUM=momentum is not None, BLOCK=block, num_warps=warps_for(block),
            enable_fp_fusion=True)
    if chunks > 1:
        guidance_gram_combine_kernel[(batch,)](partial, out, chunks, BLOCK=COMBINE_BLOCK, num_warps=4)
    return out
