"""The fused step's per-sample linear combine (``combine``: m = a c + b u + d e, ``extra``), CFG++'s eps from the
uncond prediction (``eps_from_uncond``), and the ``guidance_gram`` pre-pass (per-sample inner products, with
APG's in-place momentum update): the reference against closed forms, every compiled backend against the
reference on fresh random inputs, odd sizes, strided and transposed views, poisoned outputs, fp32/fp16/bf16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Tuple

import pytest
import torch

import fastguide
from fastguide.backends import reference
from fastguide.core.layout import NUM_COLS, Col

import test_backends_parity as parity

STEPS = 5
NAN = float("nan")


@dataclass(frozen=True)
class CombineCase:
    name: str
    shape: Tuple[int, ...] = (3, 4, 5, 7)
    extra: bool = True
    eps_from_uncond: bool = False
    terms: FrozenSet[str] = frozenset()
    learned_variance: bool = False
    clip: str = "none"
    view: str = "contiguous"
    outputs: str = "fresh"        # "fresh" | "poisoned" | "aliased" | "x0_too" | "x0_only"
    mfactor: bool = False
    mode: str = "combine"         # "combine" | "scale" (CFG++ on plain CFG) | "sparse" (CFG++ on a sparse map)


ALL = frozenset(parity.TERMS)
CASES = [
    CombineCase("combine_only", extra=False),
    CombineCase("combine_extra"),
    CombineCase("combine_extra_every_term", terms=ALL),
    CombineCase("eps_from_uncond", extra=False, eps_from_uncond=True, terms=frozenset({"noise"})),
    CombineCase("eps_from_uncond_extra", eps_from_uncond=True),
    CombineCase("learned_variance", learned_variance=True, terms=frozenset({"g_mean", "noise"})),
    CombineCase("clip_range_score", clip="range", terms=frozenset({"g_score"})),
    CombineCase("threshold_x0_too", clip="threshold", outputs="x0_too"),
    CombineCase("mfactor", mfactor=True, terms=frozenset({"x0_prev"})),
    CombineCase("row_strided", view="row_strided", terms=frozenset({"noise"})),
    CombineCase("transposed", view="transposed", eps_from_uncond=True),
    CombineCase("poisoned", outputs="poisoned", terms=ALL),
    CombineCase("aliased", outputs="aliased"),
    CombineCase("x0_only", outputs="x0_only", clip="range"),
    CombineCase("odd_rows", shape=(5, 1, 3, 1), terms=frozenset({"noise"})),
    CombineCase("long_rows", shape=(2, 4, 33, 31), eps_from_uncond=True, terms=frozenset({"noise"})),
    CombineCase("tokens", shape=(4, 17, 8)),
    CombineCase("cfgpp_scale", mode="scale", extra=False, eps_from_uncond=True, terms=frozenset({"noise"})),
    CombineCase("cfgpp_scale_clip_x0", mode="scale", extra=False, eps_from_uncond=True, clip="range",
                outputs="x0_too"),
    CombineCase("cfgpp_sparse", mode="sparse", extra=False, eps_from_uncond=True, terms=frozenset({"noise"})),
]


def combine_call(case: CombineCase, device: str, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, channels, *rest = case.shape
    table = torch.randn(STEPS, NUM_COLS, generator=gen)
    table[:, Col.LV_MIN] = -10.0 + 5.0 * torch.rand(STEPS, generator=gen)
    table[:, Col.LV_MAX] = table[:, Col.LV_MIN] + 3.0 * torch.rand(STEPS, generator=gen)
    sample = parity._tensor(case.shape, case.view, gen, device, dtype)
    model_output = parity._tensor((2 * batch, channels * (2 if case.learned_variance else 1), *rest), case.view,
                                  gen, device, dtype)
    if case.learned_variance:
        model_output[:, channels:] = model_output[:, channels:].clamp(-1, 1)
    kwargs = {t: parity._tensor(case.shape, case.view, gen, device, dtype) for t in case.terms}
    if case.mode == "combine":
        kwargs["combine"] = (4.0 * torch.rand(batch, 3, generator=gen) - 2.0).to(device)
    else:
        kwargs["scale"] = (4.0 * torch.rand(batch, generator=gen)).to(device)
    if case.mode == "sparse":  # samples 0, 2, ... have an uncond row (in reverse order), the others none
        with_u = list(range(0, batch, 2))[::-1]
        uncond = [-1] * batch
        for j, b in enumerate(with_u):
            uncond[b] = batch + j
        cond_u = model_output[batch:], model_output[:batch]
        model_output = torch.cat([cond_u[0], cond_u[1][torch.tensor(with_u, device=model_output.device)]])
        kwargs["uncond_rows"] = torch.tensor(uncond, device=device)
    if case.extra:
        kwargs["extra"] = parity._tensor(case.shape, case.view, gen, device, dtype)
    kwargs["eps_from_uncond"] = case.eps_from_uncond
    if case.clip == "range":
        kwargs["clip"] = (-1.5, 1.25)
    elif case.clip == "threshold":
        kwargs["threshold"] = (1.0 + 2.0 * torch.rand(batch, generator=gen)).to(device)
    kwargs["learned_variance"] = case.learned_variance
    return sample, model_output, table.to(device), seed % STEPS, kwargs


def run_combine(case: CombineCase, backend: str, sample, model_output, table, step, kwargs):
    """(result, x0) through the public op, or through run_step with an mfactor (the guidance layer's path)."""
    kwargs = dict(kwargs)
    x0 = torch.full_like(sample, NAN) if case.outputs in ("x0_too", "x0_only", "poisoned") else None
    out = None
    if case.outputs == "poisoned":
        out = torch.full_like(sample, NAN)
    elif case.outputs == "aliased":
        sample = sample.clone()
        out = sample
    if case.mfactor:
        from fastguide.core import ops
        from fastguide.core.args import StepArgs
        mfactor = torch.linspace(0.5, 1.5, sample.shape[0], device=sample.device)
        args = StepArgs(sample, model_output, table, step, mfactor=mfactor, out=out, x0_out=x0,
                        learned_variance=kwargs.pop("learned_variance"), combine=kwargs.pop("combine"),
                        extra=kwargs.pop("extra", None), eps_from_uncond=kwargs.pop("eps_from_uncond"), **kwargs)
        return ops.run_step(args, backend), x0
    write_out = case.outputs != "x0_only"
    res = fastguide.guided_step(sample, model_output, table, step, out=out, x0_out=x0, write_out=write_out,
                                backend=backend, **kwargs)
    return res, x0


def test_reference_combine_is_the_linear_combination():
    gen = torch.Generator().manual_seed(0)
    b = 3
    x, u, c, e = (torch.randn(b, 2, 4, generator=gen, dtype=torch.float64) for _ in range(4))
    table = torch.randn(STEPS, NUM_COLS, generator=gen)
    k = torch.randn(b, 3, generator=gen)
    got = fastguide.guided_step(x, torch.cat([u, c]), table, 2, combine=k, extra=e, backend="torch")
    m = k[:, 0, None, None] * c + k[:, 1, None, None] * u + k[:, 2, None, None] * e
    expected = fastguide.guided_step(x, m, table, 2, backend="torch")
    # The step computes in fp32: the combine there, m here in fp64 and rounded once, so fp32 tolerances.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_reference_eps_from_uncond_is_cfg_pp():
    """x0^ from the guided prediction, eps~ from the uncond one: out = A x + B x0(m) + C eps(u)."""
    gen = torch.Generator().manual_seed(1)
    b = 2
    x, u, c = (torch.randn(b, 3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    table = torch.zeros(1, NUM_COLS)
    table[0, [Col.P_X, Col.P_M, Col.Q_X, Col.Q_M, Col.A, Col.B, Col.C]] = torch.tensor([1.0, -0.7, 0.1, 1.0, 0.0, 1.0, 0.4])
    w = 3.0
    got = fastguide.guided_step(x, torch.cat([u, c]), table, 0, scale=w, eps_from_uncond=True, backend="torch")
    m = u + w * (c - u)
    expected = (x - 0.7 * m) + 0.4 * (0.1 * x + u)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", parity.DTYPE_PARAMS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend,device", parity.BACKENDS)
def test_combine_step_matches_reference(backend, device, case, dtype):
    parity.skip_unless_runs(backend, device, dtype)
    inputs = combine_call(case, device, dtype, parity.seed_of("combine", case.name, str(dtype)))
    expected, expected_x0 = run_combine(case, "torch", *inputs)
    got, got_x0 = run_combine(case, backend, *inputs)
    tol = parity.step_tol(dtype)
    if case.outputs != "x0_only":
        parity.assert_matches(got, expected, tol)
    if expected_x0 is not None:
        parity.assert_matches(got_x0, expected_x0, tol)


# --------------------------------------------------------------------------------------- guidance_gram

@dataclass(frozen=True)
class GramCase:
    name: str
    shape: Tuple[int, ...] = (3, 4, 6, 5)
    extra: bool = True
    momentum: float = None
    learned_variance: bool = False
    view: str = "contiguous"


GRAM_CASES = [
    GramCase("cond_uncond", extra=False),
    GramCase("with_extra"),
    GramCase("momentum", momentum=-0.5),
    GramCase("momentum_zero", momentum=0.0),
    GramCase("learned_variance", learned_variance=True, momentum=0.3),
    GramCase("row_strided", view="row_strided", momentum=-0.25),
    GramCase("transposed", view="transposed"),
    GramCase("odd", shape=(5, 1, 3, 1), momentum=0.5),
    GramCase("one_sample", shape=(1, 3, 11)),
    GramCase("long_rows", shape=(2, 4, 64, 65), momentum=-0.5),
    GramCase("tokens", shape=(4, 77, 16), momentum=0.7),
]


def gram_call(case: GramCase, device, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, channels, *rest = case.shape
    model_output = parity._tensor((2 * batch, channels * (2 if case.learned_variance else 1), *rest), case.view,
                                  gen, device, dtype)
    extra = parity._tensor(case.shape, case.view, gen, device, dtype) if case.extra else None
    return model_output, extra


def test_reference_gram_closed_form_and_momentum_update():
    gen = torch.Generator().manual_seed(2)
    u, c, e = (torch.randn(2, 3, 4, generator=gen) for _ in range(3))
    e0 = e.clone()
    gram = fastguide.guidance_gram(torch.cat([u, c]), e, momentum=-0.5, backend="torch")
    new_e = (c - u) - 0.5 * e0
    torch.testing.assert_close(e, new_e)
    f = lambda t: t.reshape(2, -1).double()
    expected = torch.stack([(f(c) * f(c)).sum(1), (f(c) * f(u)).sum(1), (f(u) * f(u)).sum(1), (f(c) * f(new_e)).sum(1),
                            (f(u) * f(new_e)).sum(1), (f(new_e) ** 2).sum(1), f(c).sum(1), f(u).sum(1),
                            f(new_e).sum(1)], 1).float()
    torch.testing.assert_close(gram, expected)
    assert reference.GRAM_COLUMNS[1] == "cu"


@pytest.mark.parametrize("dtype", parity.DTYPE_PARAMS)
@pytest.mark.parametrize("case", GRAM_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend,device", parity.BACKENDS)
def test_gram_matches_reference(backend, device, case, dtype):
    parity.skip_unless_runs(backend, device, dtype)
    model_output, extra = gram_call(case, device, dtype, parity.seed_of("gram", case.name, str(dtype)))
    ref_extra = extra.clone() if extra is not None else None
    expected = fastguide.guidance_gram(model_output, ref_extra, case.momentum, case.learned_variance, backend="torch")
    got = fastguide.guidance_gram(model_output, extra, case.momentum, case.learned_variance, backend=backend)
    # Sums of n products: relative to the magnitude of the largest column of the row (fp32 accumulation).
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = expected.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close((got / scale).cpu(), (expected / scale).cpu(), rtol=tol, atol=tol)
    if extra is not None:
        parity.assert_matches(extra, ref_extra, parity.step_tol(dtype))


@pytest.mark.parametrize("kwargs,match", [
    (dict(momentum=0.5), "pass extra"),
    (dict(extra=torch.zeros(2, 3, 5)), "extra must have shape"),
    (dict(momentum=float("nan"), extra=torch.zeros(2, 3, 4)), "momentum"),
])
def test_gram_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastguide.guidance_gram(torch.zeros(4, 3, 4), **kwargs)


def test_gram_needs_pairs():
    with pytest.raises(ValueError, match=r"\[uncond; cond\]"):
        fastguide.guidance_gram(torch.zeros(3, 2, 2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(combine=torch.zeros(2, 3), scale=2.0), "not both"),
    (dict(combine=torch.zeros(3, 3)), r"combine must be a \[2, 3\]"),
    (dict(extra=torch.zeros(2, 1, 4)), "pass combine too"),
    (dict(combine=torch.zeros(2, 3), rescale=0.5), "rescale"),
    (dict(eps_from_uncond=True), "needs scale or combine"),
])
def test_combine_bad_input(kwargs, match):
    sample = torch.zeros(2, 1, 4)
    out = torch.full_like(sample, 7.0)
    with pytest.raises((ValueError, TypeError), match=match):
        fastguide.guided_step(sample, torch.zeros(4, 1, 4), torch.zeros(3, NUM_COLS), 0, out=out, **kwargs)
    assert (out == 7.0).all()
