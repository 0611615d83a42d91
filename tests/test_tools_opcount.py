"""Ops dispatched by one drop-in step, counted with a TorchDispatchMode (``fastguide.tools.opcount``).

A deterministic CFG + DDIM ``fastguide.step`` is the fused kernel and its output allocation: 2 launches; a
stochastic one adds the noise draw. The diffusers path (chunk, CFG combine, ``DDIMScheduler.step``) is
counted and printed beside it.
"""

import pytest
import torch
from diffusers import DDIMScheduler

import fastguide
from fastguide.tools.opcount import OpCounter, SYNC_OPS


def _setup(eta=0.0):
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    noise_pred = torch.randn(4, 4, 16, 16, generator=g)
    return scheduler, x, noise_pred, scheduler.timesteps[7]


def _diffusers_ops(scheduler, x, noise_pred, t, **kw):
    with OpCounter() as counter:
        uncond, cond = noise_pred.chunk(2)
        scheduler.step(uncond + 7.5 * (cond - uncond), t, x, **kw)
    return counter


def test_opcounter_sees_direct_kernels_and_aten_ops():
    scheduler, x, noise_pred, t = _setup()
    fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=7.5)  # tables built, caches warm
    with OpCounter() as counter:
        fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=7.5)
    assert "fastguide.guided_step" in counter.names
    # The reference backend runs the step as aten ops: the counter sees them and the kernel's name.
    with OpCounter() as reference:
        fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=7.5, backend="torch")
    assert reference.count > 10 and "fastguide.guided_step" in reference.names


@pytest.mark.parametrize("backend", ["auto", "cpp"])
def test_deterministic_cfg_ddim_step_dispatches_at_most_two_ops(backend):
    if not fastguide.backends()["cpp"] and backend == "cpp":
        pytest.skip("C++ backend not built")
    scheduler, x, noise_pred, t = _setup()
    fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=7.5, backend=backend)
    with OpCounter() as ours:
        fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=7.5, backend=backend)
    theirs = _diffusers_ops(scheduler, x, noise_pred, t)
    print(f"\nCFG+DDIM step, ops dispatched: fastguide {ours.count} {ours.names}; diffusers {theirs.count}")
    assert ours.count <= 2, ours.names
    assert sorted(ours.names) == ["aten.empty_like.default", "fastguide.guided_step"]
    assert not ours.syncs()
    assert theirs.count > ours.count


def test_stochastic_ddim_step_adds_one_rng_op():
    scheduler, x, noise_pred, t = _setup()
    g = torch.Generator().manual_seed(1)
    fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=7.5, eta=1.0, generator=g)
    with OpCounter() as ours:
        fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=7.5, eta=1.0, generator=g)
    theirs = _diffusers_ops(scheduler, x, noise_pred, t, eta=1.0, generator=g)
    print(f"\nstochastic CFG+DDIM step, ops dispatched: fastguide {ours.count} {ours.names}; "
          f"diffusers {theirs.count}")
    assert ours.count <= 3, ours.names
    assert sum(name.startswith("aten.randn") for name in ours.names) == 1


def test_out_aliasing_sample_needs_no_allocation():
    scheduler, x, noise_pred, t = _setup()
    latents = x.clone()
    fastguide.step(noise_pred, t, latents, scheduler=scheduler, guidance_scale=7.5, out=latents)
    with OpCounter() as ours:
        fastguide.step(noise_pred, t, latents, scheduler=scheduler, guidance_scale=7.5, out=latents)
    assert ours.names == ["fastguide.guided_step"]


def test_sync_ops_are_flagged():
    with OpCounter() as counter:
        torch.ones(3).sum().item()
        torch.tensor([1, 0, 2]).nonzero()
    assert counter.syncs() == ["aten._local_scalar_dense.default", "aten.nonzero.default"]
    assert counter.host_values() == ["aten.lift_fresh.default"]
    assert "aten.item.default" in SYNC_OPS
