"""Bad input to ``fastguide.sample`` and the guidance specs: a clear ValueError/TypeError naming the argument,
raised before anything runs, and the caller's x_T is never modified."""

import math

import pytest
import torch
from torch import nn

import fastguide
from fastguide import CFG, ClassifierGuidance, DiscriminatorGuidance, Schedule

B, C, HW = 3, 2, 4
VP = Schedule.ddpm()
EDM = Schedule.edm()


def eps_model(x, t, y=None):
    return 0.5 * torch.tanh(x)


def learned_model(x, t, y=None):
    return torch.cat([eps_model(x, t, y), torch.zeros_like(x)], dim=1)


def clf(x, t):
    return x.reshape(x.shape[0], -1)[:, :5] * 2.0


def disc(x, t, y=None):
    return x.reshape(x.shape[0], -1).sum(1)


def _x():
    return torch.randn(B, C, HW, HW, generator=torch.Generator().manual_seed(0))


def _y():
    return torch.tensor([0, 1, 2])


class _Counting:
    """A model that counts its calls (to prove that validation happens before the loop)."""

    def __init__(self, fn=eps_model):
        self.calls, self.fn = 0, fn

    def __call__(self, x, t, y=None):
        self.calls += 1
        return self.fn(x, t, y)


def _raises(exc, match, **kw):
    """Call sample with defaults overridden by kw; check the error and that x_T and the model were untouched."""
    x = kw.pop("x_T", _x())
    keep = x.clone() if isinstance(x, torch.Tensor) else None
    model = kw.pop("model", _Counting())
    args = dict(schedule=VP, sampler="ddim", steps=4)
    args.update(kw)
    with pytest.raises(exc, match=match):
        fastguide.sample(model, x, **args)
    if keep is not None:
        assert torch.equal(x, keep), "x_T was modified"
    return model


def _raises_before_model(exc, match, **kw):
    model = _raises(exc, match, **kw)
    if isinstance(model, _Counting):
        assert model.calls == 0, "the model ran before the bad argument was reported"


# ---------------------------------------------------------------------------------------------------
# sampler / schedule / steps

@pytest.mark.parametrize("sampler", ["ddimm", "DDIM", "", None, 3])
def test_unknown_sampler(sampler):
    _raises_before_model((ValueError, TypeError), "sampler", sampler=sampler)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_vp_sampler_on_edm_schedule(sampler):
    _raises_before_model(ValueError, "VP schedule", sampler=sampler, schedule=EDM)


def test_schedule_not_a_schedule():
    _raises_before_model(TypeError, "schedule", schedule="linear")


@pytest.mark.parametrize("steps", [0, -3, 2.5, "10", True, None, 1001])
def test_bad_steps(steps):
    _raises_before_model((ValueError, TypeError), "steps", steps=steps)


def test_bad_steps_sigma_sampler():
    _raises_before_model(ValueError, "steps", sampler="heun", schedule=EDM, steps=0)


def test_unknown_sampler_option():
    _raises_before_model(TypeError, "s_churn|unexpected", sampler="ddim", s_churn=1.0)


# ---------------------------------------------------------------------------------------------------
# x_T, y, model

@pytest.mark.parametrize("x_T", [[[0.0, 1.0]], None, 3.0])
def test_x_T_not_a_tensor(x_T):
    _raises_before_model(TypeError, "x_T", x_T=x_T)


def test_x_T_integer_or_1d():
    _raises_before_model(TypeError, "x_T", x_T=torch.zeros(B, C, dtype=torch.long))
    _raises_before_model(ValueError, "x_T", x_T=torch.zeros(B))


def test_model_not_callable():
    _raises_before_model(TypeError, "model", model="unet")


@pytest.mark.parametrize("y", [torch.tensor([0, 1]), torch.tensor([[0, 1, 2]]), torch.tensor(1)])
def test_y_wrong_shape(y):
    _raises_before_model(ValueError, "y", y=y)


def test_y_not_a_tensor():
    _raises_before_model(TypeError, "y", y=[0, 1, 2])


def test_y_float_labels_with_classifier_guidance():
    _raises_before_model((TypeError, ValueError), "y", y=torch.tensor([0.0, 1.0, 2.0]),
                         guidance=[ClassifierGuidance(clf)])


def test_y_labels_out_of_range_for_classifier():
    # 7 is not a class of the 5-way classifier: reported by name, and x_T untouched
    _raises((ValueError, IndexError), "label|y", y=torch.tensor([0, 7, 1]), guidance=[ClassifierGuidance(clf)])


