"""Triton kernels against the torch reference: the Triton-specific cases.

Block and chunk boundaries (launchers called with small blocks so a few hundred elements cross several),
reductions that need their combine pass, K across blocks, row strides, stride-0 scales, device step
indices, non-contiguous coefficient tables, grid row slicing, aliasing and constexpr-gated inputs. Runs
on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (which has no bf16, so bf16 is tested on CUDA only).
Outputs handed to the kernels are poisoned with NaN first, so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import fastguide
from fastguide.backends import reference
from fastguide.backends.rows import as_rows
from fastguide.core.args import StepArgs
from fastguide.core.layout import CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD, NUM_COLS, Col

_why_not = fastguide.backends(reasons=True)["triton"]
pytestmark = pytest.mark.skipif(bool(_why_not), reason=f"triton backend unavailable: {_why_not}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _kernels():
    # Imported lazily: the module-level skip must run before triton decorates anything.
    from fastguide.kernels import cfg_rescale_factor, guided_step, per_sample_rms, temperature_lse_grad
    return guided_step, cfg_rescale_factor, temperature_lse_grad, per_sample_rms


def _gram_kernels():
    from fastguide.kernels import guidance_gram
    return guidance_gram


def randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, device="cpu").to(device=DEVICE, dtype=dtype)


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


def random_table(steps: int, gen: torch.Generator) -> torch.Tensor:
    """Random coefficients; the learned-range log variances in ADM's range (log beta ~ -10 .. -2)."""
    table = torch.randn(steps, NUM_COLS, generator=gen)
    table[:, Col.LV_MIN] = -10.0 + 5.0 * torch.rand(steps, generator=gen)
    table[:, Col.LV_MAX] = table[:, Col.LV_MIN] + 3.0 * torch.rand(steps, generator=gen)
    return table.to(DEVICE)


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


# ---------------------------------------------------------------------------------------------- guided step

def _step_inputs(batch, shape, dtype, gen, *, cfg=True, learned_variance=False, full=True):
    x = randn(batch, *shape, dtype=dtype, gen=gen)
    mo_shape = (shape[0] * (2 if learned_variance else 1),) + tuple(shape[1:])
    mo = randn(2 * batch if cfg else batch, *mo_shape, dtype=dtype, gen=gen)
    extra = {}
    if cfg:
        extra["scale"] = (1.0 + 7.0 * torch.rand(batch, generator=gen)).to(DEVICE)
    if full:
        for name in ("g_score", "g_mean", "noise", "x0_prev", "x0_prev2"):
            extra[name] = randn(batch, *shape, dtype=dtype, gen=gen)
    return x, mo, extra


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("clip_mode", [CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD])
@pytest.mark.parametrize("learned_variance", [False, True])
@pytest.mark.parametrize("step_kind", ["int", "int64 tensor", "int32 tensor"])
@pytest.mark.parametrize("features", ["minimal", "full", "x0 only"])
def test_step_feature_matrix(dtype, clip_mode, learned_variance, step_kind, features):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, clip_mode, learned_variance, step_kind, features)).encode()))
    batch, shape = 3, (3, 5, 7)
    x, mo, extra = _step_inputs(batch, shape, dtype, gen, learned_variance=learned_variance,
                                full=features != "minimal")
    table = random_table(6, gen)
    step = 4 if step_kind == "int" else torch.tensor(
        [4], dtype=torch.int64 if step_kind == "int64 tensor" else torch.int32, device=DEVICE)
    kwargs = dict(extra, learned_variance=learned_variance)
    if features == "full":
        kwargs["rescale"] = 0.7
    if clip_mode == CLIP_RANGE:
        kwargs["clip"] = (-0.8, 1.3)
    elif clip_mode == CLIP_THRESHOLD:
        kwargs["threshold"] = (1.0 + torch.rand(batch, generator=gen)).to(DEVICE)
    write_out = features != "x0 only"
    outs = {}
    for backend in ("triton", "torch"):
        out = poisoned(x) if write_out else None
        x0 = poisoned(x)
        ret = fastguide.guided_step(x, mo, table, step, **kwargs, out=out, x0_out=x0, write_out=write_out,
                                    backend=backend)
        assert ret is out
        outs[backend] = (out, x0)
    assert_close(outs["triton"][1], outs["torch"][1], dtype)
    if write_out:
        assert_close(outs["triton"][0], outs["torch"][0], dtype)


