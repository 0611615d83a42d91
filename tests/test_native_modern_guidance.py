"""``fastguide.sample`` with the guidance methods beyond CFG: CFG++ and ``fastguide.guidance.modern``.

Each method's whole loop is compared with a float64 re-implementation written here: a plain-torch loop of
the sampler (k-diffusion's ``sample_euler`` / ``sample_euler_ancestral`` on the sigma state with its VP eps
wrapper ``DiscreteEpsDDPMDenoiser``, DDIM eq. 12 of Song et al.) around the method's formula as diffusers'
guiders write it (``diffusers.guiders``: ``ClassifierFreeZeroStarGuidance`` with ``cfg_zero_star_scale``,
``AdaptiveProjectedGuidance`` with ``normalized_guidance`` and ``MomentumBuffer``,
``MagnitudeAwareGuidance`` with ``mambo_guidance``, ``TangentialClassifierFreeGuidance`` (an SVD of the
stacked predictions), ``PerturbedAttentionGuidance`` / ``SkipLayerGuidance``, and ``rescale_noise_cfg``),
with per-sample scales; CFG++ against ComfyUI's ``sample_euler_cfg_pp`` / ``sample_euler_ancestral_cfg_pp``.
None of the references reads a gram or a coefficient table.

The reference comparisons run the torch backend and, where it is built, the C++ CPU one; the mode and
audit tests run the torch backend.
"""

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import fastguide
from fastguide import CFG, APG, CFGPlusPlus, CFGZeroStar, ClassifierGuidance, MamboG, PerturbedGuidance, Schedule, TCFG
from fastguide.native import cudagraph
from fastguide.native import sampling as fg_sampling
from fastguide.samplers.native import sigma_schedule
from fastguide.tools.opcount import OpCounter
from graph_replay_emu import ReplayDriver
from loop_models import Classifier, EpsNet

F64 = torch.float64
B, SHAPE, STEPS, NULL = 4, (3, 6, 6), 5, 10
SCHED = Schedule.ddpm()

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class APGNull(APG):
    """APG with a null label (the modern specs carry none yet): the loop then makes one [null; y] call."""
    null_label: Any = None


@dataclass(frozen=True)
class PerturbedNull(PerturbedGuidance):
    """PerturbedGuidance with a null label: without a perturbed_model, one [uncond; cond; perturbed] call."""
    null_label: Any = None


