"""fastguide.guidance.modern: the combine of each guidance method, computed from the one-pass gram, against
an independent float64 implementation of each paper's formula (and diffusers' own functions), on random
predictions of odd sizes with per-sample scales; the specs' checks and windows against diffusers' guiders."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import fastguide
from fastguide.guidance import modern
from fastguide.guidance.modern import APG, TCFG, CFGZeroStar, MamboG, PerturbedGuidance, coefficients

SHAPES = [(3, 5, 7), (2, 1, 13), (4, 3, 3, 5), (1, 29)]
TOL = 5e-6          # relative to the largest magnitude of the reference (the gram is fp32-rounded)
BACKENDS = [b for b in ("torch", "cpp") if fastguide.backends()[b]]


def gram_of(u, c, extra=None, momentum=None, backend="torch"):
    try:
        return fastguide.guidance_gram(torch.cat([u, c]), extra=extra, momentum=momentum, backend=backend)
    except AttributeError as e:   # a compiled backend still being extended
        pytest.skip(f"{backend} guidance_gram: {e}")


def rand_preds(shape, seed, close=0.3):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g) + 0.2
    c = u + close * torch.randn(shape, generator=g)
    e = torch.randn(shape, generator=g)
    return u, c, e


def scales_for(batch, lo=1.5, hi=8.0):
    return torch.linspace(lo, hi, batch) if batch > 1 else torch.tensor([lo])


def per(v, like):
    return v.double().reshape((-1,) + (1,) * (like.dim() - 1))


def flat_dot(x, y):
    return (x * y).flatten(1).sum(1)


def fused_m(spec, u, c, e, w, step=5, backend="torch", gram=None):
    """m = (a c + b u + d e) * r in float64 from fastguide's combine."""
    if gram is None:
        gram = gram_of(u, c, e if e is not None else None, backend=backend)
    combine, r = coefficients(spec, gram, w, c[0].numel(), step)
    assert combine.shape == (c.shape[0], 3) and combine.dtype == torch.float32
    k = combine.double()
    m = per(k[:, 0], c) * c.double() + per(k[:, 1], c) * u.double()
    if e is not None:
        m = m + per(k[:, 2], c) * e.double()
    if r is not None:
        assert r.shape == (c.shape[0],) and r.dtype == torch.float32
        m = m * per(r, c)
    return m


def rescale_ref(m, c, phi):
    """Lin et al. 2023 eq. (diffusers rescale_noise_cfg), unbiased std over all non-batch dims."""
    if not phi:
        return m
    dims = list(range(1, m.dim()))
    ratio = c.std(dim=dims, keepdim=True) / m.std(dim=dims, keepdim=True)
    return phi * m * ratio + (1 - phi) * m


