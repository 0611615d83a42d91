"""Whole loops on a GPU: one CUDA graph equals eager, no host sync in an eager loop, no memory growth.

Skipped without CUDA. ``compile="graph"`` captures the whole loop (model calls with CFG batching,
classifier / discriminator gradients through autograd, noise, fused steps) and must give the eager loop's
samples for the same seed, whichever way the generators are given (``fastguide.cudagraph``).
"""

import pytest
import torch
from torch import nn

import fastguide
from fastguide import CFG, ClassifierGuidance, DiscriminatorGuidance, Schedule
from fastguide import cudagraph

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, SHAPE = 4, (3, 8, 8)
DEV = "cuda"


class EpsNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.emb = nn.Embedding(11, 3)

    def forward(self, x, t, y=None):
        h = torch.tanh(self.conv(x) + (t / 1000.0).reshape(-1, 1, 1, 1))
        if y is not None:
            h = h + 0.1 * self.emb(y).reshape(-1, 3, 1, 1)
        return 0.5 * h


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x, t):
        h = torch.nn.functional.softplus(self.conv(x), beta=3.0).mean(dim=(2, 3))
        return self.head(h) * (1 + t.reshape(-1, 1) / 1000)


def disc(x, t, y=None):
    return 0.05 * (x.flatten(1) ** 2).sum(1) - t


def edm_denoiser(x, sigma, y=None):
    s = sigma.reshape(-1, 1, 1, 1)
    return x / (1 + s * s) + 0.1 * torch.tanh(x)


@pytest.fixture(scope="module")
def nets():
    return EpsNet().to(DEV), Classifier().to(DEV)


def _cases(net, clf):
    return {
        "cfg_ddim_eta": dict(model=net, sampler="ddim", eta=1.0, guidance=[CFG(3.0, null_label=10, rescale=0.5)]),
        "adm_ddpm": dict(model=net, sampler="ddpm", guidance=[ClassifierGuidance(clf, 2.0)]),
        "ma_ddpm": dict(model=net, sampler="ddpm", clip_denoised=(-1, 1),
                        guidance=[ClassifierGuidance(clf, 1.0, input="x0", tau2=0.5, gamma=0.3)]),
        "dg_heun_churn": dict(model=edm_denoiser, sampler="heun", schedule=Schedule.edm(), s_churn=2.0,
                              guidance=[DiscriminatorGuidance(disc, weight=1.0)]),
    }


def _sample(kw, compile, generator, x_T=None, y=None):
    kw = dict(kw)
    model = kw.pop("model")
    schedule = kw.pop("schedule", Schedule.ddpm())
    x_T = torch.randn((B,) + SHAPE, device=DEV, generator=torch.Generator(DEV).manual_seed(9)) if x_T is None else x_T
    y = torch.arange(B, device=DEV) if y is None else y
    return fastguide.sample(model, x_T, schedule=schedule, steps=6, y=y, generator=generator, compile=compile, **kw)


@pytest.mark.parametrize("case", ["cfg_ddim_eta", "adm_ddpm", "ma_ddpm", "dg_heun_churn"])
@pytest.mark.parametrize("gens", ["default", "cuda", "cuda_list", "cpu"])
def test_graph_equals_eager(nets, case, gens):
    kw = _cases(*nets)[case]

    def generator():
        if gens == "default":
            torch.cuda.manual_seed(123)
            return None
        if gens == "cuda":
            return torch.Generator(DEV).manual_seed(123)
        if gens == "cuda_list":
            return [torch.Generator(DEV).manual_seed(s) for s in range(B)]
        return torch.Generator().manual_seed(123)

    eager = _sample(kw, None, generator())
    first = _sample(kw, "graph", generator())   # capture + replay
    again = _sample(kw, "graph", generator())   # replay of the cached graph, fresh generator objects
    torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_graph_advances_the_callers_generator_like_eager(nets):
    kw = _cases(*nets)["cfg_ddim_eta"]
    g_eager, g_graph = torch.Generator(DEV).manual_seed(5), torch.Generator(DEV).manual_seed(5)
    eager = [_sample(kw, None, g_eager) for _ in range(2)]
    graph = [_sample(kw, "graph", g_graph) for _ in range(2)]
    for a, b in zip(graph, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.equal(graph[0], graph[1])
    assert g_graph.get_offset() == g_eager.get_offset()


def test_graph_is_split_invariant_with_per_sample_generators(nets):
    kw = _cases(*nets)["adm_ddpm"]
    x_T = torch.randn((B,) + SHAPE, device=DEV)
    y = torch.arange(B, device=DEV)
    whole = _sample(kw, "graph", [torch.Generator(DEV).manual_seed(s) for s in range(B)], x_T, y)
    halves = [_sample(kw, "graph", [torch.Generator(DEV).manual_seed(s) for s in range(i, i + 2)], x_T[i:i + 2],
                      y[i:i + 2]) for i in (0, 2)]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-4, atol=1e-4)


def test_inductor_equals_eager_on_cuda(nets):
    kw = _cases(*nets)["adm_ddpm"]
    eager = _sample(kw, None, torch.Generator(DEV).manual_seed(1))
    compiled = _sample(kw, "inductor", torch.Generator(DEV).manual_seed(1))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["cfg_ddim_eta", "adm_ddpm", "ma_ddpm", "dg_heun_churn"])
def test_eager_loop_never_syncs(nets, case):
    kw = _cases(*nets)[case]
    x_T = torch.randn((B,) + SHAPE, device=DEV)
    y = torch.arange(B, device=DEV)
    _sample(kw, None, torch.Generator(DEV).manual_seed(0), x_T, y)  # tables copied to the device once
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _sample(kw, None, torch.Generator(DEV).manual_seed(0), x_T, y)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(out).all()


def test_replays_and_recaptures_do_not_grow_memory(nets):
    kw = dict(model=nets[0], sampler="ddim", eta=1.0, guidance=[CFG(2.0, null_label=10)])
    x_T = torch.randn((B,) + SHAPE, device=DEV)
    y = torch.arange(B, device=DEV)
    g = torch.Generator(DEV).manual_seed(0)
    _sample(kw, "graph", g, x_T, y)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for _ in range(1000):
        out = _sample(kw, "graph", g, x_T, y)
    del out
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= base
    for _ in range(1000):
        cudagraph.clear_graph_cache()
        out = _sample(kw, "graph", g, x_T, y)
    del out
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - base
    assert grown <= 1 << 20, f"{grown} bytes more after 1000 captures"
    assert cudagraph.cached_graph_count() == 1


def test_uncapturable_model_gets_an_explanation():
    def syncing(x, t, y=None):
        if float(x.abs().max()) > 1e9:  # a host read: cannot be captured
            return x
        return 0.5 * torch.tanh(x)

    x_T = torch.randn((B,) + SHAPE, device=DEV)
    with pytest.raises(RuntimeError, match="could not capture") as caught:
        fastguide.sample(syncing, x_T, schedule=Schedule.ddpm(), sampler="ddim", steps=3, compile="graph")
    assert "host synchronisation" in str(caught.value) and "compile='inductor'" in str(caught.value)
    # The stream is usable afterwards and eager still works.
    out = fastguide.sample(syncing, x_T, schedule=Schedule.ddpm(), sampler="ddim", steps=3)
    assert torch.isfinite(out).all()