class Perturbed(nn.Module):
    """A perturbed copy of a network, as a PAG / skip-layer model or a weaker model would be."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, y=None):
        return self.net(0.6 * x, t, y) - 0.05 * torch.tanh(x)


class PagNet(nn.Module):
    """A model for PerturbedGuidance without a perturbed_model: a 3B batch is [uncond; cond; perturbed] and
    its last third takes the perturbed path (as a PAG-patched model perturbs its last chunk)."""

    def __init__(self, net, perturbed):
        super().__init__()
        self.net, self.perturbed = net, perturbed

    def forward(self, x, t, y=None):
        if x.shape[0] != 3 * B:
            return self.net(x, t, y)
        return torch.cat([self.net(x[:2 * B], t[:2 * B], y[:2 * B]), self.perturbed(x[2 * B:], t[2 * B:], y[2 * B:])])


NET = EpsNet()
NET64 = copy.deepcopy(NET).double()
PERTURBED, PERTURBED64 = Perturbed(NET), Perturbed(NET64)
PAG_NET = PagNet(NET, PERTURBED)
CLF = Classifier()
CLF64 = copy.deepcopy(CLF).double()
W4 = torch.tensor([1.5, 3.0, 4.5, 6.0])


def inputs(seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((B,) + SHAPE, generator=gen), torch.randint(0, 5, (B,), generator=gen)


BACKENDS = ["torch"] + (["cpp"] if fastguide.backends()["cpp"] else [])


def run(guidance, sampler, model=NET, compile=None, seed=7, x_T=None, y=None, backend="torch", **kw):
    if x_T is None:
        x_T, y = inputs()
    return fastguide.sample(model, x_T, schedule=SCHED, sampler=sampler, steps=STEPS, y=y, guidance=guidance,
                            generator=torch.Generator().manual_seed(seed), backend=backend, compile=compile, **kw)


# ---------------------------------------------------------------------------------------------------
# The float64 references: diffusers' guider formulas, per sample


def _b(v, like):
    v = v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=F64)
    return v.to(F64).reshape((-1,) + (1,) * (like.dim() - 1))


def _dot(a, b):
    return (a * b).flatten(1).sum(1)


def window(spec, i, n=STEPS):
    """diffusers' ``_is_*_enabled``: ``int(start N) <= step < int(stop N)``, and a float scale that is not the
    identity (1; 0 with use_original_formulation)."""
    if not int(spec.start * n) <= i < int(spec.stop * n):
        return False
    identity = 0.0 if getattr(spec, "use_original_formulation", False) else 1.0
    return isinstance(spec.scale, torch.Tensor) or not math.isclose(spec.scale, identity)


def rescale_noise_cfg(pred, cond, phi):
    """diffusers ``rescale_noise_cfg`` (Lin et al. 2023, eq. 15-16)."""
    if phi <= 0:
        return pred
    dims = list(range(1, cond.dim()))
    rescaled = pred * (cond.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * pred


def ref_cfg_zero_star(spec, w):
    def method(i, c, u, p):
        if i < spec.zero_init_steps:
            return torch.zeros_like(c), None
        if not window(spec, i):
            return c, None
        alpha = _dot(c, u) / (_dot(u, u) + 1e-8)            # cfg_zero_star_scale
        u = u * _b(alpha, u)
        pred = (c if spec.use_original_formulation else u) + _b(w, c) * (c - u)
        return rescale_noise_cfg(pred, c, spec.rescale), None
    return method


def ref_apg(spec, w):
    buffer = {"running_average": 0.0}                      # diffusers' MomentumBuffer

    def method(i, c, u, p):
        if not window(spec, i):
            return c, None
        diff = c - u
        if spec.momentum is not None:
            buffer["running_average"] = diff + spec.momentum * buffer["running_average"]
            diff = buffer["running_average"]
        if spec.norm_threshold > 0:
            norm = diff.flatten(1).norm(dim=1)
            diff = diff * _b(torch.minimum(torch.ones_like(norm), spec.norm_threshold / norm), diff)
        v1 = torch.nn.functional.normalize(c.flatten(1), dim=1).view_as(c)
        parallel = _b(_dot(diff, v1), c) * v1
        update = (diff - parallel) + spec.eta * parallel
        pred = (c if spec.use_original_formulation else u) + _b(w, c) * update
        return rescale_noise_cfg(pred, c, spec.rescale), None
    return method


def ref_mambo(spec, w):
    def method(i, c, u, p):
        if not window(spec, i):
            return c, None
        diff = c - u
        ratio = _b(diff.flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1), c)
        damp = torch.exp(-spec.alpha * ratio)
        scale = _b(w, c) * damp if spec.use_original_formulation else 1.0 + (_b(w, c) - 1.0) * damp
        pred = (c if spec.use_original_formulation else u) + scale * diff
        return rescale_noise_cfg(pred, c, spec.rescale), None
    return method


def ref_tcfg(spec, w):
    def method(i, c, u, p):
        if not window(spec, i):
            return c, None
        preds = torch.stack([c, u], dim=1).flatten(2)               # [B, 2, n]
        _, _, vh = torch.linalg.svd(preds, full_matrices=False)
        vh_top = vh.clone()
        vh_top[:, 1] = 0
        u_flat = u.reshape(u.shape[0], 1, -1)
        u_proj = torch.matmul(torch.matmul(u_flat, vh.transpose(-2, -1)), vh_top).reshape(u.shape)
        pred = (c if spec.use_original_formulation else u_proj) + _b(w, c) * (c - u_proj)
        return rescale_noise_cfg(pred, c, spec.rescale), None
    return method


def ref_perturbed(spec, w):
    def method(i, c, u, p):
        if not window(spec, i):
            return c, None
        pred = (c if spec.use_original_formulation else u) + _b(w, c) * (c - u) + spec.perturbed_scale * (c - p)
        return rescale_noise_cfg(pred, c, spec.rescale), None
    return method


def ref_cfg_pp(spec, w):
    """ComfyUI's CFG++ samplers: ``denoised`` from ``uncond + cfg (cond - uncond)``, the step's direction
    ``d = to_d(x, sigma, uncond_denoised)`` from the uncond prediction alone."""
    def method(i, c, u, p):
        if not spec.start <= i / STEPS < spec.stop:
            return c, None
        return u + _b(w, c) * (c - u), u
    return method


def _clf_grad(x_in, t, y, scale):
    """ADM's classifier gradient ``scale * grad_x log softmax(clf(x_in, t))_y`` (x_in already in VP view)."""
    with torch.enable_grad():
        leaf = x_in.detach().requires_grad_(True)
        logp = torch.log_softmax(CLF64(leaf, t), dim=1).gather(1, y.reshape(-1, 1)).sum()
        return scale * torch.autograd.grad(logp, leaf)[0]