def rel(got, ref):
    assert torch.isfinite(got).all() and torch.isfinite(ref).all()
    return ((got - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------------------------------------------
# Independent float64 references


def zero_star_ref(u, c, w, orig):
    u, c = u.double(), c.double()
    alpha = per(flat_dot(c, u) / (flat_dot(u, u) + 1e-8), c)
    w = per(w, c)
    return (c if orig else alpha * u) + w * (c - alpha * u)


def apg_ref(u, c, w, eta, thr, orig, e=None):
    """Sadat et al. 2024 Alg. 1 with diffusers' conventions; ``e`` is the already-updated running average."""
    u, c = u.double(), c.double()
    d = (c - u) if e is None else e.double()
    if thr > 0:
        norm = per(flat_dot(d, d).sqrt(), c)
        d = d * torch.clamp(thr / norm, max=1.0)
    v1 = c / per(flat_dot(c, c).sqrt().clamp_min(1e-12), c)
    par = per(flat_dot(d, v1), c) * v1
    return (c if orig else u) + per(w, c) * ((d - par) + eta * par)


def mambo_ref(u, c, w, alpha, orig):
    u, c = u.double(), c.double()
    ratio = per(flat_dot(c - u, c - u).sqrt() / flat_dot(u, u).sqrt(), c)
    w = per(w, c)
    w2 = w * torch.exp(-alpha * ratio) if orig else 1 + (w - 1) * torch.exp(-alpha * ratio)
    return (c if orig else u) + w2 * (c - u)


def tcfg_ref(u, c, w, orig):
    """Kwon et al. 2025: u projected on the top right-singular vector of the stacked [c; u] (an SVD)."""
    u, c = u.double(), c.double()
    stack = torch.stack([c.flatten(1), u.flatten(1)], dim=1)
    _, _, vh = torch.linalg.svd(stack, full_matrices=False)
    v1 = vh[:, 0]
    u2 = (flat_dot(u.flatten(1), v1)[:, None] * v1).reshape(u.shape)
    return (c if orig else u2) + per(w, c) * (c - u2)


def perturbed_ref(u, c, p, w, s2, orig):
    u, c, p = u.double(), c.double(), p.double()
    return (c if orig else u) + per(w, c) * (c - u) + s2 * (c - p)


# ---------------------------------------------------------------------------------------------------
# Coefficients


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("orig", [False, True])
@pytest.mark.parametrize("phi", [0.0, 0.7])
def test_cfg_zero_star(shape, orig, phi):
    u, c, _ = rand_preds(shape, 1)
    w = scales_for(shape[0])
    spec = CFGZeroStar(4.0, zero_init_steps=1, use_original_formulation=orig, rescale=phi)
    ref = rescale_ref(zero_star_ref(u, c, w, orig), c.double(), phi)
    for backend in BACKENDS:
        assert rel(fused_m(spec, u, c, None, w, step=3, backend=backend), ref) < TOL


@pytest.mark.parametrize("step", [0, 2, torch.tensor(0), torch.tensor([1]), torch.tensor(3)])
def test_cfg_zero_star_zero_init(step):
    u, c, _ = rand_preds((3, 4, 5), 2)
    spec = CFGZeroStar(4.0, zero_init_steps=2, rescale=0.5)
    combine, r = coefficients(spec, gram_of(u, c), scales_for(3), 20, step)
    if int(step) < 2:
        assert (combine == 0).all() and (r == 1).all()
    else:
        assert (combine != 0).any() and torch.isfinite(r).all() and (r != 1).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eta,thr", [(1.0, 0.0), (0.0, 15.0), (0.3, 2.0), (-0.5, 1e-3)])
@pytest.mark.parametrize("orig", [False, True])
def test_apg_without_momentum(shape, eta, thr, orig):
    u, c, _ = rand_preds(shape, 3, close=1.0)
    w = scales_for(shape[0])
    spec = APG(5.0, eta=eta, norm_threshold=thr, use_original_formulation=orig, rescale=0.5 if orig else 0.0)
    ref = rescale_ref(apg_ref(u, c, w, eta, thr, orig), c.double(), spec.rescale)
    for backend in BACKENDS:
        assert rel(fused_m(spec, u, c, None, w, backend=backend), ref) < TOL


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 4, 3, 3)])
@pytest.mark.parametrize("orig", [False, True])
def test_apg_momentum_against_diffusers(shape, orig):
    """Three steps of a running average: fastguide.guidance_gram updates the buffer in place
    (``momentum_of``), the combine reads it; diffusers' normalized_guidance with its MomentumBuffer."""
    apg_mod = pytest.importorskip("diffusers.guiders.adaptive_projected_guidance")
    spec = APG(6.0, eta=0.2, momentum=-0.5, norm_threshold=3.0, use_original_formulation=orig, rescale=0.3)
    assert modern.momentum_of(spec) == -0.5 and modern.needs_extra(spec) and modern.needs_gram(spec)
    buf = torch.zeros(shape)
    theirs = apg_mod.MomentumBuffer(-0.5)
    for i in range(3):
        u, c, _ = rand_preds(shape, 10 + i, close=1.0)
        w = torch.full((shape[0],), 6.0)
        gram = gram_of(u, c, buf, modern.momentum_of(spec))
        got = fused_m(spec, u, c, buf, w, gram=gram)
        ref = apg_mod.normalized_guidance(c.double(), u.double(), 6.0, theirs, 0.2, 3.0, orig)
        ref = rescale_ref(ref, c.double(), 0.3)
        assert rel(got, ref) < TOL
        assert rel(buf.double(), theirs.running_average) < 1e-6
        # and the independent formula, from the updated running average
        assert rel(got, rescale_ref(apg_ref(u, c, w, 0.2, 3.0, orig, e=buf), c.double(), 0.3)) < TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 2.0, 8.0])
@pytest.mark.parametrize("orig", [False, True])
def test_mambo_g(shape, alpha, orig):
    u, c, _ = rand_preds(shape, 4)
    w = scales_for(shape[0], 2.0, 10.0)
    spec = MamboG(10.0, alpha=alpha, use_original_formulation=orig, rescale=0.4 if alpha == 2.0 else 0.0)
    ref = rescale_ref(mambo_ref(u, c, w, alpha, orig), c.double(), spec.rescale)
    for backend in BACKENDS:
        assert rel(fused_m(spec, u, c, None, w, backend=backend), ref) < TOL


