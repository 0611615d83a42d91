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
    # write_out2: the result twice, stacked, from one kernel pass.
    for backend in ("torch", "auto"):
        opcheck(torch.ops.fastguide.guided_step.default,
                (x, m, table, 2, None, scale, None, extras[0], None, extras[2], None, 0, -1.0, 1.0, None, False,
                 True, True, backend, True))
    res, _ = torch.ops.fastguide.guided_step(x, m, table, 2, None, scale, None, None, None, None, None, 0, -1.0,
                                             1.0, None, False, True, False, "auto", True)
    single, _ = torch.ops.fastguide.guided_step(x, m, table, 2, None, scale, None, None, None, None, None, 0,
                                                -1.0, 1.0, None, False, True, False, "auto")
    assert res.shape == (4,) + x.shape[1:] and torch.equal(res[:2], single) and torch.equal(res[2:], single)


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


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_compiled_step_with_out2_matches_eager(backend):
    """run_step with a second destination traces (the doubled op, copied into out and out2) and writes the
    same as the eager kernel; x0_out = out2 holds the result there too."""
    from fastguide.core.args import StepArgs
    from fastguide.core.ops import run_step
    x, m, table, g = _inputs(4)
    scale = torch.rand(2, generator=g) * 5

    def step(x, m, step_index):
        pair = x.new_empty((4,) + x.shape[1:])
        lower, upper = pair[:2], pair[2:]
        run_step(StepArgs(x, m, table, step_index, scale=scale, out=lower, out2=upper), backend)
        both = torch.empty_like(x)
        run_step(StepArgs(x, m, table, step_index, scale=scale, out2=both, x0_out=both), backend)
        return pair, both

    eager = step(x, m, torch.tensor([2]))
    assert torch.equal(eager[0][:2], eager[0][2:]) and torch.equal(eager[1], eager[0][:2])
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
