"""Heterogeneous batches in the fused step: one table row per sample (``step`` a [B] tensor, ``StepArgs.step_rows``)
and a sparse CFG batch (``uncond_rows``: B cond rows, then only the uncond rows some samples need).

The torch reference is checked against the dense step it generalises (per sample, row by row), and every
compiled backend against the reference on fresh random inputs: random per-sample rows of a stacked table,
random sparse maps (none, some, all, in shuffled order), every optional term, clip modes, learned variance,
odd sizes, strided and transposed views, poisoned and aliased outputs, fp32/fp16/bf16.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import FrozenSet, Tuple

import pytest
import torch

import fastguide
from fastguide.backends import reference
from fastguide.core.layout import NUM_COLS, Col

import test_backends_parity as parity

ROWS = 11  # rows of the stacked table: several samplers' tables back to back
NAN = float("nan")


@dataclass(frozen=True)
class MixedCase:
    name: str
    shape: Tuple[int, ...] = (5, 3, 7, 3)
    uncond: str = "some"          # "none" | "some" | "all" (sparse map), "dense" ([uncond; cond] + per-row steps)
    terms: FrozenSet[str] = frozenset()
    learned_variance: bool = False
    clip: str = "none"            # "none" | "range" | "threshold"
    rescale: float = 0.0
    view: str = "contiguous"      # "contiguous" | "row_strided" | "transposed"
    outputs: str = "fresh"        # "fresh" | "poisoned" | "aliased" | "x0_too" | "x0_only"
    map_dtype: torch.dtype = torch.int64


ALL = frozenset(parity.TERMS)
CASES = [
    MixedCase("steps_only_no_cfg", uncond="none_scale_free"),
    MixedCase("sparse_some"),
    MixedCase("sparse_none", uncond="none"),
    MixedCase("sparse_all", uncond="all"),
    MixedCase("dense_per_row_steps", uncond="dense"),
    MixedCase("sparse_every_term", terms=ALL),
    MixedCase("sparse_learned_variance", terms=frozenset({"g_mean", "noise"}), learned_variance=True),
    MixedCase("sparse_clip_range", clip="range", terms=frozenset({"g_score"})),
    MixedCase("sparse_threshold", clip="threshold", outputs="x0_too"),
    MixedCase("sparse_rescale", rescale=0.7, terms=frozenset({"noise"})),
    MixedCase("sparse_row_strided", view="row_strided", terms=frozenset({"x0_prev", "x0_prev2"})),
    MixedCase("sparse_transposed", view="transposed", terms=frozenset({"g_score", "noise"})),
    MixedCase("sparse_poisoned", outputs="poisoned", terms=ALL),
    MixedCase("sparse_aliased", outputs="aliased", terms=frozenset({"noise"})),
    MixedCase("sparse_x0_only", outputs="x0_only", clip="range"),
    MixedCase("sparse_int32_maps", map_dtype=torch.int32, terms=frozenset({"g_mean"})),  # checked into int64
    MixedCase("odd_rows", shape=(3, 1, 5, 1), terms=frozenset({"noise", "x0_prev", "x0_prev2"})),
    # Third-order multistep history at per-sample rows: x0_prev2 without x0_prev, and through the clip path.
    MixedCase("dense_x0_prev2_alone", uncond="dense", view="transposed", terms=frozenset({"x0_prev2"})),
    MixedCase("sparse_x0_prev2_clip", clip="range", outputs="x0_too", terms=frozenset({"x0_prev", "x0_prev2"})),
    MixedCase("one_sample", shape=(1, 2, 9)),
    MixedCase("long_rows", shape=(4, 4, 33, 31), terms=frozenset({"noise"})),
    MixedCase("token_latents", shape=(6, 17, 8), uncond="all", terms=frozenset({"g_score"})),
]


def mixed_call(case: MixedCase, device: str, dtype: torch.dtype, seed: int):
    """Fresh inputs and the keyword arguments of one heterogeneous ``fastguide.guided_step`` call."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    batch, channels, *rest = case.shape
    table = torch.randn(ROWS, NUM_COLS, generator=gen)
    table[:, Col.LV_MIN] = -10.0 + 5.0 * torch.rand(ROWS, generator=gen)
    table[:, Col.LV_MAX] = table[:, Col.LV_MIN] + 3.0 * torch.rand(ROWS, generator=gen)
    rows = torch.tensor([rng.randrange(ROWS) for _ in range(batch)], dtype=case.map_dtype)
    kwargs = {}
    if case.uncond in ("some", "none", "all"):
        needs = [case.uncond == "all" or (case.uncond == "some" and rng.random() < 0.5) for _ in range(batch)]
        if case.uncond == "some" and batch > 1:
            needs[0], needs[-1] = True, False  # both kinds present
        order = [b for b in range(batch) if needs[b]]
        rng.shuffle(order)  # uncond rows in any order after the cond rows
        uncond = [-1] * batch
        for j, b in enumerate(order):
            uncond[b] = batch + j
        model_rows = batch + len(order)
        kwargs["uncond_rows"] = torch.tensor(uncond, dtype=case.map_dtype, device=device)
        kwargs["scale"] = (8.0 * torch.rand(batch, generator=gen)).to(device)
    elif case.uncond == "dense":
        model_rows = 2 * batch
        kwargs["scale"] = (8.0 * torch.rand(batch, generator=gen)).to(device)
    else:
        model_rows = batch
    model_shape = (model_rows, channels * (2 if case.learned_variance else 1), *rest)
    sample = parity._tensor(case.shape, case.view, gen, device, dtype)
    model_output = parity._tensor(model_shape, case.view, gen, device, dtype)
    if case.learned_variance:  # v in [-1, 1], as a learned-range model emits
        model_output[:, channels:] = model_output[:, channels:].clamp(-1, 1)
    for t in case.terms:
        kwargs[t] = parity._tensor(case.shape, case.view, gen, device, dtype)
    if case.rescale:
        kwargs["rescale"] = case.rescale
    if case.clip == "range":
        kwargs["clip"] = (-1.5, 1.25)
    elif case.clip == "threshold":
        kwargs["threshold"] = (1.0 + 2.0 * torch.rand(batch, generator=gen)).to(device)
    kwargs["learned_variance"] = case.learned_variance
    return sample, model_output, table.to(device), rows.to(device), kwargs


