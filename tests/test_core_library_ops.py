"""The fused ops as torch.library custom ops: opcheck, and torch.compile(fullgraph=True) without breaks."""

import pytest
import torch
from torch.library import opcheck

import fastguide
from fastguide.core.layout import NUM_COLS


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 5, 4, generator=g)
    m = torch.randn(2 * batch, 3, 5, 4, generator=g)
    table = torch.randn(6, NUM_COLS, generator=g)
    return x, m, table, g


def test_opcheck_guided_step():
    x, m, table, g = _inputs()
    scale = torch.rand(2, generator=g) * 4
    extras = [torch.randn(x.shape, generator=g) for _ in range(4)]
    opcheck(torch.ops.fastguide.guided_step.default,
            (x, m, table, 3, None, scale, torch.rand(2, generator=g) + 0.5, *extras, 1, -0.5, 0.5, None, False,
             True, True, "torch"))
    opcheck(torch.ops.fastguide.guided_step.default,
            (x, m[:2], table, 0, torch.tensor([4]), None, None, None, None, None, None, 0, -1.0, 1.0, None, False,
             False, True, "torch"))


def test_opcheck_small_ops():
    x, m, _, g = _inputs()
    opcheck(torch.ops.fastguide.cfg_rescale_factor.default, (m, torch.rand(2, generator=g), 0.7, False, "torch"))
    logits = torch.randn(3, 11, generator=g)
    opcheck(torch.ops.fastguide.temperature_lse_grad.default,
            (logits, torch.tensor([0, 4, 10]), 1.0, 0.5, torch.rand(3, generator=g), "torch"))
    opcheck(torch.ops.fastguide.per_sample_rms.default, (x, "torch"))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_compiled_step_has_no_graph_break_and_matches_eager(backend):
    x, m, table, g = _inputs(1)
    scale = torch.rand(2, generator=g) * 5
    noise = torch.randn(x.shape, generator=g)

    def step(x, m, step_index):
        x0 = torch.empty_like(x)
        out = fastguide.guided_step(x, m, table, step_index, scale=scale, rescale=0.3, noise=noise,
                                    x0_out=x0, backend=backend)
        return out, x0

    eager = step(x, m, 2)
    compiled = torch.compile(step, fullgraph=True)(x, m, torch.tensor([2]))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_compiled_guidance_helpers_match_eager():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 9, generator=g)
    labels = torch.tensor([1, 8, 0, 3])
    x = torch.randn(4, 2, 3, generator=g)

    def f(logits, x):
        return (fastguide.temperature_lse_grad(logits, labels, 1.0, 0.5, scale=2.0),
                fastguide.per_sample_rms(x))

    for a, b in zip(f(logits, x), torch.compile(f, fullgraph=True)(logits, x)):
        torch.testing.assert_close(b, a)
