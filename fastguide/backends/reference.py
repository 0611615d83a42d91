"""The torch reference backend: the readable specification of every fused op.

Each function here defines the semantics that the compiled backends (C++, Triton, CUDA C++) must match.
They take already-validated tensors (see ``fastguide.core.ops`` for the public, checked entry points) and
write their results into caller-provided outputs. Everything is computed in fp32 and stored in the output dtype.
The step row is read from the device table with a tensor index, so nothing here syncs with the host.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.args import StepArgs, StepIndex
from ..core.layout import CLIP_RANGE, CLIP_THRESHOLD, Col


def _row(table: torch.Tensor, step: StepIndex) -> torch.Tensor:
    """The coefficient row of ``step``; a device-tensor index stays on the device (no host sync)."""
    if isinstance(step, torch.Tensor):
        return table.index_select(0, step.reshape(1).to(device=table.device, dtype=torch.long))[0]
    return table[step]


def _coefficients(args: StepArgs) -> list:
    """The step's coefficients by column: scalars (one row for the batch), or with ``step_rows`` one row
    per sample, each column a ``[B, 1, ...]`` tensor that broadcasts over the sample's rows."""
    if args.step_rows is None:
        r = _row(args.table, args.step).float()
        return [r[i] for i in range(len(Col))]
    rows = args.table.index_select(0, args.step_rows.reshape(-1).to(device=args.table.device, dtype=torch.long))
    shape = (-1,) + (1,) * (args.sample.dim() - 1)
    return [rows[:, i].float().reshape(shape) for i in range(len(Col))]


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] vector shaped to broadcast over the rows of ``like`` ([B, ...])."""
    return v.float().reshape((-1,) + (1,) * (like.dim() - 1))


def split_model_output(model_output: torch.Tensor, batch: int, learned_variance: bool,
                       uncond_rows: Optional[torch.Tensor] = None):
    """Split a ``[uncond; cond]`` (or plain) output into (uncond, cond, variance) parts, all fp32.

    ``uncond`` is None without CFG. The learned variance (second half of the channels) is taken from the
    cond half: guided-diffusion and DiT sample the variance of the conditional branch. With a sparse
    ``uncond_rows`` map (``StepArgs``) the cond rows are the first B and ``uncond`` is gathered per sample
    (a sample without an uncond row gets its cond row, which ``cfg_combine`` then passes through).
    """
    m = model_output.float()
    variance = None
    if learned_variance:
        m, variance = m.chunk(2, dim=1)
    if uncond_rows is not None:
        index = uncond_rows.reshape(-1).to(device=m.device, dtype=torch.long)
        index = torch.where(index >= 0, index, torch.arange(batch, device=m.device))
        return m.index_select(0, index), m[:batch], variance[:batch] if variance is not None else None
    if m.shape[0] == 2 * batch:
        uncond, cond = m[:batch], m[batch:]
        if variance is not None:
            variance = variance[batch:]
        return uncond, cond, variance
    return None, m, variance


def cfg_combine(uncond: Optional[torch.Tensor], cond: torch.Tensor, scale: Optional[torch.Tensor],
                uncond_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Classifier-free guidance, Ho & Salimans eq. 6 in diffusers' form: ``u + w (c - u)``; with a sparse
    ``uncond_rows`` map, samples whose entry is negative keep their cond prediction exactly."""
    if uncond is None:
        return cond
    guided = uncond + _per_sample(scale, cond) * (cond - uncond)
    if uncond_rows is None:
        return guided
    return torch.where(_per_sample(uncond_rows.to(cond.device), cond) >= 0, guided, cond)


def linear_combine(combine: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor],
                   extra: Optional[torch.Tensor]) -> torch.Tensor:
    """``m = a c + b u + d e`` with per-sample ``(a, b, d)`` = ``combine[b]``: the guided prediction of every
    method of ``fastguide.guidance.modern`` (u and e terms only when present)."""
    k = combine.float()
    m = _per_sample(k[:, 0], cond) * cond
    if uncond is not None:
        m = m + _per_sample(k[:, 1], cond) * uncond
    if extra is not None:
        m = m + _per_sample(k[:, 2], cond) * extra.float()
    return m


