"""Every compiled backend against the torch reference, through the public ops.

The backends "cpp", "triton" and "cuda" run on each device they support (Triton on CPU only under
TRITON_INTERPRET=1, which tests/conftest.py sets when there is no GPU; the interpreter has no bf16) and are
skipped where they were not built. Every case draws fresh seeded inputs and a random coefficient row: odd
sizes, row-strided and transposed views, per-sample / scalar / no guidance, CFG rescale, every clip mode,
learned variance, each optional term present or absent, int and tensor step indices, out= aliasing the
sample, x0-only calls, and outputs poisoned with NaN before the call. NaN never passes a comparison.

The second destination of the result (``StepArgs.out2``, what a sampling loop points at the other half of the
next ``[x; x]`` model input) has no public keyword; its cases go through ``fastguide.guided_step`` with
``run_step`` wrapped to add it, so every check of the public op still runs first.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from dataclasses import dataclass
from unittest import mock
from typing import FrozenSet, Tuple

import pytest
import torch

import fastguide
from fastguide.backends import dispatch, reference
from fastguide.core import ops
from fastguide.core.layout import NUM_COLS, Col

COMPILED = ("cpp", "triton", "cuda")
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TERMS = ("g_score", "g_mean", "noise", "x0_prev", "x0_prev2")
STEPS = 5
NAN = float("nan")

BACKENDS = [pytest.param(name, device, id=f"{name}-{device}") for name in COMPILED for device in DEVICES]
DTYPE_PARAMS = [pytest.param(d, id=str(d).replace("torch.", "")) for d in DTYPES]


def skip_unless_runs(name: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    why = fastguide.backends(reasons=True)[name]
    if why:
        pytest.skip(f"{name} backend unavailable: {why}")
    if not dispatch.runs_on(name, torch.device(device)):
        pytest.skip(f"{name} backend does not run on {device}")
    if name == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16")


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Close to within ``tol`` relative to the result's magnitude; NaN anywhere fails."""
    assert torch.isfinite(expected).all(), "the reference itself is not finite: the case is broken"
    magnitude = max(1.0, expected.float().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * magnitude)


def step_tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


# --------------------------------------------------------------------------------------------- guided step

@dataclass(frozen=True)
class StepCase:
    name: str
    shape: Tuple[int, ...] = (3, 5, 7)
    guidance: str = "per_sample"   # none | per_sample | scalar | tensor0d
    rescale: float = 0.0
    clip: str = "none"             # none | range | threshold
    learned_variance: bool = False
    terms: FrozenSet[str] = frozenset()
    step: str = "int"              # int | int64 | int32
    view: str = "contiguous"       # contiguous | row_strided | transposed
    outputs: str = "new"           # new | poisoned | alias | alias_both (out = x0_out = sample) | x0_only
    #                                 | out2_* (a second destination of the result, see _run_step_out2)
    nan_unused: bool = False       # coefficients of absent terms are NaN (they must never be read)