def test_missing_y_for_classifier_guidance():
    _raises_before_model(ValueError, "y", guidance=[ClassifierGuidance(clf)])
    _raises_before_model(ValueError, "y", guidance=[ClassifierGuidance(clf, input="x0")])


def test_missing_y_for_cfg_with_null_label():
    _raises_before_model(ValueError, "y", guidance=[CFG(3.0, null_label=10)])


@pytest.mark.parametrize("bad", [
    lambda x, t, y=None: torch.zeros(x.shape[0], C + 1, HW, HW),      # wrong channels
    lambda x, t, y=None: torch.zeros(x.shape[0] - 1, C, HW, HW),      # wrong batch
    lambda x, t, y=None: torch.zeros(x.shape[0], C, HW, HW + 1),      # wrong spatial
    lambda x, t, y=None: torch.zeros(x.shape[0], C * HW * HW),        # flattened
])
def test_model_returns_wrong_shape(bad):
    _raises(ValueError, "model", model=bad)


def test_model_returns_non_tensor():
    _raises(TypeError, "model", model=lambda x, t, y=None: x.numpy())


def test_learned_range_model_must_double_channels():
    sch = Schedule.ddpm(variance_type="learned_range")
    _raises(ValueError, "model", model=eps_model, schedule=sch, sampler="ddpm")
    _raises(ValueError, "model", model=learned_model, schedule=Schedule.ddpm(), sampler="ddpm")


def test_cfg_model_must_return_2b_rows():
    # with a null label the model is called on the 2B batch and must return 2B rows
    _raises(ValueError, "model", model=lambda x, t, y=None: eps_model(x[: x.shape[0] // 2], t),
            y=_y(), guidance=[CFG(2.0, null_label=9)])


# ---------------------------------------------------------------------------------------------------
# guidance specs

@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf"), "3", True])
def test_cfg_bad_scale(scale):
    with pytest.raises((ValueError, TypeError), match="CFG scale"):
        CFG(scale)


@pytest.mark.parametrize("scale", [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, float("nan"), 3.0]),
                                   torch.tensor([1.0, 2.0])])
def test_cfg_bad_scale_tensor(scale):
    _raises_before_model(ValueError, "CFG scale", y=_y(), guidance=[CFG(scale, null_label=9)])


def test_cfg_scale_tensor_2d_or_integer():
    with pytest.raises(ValueError, match="CFG scale"):
        CFG(torch.ones(2, 2))
    with pytest.raises(ValueError, match="CFG scale"):
        CFG(torch.ones(3, dtype=torch.long))
    for bad in (torch.full((2, 2), 0.5), torch.zeros(3, dtype=torch.long)):  # the same check, CFG++'s name
        with pytest.raises(ValueError, match="CFGPlusPlus scale"):
            fastguide.CFGPlusPlus(bad)


@pytest.mark.parametrize("kw", [dict(start=0.6, stop=0.4), dict(start=-0.1), dict(stop=1.5),
                                dict(start=float("nan")), dict(rescale=1.5), dict(rescale=-0.1)])
def test_cfg_bad_window_or_rescale(kw):
    with pytest.raises(ValueError, match="CFG (start|stop|rescale)"):
        CFG(2.0, **kw)


@pytest.mark.parametrize("kw,name", [(dict(scale=-1.0), "scale"), (dict(scale=float("nan")), "scale"),
                                     (dict(input="xT"), "input"), (dict(tau1=float("inf")), "tau1"),
                                     (dict(tau2=float("nan")), "tau2"), (dict(gamma=-0.3), "gamma"),
                                     (dict(g_max=-1.0), "g_max"), (dict(add=float("nan")), "add")])
def test_classifier_guidance_bad_spec(kw, name):
    with pytest.raises(ValueError, match=f"ClassifierGuidance {name}"):
        ClassifierGuidance(clf, **kw)


def test_classifier_not_callable():
    with pytest.raises(TypeError, match="classifier"):
        ClassifierGuidance("resnet")


@pytest.mark.parametrize("kw,name", [(dict(weight=-1.0), "weight"), (dict(weight2=float("nan")), "weight2"),
                                     (dict(t_min=0.8, t_max=0.2), "t_min"), (dict(t_min=-0.5), "t_min"),
                                     (dict(t_max=2.0), "t_max")])