def _reference_rows(x, mo, table, step, kwargs, learned_variance=False, clip_mode=CLIP_NONE):
    out = torch.empty_like(x, dtype=torch.float32)
    x0 = torch.empty_like(x, dtype=torch.float32)
    reference.guided_step(StepArgs(x, mo, table, step, **kwargs, clip_mode=clip_mode,
                                   learned_variance=learned_variance, out=out, x0_out=x0))
    return out, x0


@pytest.mark.parametrize("n", [1, 127, 128, 129, 383, 384, 385])
@pytest.mark.parametrize("learned_variance", [False, True])
def test_step_block_boundaries(n, learned_variance):
    """n around multiples of a 128-element block: masks of the last chunk, variance offset by n."""
    guided_step, *_ = _kernels()
    gen = torch.Generator().manual_seed(n + 1000 * learned_variance)
    batch = 2
    x = randn(batch, n, gen=gen)
    mo = randn(2 * batch, 2 * n if learned_variance else n, gen=gen)
    kwargs = dict(scale=(1 + torch.rand(batch, generator=gen)).to(DEVICE), mfactor=(0.5 + torch.rand(
        batch, generator=gen)).to(DEVICE))
    for name in ("g_score", "g_mean", "noise", "x0_prev", "x0_prev2"):
        kwargs[name] = randn(batch, n, gen=gen)
    table = random_table(3, gen)
    out, x0 = poisoned(x), poisoned(x)
    guided_step.guided_step(StepArgs(x, mo, table, 1, **kwargs, learned_variance=learned_variance,
                                     clip_mode=CLIP_RANGE, clip_lo=-1.0, clip_hi=1.0, out=out, x0_out=x0), block=128)
    want_out, want_x0 = _reference_rows(x, mo, table, 1, dict(kwargs, clip_lo=-1.0, clip_hi=1.0),
                                        learned_variance, CLIP_RANGE)
    assert_close(out, want_out, torch.float32)
    assert_close(x0, want_x0, torch.float32)


def test_step_default_block_spans_chunks():
    """A row longer than the default block (several programs per row on the chunk axis)."""
    gen = torch.Generator().manual_seed(7)
    batch, n = 2, 2048 * 2 + 3
    x, mo, extra = _step_inputs(batch, (n,), torch.float32, gen)
    table = random_table(2, gen)
    got = fastguide.guided_step(x, mo, table, 1, **extra, clip=(-2, 2), backend="triton")
    want = fastguide.guided_step(x, mo, table, 1, **extra, clip=(-2, 2), backend="torch")
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("scale_kind", ["strided", "stride 0", "float"])
def test_step_row_views_and_strided_vectors(scale_kind):
    """Row-strided views stay views (the kernel takes row strides), permuted ones are copied; a per-sample
    scale may be strided or a stride-0 broadcast; the table may be strided in both dimensions."""
    gen = torch.Generator().manual_seed(3)
    batch, c, h, w = 3, 4, 5, 6
    x_big = randn(2 * batch, c, h, w, gen=gen)
    x = x_big[::2]                                          # batch slice: row stride 2n
    mo_big = randn(2 * batch, c + 1, h, w, gen=gen)
    mo = mo_big[:, :c]                                      # channel slice: rows contiguous, stride (c+1)hw
    g = randn(batch, h, w, c, gen=gen).permute(0, 3, 1, 2)  # channels-last: inner stride != 1, copied
    noise = randn(batch, c, h, w + 2, gen=gen)[..., 1:-1]
    assert as_rows(x).data_ptr() == x.data_ptr() and as_rows(mo).data_ptr() == mo.data_ptr()
    table_t = random_table(5, gen).t().contiguous().t()     # row stride 1, column stride 5
    scale = {"strided": (1 + torch.rand(2 * batch, generator=gen)).to(DEVICE)[::2],
             "stride 0": torch.tensor(3.5, device=DEVICE), "float": 2.5}[scale_kind]
    kwargs = dict(scale=scale, g_score=g, noise=noise, threshold=torch.full((batch,), 1.5, device=DEVICE))
    got = fastguide.guided_step(x, mo, table_t, 2, **kwargs, backend="triton")
    want = fastguide.guided_step(x, mo, table_t, 2, **kwargs, backend="torch")
    assert_close(got, want, torch.float32)


