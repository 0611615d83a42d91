"""Whole eager loops of ``fastguide.sample`` stay sync-free (``fastguide.native.loop``).

A ``TorchDispatchMode`` (``fastguide.tools.opcount.OpCounter``) records every op of whole loops with every guidance
method: none may read a device value on the host (``item``, ``_local_scalar_dense``, ``nonzero``, ...) or copy
host data into a tensor, and the sampler's own ops per step stay a handful, independent of the step count.
"""

import pytest
import torch
from torch import nn

import fastguide
from fastguide import CFG, ClassifierGuidance, DiscriminatorGuidance, Schedule
from fastguide.native import loop as fg_loop
from fastguide.native import spec as fg_spec
from fastguide.guidance.plan import build_guided_plan
from fastguide.tools.opcount import OpCounter

from loop_models import edm_denoiser, eps_model

B, SHAPE = 4, (2, 3, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2 * 3 * 3, 5)

    def forward(self, x, t):
        return self.lin(torch.tanh(x.flatten(1))) * (1 + t.reshape(-1, 1) / 1000)


def disc(x, t, y=None):
    return 0.1 * (x.flatten(1) ** 2).sum(1) - t / 1000


CLF = Classifier()
CASES = {
    "cfg_ddim": dict(sampler="ddim", guidance=[CFG(3.0, null_label=9, rescale=0.5)]),
    "cfg_window_no_null_eta": dict(sampler="ddim", eta=1.0, guidance=[CFG(2.0, start=0.2, stop=0.8)]),
    "adm_ddpm_learned": dict(sampler="ddpm", guidance=[ClassifierGuidance(CLF, 2.0)],
                             schedule=Schedule.ddpm(variance_type="learned_range")),
    "ma_ddpm": dict(sampler="ddpm", guidance=[ClassifierGuidance(CLF, 1.0, input="x0", tau2=0.5, gamma=0.3)],
                    clip_denoised=(-1, 1)),
    "dg_heun_churn": dict(sampler="heun", schedule=Schedule.edm(), s_churn=2.0,
                          guidance=[DiscriminatorGuidance(disc, weight=1.0, weight2=0.5)]),
    "edm_recipe_heun": dict(sampler="heun", schedule=Schedule.edm(), guidance=[ClassifierGuidance(CLF, input="x0")]),
    "dpmpp_2m_adm": dict(sampler="dpmpp_2m", guidance=[ClassifierGuidance(CLF, 1.0), CFG(2.0, null_label=9)]),
}


def learned_eps(x, t, y=None):
    return torch.cat([eps_model(x, t, y), torch.tanh(x)], dim=1)


def _loop(case, steps, **extra):
    """A call of ``fastguide.sample`` for ``case`` with its inputs built beforehand (outside any counter)."""
    kw = dict(CASES[case])
    schedule = kw.pop("schedule", Schedule.ddpm())
    model = edm_denoiser if schedule.kind == "edm" else \
        (learned_eps if schedule.variance_type == "learned_range" else eps_model)
    x_T = torch.randn((B,) + SHAPE, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3])

    def call():
        gens = [torch.Generator().manual_seed(s) for s in range(B)]
        return fastguide.sample(model, x_T, schedule=schedule, steps=steps, y=y, generator=gens, **kw, **extra)
    return call


def _run(case, steps, **extra):
    return _loop(case, steps, **extra)()


@pytest.mark.parametrize("case", sorted(CASES))
def test_whole_eager_loop_has_no_host_sync_or_host_copy(case):
    call = _loop(case, 6)
    call()  # caches warm
    with OpCounter() as counter:
        out = call()
    assert torch.isfinite(out).all()
    assert counter.syncs() == [], counter.histogram()
    assert counter.host_values() == [], counter.histogram()