def test_discriminator_guidance_bad_spec(kw, name):
    with pytest.raises(ValueError, match=f"DiscriminatorGuidance {name}"):
        DiscriminatorGuidance(disc, **kw)


def test_discriminator_not_callable():
    with pytest.raises(TypeError, match="discriminator"):
        DiscriminatorGuidance(None)


def test_guidance_not_specs():
    _raises_before_model(TypeError, "guidance", guidance="cfg")
    _raises_before_model(TypeError, "guidance", guidance=[3.0])
    _raises_before_model(ValueError, "CFG", y=_y(), guidance=[CFG(2.0, null_label=9), CFG(3.0, null_label=9)])


def test_classifier_returns_bad_logits():
    bad = ClassifierGuidance(lambda x, t: x.reshape(x.shape[0], -1).sum(1))   # [B], not [B, K]
    _raises(ValueError, "classifier", y=_y(), guidance=[bad])


def test_discriminator_returns_bad_logit():
    bad = DiscriminatorGuidance(lambda x, t, y=None: x.reshape(x.shape[0], -1)[:, :2])
    _raises(ValueError, "discriminator", guidance=[bad])


def test_smooth_bad_input():
    with pytest.raises(TypeError, match="classifier"):
        fastguide.smooth(lambda x: x, 3.0)
    for beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            fastguide.smooth(nn.Sequential(nn.ReLU()), beta)


# ---------------------------------------------------------------------------------------------------
# clip, eta, generator, compile, backend, progress

@pytest.mark.parametrize("clip", [(1.0, -1.0), (0.0, 0.0), (0.0, float("nan")), 1.0, (-1.0,), (-1, 0, 1),
                                  ("a", "b"), "11"])
def test_bad_clip(clip):
    _raises_before_model((ValueError, TypeError), "clip_denoised", clip_denoised=clip)


@pytest.mark.parametrize("sampler,schedule", [("ddpm", VP), ("euler", EDM), ("heun", EDM), ("dpmpp_2m", EDM)])
def test_eta_on_sampler_without_eta(sampler, schedule):
    _raises_before_model(ValueError, "eta", sampler=sampler, schedule=schedule, eta=0.5)


@pytest.mark.parametrize("eta", [-0.5, float("nan"), float("inf"), "0.5", True])
def test_bad_eta_value(eta):
    _raises_before_model(ValueError, "eta", sampler="ddim", eta=eta)
    _raises_before_model(ValueError, "eta", sampler="euler_ancestral", schedule=EDM, eta=eta)


@pytest.mark.parametrize("sampler", ["heun", "euler"])
@pytest.mark.parametrize("kw,name", [(dict(s_churn=-1.0), "s_churn"), (dict(s_churn=float("nan")), "s_churn"),
                                     (dict(s_churn=float("inf")), "s_churn"), (dict(s_churn="a"), "s_churn"),
                                     (dict(s_noise=float("nan")), "s_noise"), (dict(s_noise=-1.0), "s_noise"),
                                     (dict(s_tmin=5.0, s_tmax=1.0), "s_tmin"), (dict(s_tmin=-1.0), "s_tmin"),
                                     (dict(s_tmax=float("nan")), "s_tmax")])
def test_bad_churn_options(sampler, kw, name):
    _raises_before_model(ValueError, name, sampler=sampler, schedule=EDM, **kw)


def test_bad_s_noise_euler_ancestral():
    _raises_before_model(ValueError, "s_noise", sampler="euler_ancestral", schedule=EDM, s_noise=float("nan"))


def test_generator_list_of_wrong_length():
    gens = [torch.Generator().manual_seed(i) for i in range(B + 1)]
    _raises_before_model(ValueError, "generator", generator=gens, eta=1.0)
    _raises_before_model(ValueError, "generator", generator=gens[:2], eta=1.0)


def test_generator_wrong_type():
    _raises_before_model(TypeError, "generator", generator=1234, eta=1.0)
    _raises_before_model(TypeError, "generator", generator=[torch.Generator(), 5, torch.Generator()], eta=1.0)


def test_compile_modes():
    # A CUDA graph needs CUDA tensors: on the CPU the error says so and names x_T, before the model runs.
    _raises_before_model(ValueError, "x_T on a CUDA device", compile="graph")
    _raises_before_model(ValueError, "compile", compile="cudagraph")


def test_bad_backend_reported_before_the_model_runs():
    _raises_before_model(ValueError, "backend", backend="fortran")