def test_step_mixed_input_dtypes():
    """Each input is read in its own dtype and the output written in the sample's."""
    gen = torch.Generator().manual_seed(11)
    batch, shape = 2, (3, 9)
    x = randn(batch, *shape, dtype=torch.float16, gen=gen)
    mo = randn(2 * batch, *shape, dtype=torch.float32, gen=gen)
    noise = randn(batch, *shape, dtype=torch.float64, gen=gen)
    g = randn(batch, *shape, dtype=torch.float16, gen=gen)
    table = random_table(2, gen)
    kwargs = dict(scale=2.0, noise=noise, g_mean=g, threshold=torch.full((batch,), 1.2, dtype=torch.float64,
                                                                         device=DEVICE))
    got = fastguide.guided_step(x, mo, table, 0, **kwargs, backend="triton")
    want = fastguide.guided_step(x, mo, table, 0, **kwargs, backend="torch")
    assert got.dtype == torch.float16
    assert_close(got, want, torch.float16)


@pytest.mark.parametrize("history", ["x0_prev", "x0_prev2"])
def test_step_outputs_alias_inputs(history):
    """out=sample and x0_out=x0_prev (or x0_prev2): every element's inputs are read before it is written."""
    gen = torch.Generator().manual_seed(5)
    batch, shape = 3, (2, 300)
    x, mo, extra = _step_inputs(batch, shape, torch.float32, gen)
    table = random_table(3, gen)
    want_x0 = poisoned(x)
    want = fastguide.guided_step(x, mo, table, 2, **extra, x0_out=want_x0, backend="torch")
    x_alias, x0_prev_alias = x.clone(), extra[history].clone()
    extra[history] = x0_prev_alias
    got = fastguide.guided_step(x_alias, mo, table, 2, **extra, out=x_alias, x0_out=x0_prev_alias,
                                backend="triton")
    assert got is x_alias
    assert_close(x_alias, want, torch.float32)
    assert_close(x0_prev_alias, want_x0, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 127, 129, 385])
@pytest.mark.parametrize("write_x0", [False, True])
def test_step_out2_block_boundaries(n, dtype, write_x0):
    """WRITE_OUT2: the second destination gets every element of the result (masks of the last chunk),
    bit for bit what out gets, with or without x0."""
    guided_step, *_ = _kernels()
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("out2", n, dtype, write_x0)).encode()))
    batch = 3
    x = randn(batch, n, dtype=dtype, gen=gen)
    mo = randn(2 * batch, n, dtype=dtype, gen=gen)
    kwargs = dict(scale=(1 + torch.rand(batch, generator=gen)).to(DEVICE), noise=randn(batch, n, dtype=dtype, gen=gen))
    table = random_table(3, gen)
    pair = torch.full((2 * batch, n), float("nan"), dtype=dtype, device=DEVICE)
    out, out2 = pair[:batch], pair[batch:]
    x0 = poisoned(x) if write_x0 else None
    guided_step.guided_step(StepArgs(x, mo, table, 2, **kwargs, out=out, out2=out2, x0_out=x0), block=128)
    want_out, want_x0 = _reference_rows(x, mo, table, 2, kwargs)
    assert torch.equal(out, out2)
    assert_close(out, want_out, dtype)
    if write_x0:
        assert_close(x0, want_x0, dtype)


def test_step_out2_aliasing():
    """out2 = sample (an input, exactly), and x0_out = out2 (the result wins), through core.ops.run_step."""
    from fastguide.core.ops import run_step
    gen = torch.Generator().manual_seed(17)
    batch, shape = 3, (2, 300)
    x, mo, extra = _step_inputs(batch, shape, torch.float32, gen)
    table = random_table(3, gen)
    scale = extra.pop("scale")
    want = fastguide.guided_step(x, mo, table, 2, scale=scale, **extra, backend="torch")
    x_alias = x.clone()
    got = run_step(StepArgs(x_alias, mo, table, 2, scale=scale, **extra, out2=x_alias), "triton")
    assert_close(got, want, torch.float32)
    assert torch.equal(x_alias, got)
    both = poisoned(x)
    got = run_step(StepArgs(x, mo, table, 2, scale=scale, **extra, out2=both, x0_out=both), "triton")
    assert torch.equal(both, got)
    assert_close(both, want, torch.float32)


