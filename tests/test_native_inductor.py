"""``fastguide.sample(compile="inductor")``: the same samples as eager, no graph break, options passed through.

Each stage kind's body (network, guidance gradients through autograd, fused step) is compiled with
``torch.compile(fullgraph=True)``; a graph break or host sync entering it fails the compile, and a
``warnings`` filter turns fastguide's fall-back-to-fullgraph=False warning into an error, so these tests
fail if the loop body stops compiling whole. Compiles cost seconds each on two cores: the cases are few.
"""

import warnings

import pytest
import torch
from torch import nn

import fastguide
from fastguide import CFG, ClassifierGuidance, DiscriminatorGuidance, Schedule
from fastguide.native import loop as fg_loop

B, SHAPE = 4, (2, 3, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_fallback():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fastguide.sample\\(compile='inductor'\\)")
        yield


class EpsNet(nn.Module):
    """A small class-conditional eps network (an nn.Module, as real models are)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.emb = nn.Embedding(11, 2)

    def forward(self, x, t, y=None):
        h = torch.tanh(self.conv(x) + (t / 1000.0).reshape(-1, 1, 1, 1))
        if y is not None:
            h = h + 0.1 * self.emb(y).reshape(-1, 2, 1, 1)
        return 0.5 * h


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(2 * 3 * 3, 5)
        self.act = nn.Softplus(beta=3.0)

    def forward(self, x, t):
        return self.lin(self.act(x.flatten(1))) * (1 + t.reshape(-1, 1) / 1000)


NET, CLF = EpsNet(), Classifier()


def _sample(compile, x_T=None, y=None, seeds=range(B), **kw):
    x_T = torch.randn((B,) + SHAPE, generator=torch.Generator().manual_seed(5)) if x_T is None else x_T
    y = torch.tensor([0, 1, 2, 3]) if y is None else y
    schedule = kw.pop("schedule", Schedule.ddpm())
    return fastguide.sample(NET, x_T, schedule=schedule, steps=5, y=y, compile=compile,
                            generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)


CASES = {
    "cfg": dict(sampler="ddim", eta=0.5, guidance=[CFG(3.0, null_label=10, rescale=0.5)]),
    "adm": dict(sampler="ddpm", guidance=[ClassifierGuidance(CLF, 2.0)]),
    "ma": dict(sampler="ddpm", clip_denoised=(-1, 1),
               guidance=[ClassifierGuidance(CLF, 1.0, input="x0", tau1=1.0, tau2=0.5, gamma=0.3)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_inductor_equals_eager(case):
    eager = _sample(None, **CASES[case])
    compiled = _sample("inductor", **CASES[case])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert (eager - _sample(None, sampler=CASES[case]["sampler"])).abs().max() > 1e-2  # guidance acts
    again = _sample("inductor", **CASES[case])  # cached bodies
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)


def test_inductor_same_seed_same_samples_whatever_the_batch_split():
    kw = CASES["adm"]
    whole = _sample("inductor", **kw)
    x_T = torch.randn((B,) + SHAPE, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 2, 3])
    halves = [_sample("inductor", x_T=x_T[i:i + 2], y=y[i:i + 2], seeds=range(i, i + 2), **kw) for i in (0, 2)]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-5, atol=1e-5)


def test_graph_break_in_the_network_falls_back_or_fails_as_asked():
    def breaking(x, t, y=None):
        torch._dynamo.graph_break()
        return 0.5 * torch.tanh(x)

    x_T = torch.randn((B,) + SHAPE)
    kw = dict(schedule=Schedule.ddpm(), sampler="ddim", steps=3)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        fastguide.sample(breaking, x_T, compile="inductor", compile_options={"fullgraph": True}, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fastguide.sample(breaking, x_T, compile="inductor", **kw)
    assert any("fullgraph=False" in str(w.message) for w in caught)
    torch.testing.assert_close(out, fastguide.sample(breaking, x_T, **kw), rtol=1e-5, atol=1e-5)


def test_compile_options_reach_torch_compile():
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    x_T = torch.randn((B,) + SHAPE)
    out = fastguide.sample(lambda x, t, y: 0.5 * torch.tanh(x), x_T, schedule=Schedule.edm(), sampler="heun",
                           steps=3, compile="inductor", compile_options={"backend": backend},
                           guidance=[DiscriminatorGuidance(lambda x, t, y: (x.flatten(1) ** 2).sum(1), weight=1.0)])
    assert seen and torch.isfinite(out).all()
    # One body per stage kind (Euler stages with and without the discriminator, Heun stages), not per stage.
    assert len(seen) <= 3
    fastguide.native.clear_caches()