ALL = frozenset(TERMS)
TARGETED = [
    StepCase("baseline"),
    StepCase("no_cfg", guidance="none"),
    StepCase("scalar_scale", guidance="scalar"),
    StepCase("scale_0d_tensor", guidance="tensor0d"),
    StepCase("rescale", rescale=0.7),
    StepCase("rescale_full_scalar", rescale=1.0, guidance="scalar"),
    StepCase("clip_range", clip="range"),
    StepCase("clip_threshold", clip="threshold"),
    StepCase("learned_variance", learned_variance=True, terms=frozenset({"g_mean", "noise"})),
    StepCase("learned_variance_no_cfg", learned_variance=True, guidance="none", terms=frozenset({"noise"})),
    StepCase("learned_variance_no_terms", learned_variance=True),
    *[StepCase(f"only_{t}", terms=frozenset({t})) for t in TERMS],
    StepCase("all_terms", terms=ALL, clip="threshold", learned_variance=True, rescale=0.5),
    StepCase("step_int64", step="int64", terms=ALL),
    StepCase("step_int32", step="int32"),
    StepCase("row_strided", view="row_strided", terms=ALL, learned_variance=True),
    StepCase("transposed", view="transposed", terms=ALL, rescale=0.3),
    StepCase("alias", outputs="alias", terms=ALL, clip="range"),
    StepCase("alias_no_cfg", outputs="alias", guidance="none", terms=frozenset({"noise"})),
    StepCase("alias_both_outputs", outputs="alias_both", terms=ALL, clip="threshold"),
    StepCase("poisoned", outputs="poisoned", terms=ALL, learned_variance=True),
    StepCase("x0_only", outputs="x0_only", clip="range", terms=frozenset({"g_score", "noise"})),
    StepCase("x0_only_threshold", outputs="x0_only", clip="threshold", guidance="none"),
    StepCase("nan_in_unused_coefficients", nan_unused=True, terms=frozenset({"noise"}), outputs="poisoned"),
    StepCase("nan_in_unused_coefficients_x0", nan_unused=True, outputs="x0_only"),
    StepCase("single_sample", shape=(1, 3, 11, 13), terms=ALL),
    # Many tiles and reduction chunks per row, and more elements than the C++ kernels' threshold for
    # starting threads (2^18): rows split between threads, one large row too.
    StepCase("many_tiles_threads", shape=(2, 4, 183, 181), terms=frozenset({"noise"}), outputs="poisoned",
             rescale=0.7, learned_variance=True),
    StepCase("one_large_row", shape=(1, 270001), terms=frozenset({"g_score", "x0_prev"}), outputs="alias"),
    # Third-order multistep history: x0_prev2 alone, with x0_prev, strided, and x0_out aliasing it.
    StepCase("x0_prev2_alone", terms=frozenset({"x0_prev2"}), nan_unused=True, outputs="poisoned"),
    StepCase("x0_prev_and_x0_prev2", terms=frozenset({"x0_prev", "x0_prev2"}), guidance="none", nan_unused=True),
    StepCase("x0_prev2_row_strided", view="row_strided", terms=frozenset({"x0_prev", "x0_prev2", "noise"})),
    StepCase("x0_prev2_odd_large", shape=(2, 3, 181, 183), terms=frozenset({"x0_prev", "x0_prev2"}),
             outputs="alias"),
    # out2: the result written twice in one pass.
    StepCase("out2_fresh_out", outputs="out2"),
    StepCase("out2_halves_of_one_buffer", outputs="out2_halves", terms=ALL, learned_variance=True),
    StepCase("out2_halves_no_cfg", outputs="out2_halves", guidance="none", terms=frozenset({"noise"})),
    StepCase("out2_poisoned_with_x0", outputs="out2_poisoned", terms=ALL, clip="threshold", rescale=0.5),
    StepCase("out2_is_the_sample", outputs="out2_alias_sample", terms=ALL, clip="range"),
    StepCase("out2_is_x0_out", outputs="out2_x0", terms=frozenset({"g_score", "noise"})),
    StepCase("out2_row_strided", outputs="out2_strided", view="row_strided", terms=ALL),
    StepCase("out2_overlaps_model_output", outputs="out2_overlaps_input", terms=frozenset({"x0_prev"})),
    StepCase("out2_ignored_by_x0_only", outputs="out2_x0_only", clip="range"),
    StepCase("out2_odd_large", shape=(2, 3, 181, 183), outputs="out2_halves", terms=frozenset({"noise"}),
             step="int64"),
    StepCase("out2_one_element_rows", shape=(5, 1), outputs="out2_poisoned", nan_unused=True),
]


def random_case(i: int) -> StepCase:
    rng = random.Random(1000 + i)
    guidance = rng.choice(["none", "per_sample", "scalar", "tensor0d"])
    return StepCase(
        f"random{i}",
        shape=rng.choice([(3, 5, 7), (2, 3, 4, 5), (5, 1, 9), (1, 2, 3, 33)]),
        guidance=guidance,
        rescale=rng.choice([0.0, 0.0, 0.6, 1.0]) if guidance != "none" else 0.0,
        clip=rng.choice(["none", "range", "threshold"]),
        learned_variance=rng.random() < 0.4,
        terms=frozenset(t for t in TERMS if rng.random() < 0.5),
        step=rng.choice(["int", "int64", "int32"]),
        view=rng.choice(["contiguous", "row_strided", "transposed"]),
        outputs=rng.choice(["new", "poisoned", "alias", "x0_only"]),
        nan_unused=rng.random() < 0.3,
    )


STEP_CASES = TARGETED + [random_case(i) for i in range(16)]