def test_progress_must_be_bool():
    _raises_before_model(TypeError, "progress", progress="yes")


# ---------------------------------------------------------------------------------------------------
# x_T is never modified, on every path

@pytest.mark.parametrize("case", ["ddpm_adm", "ddim_x0", "heun_edm_recipe", "heun_dg", "euler_a_cfg",
                                  "dpmpp_clip"])
def test_x_T_never_modified(case):
    x = _x()
    keep = x.clone()
    y = _y()
    if case == "ddpm_adm":
        fastguide.sample(eps_model, x, schedule=VP, sampler="ddpm", steps=3, y=y, guidance=[ClassifierGuidance(clf)])
    elif case == "ddim_x0":
        fastguide.sample(eps_model, x, schedule=VP, sampler="ddim", steps=3, y=y,
                         guidance=[ClassifierGuidance(clf, input="x0", gamma=0.3)], clip_denoised=(-1, 1))
    elif case == "heun_edm_recipe":
        fastguide.sample(lambda x, s, y=None: x / (1 + s.reshape(-1, 1, 1, 1) ** 2), x, schedule=EDM,
                         sampler="heun", steps=3, y=y, guidance=[ClassifierGuidance(clf, input="x0")], s_churn=5.0)
    elif case == "heun_dg":
        fastguide.sample(lambda x, s, y=None: x / (1 + s.reshape(-1, 1, 1, 1) ** 2), x, schedule=EDM,
                         sampler="heun", steps=3, guidance=[DiscriminatorGuidance(disc, weight=2.0)])
    elif case == "euler_a_cfg":
        fastguide.sample(eps_model, x, schedule=VP, sampler="euler_ancestral", steps=3, y=y,
                         guidance=[CFG(torch.tensor([1.0, 2.0, 3.0]), null_label=9, rescale=0.5)])
    else:
        fastguide.sample(eps_model, x, schedule=VP, sampler="dpmpp_2m", steps=3, clip_denoised=(-1, 1))
    assert torch.equal(x, keep)


def test_x_T_unmodified_when_the_model_fails_midway():
    x = _x()
    keep = x.clone()
    calls = []

    def flaky(x, t, y=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return eps_model(x, t)
    with pytest.raises(RuntimeError, match="boom"):
        fastguide.sample(flaky, x, schedule=VP, sampler="ddim", steps=5)
    assert torch.equal(x, keep) and math.isfinite(float(x.sum()))


# ---------------------------------------------------------------------------------------------------
# heun (and euler) on a VP schedule: supported, and their churn options checked the same way

@pytest.mark.parametrize("sampler", ["heun", "euler"])
@pytest.mark.parametrize("kw,name", [(dict(s_churn=-1.0), "s_churn"), (dict(s_noise=float("nan")), "s_noise"),
                                     (dict(s_tmin=5.0, s_tmax=1.0), "s_tmin"), (dict(s_tmax="inf"), "s_tmax")])
def test_bad_churn_options_on_vp_schedule(sampler, kw, name):
    _raises_before_model((ValueError, TypeError), name, sampler=sampler, schedule=VP, **kw)


def test_heun_on_vp_schedule_runs_and_leaves_x_T_alone():
    x = _x()
    keep = x.clone()
    model = _Counting()
    out = fastguide.sample(model, x, schedule=VP, sampler="heun", steps=4, s_churn=2.0,
                           generator=torch.Generator().manual_seed(0))
    assert model.calls == 2 * 4 - 1 and torch.isfinite(out).all() and torch.equal(x, keep)


# ---------------------------------------------------------------------------------------------------
# schedule parameters: rejected when the schedule is built, before any sample() call

@pytest.mark.parametrize("kw,name", [(dict(beta_start=-1), "beta_start"),
                                     (dict(beta_start=0.5, beta_end=0.1), "beta_start=0.5"),
                                     (dict(steps_offset=-2), "steps_offset"),
                                     (dict(use_karras_sigmas="no"), "use_karras_sigmas")])
def test_bad_vp_schedule_fails_at_construction(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        Schedule.ddpm(**kw)


@pytest.mark.parametrize("kw,name", [(dict(sigma_min=0.0), "sigma_min"), (dict(rho=-1.0), "rho"),
                                     (dict(sigma_data=float("inf")), "sigma_data")])
def test_bad_edm_schedule_fails_at_construction(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        Schedule.edm(**kw)