def test_mambo_g_against_diffusers_tokens():
    """diffusers' mambo_guidance on token-shaped [B, L, D] predictions (it raises for 4-D ones)."""
    mod = pytest.importorskip("diffusers.guiders.magnitude_aware_guidance")
    u, c, _ = rand_preds((3, 6, 11), 5)
    for orig in (False, True):
        ref = mod.mambo_guidance(c.double(), u.double(), 7.0, 3.0, orig)
        got = fused_m(MamboG(7.0, alpha=3.0, use_original_formulation=orig), u, c, None, torch.full((3,), 7.0))
        assert rel(got, ref) < TOL
    u4, c4, _ = rand_preds((2, 3, 4, 5), 6)
    with pytest.raises(Exception):
        mod.mambo_guidance(c4, u4, 7.0, 3.0)
    got = fused_m(MamboG(7.0, alpha=3.0), u4, c4, None, torch.full((2,), 7.0))
    assert rel(got, mambo_ref(u4, c4, torch.full((2,), 7.0), 3.0, False)) < TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("orig", [False, True])
@pytest.mark.parametrize("close", [0.05, 1.0, 3.0])
def test_tcfg(shape, orig, close):
    u, c, _ = rand_preds(shape, 7, close=close)
    w = scales_for(shape[0])
    spec = TCFG(5.0, use_original_formulation=orig, rescale=0.5 if close == 1.0 else 0.0)
    ref = rescale_ref(tcfg_ref(u, c, w, orig), c.double(), spec.rescale)
    for backend in BACKENDS:
        assert rel(fused_m(spec, u, c, None, w, backend=backend), ref) < TOL


def test_tcfg_against_diffusers_and_degenerate_cases():
    mod = pytest.importorskip("diffusers.guiders.tangential_classifier_free_guidance")
    u, c, _ = rand_preds((3, 4, 9), 8, close=0.5)
    ref = mod.normalized_guidance(c.double(), u.double(), 5.0)
    assert rel(fused_m(TCFG(5.0), u, c, None, torch.full((3,), 5.0)), ref) < TOL
    # rank one (c = u: u' = u) and c = 0 (u' = u): finite, and equal to the SVD's answer
    for cc in (u.clone(), torch.zeros_like(u), 2.5 * u):
        got = fused_m(TCFG(5.0), u, cc, None, torch.full((3,), 5.0))
        assert rel(got, tcfg_ref(u, cc, torch.full((3,), 5.0), False)) < TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("phi", [0.0, 0.7])
@pytest.mark.parametrize("orig", [False, True])
def test_perturbed(shape, phi, orig):
    u, c, p = rand_preds(shape, 9)
    w = scales_for(shape[0])
    spec = PerturbedGuidance(3.0, 2.5, rescale=phi, use_original_formulation=orig)
    assert modern.needs_extra(spec) and modern.needs_gram(spec) == (phi > 0) and modern.momentum_of(spec) is None
    ref = rescale_ref(perturbed_ref(u, c, p, w, 2.5, orig), c.double(), phi)
    assert rel(fused_m(spec, u, c, p, w, gram=gram_of(u, c, p)), ref) < TOL


def test_zero_star_scale_against_diffusers():
    mod = pytest.importorskip("diffusers.guiders.classifier_free_zero_star_guidance")
    u, c, _ = rand_preds((4, 3, 7), 11)
    alpha = mod.cfg_zero_star_scale(c.flatten(1), u.flatten(1)).reshape(-1, 1, 1)
    ref = alpha * u + 4.0 * (c - alpha * u)
    assert rel(fused_m(CFGZeroStar(4.0), u, c, None, torch.full((4,), 4.0)), ref.double()) < TOL


def test_fused_step_with_the_combine():
    """The combine in fastguide.guided_step gives the guided prediction's step (DDIM table row)."""
    u, c, _ = rand_preds((2, 3, 5), 12)
    mo = torch.cat([u, c])
    spec = APG(5.0, eta=0.0, norm_threshold=2.0)
    combine, _ = coefficients(spec, gram_of(u, c), torch.full((2,), 5.0), 15, 0)
    plan = fastguide.samplers.build("ddim", fastguide.Schedule.ddpm(), steps=10)
    x = torch.randn(2, 3, 5)
    got = fastguide.guided_step(x, mo, plan.table, 4, combine=combine, backend="torch")
    m = apg_ref(u, c, torch.full((2,), 5.0), 0.0, 2.0, False).float()
    ref = fastguide.guided_step(x, m, plan.table, 4, backend="torch")
    assert rel(got.double(), ref.double()) < 1e-5


def test_coefficients_trace_fullgraph():
    """[B]-sized torch ops only: dynamo traces every method without a graph break or host sync."""
    u, c, e = rand_preds((3, 4, 5), 13)
    gram = gram_of(u, c, e)
    specs = [CFGZeroStar(4.0, zero_init_steps=2, rescale=0.5), APG(5.0, eta=0.3, norm_threshold=2.0, rescale=0.2),
             APG(5.0, momentum=0.5), MamboG(8.0, rescale=0.1), TCFG(3.0, rescale=0.3), PerturbedGuidance(3.0, 1.0)]
    for spec in specs:
        fn = torch.compile(lambda g, w, s, spec=spec: coefficients(spec, g, w, 20, s), backend="eager",
                           fullgraph=True)
        got = fn(gram, scales_for(3), torch.tensor(3))
        want = coefficients(spec, gram, scales_for(3), 20, 3)
        assert torch.allclose(got[0], want[0])
        assert (got[1] is None) == (want[1] is None)