def run_case(case: MixedCase, backend: str, sample, model_output, table, rows, kwargs):
    """(result, x0) of the call in the case's output mode; poisoned outputs start as NaN."""
    kwargs = dict(kwargs)
    x0 = None
    if case.outputs in ("x0_too", "x0_only", "poisoned"):
        x0 = torch.full_like(sample, NAN)
        kwargs["x0_out"] = x0
    if case.outputs == "x0_only":
        fastguide.guided_step(sample, model_output, table, rows, write_out=False, backend=backend, **kwargs)
        return None, x0
    if case.outputs == "poisoned":
        kwargs["out"] = torch.full_like(sample, NAN)
    elif case.outputs == "aliased":
        sample = sample.clone()
        kwargs["out"] = sample
    out = fastguide.guided_step(sample, model_output, table, rows, backend=backend, **kwargs)
    return out, x0


def expected_by_sample(sample, model_output, table, rows, kwargs):
    """The same step as B dense single-sample calls of the reference: sample b at its own row, with its
    uncond row (a [uncond; cond] call) or without (a plain call). This is what the sparse form means."""
    uncond_rows = kwargs.get("uncond_rows")
    results, x0s = [], []
    for b in range(sample.shape[0]):
        one = {k: v[b:b + 1] for k, v in kwargs.items()
               if k in ("g_score", "g_mean", "noise", "x0_prev", "x0_prev2", "threshold")}
        one["learned_variance"] = kwargs["learned_variance"]
        if "clip" in kwargs:
            one["clip"] = kwargs["clip"]
        cond = model_output[b:b + 1]
        if uncond_rows is None and "scale" in kwargs:  # dense [uncond; cond]
            cond = model_output[sample.shape[0] + b:sample.shape[0] + b + 1]
            out_b = torch.cat([model_output[b:b + 1], cond])
            one["scale"], one["rescale"] = kwargs["scale"][b:b + 1], kwargs.get("rescale", 0.0)
        elif uncond_rows is not None and int(uncond_rows[b]) >= 0:
            u = int(uncond_rows[b])
            out_b = torch.cat([model_output[u:u + 1], cond])
            one["scale"], one["rescale"] = kwargs["scale"][b:b + 1], kwargs.get("rescale", 0.0)
        else:
            out_b = cond
        x0 = torch.empty_like(sample[b:b + 1])
        res = fastguide.guided_step(sample[b:b + 1], out_b, table, int(rows[b]), x0_out=x0, backend="torch", **one)
        results.append(res)
        x0s.append(x0)
    return torch.cat(results), torch.cat(x0s)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_equals_per_sample_dense_steps(case):
    if case.rescale:
        pytest.skip("the rescale factor is per sample either way; covered by test_sparse_rescale_*")
    sample, model_output, table, rows, kwargs = mixed_call(case, "cpu", torch.float64, parity.seed_of(case.name))
    kwargs.pop("rescale", None)
    expected, expected_x0 = expected_by_sample(sample, model_output, table, rows, kwargs)
    x0 = torch.empty_like(sample)
    got = fastguide.guided_step(sample, model_output, table, rows, x0_out=x0, backend="torch", **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x0, expected_x0, rtol=1e-6, atol=1e-6)


