"""``fastguide.step`` with a diffusers scheduler inside ``torch.compile(fullgraph=True)``: no graph break,
and one graph for the whole loop.

DDPM/DDIM find the timestep's row on the device. Index-based schedulers (Euler, Euler ancestral,
DPM-Solver++) take the step index from fastguide's own counter, which dynamo traces as a symbolic integer,
so the loop does not compile a graph per step (dynamo specialises on integers read from globals, and with
``fullgraph=True`` a graph per step fails hard at its recompile limit of 8). Noise comes in as ``noise=``,
drawn outside like the eager loop draws it.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)

import fastguide

STEPS = 12  # more than dynamo's recompile limit (8): a graph per step would fail with fullgraph=True
GRAPHS_3M = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def unet(x, t):
    return 0.5 * torch.tanh(x) + t.float().reshape(-1)[0] / 2000 * x


_GLOBAL_SCHEDULER = None   # the scheduler as a global, as in a script


def _loop(scheduler_cls, compiled: bool, where: str = "global", loops: int = 2, **config):
    """``loops`` sampling loops (set_timesteps, prepare, steps) through one compiled function; returns the
    last loop's samples, the graphs compiled after each loop and the scheduler."""
    global _GLOBAL_SCHEDULER
    scheduler = _GLOBAL_SCHEDULER = scheduler_cls(num_train_timesteps=1000, **config)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    weights = torch.tensor([1.0, 1.0, 1.2, 1.2]).reshape(4, 1, 1, 1)

    def denoise_closure(x, t, z):
        noise_pred = unet(torch.cat([x, x]), t) * weights  # [uncond; cond]
        return fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=3.0, noise=z)

    def denoise_global(x, t, z):
        noise_pred = unet(torch.cat([x, x]), t) * weights
        return fastguide.step(noise_pred, t, x, scheduler=_GLOBAL_SCHEDULER, guidance_scale=3.0, noise=z)

    denoise = denoise_global if where == "global" else denoise_closure
    # A fresh code object per test: dynamo's cache (and recompile limit) is per code object.
    fn = torch.compile(type(denoise)(denoise.__code__.replace(), denoise.__globals__, None, None,
                                     denoise.__closure__), backend=counter, fullgraph=True) if compiled else denoise
    graphs = []
    for _ in range(loops):
        scheduler.set_timesteps(STEPS)
        if compiled:
            fastguide.dropin.prepare(scheduler)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 4, 4, generator=g)
        for t in scheduler.timesteps:
            x = fn(x, t, torch.randn(x.shape, generator=g))
        graphs.append(counter.frame_count)
    return x, graphs, scheduler


@pytest.mark.parametrize("cls,config,graphs,where", [
    (DDIMScheduler, dict(clip_sample=True), 1, "global"),
    (DDPMScheduler, dict(variance_type="fixed_small"), 1, "global"),
    (EulerDiscreteScheduler, {}, 1, "global"),
    (EulerDiscreteScheduler, {}, 1, "closure"),
    (EulerAncestralDiscreteScheduler, {}, 1, "global"),
    # DPM-Solver++ 2M: first step (no previous x0), second (lower_order_nums 1), the rest, the final step.
    (DPMSolverMultistepScheduler, {}, 4, "global"),
    # DPM-Solver++ 3M: orders 1, 2 and 3 while warming up (lower_order_nums 0, 1, 2), the third-order middle,
    # the second-order step before the last (under 15 steps), the first-order final step.
    (DPMSolverMultistepScheduler, dict(solver_order=3), GRAPHS_3M, "global"),
])
def test_compiled_dropin_step_has_no_graph_break_and_matches_eager(cls, config, graphs, where):
    eager, _, eager_scheduler = _loop(cls, False, where, **config)
    compiled, frames, scheduler = _loop(cls, True, where, **config)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert frames == [graphs, graphs], "graphs compiled after each of two loops"
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


def test_prepare_alone_is_enough_in_a_fresh_process():
    """Nothing else has run: prepare() must leave nothing untraceable (e.g. importing a backend) to the first
    compiled call."""
    code = (
        "import torch, fastguide\n"
        "from diffusers import EulerDiscreteScheduler\n"
        "s = EulerDiscreteScheduler(num_train_timesteps=1000)\n"
        "s.set_timesteps(10)\n"
        "fastguide.dropin.prepare(s)\n"
        "f = torch.compile(lambda x, t, z: fastguide.step(torch.cat([x, x]) * 0.5, t, x, scheduler=s,\n"
        "                  guidance_scale=3.0, noise=z), backend='eager', fullgraph=True)\n"
        "x = torch.randn(1, 2, 3, 3)\n"
        "for t in s.timesteps:\n"
        "    x = f(x, t, torch.randn_like(x))\n"
        "assert s.step_index == 10 and torch.isfinite(x).all()\n"
        "print('ok')\n")
    env = dict(os.environ, TORCH_COMPILE_DYNAMIC_SOURCES="L\\['unrelated'\\]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler])
def test_prepare_on_index_less_cuda_serves_compiled_cuda_steps(cls):
    """``prepare(scheduler, "cuda")`` with the scheduler's timesteps on the CPU: the tables must be cached for the
    device the samples live on (``cuda:<current>``; ``torch.device("cuda") != torch.device("cuda:0")``), so the
    compiled step finds them instead of failing with "prepare"."""
    scheduler = cls(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    fastguide.dropin.prepare(scheduler, "cuda")

    def denoise(x, t, z):
        return fastguide.step(unet(torch.cat([x, x]), t), t, x, scheduler=scheduler, guidance_scale=3.0, noise=z)

    fn = torch.compile(denoise, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 4, 4, device="cuda")
    for t in scheduler.timesteps:
        x = fn(x, t.to("cuda") if cls is DDIMScheduler else t, torch.randn_like(x))
    assert torch.isfinite(x).all()


def test_compiled_euler_without_scale_model_input_logs_nothing_and_does_not_break():
    """diffusers' scale_model_input warning is logged by eager calls only: a log call inside the compiled step
    would break the graph (fullgraph=True would fail)."""
    import logging
    records = []

    class Handler(logging.Handler):
        def emit(self, record):
            records.append(record)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(4)
    fastguide.dropin.prepare(scheduler)
    fn = torch.compile(lambda x, t, z: fastguide.step(unet(torch.cat([x, x]), t), t, x, scheduler=scheduler,
                                                      guidance_scale=3.0, noise=z), backend="eager", fullgraph=True)
    handler = Handler()
    logging.getLogger("diffusers").addHandler(handler)
    try:
        x = torch.randn(2, 3, 4, 4)
        for t in scheduler.timesteps:
            x = fn(x, t, torch.randn_like(x))
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert torch.isfinite(x).all() and scheduler.step_index == 4
    assert not [r for r in records if "scale_model_input" in r.getMessage()]
