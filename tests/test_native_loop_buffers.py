"""Paired stages of the native loop: the fused step writes x_next into both halves of the next CFG call's
``[x; x]`` input (``StepArgs.out2``), so a steady-state step of a CFG loop with a null label needs no
``torch.cat`` (``fastguide.native.spec.paired_stages``, ``fastguide.native.loop.run_loop``).

It must never change a result: every loop here is run with the pairing on and off (the private switch
``fastguide.native.spec._PAIR_INPUTS``) and the samples must be identical, bit for bit, in fp32.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastguide
from fastguide import CFG, ClassifierGuidance, DiscriminatorGuidance, Schedule
from fastguide.native import loop as fg_loop
from fastguide.native import sampling
from fastguide.native import spec as fg_spec
from fastguide.tools.opcount import OpCounter

from loop_models import eps_model

B, SHAPE = 3, (2, 5, 3)
NULL = 7

pytestmark = pytest.mark.usefixtures("one_thread")


def edm_denoiser(x, sigma, y=None):
    s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
    d = x / (1 + s * s) + 0.1 * torch.tanh(x)
    return d if y is None else d + 0.02 * y.to(x.dtype).reshape(-1, 1, 1, 1)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2 * 5 * 3, NULL + 1)

    def forward(self, x, t):
        return self.lin(torch.tanh(x.flatten(1))) * (1 + t.reshape(-1, 1) / 1000)


def disc(x, t, y=None):
    return 0.1 * (x.flatten(1) ** 2).sum(1) - t / 1000


CLF = Classifier()
PER_SAMPLE = torch.tensor([1.5, 3.0, 0.0])
VP, EDM = Schedule.ddpm(), Schedule.edm()
CASES = {
    "ddim": dict(sampler="ddim", guidance=[CFG(3.0, null_label=NULL)]),
    "ddim_eta_clip_rescale": dict(sampler="ddim", eta=0.7, clip_denoised=(-1, 1),
                                  guidance=[CFG(2.5, null_label=NULL, rescale=0.6)]),
    "ddpm": dict(sampler="ddpm", guidance=[CFG(4.0, null_label=NULL)]),
    "ddpm_learned_range": dict(sampler="ddpm", schedule=Schedule.ddpm(variance_type="learned_range"),
                               guidance=[CFG(2.0, null_label=NULL)]),
    "euler_edm": dict(sampler="euler", schedule=EDM, guidance=[CFG(3.0, null_label=NULL)]),
    "euler_ancestral_edm": dict(sampler="euler_ancestral", schedule=EDM, guidance=[CFG(2.0, null_label=NULL)]),
    "heun_edm": dict(sampler="heun", schedule=EDM, guidance=[CFG(3.0, null_label=NULL)]),
    "heun_edm_churn": dict(sampler="heun", schedule=EDM, s_churn=4.0, s_tmin=0.05, s_tmax=10.0,
                           guidance=[CFG(3.0, null_label=NULL)]),
    "dpmpp_2m_edm": dict(sampler="dpmpp_2m", schedule=EDM, guidance=[CFG(2.0, null_label=NULL)]),
    "dpmpp_2m_vp": dict(sampler="dpmpp_2m", guidance=[CFG(2.0, null_label=NULL)]),
    "euler_vp": dict(sampler="euler", guidance=[CFG(3.0, null_label=NULL)]),
    "ddim_classifier": dict(sampler="ddim", guidance=[CFG(3.0, null_label=NULL), ClassifierGuidance(CLF, 2.0)]),
    "ddpm_classifier_x0": dict(sampler="ddpm", clip_denoised=(-1, 1),
                               guidance=[CFG(2.0, null_label=NULL),
                                         ClassifierGuidance(CLF, 1.0, input="x0", tau2=0.5, gamma=0.3)]),
    "heun_edm_recipe": dict(sampler="heun", schedule=EDM,
                            guidance=[CFG(2.0, null_label=NULL), ClassifierGuidance(CLF, input="x0")]),
    "ddim_discriminator": dict(sampler="ddim", guidance=[CFG(3.0, null_label=NULL),
                                                         DiscriminatorGuidance(disc, weight=1.0)]),
    "ddim_cfg_window": dict(sampler="ddim", guidance=[CFG(3.0, null_label=NULL, start=0.2, stop=0.7)]),
    "heun_cfg_window": dict(sampler="heun", schedule=EDM, guidance=[CFG(3.0, null_label=NULL, start=0.3)]),
    "ddim_per_sample_scales": dict(sampler="ddim", guidance=[CFG(PER_SAMPLE, null_label=NULL)]),
    "dpmpp_2m_per_sample_tensor_null": dict(sampler="dpmpp_2m", schedule=EDM,
                                            guidance=[CFG(PER_SAMPLE, null_label=torch.tensor(NULL))]),
}
# Where no stage can take its input as a pair: the model sees c_in x (sigma samplers on a VP schedule), or
# the uncond half is a second call (no null label).
NEVER_PAIRED = {"dpmpp_2m_vp", "euler_vp"}


@pytest.fixture
def pairing():
    """Set the switch (and drop built loops, which hold stage kinds built under the other setting)."""
    def set_to(on: bool):
        fg_spec._PAIR_INPUTS = on
        sampling.clear_caches()

    yield set_to
    set_to(True)


def _call(case, steps=7, dtype=torch.float32, backend="auto", model=None, **extra):
    kw = dict(CASES[case])
    schedule = kw.pop("schedule", VP)
    if model is None:
        model = edm_denoiser if schedule.kind == "edm" else eps_model
        if schedule.kind == "vp" and schedule.variance_type == "learned_range":
            model = lambda x, t, y: torch.cat([eps_model(x, t, y), torch.tanh(x)], dim=1)  # noqa: E731
    x_T = torch.randn((B,) + SHAPE, generator=torch.Generator().manual_seed(11)).to(dtype)
    y = torch.tensor([0, 3, 5])
    gens = [torch.Generator().manual_seed(100 + s) for s in range(B)]
    return fastguide.sample(model, x_T, schedule=schedule, steps=steps, y=y, generator=gens, backend=backend,
                            **kw, **extra)


def _spec(case, steps=7):
    kw = dict(CASES[case])
    schedule = kw.pop("schedule", VP)
    options = {k: kw.pop(k) for k in list(kw) if k not in ("sampler", "guidance", "clip_denoised")}
    if kw["sampler"] == "ddim" and kw.get("clip_denoised") is not None:
        options["clipped"] = True
    return sampling._built_loop(kw["sampler"], schedule, steps, options, kw["guidance"], B,
                                kw.get("clip_denoised"))[1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_paired_loop_is_bitwise_the_plain_loop(case, pairing):
    pairing(False)
    plain = _call(case)
    assert _spec(case).pair_out == ()
    pairing(True)
    paired = _call(case)
    spec = _spec(case)
    if case in NEVER_PAIRED:
        assert spec.pair_out == ()
    else:
        assert sum(spec.pair_out) > 0, "the case does not exercise the paired stages"
        assert len(spec.pair_out) == spec.num_stages and not spec.pair_out[-1]
        for k, paired_out in enumerate(spec.pair_out[:-1]):
            assert paired_out == fg_spec.takes_pair(spec.kinds[k + 1], spec.null_label)
    assert paired.dtype == plain.dtype and paired.shape == plain.shape
    assert torch.equal(paired, plain), (paired - plain).abs().max()
    # The result is a tensor of its own, not a view into one of the loop's pair buffers.
    assert paired.untyped_storage().nbytes() == paired.numel() * paired.element_size()


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("auto", torch.float16),
                                           ("torch", torch.float16)])
@pytest.mark.parametrize("case", ["ddim_eta_clip_rescale", "heun_edm", "dpmpp_2m_edm"])
def test_paired_loop_other_backends_and_dtypes(case, backend, dtype, pairing):
    pairing(False)
    plain = _call(case, dtype=dtype, backend=backend)
    pairing(True)
    paired = _call(case, dtype=dtype, backend=backend)
    assert torch.equal(paired, plain)


def test_pairing_follows_the_model_input():
    """Exactly the stages whose model input is [x; x] take a pair: not the first (x_T is concatenated), not
    the stages outside a CFG window, not churned stages, not those whose model sees c_in x."""
    spec = _spec("ddim_cfg_window", steps=10)
    assert [k.cfg for k in spec.kinds] == [False, False, True, True, True, True, True, False, False, False]
    assert spec.pair_out == (False, True, True, True, True, True, False, False, False, False)
    churned = _spec("heun_edm_churn", steps=7)
    for k, kind in enumerate(churned.kinds[1:]):
        assert churned.pair_out[k] == (not kind.pre_noise)
    assert any(k.pre_noise for k in churned.kinds) and any(churned.pair_out)
    assert _spec("euler_vp").pair_out == ()
    # Pairing is no stage-kind fact: the kinds (and so the compiled bodies) are those of the plain loop.
    assert len(set(_spec("ddim").kinds)) == 1


def test_model_that_returns_or_keeps_its_input(pairing):
    """A model whose output is its input tensor (an alias of a pair buffer the step then reads), and one that
    reads its previous call's input at the next call: both see what the plain loop gives them."""
    seen = []

    def identity_ish(x, t, y):
        return x

    def keeps_previous(x, t, y):
        prev = seen[-1] if seen else x
        seen.append(x)
        return 0.5 * torch.tanh(x) + 0.1 * prev

    for model in (identity_ish, keeps_previous):
        pairing(False)
        seen.clear()
        plain = _call("ddim", model=model)
        pairing(True)
        seen.clear()
        paired = _call("ddim", model=model)
        assert torch.equal(paired, plain), model.__name__


