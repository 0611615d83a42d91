"""The fused ops' checks: every bad input raises a clear error naming the argument, before any
kernel runs, and the caller's tensors are left untouched."""

import math

import pytest
import torch

import fastguide
from fastguide.backends import dispatch
from fastguide.core.layout import NUM_COLS


def _args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    m = torch.randn(4, 3, 4, 4, generator=g)
    table = torch.randn(5, NUM_COLS, generator=g)
    return x, m, table


CASES = [
    # (description, kwargs override, error type, text the message must contain)
    ("sample not a tensor", dict(sample=[1.0]), TypeError, "sample"),
    ("integer sample", dict(sample=torch.zeros(2, 3, 4, 4, dtype=torch.int64)), TypeError, "sample"),
    ("B rows with a scale", dict(model_output=torch.randn(2, 3, 4, 4)), ValueError, "model_output"),
    ("2B rows without a scale", dict(scale=None), ValueError, "model_output"),
    ("wrong per-sample shape", dict(model_output=torch.randn(4, 3, 4, 5)), ValueError, "model_output"),
    ("learned variance without 2C", dict(learned_variance=True), ValueError, "model_output"),
    ("negative scale", dict(scale=-1.0), ValueError, "guidance_scale"),
    ("NaN scale", dict(scale=math.nan), ValueError, "guidance_scale"),
    ("negative per-sample scale", dict(scale=torch.tensor([1.0, -2.0])), ValueError, "guidance_scale"),
    ("scale of wrong length", dict(scale=torch.tensor([1.0, 2.0, 3.0])), ValueError, "guidance_scale"),
    ("bool scale", dict(scale=True), TypeError, "guidance_scale"),
    ("rescale > 1", dict(rescale=1.5), ValueError, "guidance_rescale"),
    ("step out of range", dict(step=5), ValueError, "step"),
    ("float step", dict(step=1.0), TypeError, "step"),
    ("float step tensor", dict(step=torch.tensor([1.0])), TypeError, "step"),
    ("table wrong width", dict(table=torch.randn(5, NUM_COLS - 1)), ValueError, "table"),
    ("table fp64", dict(table=torch.randn(5, NUM_COLS, dtype=torch.float64)), ValueError, "table"),
    ("noise of the wrong shape", dict(noise=torch.randn(2, 3, 4)), ValueError, "noise"),
    ("g_score not a tensor", dict(g_score=3.0), TypeError, "g_score"),
    ("clip reversed", dict(clip=(1.0, -1.0)), ValueError, "clip"),
    ("clip and threshold", dict(clip=(-1.0, 1.0), threshold=torch.ones(2)), ValueError, "clip"),
    ("threshold wrong shape", dict(threshold=torch.ones(3)), ValueError, "threshold"),
    ("out of another dtype", dict(out=torch.zeros(2, 3, 4, 4, dtype=torch.float16)), TypeError, "out"),
    ("out of another shape", dict(out=torch.zeros(2, 3, 4, 5)), ValueError, "out"),
    ("x0 only without x0_out", dict(write_out=False), ValueError, "x0_out"),
    ("unknown backend", dict(backend="metal"), ValueError, "backend"),
]


@pytest.mark.parametrize("desc,override,exc,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_leaves_tensors_untouched(desc, override, exc, needle):
    x, m, table = _args()
    out = torch.full_like(x, 7.0)
    kwargs = dict(sample=x, model_output=m, table=table, step=1, scale=2.0, out=out)
    kwargs.update(override)
    before = [t.clone() for t in (x, m, table, out)]
    with pytest.raises(exc, match=needle):
        fastguide.guided_step(**kwargs)
    for t, b in zip((x, m, table, out), before):
        assert torch.equal(t, b)


def test_nan_model_output_is_caught_when_asked():
    x, m, table = _args()
    m[1, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="model_output"):
        fastguide.guided_step(x, m, table, 0, scale=1.0, check_outputs_finite=True)
    # Without the opt-in check the NaN simply propagates (no host sync per call).
    assert torch.isnan(fastguide.guided_step(x, m, table, 0, scale=1.0)).any()


def test_forced_unavailable_backend_says_why(monkeypatch):
    x, m, table = _args()
    monkeypatch.setattr(dispatch, "_cache", {"cuda": (False, "not built with CUDA", None)})
    with pytest.raises(RuntimeError, match="not built with CUDA"):
        fastguide.guided_step(x, m, table, 0, scale=1.0, backend="cuda")


def test_temperature_lse_grad_bad_input():
    logits = torch.randn(3, 5)
    with pytest.raises(ValueError, match="labels"):
        fastguide.temperature_lse_grad(logits, torch.tensor([0, 5, 1]))
    with pytest.raises(TypeError, match="labels"):
        fastguide.temperature_lse_grad(logits, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="logits"):
        fastguide.temperature_lse_grad(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="tau2"):
        fastguide.temperature_lse_grad(logits, torch.tensor([0, 1, 2]), tau2=math.inf)
    with pytest.raises(ValueError, match="scale"):
        fastguide.temperature_lse_grad(logits, torch.tensor([0, 1, 2]), scale=-1.0)