def test_step_absent_inputs_and_columns_are_never_read():
    """Columns of absent terms are NaN and the variance channels are NaN while no term needs them: the
    constexpr-gated kernel never multiplies them in, so the result is finite and equals the reference."""
    gen = torch.Generator().manual_seed(9)
    batch, n = 2, 50
    x = randn(batch, n, gen=gen)
    mo = randn(2 * batch, 2 * n, gen=gen)
    mo[:, n:] = float("nan")
    table = random_table(2, gen)
    for col in (Col.P_G, Col.P_Z, Col.Q_G, Col.Q_Z, Col.D, Col.E, Col.F, Col.DV, Col.EV, Col.LV_MAX, Col.LV_MIN,
                Col.F2):
        table[:, col] = float("nan")
    # [B, 1, n] samples; the model output's doubled channel dimension holds the (NaN) variance.
    x3, mo3 = x.reshape(batch, 1, n), mo.reshape(2 * batch, 2, n)
    got = fastguide.guided_step(x3, mo3, table, 1, scale=2.0, learned_variance=True, backend="triton")
    want = fastguide.guided_step(x3, mo3, table, 1, scale=2.0, learned_variance=True, backend="torch")
    assert torch.isfinite(got).all()
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("n", [1, 129])
def test_step_x0_prev2_without_x0_prev(n):
    """The history terms are gated each by its own flag: x0_prev2 alone reads column F2, never F (NaN here)
    nor an x0_prev pointer, across a chunk boundary."""
    guided_step, *_ = _kernels()
    gen = torch.Generator().manual_seed(n + 51)
    batch = 3
    x, mo = randn(batch, n, gen=gen), randn(batch, n, gen=gen)
    table = random_table(2, gen)
    table[:, Col.F] = float("nan")
    kwargs = dict(x0_prev2=randn(batch, n, gen=gen))
    out = poisoned(x)
    guided_step.guided_step(StepArgs(x, mo, table, 1, **kwargs, out=out), block=128)
    want, _ = _reference_rows(x, mo, table, 1, kwargs)
    assert torch.isfinite(out).all()
    assert_close(out, want, torch.float32)


@pytest.mark.parametrize("clip", ["range", "threshold", "none"])
def test_step_nan_survives_clipping(clip):
    gen = torch.Generator().manual_seed(13)
    batch, n = 2, 40
    x = randn(batch, 1, n, gen=gen)
    mo = randn(2 * batch, 1, n, gen=gen)
    mo[batch, 0, 3] = float("nan")    # cond half of sample 0
    mo[1, 0, 17] = float("nan")       # uncond half of sample 1
    table = random_table(1, gen)
    kwargs = {"range": dict(clip=(-1, 1)), "threshold": dict(threshold=torch.full((batch,), 1.5, device=DEVICE)),
              "none": {}}[clip]
    x0 = poisoned(x)
    got = fastguide.guided_step(x, mo, table, 0, scale=3.0, x0_out=x0, **kwargs, backend="triton")
    for t in (got, x0):
        assert torch.isnan(t[0, 0, 3]) and torch.isnan(t[1, 0, 17])
        assert torch.isfinite(t).sum() == t.numel() - 2


def test_step_device_step_follows_the_counter():
    """The step row is read through the device index at launch time: bumping the counter in place (as a
    CUDA-graph loop does) selects the next row without a new argument."""
    gen = torch.Generator().manual_seed(17)
    x, mo, extra = _step_inputs(2, (33,), torch.float32, gen)
    table = random_table(4, gen)
    counter = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    for i in range(4):
        got = fastguide.guided_step(x, mo, table, counter, **extra, backend="triton")
        want = fastguide.guided_step(x, mo, table, i, **extra, backend="torch")
        assert_close(got, want, torch.float32)
        counter += 1


def test_step_grid_row_slices(monkeypatch):
    """Batches beyond the grid's row limit launch in slices; a tiny limit exercises the row offset."""
    guided_step, *_ = _kernels()
    from fastguide.kernels import launch_utils
    monkeypatch.setattr(launch_utils, "MAX_GRID_ROWS", 2)
    gen = torch.Generator().manual_seed(19)
    batch, n = 5, 70
    x = randn(batch, n, gen=gen)
    mo = randn(2 * batch, 2 * n, gen=gen)
    kwargs = dict(scale=(1 + torch.rand(batch, generator=gen)).to(DEVICE), noise=randn(batch, n, gen=gen),
                  threshold=(1 + torch.rand(batch, generator=gen)).to(DEVICE))
    table = random_table(2, gen)
    out, x0 = poisoned(x), poisoned(x)
    guided_step.guided_step(StepArgs(x, mo, table, 1, **kwargs, clip_mode=CLIP_THRESHOLD, learned_variance=True,
                                     out=out, x0_out=x0), block=32)
    want_out, want_x0 = _reference_rows(x, mo, table, 1, kwargs, True, CLIP_THRESHOLD)
    assert_close(out, want_out, torch.float32)
    assert_close(x0, want_x0, torch.float32)
    _, cfg_rescale_factor, _, per_sample_rms = _kernels()
    assert_close(cfg_rescale_factor.cfg_rescale_factor(mo, n, kwargs["scale"], 0.6, block=16),
                 reference.cfg_rescale_factor(mo, kwargs["scale"], 0.6, learned_variance=True), torch.float32)
    assert_close(per_sample_rms.per_sample_rms(x, block=16), reference.per_sample_rms(x), torch.float32)