def _predict(model, x_in, t, y, null, uncond, perturbed):
    c = model(x_in, t, y)
    if not uncond:
        return c, None, None
    u = model(x_in, t, None if null is None else torch.full_like(y, null))
    return c, u, perturbed(x_in, t, y) if perturbed is not None else None


def _guided(method_name_spec, i):
    spec = method_name_spec
    if isinstance(spec, CFGZeroStar):
        return i >= spec.zero_init_steps and window(spec, i)
    if isinstance(spec, CFGPlusPlus):
        return spec.start <= i / STEPS < spec.stop
    if isinstance(spec, PerturbedGuidance):
        return window(spec, i) or (int(spec.start * STEPS) <= i < int(spec.stop * STEPS) and spec.perturbed_scale)
    return window(spec, i)


def reference(spec, method, sampler, x_T, y, seed=7, null=None, perturbed=None, clf_scale=0.0, eta=1.0):
    """A float64 loop of ``sampler`` with ``method(i, c, u, p) -> (m, eps source or None)``."""
    gen = torch.Generator().manual_seed(seed)
    x = x_T.to(F64)
    t_of = lambda v: torch.full((B,), float(v), dtype=F64)  # noqa: E731
    if sampler == "ddim":
        ts = SCHED.timesteps(STEPS)
        abar = torch.tensor(SCHED.alphas_cumprod[ts], dtype=F64)
        abar_prev = torch.cat([abar[1:], torch.ones(1, dtype=F64)])
        for i in range(STEPS):
            c, u, p = _predict(NET64, x, t_of(ts[i]), y, null, _guided(spec, i), perturbed)
            eps, _ = method(i, c, u, p)
            if clf_scale:
                eps = eps - (1 - abar[i]).sqrt() * _clf_grad(x, t_of(ts[i]), y, clf_scale)
            x0 = (x - (1 - abar[i]).sqrt() * eps) / abar[i].sqrt()
            x = abar_prev[i].sqrt() * x0 + (1 - abar_prev[i]).sqrt() * eps
        return x
    sigmas, ts = sigma_schedule(SCHED, STEPS)
    x = x * math.sqrt(1 + sigmas[0] ** 2)
    for i in range(STEPS):
        sigma, nxt = float(sigmas[i]), float(sigmas[i + 1])
        up = min(nxt, eta * math.sqrt(nxt ** 2 * (sigma ** 2 - nxt ** 2) / sigma ** 2)) \
            if sampler == "euler_ancestral" else 0.0          # k-diffusion get_ancestral_step
        down = math.sqrt(nxt ** 2 - up ** 2)
        z = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(F64) if up > 0 else None
        c_in = 1.0 / math.sqrt(1.0 + sigma ** 2)                # DiscreteEpsDDPMDenoiser: c_in, c_out = -sigma
        c, u, p = _predict(NET64, x * c_in, t_of(ts[i]), y, null, _guided(spec, i), perturbed)
        eps, eps_source = method(i, c, u, p)
        g = _clf_grad(x * c_in, t_of(ts[i]), y, clf_scale) * c_in if clf_scale else 0.0
        denoised = x - sigma * (eps - sigma * g)                 # score correction: eps -= sigma g
        if eps_source is None:                                   # sample_euler / sample_euler_ancestral
            x = x + (x - denoised) / sigma * (down - sigma)
        else:                                                    # sample_euler(_ancestral)_cfg_pp
            uncond_denoised = x - sigma * (eps_source - sigma * g)
            x = denoised + (x - uncond_denoised) / sigma * down
        if z is not None:
            x = x + z * up
    return x


