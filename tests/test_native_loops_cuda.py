"""Whole loops on a GPU: no host sync in an eager loop, inductor equals eager, no memory growth over replays.

Skipped without CUDA. Graph capture equals eager (on CUDA, and on the CPU through a stand-in for the CUDA
runtime) is tested in ``test_native_cudagraph.py``.
"""

import pytest
import torch

import fastguide
from fastguide import CFG, ClassifierGuidance, DiscriminatorGuidance, Schedule
from fastguide.native import cudagraph
from loop_models import Classifier, EpsNet, disc, edm_denoiser

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, SHAPE = 4, (3, 8, 8)
DEV = "cuda"


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