def test_sparse_rescale_factor_matches_dense_rows():
    """A sample with an uncond row gets Lin et al.'s factor of its own [uncond; cond] pair; one without gets 1."""
    case = MixedCase("rescale", shape=(6, 2, 5, 5), uncond="some")
    sample, model_output, _, _, kwargs = mixed_call(case, "cpu", torch.float64, 7)
    phi = torch.tensor([0.0, 0.3, 0.5, 0.7, 1.0, 0.9], dtype=torch.float64)
    got = reference.cfg_rescale_factor(model_output, kwargs["scale"], phi, uncond_rows=kwargs["uncond_rows"])
    for b, u in enumerate(kwargs["uncond_rows"].tolist()):
        if u < 0:
            assert got[b] == 1.0
            continue
        pair = torch.cat([model_output[u:u + 1], model_output[b:b + 1]])
        dense = reference.cfg_rescale_factor(pair, kwargs["scale"][b:b + 1], float(phi[b]))
        torch.testing.assert_close(got[b:b + 1], dense.to(got.dtype))


def test_sparse_full_map_equals_dense_layout():
    """Every sample with an uncond row, in order: the sparse call is the dense [uncond; cond] call."""
    gen = torch.Generator().manual_seed(3)
    b = 4
    sample, u, c = torch.randn(b, 3, 8, generator=gen), torch.randn(b, 3, 8, generator=gen), torch.randn(b, 3, 8, generator=gen)
    table = torch.randn(ROWS, NUM_COLS, generator=gen)
    scale = torch.rand(b, generator=gen) * 5
    dense = fastguide.guided_step(sample, torch.cat([u, c]), table, 2, scale=scale, backend="torch")
    sparse = fastguide.guided_step(sample, torch.cat([c, u]), table, torch.full((b,), 2), scale=scale,
                                   uncond_rows=torch.arange(b, 2 * b), backend="torch")
    torch.testing.assert_close(sparse, dense)


