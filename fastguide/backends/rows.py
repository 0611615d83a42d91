"""Views of [B, ...] tensors as [rows, N] with contiguous rows: the layout the compiled kernels take."""

from __future__ import annotations

from typing import Optional

import torch


def as_rows(t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """``t`` as a 2-D ``[t.shape[0], -1]`` tensor whose inner stride is 1 (a view when possible).

    Only the row stride may be arbitrary, so chunked ``[uncond; cond]`` halves and batch slices stay views;
    anything else (permuted, channel-strided) is copied. ``dtype`` casts when it differs.
    """
    if t is None:
        return None
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    rows = t.shape[0]
    flat = t.reshape(rows, -1) if t.numel() else t.reshape(rows, 0)
    if flat.shape[1] > 1 and flat.stride(1) != 1:
        flat = flat.contiguous()
    return flat