def _sparse_inputs(batch, n, gen, uncond, learned_variance=False):
    """A heterogeneous batch: ``uncond`` lists sample b's uncond row (or -1); the model output is the B cond
    rows, then the uncond rows, then a row of NaN that no sample points at (never read)."""
    k = max(uncond) + 1 - batch if max(uncond) >= batch else 0
    width = 2 * n if learned_variance else n
    mo = torch.cat([randn(batch + k, width, gen=gen), torch.full((1, width), float("nan"), device=DEVICE)])
    if learned_variance:
        mo[:, n:] = mo[:, n:].clamp(-1, 1)
    return randn(batch, n, gen=gen), mo, torch.tensor(uncond, dtype=torch.int64, device=DEVICE)


def test_step_heterogeneous_grid_row_slices(monkeypatch):
    """Per-sample table rows and uncond rows are looked up at the absolute sample index when the batch
    launches in row slices (a tiny grid limit), across chunk boundaries, with the learned variance of the
    cond row."""
    guided_step, *_ = _kernels()
    from fastguide.kernels import launch_utils
    monkeypatch.setattr(launch_utils, "MAX_GRID_ROWS", 2)
    gen = torch.Generator().manual_seed(29)
    batch, n = 5, 70
    x, mo, uncond = _sparse_inputs(batch, n, gen, [6, -1, 5, 7, -1], learned_variance=True)
    step_rows = torch.tensor([3, 0, 5, 1, 3], device=DEVICE)
    kwargs = dict(scale=(1 + torch.rand(batch, generator=gen)).to(DEVICE), noise=randn(batch, n, gen=gen),
                  g_mean=randn(batch, n, gen=gen), step_rows=step_rows, uncond_rows=uncond)
    table = random_table(6, gen)
    out, x0 = poisoned(x), poisoned(x)
    guided_step.guided_step(StepArgs(x, mo, table, 0, **kwargs, learned_variance=True, out=out, x0_out=x0),
                            block=32)
    want_out, want_x0 = _reference_rows(x, mo, table, 0, kwargs, True)
    assert_close(out, want_out, torch.float32)
    assert_close(x0, want_x0, torch.float32)