# ---------------------------------------------------------------------------------------------------
# Specs: checks and windows


@pytest.mark.parametrize("make,name", [
    (lambda: CFGZeroStar(float("nan")), "scale"),
    (lambda: CFGZeroStar(4.0, zero_init_steps=-1), "zero_init_steps"),
    (lambda: CFGZeroStar(4.0, zero_init_steps=1.5), "zero_init_steps"),
    (lambda: CFGZeroStar(4.0, rescale=1.5), "rescale"),
    (lambda: CFGZeroStar(4.0, use_original_formulation=1), "use_original_formulation"),
    (lambda: APG(5.0, eta="x"), "eta"),
    (lambda: APG(5.0, momentum=float("inf")), "momentum"),
    (lambda: APG(5.0, norm_threshold=-1.0), "norm_threshold"),
    (lambda: APG(5.0, start=1.0), "start"),
    (lambda: APG(5.0, start=0.5, stop=0.2), "stop"),
    (lambda: MamboG(5.0, alpha=-1.0), "alpha"),
    (lambda: TCFG("7"), "scale"),
    (lambda: TCFG(7.0, stop=1.5), "stop"),
    (lambda: PerturbedGuidance(3.0, None), "perturbed_scale"),
    (lambda: PerturbedGuidance(3.0, 1.0, perturbed_model=3), "perturbed_model"),
    (lambda: TCFG(torch.ones(2, 2)), "scale"),
])
def test_specs_check_their_arguments(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()


def test_coefficients_refuses_other_specs():
    with pytest.raises(TypeError, match="spec"):
        coefficients(fastguide.CFG(3.0), torch.zeros(2, 9), torch.ones(2), 4, 0)
    with pytest.raises(TypeError, match="spec"):
        modern.needs_gram(object())


def _diffusers_guider(spec):
    guiders = pytest.importorskip("diffusers.guiders")
    common = dict(guidance_rescale=spec.rescale, use_original_formulation=spec.use_original_formulation,
                  start=spec.start, stop=spec.stop)
    if isinstance(spec, CFGZeroStar):
        return guiders.ClassifierFreeZeroStarGuidance(spec.scale, zero_init_steps=spec.zero_init_steps, **common)
    if isinstance(spec, APG):
        return guiders.AdaptiveProjectedGuidance(spec.scale, adaptive_projected_guidance_momentum=spec.momentum,
                                                 adaptive_projected_guidance_rescale=spec.norm_threshold,
                                                 eta=spec.eta, **common)
    if isinstance(spec, MamboG):
        return guiders.MagnitudeAwareGuidance(spec.scale, alpha=spec.alpha, **common)
    return guiders.TangentialClassifierFreeGuidance(spec.scale, **common)


@pytest.mark.parametrize("spec", [
    CFGZeroStar(4.0, zero_init_steps=0, start=0.2, stop=0.75), CFGZeroStar(1.0, zero_init_steps=0),
    CFGZeroStar(0.0, zero_init_steps=0, use_original_formulation=True),
    APG(5.0, start=0.1, stop=0.9), APG(1.0), MamboG(3.0, stop=0.5), TCFG(2.0, start=0.34), TCFG(1.0 + 1e-12),
], ids=repr)
def test_active_is_diffusers_window(spec):
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        guider = _diffusers_guider(spec)
    finally:
        logger.setLevel(level)
    for n in (7, 10, 13):
        for i in range(n):
            guider.set_state(step=i, num_inference_steps=n, timestep=None)
            assert spec.active(i, n) == (guider.num_conditions == 2), (n, i)


def test_active_zero_init_and_perturbed():
    spec = CFGZeroStar(4.0, zero_init_steps=2, start=0.5)
    assert [spec.active(i, 10) for i in range(4)] == [True, True, False, False]
    assert spec.active(5, 10)
    assert not PerturbedGuidance(1.0, 0.0).active(3, 10)
    assert PerturbedGuidance(1.0, 0.5).active(3, 10) and PerturbedGuidance(3.0, 0.0).active(3, 10)
    assert not PerturbedGuidance(3.0, 0.5, stop=0.2).active(3, 10)
    assert APG(torch.ones(3)).active(0, 10)            # a tensor scale is never the identity
    assert math.isclose(MamboG().scale, 10.0) and MamboG().alpha == 8.0
    assert APG().norm_threshold == 15.0 and APG().eta == 1.0 and APG().momentum is None