GRAM_COLUMNS = ("cc", "cu", "uu", "ce", "ue", "ee", "sum_c", "sum_u", "sum_e")


def guidance_gram(model_output: torch.Tensor, extra: Optional[torch.Tensor] = None, momentum: Optional[float] = None,
                  learned_variance: bool = False) -> torch.Tensor:
    """Per-sample inner products and sums of the cond c and uncond u predictions (``model_output`` is
    ``[uncond; cond]``, prediction channels only) and of ``extra`` e, as a ``[B, 9]`` fp32 tensor in the order
    of ``GRAM_COLUMNS``: ``c.c, c.u, u.u, c.e, u.e, e.e, sum c, sum u, sum e`` (e columns 0 without ``extra``).

    With ``momentum`` beta, ``extra`` is first updated in place to ``(c - u) + beta e`` (APG's running average
    of the guidance direction, diffusers' ``MomentumBuffer``) and the products are those of the new e. Every
    guidance method of ``fastguide.guidance.modern`` is a function of these numbers, so one pass over the
    predictions serves any of them. Accumulated in fp64 here (the specification); backends may use fp32
    partial sums.
    """
    batch = model_output.shape[0] // 2
    uncond, cond, _ = split_model_output(model_output, batch, learned_variance)
    if momentum is not None:
        extra.copy_((cond - uncond) + float(momentum) * extra.float())
    c, u = cond.double().reshape(batch, -1), uncond.double().reshape(batch, -1)
    e = extra.double().reshape(batch, -1) if extra is not None else torch.zeros_like(c)
    cols = [(c * c).sum(1), (c * u).sum(1), (u * u).sum(1), (c * e).sum(1), (u * e).sum(1), (e * e).sum(1),
            c.sum(1), u.sum(1), e.sum(1)]
    return torch.stack(cols, dim=1).float()