def test_step_heterogeneous_maps_strided_int32_and_override_a_device_step():
    """The [B] maps may be strided int32 views (a direct launcher call); step_rows overrides a device step;
    a sample without an uncond row gets m = c exactly, even with a NaN scale."""
    guided_step, *_ = _kernels()
    gen = torch.Generator().manual_seed(31)
    batch, n = 4, 45
    x, mo, _ = _sparse_inputs(batch, n, gen, [4, -1, 5, -1])
    uncond = torch.tensor([[4, 9], [-1, 9], [5, 9], [-1, 9]], dtype=torch.int32, device=DEVICE)[:, 0]
    step_rows = torch.tensor([[2, 0], [1, 0], [2, 0], [0, 0]], dtype=torch.int32, device=DEVICE)[:, 0]
    scale = torch.tensor([2.0, float("nan"), 0.5, float("nan")], device=DEVICE)
    table = random_table(3, gen)
    counter = torch.full((1,), 1, dtype=torch.int64, device=DEVICE)
    kwargs = dict(scale=scale, step_rows=step_rows, uncond_rows=uncond, x0_prev=randn(batch, n, gen=gen),
                  x0_prev2=randn(batch, n, gen=gen))
    out = poisoned(x)
    guided_step.guided_step(StepArgs(x, mo, table, counter, **kwargs, out=out), block=16)
    want, _ = _reference_rows(x, mo, table, 0, kwargs)
    assert_close(out, want, torch.float32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("n", [1, 127, 129, 385])
@pytest.mark.parametrize("extra,eps_from_uncond", [(False, True), (True, False), (True, True)])
def test_step_combine_block_boundaries_and_row_slices(monkeypatch, n, extra, eps_from_uncond):
    """The linear combine across 128-element chunks and grid row slices (a tiny row limit): each program
    reads its own sample's (a, b, d) at the absolute row; the extra stream is a strided row view."""
    guided_step, *_ = _kernels()
    from fastguide.kernels import launch_utils
    monkeypatch.setattr(launch_utils, "MAX_GRID_ROWS", 2)
    gen = torch.Generator().manual_seed(n + 10 * extra + 100 * eps_from_uncond)
    batch = 5
    x = randn(batch, n, gen=gen)
    mo = randn(2 * batch, 2 * n, gen=gen)
    kwargs = dict(combine=(4 * torch.rand(batch, 3, generator=gen) - 2).to(DEVICE), noise=randn(batch, n, gen=gen),
                  mfactor=(0.5 + torch.rand(batch, generator=gen)).to(DEVICE), eps_from_uncond=eps_from_uncond)
    if extra:
        kwargs["extra"] = randn(batch, 2 * n, gen=gen)[:, :n]
    table = random_table(3, gen)
    out, x0 = poisoned(x), poisoned(x)
    guided_step.guided_step(StepArgs(x, mo, table, 2, **kwargs, learned_variance=True, out=out, x0_out=x0),
                            block=128)
    want_out, want_x0 = _reference_rows(x, mo, table, 2, kwargs, True)
    assert_close(out, want_out, torch.float32)
    assert_close(x0, want_x0, torch.float32)


def test_step_sparse_cfg_eps_from_uncond():
    """CFG++ on a sparse CFG batch: a sample without an uncond row renoises with its cond prediction (the
    reference's gathered uncond), whatever its (NaN) scale."""
    guided_step, *_ = _kernels()
    gen = torch.Generator().manual_seed(41)
    batch, n = 4, 45
    x, mo, uncond = _sparse_inputs(batch, n, gen, [4, -1, 5, -1])
    scale = torch.tensor([2.0, float("nan"), 0.5, float("nan")], device=DEVICE)
    table = random_table(3, gen)
    kwargs = dict(scale=scale, uncond_rows=uncond, noise=randn(batch, n, gen=gen), eps_from_uncond=True)
    out, x0 = poisoned(x), poisoned(x)
    guided_step.guided_step(StepArgs(x, mo, table, 1, **kwargs, out=out, x0_out=x0), block=16)
    want_out, want_x0 = _reference_rows(x, mo, table, 1, kwargs)
    assert_close(out, want_out, torch.float32)
    assert_close(x0, want_x0, torch.float32)
    assert torch.isfinite(out).all()


def test_step_combine_needs_the_dense_layout():
    guided_step, *_ = _kernels()
    x = randn(2, 8)
    with pytest.raises(ValueError, match="dense"):
        guided_step.guided_step(StepArgs(x, randn(2, 8), random_table(1, torch.Generator()), 0,
                                         combine=torch.ones(2, 3, device=DEVICE), out=poisoned(x)))


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 needs a GPU (the interpreter has no bf16)")
def test_step_bf16_on_gpu():
    gen = torch.Generator().manual_seed(23)
    x, mo, extra = _step_inputs(4, (4, 32, 32), torch.bfloat16, gen, learned_variance=True)
    table = random_table(3, gen)
    got = fastguide.guided_step(x, mo, table, 2, **extra, rescale=0.5, learned_variance=True, backend="triton")
    want = fastguide.guided_step(x, mo, table, 2, **extra, rescale=0.5, learned_variance=True, backend="torch")
    assert_close(got, want, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ reductions

@pytest.mark.parametrize("n", [2, 15, 16, 17, 100, 16 * 300 + 5])
@pytest.mark.parametrize("learned_variance", [False, True])
def test_cfg_rescale_factor_chunks(n, learned_variance):
    """16-element chunks: one chunk, exact multiples, a short last chunk, and more chunks than one
    combine block holds (300 > 256)."""
    _, cfg_rescale_factor, _, _ = _kernels()
    gen = torch.Generator().manual_seed(n)
    batch = 3
    mo = randn(2 * batch, 2 * n if learned_variance else n, gen=gen)
    scale = (1 + 6 * torch.rand(2 * batch, generator=gen)).to(DEVICE)[::2]
    got = cfg_rescale_factor.cfg_rescale_factor(mo, n, scale, 0.7, block=16)
    want = reference.cfg_rescale_factor(mo, scale, 0.7, learned_variance)
    assert_close(got, want, torch.float32)


def test_cfg_rescale_factor_large_mean_does_not_cancel():
    """std of values ~1000 +- 1: a raw sum of squares in fp32 would lose most digits of the variance."""
    _, cfg_rescale_factor, _, _ = _kernels()
    gen = torch.Generator().manual_seed(29)
    batch, n = 2, 5000
    mo = randn(2 * batch, n, gen=gen) + 1000.0
    scale = torch.tensor([2.0, 5.0], device=DEVICE)
    exact = reference.cfg_rescale_factor(mo.double(), scale.double(), 0.9).float()
    for block in (None, 64):
        torch.testing.assert_close(cfg_rescale_factor.cfg_rescale_factor(mo, n, scale, 0.9, block=block), exact,
                                   rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cfg_rescale_factor_through_ops(dtype):
    gen = torch.Generator().manual_seed(31)
    x, mo, extra = _step_inputs(3, (4, 33, 35), dtype, gen, learned_variance=True, full=False)
    table = random_table(2, gen)
    got = fastguide.guided_step(x, mo, table, 1, **extra, rescale=0.7, learned_variance=True, backend="triton")
    want = fastguide.guided_step(x, mo, table, 1, **extra, rescale=0.7, learned_variance=True, backend="torch")
    assert_close(got, want, dtype)


def _assert_gram_close(got, want):
    # Sums of n products in fp32: relative to the row's largest column, as the parity tests compare.
    scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close((got / scale).cpu(), (want / scale).cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 16 * 70 + 3])
@pytest.mark.parametrize("extra,momentum", [(False, None), (True, None), (True, -0.5)])
def test_guidance_gram_chunks(n, extra, momentum):
    """16-element chunks: one chunk, exact multiples, a short last chunk, and more chunks than one combine
    iteration holds (70 > 64); the momentum update of e lands in every chunk, masked past n."""
    guidance_gram = _gram_kernels()
    gen = torch.Generator().manual_seed(n + 7 * extra)
    batch = 3
    mo = randn(2 * batch, 2 * n, gen=gen)  # [prediction | variance] rows: only the first n are reduced
    e = randn(batch, n + 1, gen=gen) if extra else None
    e_rows = e[:, :n] if extra else None   # a strided row view; the column past it must stay untouched
    want_e = e_rows.clone() if extra else None
    want = reference.guidance_gram(mo.reshape(2 * batch, 2, n), want_e.reshape(batch, 1, n) if extra else None,
                                   momentum, learned_variance=True)
    tail = e[:, n:].clone() if extra else None
    got = guidance_gram.guidance_gram(mo, n, e_rows, momentum, block=16)
    _assert_gram_close(got, want)
    if extra:
        assert_close(e_rows, want_e, torch.float32)
        assert torch.equal(e[:, n:], tail)


def test_guidance_gram_grid_row_slices(monkeypatch):
    """Rows beyond the grid's row limit launch in slices: each sample's cond row is B rows below its uncond
    row at the absolute index, and its e row and result row are its own."""
    guidance_gram = _gram_kernels()
    from fastguide.kernels import launch_utils
    monkeypatch.setattr(launch_utils, "MAX_GRID_ROWS", 2)
    gen = torch.Generator().manual_seed(43)
    batch, n = 5, 70
    mo, e = randn(2 * batch, n, gen=gen), randn(batch, n, gen=gen)
    want_e = e.clone()
    want = reference.guidance_gram(mo, want_e, 0.25)
    _assert_gram_close(guidance_gram.guidance_gram(mo, n, e, 0.25, block=32), want)
    assert_close(e, want_e, torch.float32)


@pytest.mark.parametrize("view", ["row_strided", "transposed", "channels_strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_guidance_gram_momentum_updates_views_in_place(view, dtype):
    """Through the backend: a written extra that is a slice of a wider tensor is updated through its row view
    (the rest of the wider tensor untouched); one with no row view goes through a temporary copied back.
    The products are those of the values stored in e's dtype."""
    gen = torch.Generator().manual_seed(47)
    batch, shape = 3, (4, 5, 6)
    mo = randn(2 * batch, *shape, dtype=dtype, gen=gen)
    if view == "row_strided":
        wide = randn(batch, 8, 5, 6, dtype=dtype, gen=gen)
        e = wide[:, 2:6]
    elif view == "transposed":
        wide = randn(6, 5, 4, batch, dtype=dtype, gen=gen)
        e = wide.permute(3, 2, 1, 0)
    else:
        wide = randn(batch, 4, 5, 12, dtype=dtype, gen=gen)
        e = wide[..., ::2]
    before = wide.clone()
    want_e = e.clone()
    want = fastguide.guidance_gram(mo, want_e, momentum=0.7, backend="torch")
    got = fastguide.guidance_gram(mo, e, momentum=0.7, backend="triton")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close((got / scale).cpu(), (want / scale).cpu(), rtol=tol, atol=tol)
    assert_close(e, want_e, dtype)
    untouched = torch.ones_like(wide, dtype=torch.bool)
    if view == "row_strided":
        untouched[:, 2:6] = False
    elif view == "transposed":
        untouched[:] = False
    else:
        untouched[..., ::2] = False
    assert torch.equal(wide[untouched], before[untouched])


@pytest.mark.parametrize("n", [1, 15, 16, 17, 16 * 300 + 1])
def test_per_sample_rms_chunks(n):
    _, _, _, per_sample_rms = _kernels()
    gen = torch.Generator().manual_seed(n)
    x = randn(3, n, gen=gen) * 3 + 1
    assert_close(per_sample_rms.per_sample_rms(x, block=16), reference.per_sample_rms(x), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_rms_through_ops(dtype):
    gen = torch.Generator().manual_seed(37)
    x = randn(4, 3, 70, 70, dtype=dtype, gen=gen)[:, :, 1:-1, ::2]   # strided view, copied to rows
    got = fastguide.per_sample_rms(x, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, fastguide.per_sample_rms(x, backend="torch"), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------- temperature LSE grad

@pytest.mark.parametrize("k", [1, 15, 16, 17, 33, 1000])
@pytest.mark.parametrize("tau2", [0.5, 0.0, -1.3])
def test_temperature_lse_grad_k_across_blocks(k, tau2):
    """16-wide K blocks: the online max / sum carries across block boundaries and a short last block."""
    _, _, temperature_lse_grad, _ = _kernels()
    gen = torch.Generator().manual_seed(k)
    rows = 3
    logits = randn(rows, k, gen=gen) * 8
    labels = torch.randint(0, k, (rows,), generator=gen).to(DEVICE)
    scale = (0.5 + torch.rand(rows, generator=gen)).to(DEVICE)
    out = poisoned(logits)
    temperature_lse_grad.temperature_lse_grad(logits, labels, 1.25, tau2, scale, out, block=16)
    want = torch.empty_like(logits)
    reference.temperature_lse_grad(logits, labels, 1.25, tau2, scale, want)
    assert_close(out, want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_temperature_lse_grad_imagenet21k_extreme_logits(dtype):
    """K = 21,843 low-precision logits near the dtype's range: stable where a naive exp overflows."""
    gen = torch.Generator().manual_seed(41)
    rows, k = 2, 21843
    big = 6e4 if dtype == torch.float16 else 1e30
    logits = (torch.rand(rows, k, generator=gen) * 2 - 1).mul(big).to(DEVICE).to(dtype)
    labels = torch.tensor([0, k - 1], dtype=torch.int32, device=DEVICE)
    got = fastguide.temperature_lse_grad(logits, labels, 1.0, 1.0, backend="triton")
    want = fastguide.temperature_lse_grad(logits, labels, 1.0, 1.0, backend="torch")
    assert torch.isfinite(got).all()
    assert_close(got, want, dtype)


def test_temperature_lse_grad_views_and_scales():
    gen = torch.Generator().manual_seed(43)
    rows, k = 4, 1001
    logits_rows = randn(2 * rows, k, dtype=torch.float16, gen=gen)[::2]     # row-strided view
    logits_cols = randn(rows, 2 * k, gen=gen)[:, ::2]                        # inner stride 2: copied
    labels = torch.randint(0, k, (2 * rows,), generator=gen).to(DEVICE)[::2]
    for logits in (logits_rows, logits_cols):
        for scale in (None, 4.0, (torch.rand(2 * rows, generator=gen)).to(DEVICE)[::2]):
            got = fastguide.temperature_lse_grad(logits, labels, 0.7, 0.5, scale=scale, backend="triton")
            want = fastguide.temperature_lse_grad(logits, labels, 0.7, 0.5, scale=scale, backend="torch")
            assert_close(got, want, logits.dtype)


# --------------------------------------------------------------------------------------------- availability

def test_unavailable_reason_names_the_fix(monkeypatch):
    from fastguide.backends import triton as backend_triton
    assert backend_triton.unavailable_reason() == ""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "TRITON_INTERPRET=1" in backend_triton.unavailable_reason()