def _random_table(case: StepCase, gen: torch.Generator) -> torch.Tensor:
    table = torch.randn(STEPS, NUM_COLS, generator=gen)
    # Learned-range log variances in ADM's range (log beta ~ -10 .. -2).
    table[:, Col.LV_MIN] = -10.0 + 5.0 * torch.rand(STEPS, generator=gen)
    table[:, Col.LV_MAX] = table[:, Col.LV_MIN] + 3.0 * torch.rand(STEPS, generator=gen)
    if case.nan_unused:
        unused = {"g_score": [Col.P_G, Col.Q_G], "g_mean": [Col.D, Col.DV], "noise": [Col.P_Z, Col.Q_Z, Col.E, Col.EV],
                  "x0_prev": [Col.F], "x0_prev2": [Col.F2]}
        cols = [c for term, cs in unused.items() if term not in case.terms for c in cs]
        if not case.learned_variance:
            cols += [Col.DV, Col.EV, Col.LV_MAX, Col.LV_MIN]
        if case.outputs == "x0_only":
            cols += [Col.A, Col.B, Col.C, Col.D, Col.E, Col.F, Col.F2, Col.DV, Col.EV, Col.LV_MAX, Col.LV_MIN]
        table[:, cols] = NAN
    return table


def _tensor(shape, view: str, gen: torch.Generator, device, dtype) -> torch.Tensor:
    """Random values through the case's memory layout: contiguous, rows strided (a slice of a wider tensor
    along dim 1, still a [rows, N] view), or fully transposed (batch stride 1, needs a copy)."""
    if view == "row_strided":
        wide = (shape[0], 2 * shape[1]) + tuple(shape[2:])
        t = torch.randn(wide, generator=gen)[:, :shape[1]]
    elif view == "transposed":
        t = torch.randn(tuple(reversed(shape)), generator=gen).permute(*reversed(range(len(shape))))
    else:
        t = torch.randn(shape, generator=gen)
    return t.to(device=device, dtype=dtype)