def cfg_rescale_factor(model_output: torch.Tensor, scale: torch.Tensor, rescale,
                       learned_variance: bool = False, uncond_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample factor r of Lin et al. 2023 (diffusers ``rescale_noise_cfg``), as a [B] fp32 tensor.

    ``phi * m * std(c)/std(m) + (1 - phi) * m  ==  m * r``  with ``r = phi * std(c)/std(m) + (1 - phi)``
    (unbiased std over all but the batch dimension), so the step kernel only needs ``r``. ``rescale`` is
    phi: a float, or a [B] tensor (one phi per sample). With a sparse ``uncond_rows`` map (``StepArgs``;
    the batch is ``scale``'s length) a sample without an uncond row gets exactly 1.
    """
    batch = scale.shape[0] if uncond_rows is not None else model_output.shape[0] // 2
    uncond, cond, _ = split_model_output(model_output, batch, learned_variance, uncond_rows)
    guided = cfg_combine(uncond, cond, scale, uncond_rows)
    dims = list(range(1, cond.dim()))
    ratio = cond.std(dim=dims) / guided.std(dim=dims)
    phi = rescale.float().reshape(-1).to(ratio.device) if isinstance(rescale, torch.Tensor) else rescale
    factor = phi * ratio + (1.0 - phi)
    if uncond_rows is None:
        return factor
    return torch.where(uncond_rows.reshape(-1).to(factor.device) >= 0, factor, torch.ones_like(factor))


def guided_step(args: StepArgs) -> None:
    """One fused guided sampler step (the row formula of ``fastguide.core.layout``), written into
    ``args.out`` (and ``args.out2``, a second copy) / ``args.x0_out`` (``out=None``: x0 only).

    ``model_output`` has ``2B`` rows ``[uncond; cond]`` when ``scale`` is given, else ``B`` rows; with
    ``learned_variance`` its channel dimension is doubled (ADM's learned-range output).
    ``mfactor`` ([B]) multiplies the combined output (the CFG-rescale factor). ``step_rows`` (one table row
    per sample) and ``uncond_rows`` (a sparse CFG batch of ``B + K`` rows) are described at ``StepArgs``.
    """
    sample, model_output, noise, out, x0_out = args.sample, args.model_output, args.noise, args.out, args.x0_out
    learned_variance, clip_mode = args.learned_variance, args.clip_mode
    c = _coefficients(args)
    batch = sample.shape[0]
    uncond, cond, v = split_model_output(model_output, batch, learned_variance, args.uncond_rows)
    if args.combine is not None:
        m = linear_combine(args.combine, cond, uncond, args.extra)
    else:
        m = cfg_combine(uncond, cond, args.scale, args.uncond_rows)
    if args.mfactor is not None:
        m = m * _per_sample(args.mfactor, m)
    x = sample.float()
    z = noise.float() if noise is not None else None

    # CFG++ (Chung et al. 2024): x0^ from the guided prediction, eps~ from the unconditional one.
    eps_source = uncond if args.eps_from_uncond else m
    x0 = c[Col.P_X] * x + c[Col.P_M] * m
    eps = c[Col.Q_X] * x + c[Col.Q_M] * eps_source
    if z is not None:
        x0 = x0 + c[Col.P_Z] * z
        eps = eps + c[Col.Q_Z] * z
    if clip_mode == CLIP_RANGE:
        x0 = x0.clamp(args.clip_lo, args.clip_hi)
    elif clip_mode == CLIP_THRESHOLD:
        # Saharia et al. 2022 dynamic thresholding with a precomputed per-sample threshold s >= 1.
        s = _per_sample(args.threshold, x0)
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    if args.g_score is not None:
        g = args.g_score.float()
        x0 = x0 + c[Col.P_G] * g
        eps = eps + c[Col.Q_G] * g
    if out is None:
        x0_out.copy_(x0)
        return

    res = c[Col.A] * x + c[Col.B] * x0 + c[Col.C] * eps
    variance = None
    if v is not None:
        # guided-diffusion learned_range: log Sigma = f log(beta_t) + (1 - f) log(beta~_t), f = (v + 1)/2.
        frac = (v + 1.0) * 0.5
        variance = torch.exp(frac * c[Col.LV_MAX] + (1.0 - frac) * c[Col.LV_MIN])
    if args.g_mean is not None:
        shift = c[Col.D] if variance is None else c[Col.D] + c[Col.DV] * variance
        res = res + shift * args.g_mean.float()
    if z is not None:
        amp = c[Col.E] if variance is None else c[Col.E] + c[Col.EV] * variance.sqrt()
        res = res + amp * z
    if args.x0_prev is not None:
        res = res + c[Col.F] * args.x0_prev.float()
    if args.x0_prev2 is not None:
        res = res + c[Col.F2] * args.x0_prev2.float()
    # Every input has been read before anything is written, so outputs may alias inputs exactly. x0 goes
    # first: where x0_out is out or out2, the result wins.
    if x0_out is not None:
        x0_out.copy_(x0)
    out.copy_(res)
    if args.out2 is not None:
        args.out2.copy_(res)


def temperature_lse_grad(logits: torch.Tensor, labels: torch.Tensor, tau1: float, tau2: float,
                         scale: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """d/dl of ``J = tau1 * l_y - log sum_k exp(tau2 * l_k)`` (Ma et al. 2023, eq. 9), times a per-sample scale.

    ``dJ/dl = tau1 * onehot(y) - tau2 * softmax(tau2 * l)``; softmax subtracts the row max, so fp16/bf16
    logits and K in the tens of thousands stay finite.
    """
    l32 = logits.float()
    grad = -tau2 * torch.softmax(tau2 * l32, dim=-1)
    grad.scatter_add_(-1, labels.long().reshape(-1, 1),
                      torch.full((l32.shape[0], 1), float(tau1), device=l32.device))
    if scale is not None:
        grad = grad * scale.float().reshape(-1, 1)
    out.copy_(grad)


def per_sample_rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over all but the batch dimension, [B] fp32 (Ma et al.'s EDM recipe)."""
    return x.float().reshape(x.shape[0], -1).square().mean(dim=1).sqrt()