def _close(fast, ref, rtol=1e-5):
    assert torch.isfinite(fast).all()
    scale = ref.abs().max().item()
    torch.testing.assert_close(fast.to(F64), ref, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------------
# Whole loops against the references

REFS = {CFGZeroStar: ref_cfg_zero_star, APG: ref_apg, APGNull: ref_apg, MamboG: ref_mambo, TCFG: ref_tcfg,
        PerturbedGuidance: ref_perturbed, PerturbedNull: ref_perturbed, CFGPlusPlus: ref_cfg_pp}

CASES = {
    "cfg_zero_star_euler": (CFGZeroStar(4.0, zero_init_steps=1), "euler"),
    "cfg_zero_star_original_rescale_ddim": (CFGZeroStar(W4, zero_init_steps=2, use_original_formulation=True,
                                                        rescale=0.7), "ddim"),
    "apg_momentum_clamp_euler": (APG(6.0, eta=0.3, momentum=-0.5, norm_threshold=0.1), "euler"),
    "apg_momentum_window_per_sample_ddim": (APG(W4, momentum=0.4, norm_threshold=0.0, start=0.2, stop=0.8),
                                            "ddim"),
    "apg_no_momentum_rescale_ancestral": (APG(5.0, eta=0.0, norm_threshold=0.1, rescale=0.5), "euler_ancestral"),
    "apg_null_label_one_call": (APGNull(5.0, momentum=-0.3, null_label=NULL), "euler"),
    "mambo_euler": (MamboG(6.0), "euler"),
    "mambo_original_rescale_per_sample_ddim": (MamboG(W4, alpha=3.0, use_original_formulation=True,
                                                      rescale=0.5), "ddim"),
    "tcfg_euler": (TCFG(4.0), "euler"),
    "tcfg_original_rescale_window_ddim": (TCFG(3.0, use_original_formulation=True, rescale=0.3, stop=0.6), "ddim"),
    "perturbed_model_euler": (PerturbedGuidance(3.0, 2.0, perturbed_model=PERTURBED), "euler"),
    "perturbed_model_rescale_per_sample_ddim": (PerturbedGuidance(W4, 1.5, perturbed_model=PERTURBED,
                                                                  rescale=0.5), "ddim"),
    "perturbed_batch_one_forward": (PerturbedNull(3.0, 2.0, null_label=NULL), "euler"),
    "cfg_pp_euler": (CFGPlusPlus(0.6, null_label=NULL), "euler"),
    "cfg_pp_ancestral_per_sample_window": (CFGPlusPlus(torch.tensor([0.2, 0.5, 0.8, 1.0]), null_label=NULL,
                                                       start=0.2), "euler_ancestral"),
}


def _reference_of(spec, sampler, x_T, y, clf_scale=0.0):
    null = getattr(spec, "null_label", None)
    perturbed = PERTURBED64 if isinstance(spec, PerturbedGuidance) else None
    return reference(spec, REFS[type(spec)](spec, spec.scale), sampler, x_T, y, null=null, perturbed=perturbed,
                     clf_scale=clf_scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_loop_equals_the_float64_reference(name, backend):
    spec, sampler = CASES[name]
    x_T, y = inputs()
    model = PAG_NET if isinstance(spec, PerturbedNull) else NET
    fast = run([spec], sampler, model=model, backend=backend)
    _close(fast, _reference_of(spec, sampler, x_T, y))
    plain = run([CFG(spec.scale, null_label=getattr(spec, "null_label", None))], sampler)
    # The method must move the samples away from CFG at its scale (100x the tolerance at least).
    assert (fast - plain).abs().max() > 1e-3 * fast.abs().max()


@pytest.mark.parametrize("spec, sampler", [(APG(5.0, momentum=-0.5, norm_threshold=0.1), "euler"),
                                           (CFGPlusPlus(0.7, null_label=NULL), "euler_ancestral"),
                                           (TCFG(3.0, rescale=0.5), "ddim")], ids=["apg", "cfg_pp", "tcfg"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_composes_with_classifier_guidance(spec, sampler, backend):
    """The method's combine and the classifier's score correction enter one fused step: eps~ = m - sigma g
    (CFG++: x0^ from m, the renoising eps from u, both corrected)."""
    x_T, y = inputs()
    fast = run([spec, ClassifierGuidance(CLF, 2.0)], sampler, backend=backend)
    _close(fast, _reference_of(spec, sampler, x_T, y, clf_scale=2.0))
    assert (fast - run([spec], sampler)).abs().max() > 1e-3 * fast.abs().max()


def test_per_sample_scales_equal_solo_runs():
    """A batch with one scale per sample gives each sample its solo run with that scale."""
    x_T, y = inputs()
    for spec in (APG(W4, momentum=-0.5, norm_threshold=0.1), CFGPlusPlus(W4 / 6.0, null_label=NULL)):
        sampler = "euler_ancestral" if isinstance(spec, CFGPlusPlus) else "euler"
        gens = [torch.Generator().manual_seed(s) for s in range(B)]
        whole = fastguide.sample(NET, x_T, schedule=SCHED, sampler=sampler, steps=STEPS, y=y, guidance=[spec],
                                 generator=gens, backend="torch")
        for b in range(B):
            solo_spec = type(spec)(**{**spec.__dict__, "scale": float(spec.scale[b])})
            solo = fastguide.sample(NET, x_T[b:b + 1], schedule=SCHED, sampler=sampler, steps=STEPS, y=y[b:b + 1],
                                    guidance=[solo_spec], generator=[torch.Generator().manual_seed(b)],
                                    backend="torch")
            torch.testing.assert_close(whole[b:b + 1], solo, rtol=1e-5, atol=1e-5 * whole.abs().max().item())


def test_an_identity_scale_builds_another_loop():
    """A modern spec is off where its float scale is the identity (diffusers' test): the built-loop cache must
    not hand a scale-1 loop (cond only) to a later call with another scale."""
    x_T, y = inputs()
    assert torch.equal(run([MamboG(1.0)], "euler"), run([], "euler"))
    _close(run([MamboG(4.0)], "euler"), _reference_of(MamboG(4.0), "euler", x_T, y))


# ---------------------------------------------------------------------------------------------------
# Modes: eager, inductor, CUDA graph (the CPU stand-in); the sync audit

MODE_CASES = {
    "apg_momentum_clf": ([APG(W4, momentum=-0.5, norm_threshold=0.1), ClassifierGuidance(CLF, 2.0)], "euler", NET),
    "cfg_zero_star_rescale": ([CFGZeroStar(4.0, zero_init_steps=1, rescale=0.5)], "ddim", NET),
    "perturbed_batch": ([PerturbedNull(3.0, 2.0, null_label=NULL)], "euler", PAG_NET),
    "cfg_pp_ancestral": ([CFGPlusPlus(0.6, null_label=NULL)], "euler_ancestral", NET),
    "perturbed_model_per_sample_ddim": ([PerturbedGuidance(W4, 1.5, perturbed_model=PERTURBED)], "ddim", NET),
}


@pytest.fixture
def stand_in(monkeypatch):
    cudagraph.clear_graph_cache()
    driver = ReplayDriver()
    monkeypatch.setattr(cudagraph, "driver", driver)
    yield driver
    cudagraph.clear_graph_cache()


@pytest.mark.parametrize("name", sorted(MODE_CASES))
def test_graph_stand_in_replays_the_eager_loop(stand_in, name):
    """Captured once, replayed twice (the second time with a new x_T): bit-equal to eager. APG's running
    average is zeroed inside the graph, so each replay starts it afresh."""
    guidance, sampler, model = MODE_CASES[name]
    eager = run(guidance, sampler, model=model)
    assert torch.equal(run(guidance, sampler, model=model, compile="graph"), eager)
    assert torch.equal(run(guidance, sampler, model=model, compile="graph"), eager)
    x2, y2 = inputs(seed=11)
    again = run(guidance, sampler, model=model, compile="graph", x_T=x2, y=y2)
    assert torch.equal(again, run(guidance, sampler, model=model, x_T=x2, y=y2))
    assert len(stand_in.graphs) == 1 and stand_in.graphs[0].replays == 3


INDUCTOR_CASES = {   # (compiles cost seconds each on two cores: few cases, no classifier gradient)
    "apg_momentum_per_sample": ([APG(W4, momentum=-0.5, norm_threshold=0.1)], "euler", NET),
    "cfg_zero_star_rescale": MODE_CASES["cfg_zero_star_rescale"],
    "perturbed_batch": MODE_CASES["perturbed_batch"],
}


@pytest.mark.parametrize("name", sorted(INDUCTOR_CASES))
def test_inductor_equals_eager(name):
    """Each stage kind compiles whole (fullgraph: the gram, coefficients and fused step trace without a break
    or a sync) and gives the eager samples."""
    guidance, sampler, model = INDUCTOR_CASES[name]
    eager = run(guidance, sampler, model=model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fastguide.sample\\(compile='inductor'\\)")
        compiled = run(guidance, sampler, model=model, compile="inductor")
    scale = eager.abs().max().item()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", sorted(MODE_CASES))
def test_whole_loops_have_no_host_sync(name):
    """No host read and no host-to-device copy in the loop: the gram, the coefficients and the momentum
    buffer stay on the device. A per-sample scale tensor is checked once, before the loop (one read)."""
    guidance, sampler, model = MODE_CASES[name]
    run(guidance, sampler, model=model)  # caches warm
    with OpCounter() as counter:
        out = run(guidance, sampler, model=model)
    assert torch.isfinite(out).all()
    up_front = ["aten._local_scalar_dense.default"] if isinstance(guidance[0].scale, torch.Tensor) else []
    assert counter.syncs() == up_front, counter.histogram()
    assert counter.host_values() == [], counter.histogram()


def test_gram_runs_only_where_the_method_reads_it():
    """One guidance_gram per guided stage for APG; none for PerturbedGuidance without rescale; CFG-Zero*'s
    zero-init stage calls no network."""
    x_T, y = inputs()
    for guidance, grams in (([APG(5.0, momentum=-0.5)], STEPS),
                            ([PerturbedGuidance(3.0, 2.0, perturbed_model=PERTURBED)], 0),
                            ([CFGZeroStar(4.0, zero_init_steps=2)], STEPS - 2)):
        run(guidance, "euler")
        calls = NET.calls
        with OpCounter() as counter:
            run(guidance, "euler")
        assert counter.names.count("fastguide.guidance_gram") == grams
        if isinstance(guidance[0], CFGZeroStar):
            assert NET.calls - calls == 2 * (STEPS - 2)   # two calls (no null label) per guided stage


# ---------------------------------------------------------------------------------------------------
# Bad specs are refused, naming the argument


def test_bad_specs_are_refused():
    x_T, y = inputs()
    with pytest.raises(ValueError, match="sampler='euler' or 'euler_ancestral'.*sampler='ddim'"):
        run([CFGPlusPlus(0.5)], "ddim")
    with pytest.raises(ValueError, match="sampler='heun'"):
        run([CFGPlusPlus(0.5)], "heun")
    with pytest.raises(ValueError, match="flow schedule"):
        fastguide.sample(NET, x_T, schedule=Schedule.flow(), sampler="euler", steps=3, guidance=[CFGPlusPlus(0.5)],
                         backend="torch")
    with pytest.raises(ValueError, match="guidance holds more than one CFG-like spec .CFG and APG"):
        run([CFG(3.0), APG(4.0)], "euler")
    with pytest.raises(ValueError, match="guidance holds more than one CFG-like spec .CFGPlusPlus and TCFG"):
        run([CFGPlusPlus(0.5), TCFG(4.0)], "euler")
    with pytest.raises(ValueError, match="CFGPlusPlus scale"):
        CFGPlusPlus(1.5)
    with pytest.raises(ValueError, match="CFGPlusPlus scale .CFG\\+\\+'s lambda. must lie in \\[0, 1\\]"):
        CFGPlusPlus(torch.tensor([0.5, 1.2, 0.1, 0.0]))
    with pytest.raises(ValueError, match="PerturbedGuidance without a perturbed_model .* null label"):
        run([PerturbedGuidance(3.0, 2.0)], "euler")
    with pytest.raises(ValueError, match="APG scale must be a float or a tensor of shape \\[4\\]"):
        run([APG(torch.ones(3))], "euler")
    with pytest.raises(ValueError, match="perturbed_model returned shape"):
        run([PerturbedGuidance(3.0, 2.0, perturbed_model=lambda x, t, y: x[:1])], "euler")


def test_signed_scales_run_as_the_specs_take_them():
    """The modern specs take any finite scale (diffusers' guiders do): a negative one runs, and matches."""
    x_T, y = inputs()
    spec = MamboG(-1.0, alpha=1.0)
    _close(run([spec], "euler"), _reference_of(spec, "euler", x_T, y))


def teardown_module():
    fg_sampling.clear_caches()