def _step_call(case: StepCase, device: str, dtype: torch.dtype, seed: int):
    """Fresh inputs and the keyword arguments of one fastguide.guided_step call (the same for every backend)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    batch, channels, *rest = case.shape
    rows = batch if case.guidance == "none" else 2 * batch
    model_shape = (rows, channels * (2 if case.learned_variance else 1), *rest)
    sample = _tensor(case.shape, case.view, gen, device, dtype)
    model_output = _tensor(model_shape, case.view, gen, device, dtype)
    kwargs = {t: _tensor(case.shape, case.view, gen, device, dtype) for t in case.terms}
    if case.guidance == "per_sample":
        kwargs["scale"] = (8.0 * torch.rand(batch, generator=gen)).to(device)
    elif case.guidance == "scalar":
        kwargs["scale"] = 7.5
    elif case.guidance == "tensor0d":
        kwargs["scale"] = torch.tensor(3.5, device=device)
    if case.rescale:
        kwargs["rescale"] = case.rescale
    if case.clip == "range":
        kwargs["clip"] = (-1.5, 1.25)
    elif case.clip == "threshold":
        kwargs["threshold"] = (1.0 + 2.0 * torch.rand(batch, generator=gen)).to(device)
    kwargs["learned_variance"] = case.learned_variance
    table = _random_table(case, gen).to(device)
    index = rng.randrange(STEPS)
    step = {"int": index, "int64": torch.tensor(index, device=device),
            "int32": torch.tensor([index], dtype=torch.int32, device=device)}[case.step]
    return sample, model_output, table, step, kwargs


@contextlib.contextmanager
def second_destination(out2):
    """Inside the block, ``fastguide.guided_step`` calls also write their result into ``out2``."""
    run_step = ops.run_step

    def with_out2(args, backend):
        args.out2 = out2
        return run_step(args, backend)

    with mock.patch.object(ops, "run_step", with_out2):
        yield


def _run_step_out2(case: StepCase, backend: str, sample, model_output, table, step, kwargs):
    """An ``out2`` case: its destinations (NaN-poisoned) and what they must hold afterwards."""
    def nan(shape=sample.shape):
        return torch.full(shape, NAN, dtype=sample.dtype, device=sample.device)

    batch, channels, *rest = sample.shape
    before = sample.clone()
    out = x0 = None
    write_out = case.outputs != "out2_x0_only"
    if case.outputs == "out2_halves":  # the loop's use: both halves of one [2B] buffer
        out, out2 = nan((2 * batch, channels, *rest)).split(batch)
    elif case.outputs == "out2_poisoned":
        out, out2, x0 = nan(), nan(), nan()
    elif case.outputs == "out2_alias_sample":  # exactly an input: read before written
        sample = out2 = sample.clone()
    elif case.outputs == "out2_x0":  # x0_out is out2: the result wins
        out2 = x0 = nan()
    elif case.outputs == "out2_strided":  # through a temporary
        out2 = nan((batch, 2 * channels, *rest))[:, :channels]
    elif case.outputs == "out2_overlaps_input":  # part of the model output: through a temporary
        model_output = model_output.clone()
        out2 = model_output[1:1 + batch]
    elif case.outputs == "out2_x0_only":
        out2, x0 = nan(), nan()
    else:
        out2 = nan()
    with second_destination(out2):
        returned = fastguide.guided_step(sample, model_output, table, step, out=out, x0_out=x0,
                                         write_out=write_out, backend=backend, **kwargs)
    if case.outputs != "out2_alias_sample":
        torch.testing.assert_close(sample, before, rtol=0, atol=0)  # inputs are never written
    if not write_out:
        assert returned is None and out2.isnan().all()  # an x0-only call leaves out2 alone
        return {"x0": x0}
    assert out is None or returned is out
    assert torch.equal(out2, returned), "out2 differs from out"
    results = {"out": returned, "out2": out2}
    if x0 is not None and x0 is not out2:
        results["x0"] = x0
    return results


def _run_step(case: StepCase, backend: str, sample, model_output, table, step, kwargs):
    """Run one call and return its results by name (outputs are fresh or poisoned per the case)."""
    kwargs = dict(kwargs)
    if case.outputs.startswith("out2"):
        return _run_step_out2(case, backend, sample, model_output, table, step, kwargs)
    results = {}
    if case.outputs in ("alias", "alias_both"):
        sample = sample.clone()
        x0 = sample if case.outputs == "alias_both" else None
        returned = fastguide.guided_step(sample, model_output, table, step, out=sample, x0_out=x0,
                                         backend=backend, **kwargs)
        assert returned is sample
        results["out"] = sample
        return results
    before = sample.clone()
    if case.outputs == "x0_only":
        x0 = torch.full(sample.shape, NAN, dtype=sample.dtype, device=sample.device)
        returned = fastguide.guided_step(sample, model_output, table, step, x0_out=x0, write_out=False,
                                         backend=backend, **kwargs)
        assert returned is None
        results["x0"] = x0
    elif case.outputs == "poisoned":
        out = torch.full(sample.shape, NAN, dtype=sample.dtype, device=sample.device)
        x0 = torch.full(sample.shape, NAN, dtype=sample.dtype, device=sample.device)
        returned = fastguide.guided_step(sample, model_output, table, step, out=out, x0_out=x0,
                                         backend=backend, **kwargs)
        assert returned is out
        results["out"], results["x0"] = out, x0
    else:
        results["out"] = fastguide.guided_step(sample, model_output, table, step, backend=backend, **kwargs)
    torch.testing.assert_close(sample, before, rtol=0, atol=0)  # inputs are never written
    return results


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_guided_step_matches_reference(backend, device, case, dtype):
    skip_unless_runs(backend, device, dtype)
    call = _step_call(case, device, dtype, seed_of(case.name, str(dtype)))
    expected = _run_step(case, "torch", *call)
    actual = _run_step(case, backend, *call)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert actual[name].dtype == dtype
        assert_matches(actual[name], expected[name], step_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_guided_step_repeated_calls_are_fresh(backend, device, dtype):
    """The same arguments twice give the same result, and a different step row a different one (nothing
    about a previous call, such as the step, leaks into the next)."""
    skip_unless_runs(backend, device, dtype)
    case = StepCase("repeat", terms=ALL, step="int64", outputs="poisoned")
    sample, model_output, table, _, kwargs = _step_call(case, device, dtype, seed_of("repeat", str(dtype)))
    step = torch.tensor(1, device=device)
    first = fastguide.guided_step(sample, model_output, table, step, backend=backend, **kwargs)
    again = fastguide.guided_step(sample, model_output, table, step, backend=backend, **kwargs)
    step.fill_(3)
    other = fastguide.guided_step(sample, model_output, table, step, backend=backend, **kwargs)
    expected = fastguide.guided_step(sample, model_output, table, 3, backend="torch", **kwargs)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert_matches(other, expected, step_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_guided_step_rounds_like_torch(backend, device, dtype):
    """fp32 results are stored with round-to-nearest-even, bit for bit as torch casts them: a row whose only
    nonzero coefficient is A gives out = fp32(A * x) exactly, whatever the order of the other (zero) terms.
    The (finite) inputs span fp16 subnormals and normals; A = 3 overflows some of them to Inf."""
    skip_unless_runs(backend, device, dtype)
    gen = torch.Generator().manual_seed(seed_of("rounding", str(dtype)))
    magnitudes = torch.pow(2.0, torch.empty(3, 4099).uniform_(-30.0, 15.9, generator=gen))
    signs = torch.where(torch.rand(3, 4099, generator=gen) < 0.5, -1.0, 1.0)
    sample = (signs * magnitudes).to(device=device, dtype=dtype)
    model_output = torch.randn(3, 4099, generator=gen).to(device=device, dtype=dtype)
    for a in (1.0 / 3.0, 3.0, 0.7):
        table = torch.zeros(1, NUM_COLS, device=device)
        table[0, Col.A] = a
        expected = (sample.float() * torch.tensor(a, dtype=torch.float32)).to(dtype)
        actual = fastguide.guided_step(sample, model_output, table, 0, backend=backend)
        assert not torch.isnan(actual).any()
        mismatched = (actual != expected).sum().item()  # exact, with -0 == +0 (the zero terms add +0)
        assert mismatched == 0, f"{mismatched} elements differ from torch's rounding (A = {a})"


# ------------------------------------------------------------------------------------- CFG-rescale factor

@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", ["per_sample", "stride0_scale", "learned_variance", "large_mean", "long_rows"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_cfg_rescale_factor_matches_reference(backend, device, layout, dtype):
    skip_unless_runs(backend, device, dtype)
    gen = torch.Generator().manual_seed(seed_of("rescale", layout, str(dtype)))
    batch = 3
    shape = (2 * batch, 2 * 4 if layout == "learned_variance" else 4, 5, 7)
    if layout == "long_rows":  # several chunks per row, split between threads
        shape = (2 * batch, 100001)
    model_output = torch.randn(shape, generator=gen)
    if layout == "large_mean":  # a mean far above the spread must not cancel the variance away
        model_output = model_output + 100.0
    model_output = model_output.to(device=device, dtype=dtype)
    scale = (8.0 * torch.rand(batch, generator=gen)).to(device)
    if layout == "stride0_scale":
        scale = torch.tensor(2.5, device=device).reshape(1).expand(batch)
    lv = layout == "learned_variance"
    expected = reference.cfg_rescale_factor(model_output, scale, 0.7, lv)
    actual = dispatch.resolve(backend, torch.device(device)).cfg_rescale_factor(model_output, scale, 0.7, lv)
    assert actual.dtype == torch.float32 and actual.shape == (batch,)
    # fp32 compute from the same stored values, whatever the storage dtype.
    assert_matches(actual, expected, 1e-4 if layout == "large_mean" else 2e-5)


# ------------------------------------------------------------------------------ temperature LSE gradient

@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("k", [1, 7, 1000, 21843])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_temperature_lse_grad_matches_reference(backend, device, k, dtype):
    skip_unless_runs(backend, device, dtype)
    gen = torch.Generator().manual_seed(seed_of("lse", k, str(dtype)))
    rows = 3
    logits = (4.0 * torch.randn(rows, k, generator=gen)).to(device=device, dtype=dtype)
    labels = torch.randint(0, k, (rows,), generator=gen).to(device)
    scale = (2.0 * torch.rand(rows, generator=gen)).to(device)
    for tau1, tau2, s in [(1.0, 0.5, None), (0.3, 2.0, scale), (1.0, -1.5, 0.75), (2.0, 0.0, None)]:
        expected = fastguide.temperature_lse_grad(logits, labels, tau1, tau2, s, backend="torch")
        actual = fastguide.temperature_lse_grad(logits, labels, tau1, tau2, s, backend=backend)
        assert actual.dtype == dtype
        assert_matches(actual, expected, step_tol(dtype))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_temperature_lse_grad_large_low_precision_logits_stay_finite(backend, device, dtype):
    """fp16/bf16 logits near the fp16 limit (|l| ~ 60000) with K = 21843: no overflow in exp or the sum."""
    skip_unless_runs(backend, device, dtype)
    gen = torch.Generator().manual_seed(seed_of("lse-large", str(dtype)))
    logits = (60000.0 * (2.0 * torch.rand(2, 21843, generator=gen) - 1.0)).to(device=device, dtype=dtype)
    labels = torch.tensor([5, 21842], device=device)
    for tau2 in (0.5, 1.0):
        expected = fastguide.temperature_lse_grad(logits, labels, 1.0, tau2, backend="torch")
        actual = fastguide.temperature_lse_grad(logits, labels, 1.0, tau2, backend=backend)
        assert torch.isfinite(actual).all()
        assert_matches(actual, expected, 1e-2)


@pytest.mark.parametrize("view", ["row_strided", "transposed", "int32_labels"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_temperature_lse_grad_views(backend, device, view):
    skip_unless_runs(backend, device)
    gen = torch.Generator().manual_seed(seed_of("lse-view", view))
    rows, k = 5, 37
    if view == "row_strided":
        logits = torch.randn(rows, k + 6, generator=gen)[:, 3:3 + k]
    elif view == "transposed":
        logits = torch.randn(k, rows, generator=gen).t()
    else:
        logits = torch.randn(rows, k, generator=gen)
    logits = logits.to(device)
    labels = torch.randint(0, k, (rows,), generator=gen).to(device)
    if view == "int32_labels":
        labels = labels.to(torch.int32)
    expected = fastguide.temperature_lse_grad(logits, labels, 1.0, 0.5, backend="torch")
    actual = fastguide.temperature_lse_grad(logits, labels, 1.0, 0.5, backend=backend)
    assert_matches(actual, expected, 1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_temperature_lse_grad_kernel_skips_out_of_range_labels(backend, device):
    """A label outside [0, K) adds no one-hot term and nothing is written outside the output. The public op
    rejects such labels only where it can read them on the host (not for device or traced labels), so the
    backend is called directly, below that check, with its output inside a NaN-poisoned buffer."""
    skip_unless_runs(backend, device)
    gen = torch.Generator().manual_seed(seed_of("lse-out-of-range"))
    rows, k, pad, tau1, tau2 = 4, 37, 16, 1.25, 0.5
    logits = torch.randn(rows, k, generator=gen).to(device)
    labels = torch.tensor([-1, 3, k, 0], device=device)
    scale = (0.5 + torch.rand(rows, generator=gen)).to(device)
    buffer = torch.full((pad + rows * k + pad,), NAN, device=device)
    out = buffer[pad:pad + rows * k].view(rows, k)
    dispatch.resolve(backend, torch.device(device)).temperature_lse_grad(logits, labels, tau1, tau2, scale, out)
    expected = -tau2 * torch.softmax(tau2 * logits.cpu(), dim=-1)
    for row, label in enumerate(labels.tolist()):
        if 0 <= label < k:
            expected[row, label] += tau1
    expected *= scale.cpu().reshape(-1, 1)
    assert_matches(out.cpu(), expected, 1e-5)
    assert buffer[:pad].isnan().all() and buffer[pad + rows * k:].isnan().all()


# ----------------------------------------------------------------------------------------- per-sample RMS

@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", ["odd", "one_element", "single_long_row", "threads", "row_strided",
                                    "transposed", "large_values"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_per_sample_rms_matches_reference(backend, device, layout, dtype):
    skip_unless_runs(backend, device, dtype)
    gen = torch.Generator().manual_seed(seed_of("per_sample_rms", layout, str(dtype)))
    shape = {"odd": (3, 5, 7), "one_element": (4, 1), "single_long_row": (1, 300001),
             "threads": (2, 3, 150, 301), "row_strided": (3, 5, 7), "transposed": (3, 5, 7),
             "large_values": (3, 5, 7)}[layout]
    x = _tensor(shape, layout if layout in ("row_strided", "transposed") else "contiguous", gen, "cpu",
                torch.float32)
    if layout == "large_values":
        x = 60000.0 * x.clamp(-1, 1)
    x = x.to(device=device, dtype=dtype)
    expected = fastguide.per_sample_rms(x, backend="torch")
    actual = fastguide.per_sample_rms(x, backend=backend)
    assert actual.dtype == torch.float32 and actual.shape == (shape[0],)
    # fp32 compute from the same stored values, whatever the storage dtype.
    assert_matches(actual, expected, 2e-5)