@pytest.mark.parametrize("dtype", parity.DTYPE_PARAMS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend,device", parity.BACKENDS)
def test_heterogeneous_step_matches_reference(backend, device, case, dtype):
    parity.skip_unless_runs(backend, device, dtype)
    if backend == "triton" and device == "cpu" and case.shape[0] * case.shape[1] > 2000:
        pytest.skip("interpreter time: long rows are covered on the compiled paths")
    inputs = mixed_call(case, device, dtype, parity.seed_of(case.name, str(dtype)))
    expected, expected_x0 = run_case(case, "torch", *inputs)
    got, got_x0 = run_case(case, backend, *inputs)
    tol = parity.step_tol(dtype)
    if expected is not None:
        parity.assert_matches(got, expected, tol)
    if expected_x0 is not None:
        parity.assert_matches(got_x0, expected_x0, tol)


@pytest.mark.parametrize("backend,device", parity.BACKENDS)
def test_sample_without_uncond_row_ignores_its_scale(backend, device):
    """m = c exactly for a sample without an uncond row, whatever its scale (here 1e6, which would blow up
    any use of it), and a model-output row no sample points at (all NaN) changes nothing."""
    parity.skip_unless_runs(backend, device)
    gen = torch.Generator().manual_seed(11)
    sample, model_output = torch.randn(3, 2, 6, generator=gen), torch.randn(5, 2, 6, generator=gen)
    model_output[4] = NAN
    table = torch.randn(ROWS, NUM_COLS, generator=gen)
    rows = torch.tensor([1, 4, 9])
    scale = torch.tensor([1e6, 3.0, 1e6])
    uncond = torch.tensor([-1, 3, -1])
    args = [t.to(device) for t in (sample, model_output, table, rows)]
    got = fastguide.guided_step(*args, scale=scale.to(device), uncond_rows=uncond.to(device), backend=backend)
    expected = expected_by_sample(sample, model_output, table, rows,
                                  {"scale": scale, "uncond_rows": uncond, "learned_variance": False})[0]
    parity.assert_matches(got.cpu(), expected, 1e-5)


# ------------------------------------------------------------------------------------------- bad input

def _good(batch=3):
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 2, 4, generator=gen)
    model_output = torch.randn(batch + 2, 2, 4, generator=gen)
    table = torch.randn(ROWS, NUM_COLS, generator=gen)
    return sample, model_output, table


@pytest.mark.parametrize("rows,uncond,match", [
    (torch.tensor([0, 1, ROWS]), torch.tensor([3, -1, 4]), r"step must hold values in \[0, 11\)"),
    (torch.tensor([0, 1, -1]), torch.tensor([3, -1, 4]), r"step must hold values"),
    (torch.tensor([0, 1]), torch.tensor([3, -1, 4]), r"step must be a \[3\] int32/int64 tensor"),
    (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3, -1, 4]), r"step"),
    (torch.tensor([0, 1, 2]), torch.tensor([3, -1, 5]), r"uncond_rows must hold values in \[3, 5\) or -1"),
    (torch.tensor([0, 1, 2]), torch.tensor([0, -1, 4]), r"uncond_rows must hold values"),
    (torch.tensor([0, 1, 2]), torch.tensor([3, -2, 4]), r"uncond_rows must hold values"),
    (torch.tensor([0, 1, 2]), torch.tensor([3, 4]), r"uncond_rows must be a \[3\]"),
    (torch.tensor([0, 1, 2]), torch.tensor([3.0, -1.0, 4.0]), r"uncond_rows must be a \[3\] int32/int64"),
    (torch.tensor([0, 1, 2]), [3, -1, 4], r"uncond_rows must be a \[3\] integer tensor"),
])
def test_bad_maps_are_refused_before_any_write(rows, uncond, match):
    sample, model_output, table = _good()
    out = torch.full_like(sample, 7.0)
    with pytest.raises((ValueError, TypeError), match=match):
        fastguide.guided_step(sample, model_output, table, rows, scale=2.0, uncond_rows=uncond, out=out,
                              backend="torch")
    assert (out == 7.0).all()


def test_uncond_rows_needs_a_scale():
    sample, model_output, table = _good()
    with pytest.raises(ValueError, match="uncond_rows .* needs guidance_scale"):
        fastguide.guided_step(sample, model_output, table, 0, uncond_rows=torch.tensor([3, -1, 4]))


def test_sparse_model_output_needs_the_cond_rows():
    sample, _, table = _good()
    with pytest.raises(ValueError, match="B cond rows"):
        fastguide.guided_step(sample, torch.randn(2, 2, 4), table, 0, scale=2.0,
                              uncond_rows=torch.tensor([-1, -1, -1]))