def test_steady_state_cfg_step_has_no_cat(pairing):
    """CFG + DDIM with a null label: a steady-state step is the timestep gather, the network, the fused
    step and the counter; the [x; x] batch costs no op (the previous step wrote it). Without the pairing
    every step concatenates and allocates its output."""
    model = lambda x, t, y: x * 0.5  # noqa: E731
    x_T = torch.randn((B,) + SHAPE)
    y = torch.tensor([0, 1, 2])

    def run(steps):
        return fastguide.sample(model, x_T, schedule=VP, sampler="ddim", steps=steps, y=y,
                                guidance=[CFG(3.0, null_label=NULL)])

    def per_step():
        run(10)
        run(20)
        with OpCounter() as c10:
            run(10)
        with OpCounter() as c20:
            run(20)
        h10, h20 = c10.histogram(), c20.histogram()
        return {op: (h20.get(op, 0) - h10.get(op, 0)) / 10 for op in set(h10) | set(h20)}, c20

    pairing(False)
    plain, _ = per_step()
    assert plain["aten.cat.default"] == 1
    pairing(True)
    paired, c20 = per_step()
    assert "aten.cat.default" not in paired or paired["aten.cat.default"] == 0
    steady = {op: n for op, n in paired.items() if n}
    # The model's timestep is a view of the loop's table (an eager loop's host step index): no gather, and no
    # device counter to advance.
    assert steady == {"aten.select.int": 1, "aten.mul.Tensor": 1, "fastguide.guided_step": 1}, steady
    # One cat per call: x_T's, into the first stage (and the labels' [null; y], built once per call).
    assert c20.histogram()["aten.cat.default"] == 2
    assert c20.syncs() == [] and c20.host_values() == []


