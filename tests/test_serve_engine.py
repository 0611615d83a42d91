"""The serving engine (``fastguide.serve.Engine``): every request equals its solo ``fastguide.sample`` run
whatever shares its batch, requests join mid-flight, scale-1 CFG costs no uncond rows, and faults stay
with their request (bad fields, a network that raises, NaN samples, cancellation, a full queue, closing)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch

import fastguide
from fastguide.examples import digits
from fastguide.generation.models import ModelSpec
from fastguide.generation.models import digits as digits_spec
from fastguide.serve import Engine, EngineClosed, QueueFull, RequestError, RequestFailed

TOL = 2e-4


@pytest.fixture(scope="module")
def bundle():
    return digits.load()


@pytest.fixture(scope="module")
def spec():
    return digits_spec()


def solo(bundle, request) -> torch.Tensor:
    """The request sampled alone, as the issue defines it (``digits.sample`` for the default sampler)."""
    y = torch.tensor([request.class_label if request.class_label is not None else 0])
    if request.sampler == bundle.sampler:
        return digits.sample(bundle, y, guidance_specs=request.guidance, seed=request.seed, steps=request.steps,
                             unconditional=request.label is None)[0]
    gen = torch.Generator().manual_seed(request.seed)
    x_T = torch.randn((1,) + tuple(bundle.image_shape), generator=gen)
    model = bundle.unconditional_model() if request.label is None else bundle.model
    return fastguide.sample(model, x_T, schedule=bundle.schedule, sampler=request.sampler, steps=request.steps,
                            y=y, guidance=request.guidance, generator=gen, clip_denoised=bundle.clip)[0]


MIXED = [
    {"label": 3, "seed": 1, "steps": 10},
    {"label": 5, "seed": 2, "steps": 7, "guidance": [{"type": "cfg", "scale": 2.0}]},
    {"label": 7, "seed": 3, "steps": 12, "sampler": "ddim",
     "guidance": [{"type": "cfg", "scale": 2.5, "rescale": 0.5, "start": 0.2, "stop": 0.8}]},
    {"label": None, "target": 4, "seed": 4, "steps": 9,
     "guidance": [{"type": "classifier", "network": "noisy_classifier", "scale": 5.0}]},
    {"label": 1, "seed": 5, "steps": 6, "sampler": "heun",
     "guidance": [{"type": "discriminator", "network": "discriminator", "weight": 2.0}]},
    {"label": 2, "seed": 6, "steps": 8, "sampler": "dpmpp_2m",
     "guidance": [{"type": "classifier", "network": "smoothed_clean_classifier", "scale": 0.5, "input": "x0",
                   "tau2": 0.9, "gamma": 0.3}]},
    {"label": 9, "seed": 7, "steps": 11, "sampler": "euler_ancestral", "guidance": [{"type": "cfg", "scale": 3.0}]},
    {"label": 0, "seed": 8, "steps": 5, "sampler": "euler",
     "guidance": [{"type": "cfg", "scale": 1.5}, {"type": "classifier", "network": "noisy_classifier", "scale": 2.0}]},
    {"label": None, "target": 6, "seed": 9, "steps": 10, "sampler": "ddim",
     "guidance": [{"type": "classifier", "network": "clean_classifier", "scale": 1.0, "input": "x0"}]},
    {"label": 8, "seed": 10, "steps": 4, "guidance": [{"type": "cfg", "scale": 1.0}]},
    {"label": 4, "seed": 11, "steps": 9, "sampler": "heun", "guidance": [{"type": "cfg", "scale": 2.0, "stop": 0.5}]},
    {"label": 6, "seed": 12, "steps": 6, "guidance": [
        {"type": "classifier", "network": "noisy_classifier", "scale": 1.0},
        {"type": "discriminator", "network": "discriminator", "weight": 1.0}]},
]


@pytest.mark.parametrize("policy,backend", [("continuous", "auto"), ("continuous", "torch"), ("static", "auto"),
                                            ("sequential", "auto")])
def test_mixed_requests_equal_their_solo_runs(spec, bundle, policy, backend):
    with Engine(spec, max_batch=5, backend=backend, policy=policy) as engine:
        futures = [engine.submit(body) for body in MIXED]
        results = [f.result(timeout=120) for f in futures]
    for body, res in zip(MIXED, results):
        assert res.sample.shape == (1, 8, 8)
        torch.testing.assert_close(res.sample, solo(bundle, res.request), rtol=TOL, atol=TOL, msg=str(body))
    assert engine.metrics.requests["ok"] == len(MIXED)


def test_requests_join_a_running_batch(spec, bundle):
    with Engine(spec, max_batch=4) as engine:
        engine.wait_ready(60)
        first = engine.submit({"label": 1, "seed": 0, "steps": 60, "guidance": [{"type": "cfg", "scale": 2.0}]})
        deadline = time.monotonic() + 30
        while engine.metrics.iterations < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        second = engine.submit({"label": 2, "seed": 1, "steps": 5})
        late = second.result(timeout=60)
        assert not first.done(), "the short request joined the running batch and finished first"
        early = first.result(timeout=60)
    assert engine.metrics.batch_size.count > 0 and engine.metrics.batch_size.counts[1] > 0  # batches of 2
    torch.testing.assert_close(late.sample, solo(bundle, late.request), rtol=TOL, atol=TOL)
    torch.testing.assert_close(early.sample, solo(bundle, early.request), rtol=TOL, atol=TOL)


def test_scale_one_and_out_of_window_requests_cost_no_uncond_rows(spec):
    with Engine(spec, max_batch=1) as engine:
        engine.wait_ready(60)
        rows0 = engine.metrics.model_rows
        engine.submit({"label": 1, "seed": 0, "steps": 8, "guidance": [{"type": "cfg", "scale": 1.0}]}).result(60)
        assert engine.metrics.model_rows - rows0 == 8
        rows1 = engine.metrics.model_rows
        engine.submit({"label": 1, "seed": 0, "steps": 8, "guidance": [{"type": "cfg", "scale": 3.0}]}).result(60)
        assert engine.metrics.model_rows - rows1 == 16
        rows2 = engine.metrics.model_rows
        engine.submit({"label": 1, "seed": 0, "steps": 8,
                       "guidance": [{"type": "cfg", "scale": 3.0, "start": 0.5}]}).result(60)
        assert engine.metrics.model_rows - rows2 == 12
    assert "fastguide_uncond_rows_skipped_total 12" in engine.metrics.prometheus()


def test_a_cancelled_request_leaves_the_batch(spec):
    with Engine(spec, max_batch=4) as engine:
        engine.wait_ready(60)
        doomed = engine.submit({"label": 1, "seed": 0, "steps": 900})
        deadline = time.monotonic() + 30
        while engine.active_count == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert doomed.cancel()
        deadline = time.monotonic() + 30
        while engine.active_count and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.active_count == 0
        assert engine.metrics.iterations < 900
        engine.submit({"label": 2, "seed": 1, "steps": 3}).result(60)  # still serving
    assert engine.metrics.requests["cancelled"] == 1


def _with_network(spec, name, kind, net, model=None):
    networks = dict(spec.networks, **{name: net})
    kinds = dict(spec.network_kinds, **{name: kind})
    return dataclasses.replace(spec, networks=networks, network_kinds=kinds, model=model or spec.model)


def test_a_failing_network_fails_only_the_requests_that_fail_alone(spec, bundle):
    def broken(x, t):
        raise RuntimeError("classifier crashed")

    faulty = _with_network(spec, "broken", "classifier", broken)
    with Engine(faulty, max_batch=4) as engine:
        good = [engine.submit({"label": i, "seed": i, "steps": 6}) for i in range(2)]
        bad = engine.submit({"label": 3, "seed": 3, "steps": 6,
                             "guidance": [{"type": "classifier", "network": "broken", "scale": 1.0}]})
        with pytest.raises(RequestFailed, match="classifier crashed"):
            bad.result(60)
        for f in good:
            res = f.result(60)
            torch.testing.assert_close(res.sample, solo(bundle, res.request), rtol=TOL, atol=TOL)
        engine.submit({"label": 5, "seed": 5, "steps": 2}).result(60)
    assert engine.metrics.requests["failed"] == 1


def test_a_nan_sample_fails_only_its_request(spec):
    model = spec.model

    def nan_for_label_3(x, t, y):
        out = model(x, t, y)
        return torch.where((y == 3).reshape(-1, 1, 1, 1), torch.full_like(out, float("nan")), out)

    with Engine(dataclasses.replace(spec, model=nan_for_label_3), max_batch=4) as engine:
        futures = [engine.submit({"label": i, "seed": i, "steps": 5}) for i in (2, 3, 4)]
        assert futures[0].result(60).sample.isfinite().all()
        with pytest.raises(RequestFailed, match="NaN"):
            futures[1].result(60)
        assert futures[2].result(60).sample.isfinite().all()


@pytest.mark.parametrize("body,field", [
    ({"label": 3}, "seed"),
    ({"label": 3, "seed": -1}, "seed"),
    ({"label": 3, "seed": "1"}, "seed"),
    ({"label": 10, "seed": 1}, "label"),
    ({"label": 2.0, "seed": 1}, "label"),
    ({"label": 3, "seed": 1, "steps": 0}, "steps"),
    ({"label": 3, "seed": 1, "steps": 5000}, "steps"),
    ({"label": 3, "seed": 1, "steps": True}, "steps"),
    ({"label": 3, "seed": 1, "sampler": "plms"}, "sampler"),
    ({"label": 3, "seed": 1, "format": "jpeg"}, "format"),
    ({"label": 3, "seed": 1, "colour": "red"}, "colour"),
    ({"label": 3, "seed": 1, "guidance": {"type": "cfg"}}, "guidance"),
    ({"label": 3, "seed": 1, "guidance": [{"type": "pag"}]}, "guidance[0].type"),
    ({"label": 3, "seed": 1, "guidance": [{"type": "cfg", "scale": -1}]}, "guidance[0].scale"),
    ({"label": 3, "seed": 1, "guidance": [{"type": "cfg", "scale": float("inf")}]}, "guidance[0].scale"),
    ({"label": 3, "seed": 1, "guidance": [{"type": "cfg", "scale": "2"}]}, "guidance[0].scale"),
    ({"label": 3, "seed": 1, "guidance": [{"type": "cfg", "rescale": 1.5}]}, "guidance[0].rescale"),
    ({"label": 3, "seed": 1, "guidance": [{"type": "cfg", "start": 0.6, "stop": 0.5}]}, "guidance[0].stop"),
    ({"label": 3, "seed": 1, "guidance": [{"type": "cfg"}, {"type": "cfg"}]}, "guidance"),
    ({"label": 3, "seed": 1, "guidance": [{"type": "classifier", "network": "imagenet"}]}, "guidance[0].network"),
    ({"label": 3, "seed": 1, "guidance": [{"type": "classifier", "network": "discriminator"}]},
     "guidance[0].network"),
    ({"label": 3, "seed": 1, "guidance": [{"type": "classifier", "network": "model"}]}, "guidance[0].network"),
    ({"label": 3, "seed": 1, "guidance": [{"type": "classifier", "network": "noisy_classifier", "input": "x1"}]},
     "guidance[0].input"),
    ({"label": 3, "seed": 1, "guidance": [{"type": "discriminator", "network": "discriminator", "weight": -2}]},
     "guidance[0].weight"),
    ({"label": None, "seed": 1, "guidance": [{"type": "classifier", "network": "noisy_classifier"}]}, "target"),
    ({"label": None, "seed": 1, "guidance": [{"type": "cfg", "scale": 2.0}]}, "guidance"),
    ({"label": 3, "target": 4, "seed": 1}, "target"),
    ({"label": 3, "seed": 1, "prompt": "a cat"}, "prompt"),
    ([1, 2], "body"),
])
def test_bad_requests_are_refused_naming_the_field(spec, body, field):
    engine = Engine(spec)  # not started: nothing could run
    with pytest.raises(RequestError) as info:
        engine.submit(body)
    assert info.value.field == field
    assert engine.queue_depth == 0


def test_a_full_queue_refuses_with_retry_after_and_drops_nothing(spec, bundle):
    engine = Engine(spec, max_queue=2, max_batch=2)
    accepted = [engine.submit({"label": i, "seed": i, "steps": 3}) for i in range(2)]
    with pytest.raises(QueueFull) as info:
        engine.submit({"label": 5, "seed": 5, "steps": 3})
    assert info.value.retry_after >= 1.0
    engine.start()
    for f in accepted:
        res = f.result(60)
        torch.testing.assert_close(res.sample, solo(bundle, res.request), rtol=TOL, atol=TOL)
    engine.close()
    assert engine.metrics.requests["rejected_full"] == 1 and engine.metrics.requests["ok"] == 2


def test_close_drains_in_flight_requests_and_refuses_new_ones(spec):
    engine = Engine(spec, max_batch=2).start()
    futures = [engine.submit({"label": i, "seed": i, "steps": 10}) for i in range(5)]
    engine.close(drain=True, timeout=120)
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(EngineClosed):
        engine.submit({"label": 1, "seed": 1, "steps": 2})


def test_close_without_drain_fails_what_is_left(spec):
    engine = Engine(spec, max_batch=1)
    futures = [engine.submit({"label": i, "seed": i, "steps": 10}) for i in range(3)]
    engine.close(drain=False)
    for f in futures:
        with pytest.raises(EngineClosed):
            f.result(1)


def test_asyncio_form_and_cancelling_the_awaiting_task(spec, bundle):
    async def main(engine):
        res = await engine.generate({"label": 4, "seed": 2, "steps": 6})
        task = asyncio.ensure_future(engine.generate({"label": 4, "seed": 3, "steps": 900}))
        while engine.active_count == 0:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(2000):
            if engine.active_count == 0:
                break
            await asyncio.sleep(0.005)
        return res

    with Engine(spec, max_batch=2) as engine:
        res = asyncio.run(main(engine))
        assert engine.active_count == 0
    torch.testing.assert_close(res.sample, solo(bundle, res.request), rtol=TOL, atol=TOL)


# ------------------------------------------------------------------------------ a text-conditioned model

def test_prompt_conditioned_unet_equals_its_solo_runs():
    """A tiny diffusers UNet2DConditionModel on prompt embeddings (null embedding for uncond rows)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8).eval().requires_grad_(False)

    def encode(prompt: str) -> torch.Tensor:  # a stand-in text encoder: a fixed embedding per prompt
        return torch.randn(5, 16, generator=torch.Generator().manual_seed(sum(map(ord, prompt))))

    def model(x, t, y):
        return unet(x, t, encoder_hidden_states=y).sample

    null = torch.zeros(5, 16)
    spec = ModelSpec(model=model, schedule=fastguide.Schedule.ddpm(), sample_shape=(4, 8, 8), networks={"unet": unet},
                     null_label=null, sampler="ddim", steps=10, encode_prompt=encode,
                     network_kinds={"unet": "model"})
    bodies = [{"prompt": "a red fox", "seed": 1, "steps": 6, "guidance": [{"type": "cfg", "scale": 4.0}]},
              {"prompt": "a blue bird", "seed": 2, "steps": 4},
              {"prompt": "an owl", "seed": 3, "steps": 5, "sampler": "euler",
               "guidance": [{"type": "cfg", "scale": 2.0, "rescale": 0.7}]}]
    with Engine(spec, max_batch=3) as engine:
        results = [f.result(120) for f in [engine.submit(b) for b in bodies]]
        with pytest.raises(RequestError) as info:
            engine.submit({"label": 3, "seed": 1})
        assert info.value.field == "label"
    for res in results:
        req = res.request
        gen = torch.Generator().manual_seed(req.seed)
        x_T = torch.randn((1, 4, 8, 8), generator=gen)
        expected = fastguide.sample(model, x_T, schedule=spec.schedule, sampler=req.sampler, steps=req.steps,
                                    y=encode(req.prompt)[None], guidance=req.guidance, generator=gen)[0]
        torch.testing.assert_close(res.sample, expected, rtol=1e-4, atol=1e-4)