@pytest.mark.parametrize("case", ["cfg_ddim", "ma_ddpm", "dg_heun_churn"])
def test_ops_grow_linearly_with_the_step_count(case):
    """Per-call setup is constant and every step adds the same ops (nothing per step scales with the loop's
    length, e.g. no per-step table rebuild or copy)."""
    counts = []
    for steps in (4, 8, 12):
        call = _loop(case, steps)
        call()
        with OpCounter() as counter:
            call()
        counts.append(counter.count)
    assert counts[2] - counts[1] == counts[1] - counts[0] > 0


def test_cfg_step_ops_without_the_network():
    """CFG + DDIM with a null label: the gather of the timesteps, the fused step (which also writes the next
    step's [x; x] batch: no cat, no output allocation) and the counter increment; the free network adds its
    one multiply."""
    model = lambda x, t, y: x * 0.1  # noqa: E731
    x_T = torch.randn((B,) + SHAPE)
    y = torch.tensor([0, 1, 2, 3])
    run = lambda steps: fastguide.sample(model, x_T, schedule=Schedule.ddpm(), sampler="ddim", steps=steps,  # noqa
                                         y=y, guidance=[CFG(3.0, null_label=9)])
    run(10)
    run(20)
    with OpCounter() as c10:
        run(10)
    with OpCounter() as c20:
        run(20)
    per_step = (c20.count - c10.count) / 10
    print(f"\nCFG+DDIM eager loop: {per_step:g} ops per step including the network's 1")
    assert per_step <= 4


def test_split_invariance_and_progress(capsys):
    whole = _run("adm_ddpm_learned", 5)
    x_T = torch.randn((B,) + SHAPE, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3])
    parts = []
    for sl, seeds in ((slice(0, 1), [0]), (slice(1, 4), [1, 2, 3])):
        parts.append(fastguide.sample(learned_eps, x_T[sl], schedule=Schedule.ddpm(variance_type="learned_range"),
                                      sampler="ddpm", steps=5, y=y[sl], guidance=[ClassifierGuidance(CLF, 2.0)],
                                      generator=[torch.Generator().manual_seed(s) for s in seeds], progress=True))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=1e-6)
    assert "fastguide ddpm" in capsys.readouterr().err


def test_tables_hold_every_per_stage_number():
    """Stage kinds are shared between stages; what differs (timesteps, c_in, churn, guidance weights) is in
    the device tables."""
    schedule = Schedule.ddpm()
    plan = fastguide.samplers.build("euler", schedule, 6, s_churn=1.0)
    gp = build_guided_plan(plan, [DiscriminatorGuidance(disc, weight=2.0)])
    spec = fg_spec.build_spec(gp, B, None)
    assert len(set(spec.kinds)) <= 3 < spec.num_stages
    tables = fg_spec.make_tables(spec, B, torch.device("cpu"))
    for k, st in enumerate(plan.stages):
        assert tables.t_model[k].tolist() == pytest.approx([st.t_model] * B, rel=1e-6)
        assert tables.scalars[fg_spec.ROW_C_IN][k].item() == pytest.approx(st.c_in, rel=1e-6)
        assert tables.scalars[fg_spec.ROW_PRE_NOISE][k].item() == pytest.approx(st.pre_noise, rel=1e-6)
    torch.testing.assert_close(tables.coeffs, torch.from_numpy(gp.rows).float())


def test_graph_mode_needs_cuda_and_compile_options_need_inductor():
    x = torch.randn((B,) + SHAPE)
    with pytest.raises(ValueError, match="CUDA"):
        fastguide.sample(eps_model, x, schedule=Schedule.ddpm(), sampler="ddim", steps=2, compile="graph")
    with pytest.raises(ValueError, match="compile_options"):
        fastguide.sample(eps_model, x, schedule=Schedule.ddpm(), sampler="ddim", steps=2,
                         compile_options={"mode": "reduce-overhead"})
    with pytest.raises(TypeError, match="compile_options"):
        fastguide.sample(eps_model, x, schedule=Schedule.ddpm(), sampler="ddim", steps=2, compile="inductor",
                         compile_options="max-autotune")