def test_stage_refuses_a_pair_it_cannot_take():
    """A stage whose model sees something else than [x; x] (here c_in x) rejects a paired input."""
    spec = _spec("euler_vp")
    stage = fg_loop.make_stage(spec, spec.kinds[0], eps_model, (), (), "auto")
    x = torch.zeros((B,) + SHAPE)
    pair, lower, _ = fg_loop.pair_buffer(x)
    with pytest.raises(ValueError, match="does not see"):
        stage((pair, lower), None, None, None, torch.zeros((), dtype=torch.int64),
              fg_spec.make_tables(spec, B, x.device).as_tuple(), (None,) * 5)


def test_compiled_loop_runs_unpaired_with_the_same_bodies(pairing):
    """compile='inductor': compiled bodies do not take the paired calling convention, so the loop runs
    unpaired there, with one compiled body per stage kind as before, and matches the paired eager loop."""
    from fastguide.native import inductor
    pairing(True)
    eager = _call("ddim_per_sample_scales", steps=3)
    compiled = _call("ddim_per_sample_scales", steps=3, compile="inductor")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    [key] = list(inductor.COMPILED.keys())  # the pairing fixture cleared the caches first
    assert len(inductor.COMPILED.get(key)._bodies) == len(set(_spec("ddim_per_sample_scales", steps=3).kinds)) == 1
