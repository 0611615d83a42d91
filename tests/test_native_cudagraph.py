"""``compile="graph"``: the whole loop captured once and replayed gives the eager loop's samples.

``fastguide.native.cudagraph`` captures everything a loop does (model calls with CFG batching, classifier and
discriminator gradients through autograd, noise, fused steps) and replays it on later calls. These tests run
its capture, cache and replay logic in two places:

* ``cpu-replay``, always: ``cudagraph.driver`` is swapped for a CPU stand-in that records the captured ops
  and replays them on the same tensors without running any of the loop's Python, after poisoning what the
  capture produced (``tests/graph_replay_emu.py``). A value baked in at capture instead of read from a
  buffer, a stale input, a counter not reset, a generator not advanced: each gives wrong samples here.
* ``cuda``, when a CUDA device is present: real CUDA graphs (plus the CUDA-only checks in
  ``test_native_loops_cuda.py``: no host sync in an eager loop, no memory growth over 1,000 replays).
"""

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import fastguide
from fastguide import CFG, ClassifierGuidance, DiscriminatorGuidance, Schedule
from fastguide.native import cudagraph
from graph_replay_emu import ReplayDriver
from loop_models import Classifier, EpsNet, disc, edm_denoiser

B, SHAPE, STEPS = 4, (3, 6, 6), 5
WHERE = ["cpu-replay"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass
class Where:
    device: str
    driver: Optional[ReplayDriver]   # the CPU stand-in, None on CUDA

    def generator(self, kind: str, seed: int = 123):
        """A generator argument of ``kind``: 'default' (seeds the device's default generator, returns None),
        'device' (one generator on the sample's device), 'device_list' (one per sample) or 'host' (a CPU
        generator for CUDA samples: noise drawn on the host)."""
        if kind == "default":
            (torch.cuda.manual_seed if self.device == "cuda" else torch.manual_seed)(seed)
            return None
        if kind == "device":
            return torch.Generator(self.device).manual_seed(seed)
        if kind == "device_list":
            return [torch.Generator(self.device).manual_seed(seed + s) for s in range(B)]
        return torch.Generator().manual_seed(seed)


@pytest.fixture(params=WHERE)
def where(request, monkeypatch, one_thread):
    cudagraph.clear_graph_cache()
    driver = None
    if request.param == "cpu-replay":
        driver = ReplayDriver()
        monkeypatch.setattr(cudagraph, "driver", driver)
    yield Where("cuda" if request.param == "cuda" else "cpu", driver)
    cudagraph.clear_graph_cache()


NETS = {}


def nets(device):
    """One set of networks per device (graphs are cached per network object)."""
    if device not in NETS:
        NETS[device] = (EpsNet().to(device), EpsNet(learned=True).to(device), Classifier().to(device))
    return NETS[device]


def case(name: str, device: str) -> dict:
    net, learned_net, clf = nets(device)
    return {
        "cfg_ddim_eta_rescale": dict(model=net, sampler="ddim", eta=1.0,
                                     guidance=[CFG(3.0, null_label=10, rescale=0.5)]),
        "adm_ddpm_learned_range": dict(model=learned_net, sampler="ddpm", guidance=[ClassifierGuidance(clf, 2.0)],
                                       schedule=Schedule.ddpm(variance_type="learned_range")),
        "ma_ddpm_x0_clip": dict(model=net, sampler="ddpm", clip_denoised=(-1, 1),
                                guidance=[ClassifierGuidance(clf, 1.0, input="x0", tau2=0.5, gamma=0.3)]),
        "dpmpp_2m_cfg_adm": dict(model=net, sampler="dpmpp_2m",
                                 guidance=[ClassifierGuidance(clf, 1.0), CFG(2.0, null_label=10)]),
        "dg_heun_churn": dict(model=edm_denoiser, sampler="heun", schedule=Schedule.edm(), s_churn=2.0,
                              guidance=[DiscriminatorGuidance(disc, weight=1.0, weight2=0.5)]),
        "ma_edm_recipe_heun": dict(model=edm_denoiser, sampler="heun", schedule=Schedule.edm(),
                                   guidance=[ClassifierGuidance(clf, 1.0, input="x0")]),
    }[name]


CASES = ["cfg_ddim_eta_rescale", "adm_ddpm_learned_range", "ma_ddpm_x0_clip", "dpmpp_2m_cfg_adm",
         "dg_heun_churn", "ma_edm_recipe_heun"]


def inputs(device, seed=9, batch=B):
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((batch,) + SHAPE, generator=gen).to(device)
    y = torch.randint(0, 5, (batch,), generator=gen).to(device)
    return x_T, y


def sample(kw, compile, generator, x_T, y, **extra):
    kw = dict(kw, **extra)
    model = kw.pop("model")
    schedule = kw.pop("schedule", Schedule.ddpm())
    return fastguide.sample(model, x_T, schedule=schedule, steps=STEPS, y=y, generator=generator, compile=compile,
                            **kw)


def close(a, b, where):
    # The CPU stand-in replays the very ops of the eager loop: bit-exact. CUDA may pick other kernels.
    tol = dict(rtol=0, atol=0) if where.driver else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("gens", ["default", "device", "device_list", "host"])
def test_graph_equals_eager(where, name, gens):
    if gens == "host" and where.device == "cpu":
        pytest.skip("host-drawn noise is the CUDA path for CPU generators")
    kw = case(name, where.device)
    x_T, y = inputs(where.device)
    x_keep, y_keep = x_T.clone(), y.clone()
    eager = sample(kw, None, where.generator(gens), x_T, y)
    first = sample(kw, "graph", where.generator(gens), x_T, y)   # capture, then replay
    again = sample(kw, "graph", where.generator(gens), x_T, y)   # replay, fresh generator objects
    close(first, eager, where)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert torch.isfinite(first).all()
    assert torch.equal(x_T, x_keep) and torch.equal(y, y_keep)   # the caller's inputs are only read
    assert cudagraph.cached_graph_count() == 1
    if where.driver:
        assert len(where.driver.graphs) == 1 and where.driver.graphs[0].replays == 2


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("gens", ["device", "device_list"])
def test_host_drawn_noise_replays_the_eager_draws(where, monkeypatch, name, gens):
    """With CPU generators for CUDA samples, a graph reads noise drawn on the host before each replay, in
    the loop's order (pre-noise and step noise per stage, one draw per sample generator). On the CPU the
    generators are on the sample's device, so that mode is forced here to run its bookkeeping."""
    if where.device == "cuda":
        pytest.skip("on CUDA test_graph_equals_eager covers host draws with real CPU generators")
    monkeypatch.setattr(cudagraph, "generator_mode",
                        lambda generator, device: ("default",) if generator is None else ("host",))
    kw = case(name, where.device)
    x_T, y = inputs(where.device)
    eager = sample(kw, None, where.generator(gens), x_T, y)
    for seed in (123, 123, 77):
        graph = sample(kw, "graph", where.generator(gens, seed), x_T, y)
        close(graph, sample(kw, None, where.generator(gens, seed), x_T, y), where)
    close(sample(kw, "graph", where.generator(gens), x_T, y), eager, where)
    assert cudagraph.cached_graph_count() == 1


@pytest.mark.parametrize("name", ["cfg_ddim_eta_rescale", "adm_ddpm_learned_range", "dg_heun_churn"])
def test_replay_reads_new_inputs_without_running_python(where, name):
    """Later calls with new x_T, labels, seeds (and per-sample CFG scales) replay the one graph: no network
    runs in Python, and the samples are the eager loop's for the new inputs."""
    kw = case(name, where.device)
    net, learned_net, clf = nets(where.device)

    def call(compile, seed):
        x_T, y = inputs(where.device, seed=seed)
        extra = {}
        if name.startswith("cfg"):   # a [B] scale tensor is an input of the graph, like x_T and y
            scale = torch.linspace(0.5, 4.0, B, device=where.device) * seed
            extra = dict(guidance=[CFG(scale, null_label=10, rescale=0.5)])
        return sample(kw, compile, where.generator("device", seed), x_T, y, **extra)

    call("graph", 1)
    for seed in (2, 3):
        calls = (net.calls, learned_net.calls, clf.calls)
        graph = call("graph", seed)
        assert (net.calls, learned_net.calls, clf.calls) == calls, "a replay ran the networks' Python"
        close(graph, call(None, seed), where)
    assert cudagraph.cached_graph_count() == 1


def test_changed_settings_make_new_graphs(where):
    """Settings fixed when a loop is built (CFG rescale, a classifier's scale, eta, steps) are part of the
    cache key: changing one captures a new graph with the new numbers, never replays a stale one."""
    net, _, clf = nets(where.device)
    x_T, y = inputs(where.device)
    variants = [
        dict(sampler="ddim", eta=1.0, guidance=[CFG(3.0, null_label=10, rescale=0.5), ClassifierGuidance(clf, 2.0)]),
        dict(sampler="ddim", eta=1.0, guidance=[CFG(3.0, null_label=10, rescale=0.2), ClassifierGuidance(clf, 2.0)]),
        dict(sampler="ddim", eta=1.0, guidance=[CFG(3.0, null_label=10, rescale=0.2), ClassifierGuidance(clf, 0.5)]),
        dict(sampler="ddim", eta=0.3, guidance=[CFG(3.0, null_label=10, rescale=0.2), ClassifierGuidance(clf, 0.5)]),
    ]
    outs = []
    for k, kw in enumerate(variants):
        kw = dict(kw, model=net)
        graph = sample(kw, "graph", where.generator("device"), x_T, y)
        close(graph, sample(kw, None, where.generator("device"), x_T, y), where)
        assert all(not torch.equal(graph, o) for o in outs)
        outs.append(graph)
        assert cudagraph.cached_graph_count() == min(k + 1, cudagraph.GRAPH_CACHE_SIZE)


def test_graph_advances_the_callers_generator_like_eager(where):
    kw = case("cfg_ddim_eta_rescale", where.device)
    x_T, y = inputs(where.device)
    g_eager, g_graph = where.generator("device", 5), where.generator("device", 5)
    eager = [sample(kw, None, g_eager, x_T, y) for _ in range(2)]
    graph = [sample(kw, "graph", g_graph, x_T, y) for _ in range(2)]
    for a, b in zip(graph, eager):
        close(a, b, where)
    assert not torch.equal(graph[0], graph[1])
    assert torch.equal(g_graph.get_state(), g_eager.get_state())


def test_default_generator_advances_like_eager(where):
    kw = case("cfg_ddim_eta_rescale", where.device)
    x_T, y = inputs(where.device)
    where.generator("default", 7)
    eager = [sample(kw, None, None, x_T, y) for _ in range(2)]
    where.generator("default", 7)
    graph = [sample(kw, "graph", None, x_T, y) for _ in range(2)]
    for a, b in zip(graph, eager):
        close(a, b, where)


def test_graph_is_split_invariant_with_per_sample_generators(where):
    kw = case("adm_ddpm_learned_range", where.device)
    x_T, y = inputs(where.device)

    def gens(lo, hi):
        return [torch.Generator(where.device).manual_seed(s) for s in range(lo, hi)]
    whole = sample(kw, "graph", gens(0, B), x_T, y)
    halves = [sample(kw, "graph", gens(i, i + 2), x_T[i:i + 2], y[i:i + 2]) for i in (0, 2)]
    close(torch.cat(halves), whole, where)
    assert cudagraph.cached_graph_count() == 2   # batch 4 and batch 2


def test_cache_hits_misses_and_eviction(where):
    kw = case("cfg_ddim_eta_rescale", where.device)
    x_T, y = inputs(where.device)
    sample(kw, "graph", None, x_T, y)
    sample(dict(kw, schedule=Schedule.ddpm()), "graph", None, x_T, y)   # an equal schedule rebuilt: a hit
    assert cudagraph.cached_graph_count() == 1
    for batch in (1, 2, 3, 5):   # new shapes: new graphs, the oldest evicted beyond GRAPH_CACHE_SIZE
        xb, yb = inputs(where.device, batch=batch)
        out = sample(kw, "graph", where.generator("device"), xb, yb)
        close(out, sample(kw, None, where.generator("device"), xb, yb), where)
    assert cudagraph.cached_graph_count() == cudagraph.GRAPH_CACHE_SIZE
    if where.driver:
        assert where.driver.graphs[0].was_reset and not where.driver.graphs[-1].was_reset
    cudagraph.clear_graph_cache()
    assert cudagraph.cached_graph_count() == 0
    if where.driver:
        assert all(g.was_reset for g in where.driver.graphs)


def test_uncapturable_model_gets_an_explanation(where):
    def syncing(x, t, y=None):
        if float(x.abs().max()) > 1e9:  # a host read: cannot be captured
            return x
        return 0.5 * torch.tanh(x)

    x_T, _ = inputs(where.device)
    keep = x_T.clone()
    with pytest.raises(RuntimeError, match="could not capture") as caught:
        fastguide.sample(syncing, x_T, schedule=Schedule.ddpm(), sampler="ddim", steps=3, compile="graph")
    assert "host synchronisation" in str(caught.value) and "compile='inductor'" in str(caught.value)
    assert cudagraph.cached_graph_count() == 0 and torch.equal(x_T, keep)
    # Eager still works afterwards (on CUDA: the stream is usable again).
    out = fastguide.sample(syncing, x_T, schedule=Schedule.ddpm(), sampler="ddim", steps=3)
    assert torch.isfinite(out).all()


def test_the_stand_in_catches_a_stale_input(monkeypatch, one_thread):
    """The CPU stand-in is sensitive: a graph that forgot to copy a new x_T into its buffer gives the old
    samples, and the comparison with eager fails."""
    cudagraph.clear_graph_cache()
    monkeypatch.setattr(cudagraph, "driver", ReplayDriver())
    real_fill = cudagraph._fill

    def fill_without_x(entry, spec, x_T, *rest):
        keep = entry.x_T.clone()
        real_fill(entry, spec, x_T, *rest)
        entry.x_T.copy_(keep)
    monkeypatch.setattr(cudagraph, "_fill", fill_without_x)
    kw = case("cfg_ddim_eta_rescale", "cpu")
    for seed, expect_equal in ((1, True), (2, False)):
        x_T, y = inputs("cpu", seed=seed)
        graph = sample(kw, "graph", torch.Generator().manual_seed(0), x_T, y)
        eager = sample(kw, None, torch.Generator().manual_seed(0), x_T, y)
        assert torch.equal(graph, eager) == expect_equal
    cudagraph.clear_graph_cache()
