"""``fastguide.step`` with a diffusers scheduler inside ``torch.compile(fullgraph=True)``: no graph break.

DDPM/DDIM find the timestep's row on the device, so one graph serves every step; index-based schedulers
(Euler, Euler ancestral, DPM-Solver++) read their Python step counter, on which dynamo specialises (one
graph per step, still no break). Noise comes in as ``noise=``, drawn outside like the eager loop draws it.
"""

import pytest
import torch
import torch._dynamo.testing
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)

import fastguide

STEPS = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def unet(x, t):
    return 0.5 * torch.tanh(x) + t.float().reshape(-1)[0] / 2000 * x


def _loop(scheduler_cls, compiled: bool, **config):
    scheduler = scheduler_cls(num_train_timesteps=1000, **config)
    scheduler.set_timesteps(STEPS)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    if compiled:
        fastguide.dropin.prepare(scheduler)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
    weights = torch.tensor([1.0, 1.0, 1.2, 1.2]).reshape(4, 1, 1, 1)

    def denoise(x, t, z):
        noise_pred = unet(torch.cat([x, x]), t) * weights  # [uncond; cond]
        return fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=3.0, noise=z)

    # A fresh code object per loop: dynamo's cache (and recompile limit) is per code object.
    fn = torch.compile(type(denoise)(denoise.__code__.replace(), denoise.__globals__, None, None,
                                     denoise.__closure__), backend=counter, fullgraph=True) if compiled else denoise
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for t in scheduler.timesteps:
        x = fn(x, t, torch.randn(x.shape, generator=g))
    return x, counter.frame_count, scheduler


@pytest.mark.parametrize("cls,config,graphs", [
    (DDIMScheduler, dict(clip_sample=True), 1),
    (DDPMScheduler, dict(variance_type="fixed_small"), 1),
    (EulerDiscreteScheduler, {}, STEPS),
    (EulerAncestralDiscreteScheduler, {}, STEPS),
    (DPMSolverMultistepScheduler, {}, STEPS),
])
def test_compiled_dropin_step_has_no_graph_break_and_matches_eager(cls, config, graphs):
    eager, _, eager_scheduler = _loop(cls, False, **config)
    compiled, frames, scheduler = _loop(cls, True, **config)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert frames == graphs
    assert getattr(scheduler, "step_index", None) == getattr(eager_scheduler, "step_index", None)  # state advanced


def test_compiled_dropin_without_prepared_tables_says_what_to_do():
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)  # no prepare(), no eager call

    def denoise(x, t):
        return fastguide.step(unet(torch.cat([x, x]), t), t, x, scheduler=scheduler, guidance_scale=3.0)

    with pytest.raises(Exception, match="prepare"):
        torch.compile(denoise, backend="eager", fullgraph=True)(torch.randn(2, 3, 4, 4), scheduler.timesteps[0])


def test_compiled_dropin_rejects_a_generator_and_names_noise():
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    fastguide.dropin.prepare(scheduler, eta=1.0)
    g = torch.Generator().manual_seed(0)

    def denoise(x, t):
        return fastguide.step(unet(torch.cat([x, x]), t), t, x, scheduler=scheduler, guidance_scale=3.0, eta=1.0,
                              generator=g)

    with pytest.raises(Exception, match="noise="):
        torch.compile(denoise, backend="eager", fullgraph=True)(torch.randn(2, 3, 4, 4), scheduler.timesteps[0])
