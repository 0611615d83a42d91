"""The CUDA C++ kernels (csrc/cuda) run on the CPU through a host emulation of CUDA (tests/cuda_emu).

CI has no GPU, so without this the kernels' logic would only ever be compiled. Here fastguide._C is built with
csrc/cuda compiled by g++ against tests/cuda_emu (once per session; cached under the temp dir by a hash of the
sources), and fastguide's "cuda" backend is pointed at it for CPU tensors, inside each test only (monkeypatch):
fastguide.backends.abi's extension, backend_cuda._run (stream 0) and dispatch's availability of "cuda" on CPU.

* Every test of tests/test_backends_parity.py runs for backend "cuda" on its own case lists (read from its
  parametrize marks): on an emulated H100 (sm_90, so row reductions use clusters of blocks), and the
  row-reduction tests also on an A100 (sm_80, one block per row), on an sm_90 partition where a cluster launch
  does not fit (the fallback), and with blocks and threads scheduled in reverse order.
* The fused step over every combination of optional inputs (the multistep history as x0_prev, x0_prev2 or
  both: one feature bit), CFG on/off, learned variance and x0-only calls, with the clip modes, output modes
  (fresh, poisoned, aliased) and step kinds rotating, in fp32/fp16/bf16, on the 16-byte vector path (every one
  of its kernels must run) and on the scalar fallback (odd sizes, misaligned views); each call checks from the
  launch log that the expected path ran. The history terms alone and together, aliased and in x0-only calls
  (which must not read them), counting each history element's reads.
* The heterogeneous-batch cases of tests/test_backends_heterogeneous.py (one table row per sample, sparse CFG
  batches) in fp32/fp16/bf16 on the vector path (row lengths rounded up to whole packs) and on the scalar
  fallback (the cases' odd sizes, or a misaligned model_output), checking the path from the launch log and
  that each thread read step_rows[b] / uncond_rows[b] once per row; a sample without an uncond row is exact
  (infinite cond values, NaN scale); and the per-sample regions do catch a block reading another sample's.
* Guidance beyond CFG: the combine cases of tests/test_backends_guidance_ops.py (m = a c + b u + d e, extra,
  eps_from_uncond) in fp32/fp16/bf16 on the vector path and on the scalar fallback (odd sizes, or a misaligned
  extra / model_output), checking the kernel from the launch log, that each thread reads its sample's combine
  coefficients once per row (a per-sample region) and every element of extra once; CFG++ with a scale on the
  heterogeneous cases (dense and sparse); and a sweep that runs every beyond-CFG vector kernel.
* The row reductions (RMS, CFG-rescale factor, LSE gradient, guidance gram) over sizes around the vector width,
  misaligned rows and row offsets, and every emulated device; the gram cases of
  tests/test_backends_guidance_ops.py on both paths (extra writable only with a momentum) and on every device.
* The emulation itself (tests/cuda_emu/selftest.cu): shuffles, barriers, clusters, and that the faults it
  promises to catch do fail.

Every kernel access is checked against the memory its argument block allows (tests/cuda_emu/emulator.py:
rows of each tensor, the selected coefficient row(s), for one sample's table row or uncond row only the blocks
of that sample, inputs read-only); misaligned vector accesses, barriers
not every thread reaches and array overruns fail the launch. What the emulation cannot see (real
concurrency, the memory model, FMA contraction, timing) is listed in tests/cuda_emu/include/cuda_runtime.h.
"""

from __future__ import annotations

import ctypes
import inspect
import dataclasses
import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pytest
import torch

import fastguide
from fastguide.backends import abi, dispatch, reference
from fastguide.backends import cuda as backend_cuda
from cuda_emu import build
from cuda_emu.emulator import Emulator

import test_backends_guidance_ops as guide   # (module attributes, so pytest does not collect their tests
import test_backends_heterogeneous as hetero  # here again)
import test_backends_parity as parity

MISSING = build.missing_toolchain()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"CUDA emulation unavailable: {MISSING}")

H100, A100, SMALL_SM90 = 0, 1, 2  # emulated devices (tests/cuda_emu/emu_runtime.cpp)
DEVICE_IDS = {H100: "h100", A100: "a100", SMALL_SM90: "sm90-no-cluster-fit"}
DTYPE_IDS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
VEC = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}  # elements per 16-byte pack


@pytest.fixture(scope="session")
def emulator() -> Emulator:
    return Emulator(build.build())


def _runs_emulated(name: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    """Stands in for test_backends_parity.skip_unless_runs: here only the emulated "cuda" on CPU runs."""
    assert (name, device) == ("cuda", "cpu"), (name, device)


@pytest.fixture
def cuda_emulated(emulator: Emulator, monkeypatch) -> Emulator:
    """fastguide's "cuda" backend on the emulated kernels for CPU tensors, for the duration of one test."""
    monkeypatch.setattr(abi, "_extension", emulator.module)
    monkeypatch.setattr(backend_cuda, "_run", emulator.run)
    monkeypatch.setitem(dispatch._cache, "cuda", (True, "", backend_cuda))
    runs_on = dispatch.runs_on
    monkeypatch.setattr(dispatch, "runs_on",
                        lambda name, device: device.type == "cpu" if name == "cuda" else runs_on(name, device))
    # Parity tests reused here must be asked for the emulated "cuda" on CPU only (the stand-in asserts it).
    monkeypatch.setattr(parity, "skip_unless_runs", _runs_emulated)
    emulator.configure(device=H100, schedule="forward")
    emulator.clear_log()
    return emulator


# ------------------------------------------------------------------------------------ the parity suite

def _parity_cases() -> List:
    """(test name, kwargs) for every test of test_backends_parity and every value of its parametrize marks other
    than backend/device, with the ids pytest gives them there."""
    params = []
    for name in sorted(n for n in dir(parity) if n.startswith("test_")):
        fn = getattr(parity, name)
        axes = []
        for mark in reversed([m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]):
            argnames = mark.args[0]
            names = [s.strip() for s in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
            if names == ["backend", "device"]:
                continue
            ids = mark.kwargs.get("ids")
            axis = []
            for i, value in enumerate(mark.args[1]):
                marks = ()
                if getattr(value, "_fields", None) == ("values", "marks", "id"):  # a pytest.param
                    value, marks, given = (value.values if len(names) > 1 else value.values[0]), value.marks, value.id
                else:
                    given = None
                if given is None:
                    given = ids(value) if callable(ids) else ids[i] if ids else (
                        getattr(value, "name", None) or str(value))
                axis.append((names, value, given, marks))
            axes.append(axis)
        wanted = list(inspect.signature(fn).parameters)
        covered = ["backend", "device"] + [n for axis in axes for n in axis[0][0]]
        assert sorted(wanted) == sorted(covered), (
            f"test_backends_parity.{name} takes {wanted}; only backend, device and its parametrize values are "
            f"passed here: extend _parity_cases")
        for combo in itertools.product(*axes):
            kwargs, ids, marks = {}, [name], []
            for names, value, given, value_marks in combo:
                kwargs.update(zip(names, value) if len(names) > 1 else {names[0]: value})
                ids.append(str(given))
                marks.extend(value_marks)
            params.append(pytest.param(name, kwargs, id="-".join(ids), marks=marks))
    return params


PARITY_CASES = _parity_cases()
# Tests whose kernels are row reductions launched as clusters on sm_90 (rescale factor, RMS; the step's
# rescale cases call the same kernel but are covered on H100 only).
REDUCTION_CASES = [p for p in PARITY_CASES if re.search(r"cfg_rescale_factor|per_sample_rms", p.values[0])]


@pytest.mark.parametrize("name,kwargs", PARITY_CASES)
def test_parity_suite_on_emulated_h100(cuda_emulated, name, kwargs):
    getattr(parity, name)("cuda", "cpu", **kwargs)
    launches = cuda_emulated.launches()
    assert launches and all(r.result == 0 for r in launches), launches  # the emulated kernels did run


@pytest.mark.parametrize("config", [(A100, "forward"), (SMALL_SM90, "forward"), (H100, "reverse")],
                         ids=["a100", "sm90-no-cluster-fit", "h100-reverse-order"])
@pytest.mark.parametrize("name,kwargs", REDUCTION_CASES)
def test_parity_reductions_on_other_devices(cuda_emulated, config, name, kwargs):
    device, schedule = config
    cuda_emulated.configure(device=device, schedule=schedule)
    getattr(parity, name)("cuda", "cpu", **kwargs)
    assert any(r.result == 0 for r in cuda_emulated.launches())


def test_parity_suite_is_reused():
    """The reuse above really picked up the parity suite's cases (a renamed mark would silently drop them)."""
    names = {p.values[0] for p in PARITY_CASES}
    assert {"test_guided_step_matches_reference", "test_cfg_rescale_factor_matches_reference",
            "test_temperature_lse_grad_matches_reference", "test_per_sample_rms_matches_reference"} <= names
    step_cases = [p for p in PARITY_CASES if p.values[0] == "test_guided_step_matches_reference"]
    assert len(step_cases) == len(parity.STEP_CASES) * len(parity.DTYPES)


# ------------------------------------------------------------------------------------ fused step sweep

# Bits of the kernel's feature mask (csrc/cuda/guided_step.cu, StepFeature), computed here from the call.
CFG, SCORE_GRAD, MEAN_GRAD, NOISE, X0_PREV, LEARNED_VAR = 1, 2, 4, 8, 16, 32
EXTRA, BEYOND_CFG = 64, 128  # extra e; guidance beyond CFG (combine and/or eps_from_uncond), not a stream
RUNTIME_IN_BEYOND = SCORE_GRAD | MEAN_GRAD  # runtime flags in the beyond-CFG kernels, not in their mask
# x0_prev2 (the third-order history) is no bit of its own: a runtime branch inside the X0_PREV kernels, whose
# bit is set for x0_prev, x0_prev2 or both.
TERM_BITS = {"g_score": SCORE_GRAD, "g_mean": MEAN_GRAD, "noise": NOISE, "x0_prev": X0_PREV, "x0_prev2": X0_PREV}
assert set(TERM_BITS) == set(parity.TERMS), "a term of the parity suite without its feature bit here"
# The term slots of the sweeps: the history slot is x0_prev, x0_prev2 or both (drawn per call).
SLOTS = ("g_score", "g_mean", "noise", "history")
HISTORIES = (frozenset({"x0_prev"}), frozenset({"x0_prev2"}), frozenset({"x0_prev", "x0_prev2"}))


def reachable_masks() -> List[int]:
    """Masks the host code can select: g_mean/x0_prev/x0_prev2/variance only when x_out is written, the
    variance bit only with a term that uses Sigma."""
    masks = set()
    terms = parity.TERMS
    for bits, cfg, lv, write_out in itertools.product(range(1 << len(terms)), (0, 1), (0, 1), (0, 1)):
        masks.add(_mask({t for i, t in enumerate(terms) if bits >> i & 1}, cfg, lv, write_out))
    return sorted(masks)


def _slot_terms(bits: int, history_rng: random.Random) -> frozenset:
    """The terms of the slots set in ``bits`` (SLOTS order); the history slot's variant drawn from its own
    generator (so that the other options' draws stay as they were)."""
    history = history_rng.choice(HISTORIES)
    terms = set()
    for j, slot in enumerate(SLOTS):
        if bits >> j & 1:
            terms |= history if slot == "history" else {slot}
    return frozenset(terms)


def _mask(terms, cfg: bool, learned_variance: bool, write_out: bool) -> int:
    mask = CFG if cfg else 0
    for term in terms:
        if write_out or term in ("g_score", "noise"):
            mask |= TERM_BITS[term]
    if write_out and learned_variance and terms & {"g_mean", "noise"}:
        mask |= LEARNED_VAR
    return mask


@dataclass(frozen=True)
class SweepCall:
    case: parity.StepCase
    misaligned: Optional[str] = None  # a tensor placed one element off a 16-byte boundary


def _sweep_calls(path: str) -> List[SweepCall]:
    """Every (terms, CFG, learned variance, writes x_out) combination; the other options drawn from a seeded
    generator (not from the combination's index, which would tie them to the bits above)."""
    calls = []
    combos = itertools.product(range(1 << len(SLOTS)), (False, True), (False, True), (True, False))
    for i, (bits, cfg, lv, write_out) in enumerate(combos):
        rng = random.Random(parity.seed_of("emulated-sweep", path, i))
        terms = _slot_terms(bits, random.Random(parity.seed_of("emulated-sweep-history", path, i)))
        guidance = rng.choice(["per_sample", "scalar", "tensor0d"]) if cfg else "none"
        outputs = rng.choice(["new", "poisoned", "alias", "alias_both"]) if write_out else "x0_only"
        misaligned = None
        if path == "vector":
            # Rows of whole 16-byte packs (multiples of 8 elements); the last shape spans several blocks with
            # a partial one. Row-strided views keep rows aligned (a stride of 2N); transposed ones are copied.
            shape = rng.choice([(2, 4, 8, 10), (3, 8, 6, 4), (1, 2, 1040)])
            view = rng.choice(["contiguous", "row_strided", "transposed"])
        else:
            # Odd row lengths, or aligned lengths with one tensor that the kernel reads or writes misaligned.
            shape = rng.choice([(3, 5, 7), (1, 3, 11, 13), (2, 8, 8), (2, 4, 16)])
            view = rng.choice(["contiguous", "row_strided", "transposed"])
            if shape[1:] in ((8, 8), (4, 16)):
                candidates = ["sample", "model_output"] + sorted(t for t in terms if _mask({t}, False, False, write_out))
                candidates += {"poisoned": ["out", "x0_out"], "x0_only": ["x0_out"]}.get(outputs, [])
                misaligned = rng.choice(candidates)
                view = "contiguous"
        case = parity.StepCase(
            f"{path}{i}", shape=shape, guidance=guidance, learned_variance=lv, terms=terms, outputs=outputs,
            clip=rng.choice(["none", "range", "threshold"]), rescale=rng.choice([0.0, 0.6]) if cfg else 0.0,
            step=rng.choice(["int", "int64", "int32"]), view=view, nan_unused=rng.random() < 0.25)
        calls.append(SweepCall(case, misaligned))
    return calls


def _check_options_covered(calls: List[SweepCall]) -> None:
    """Each rotating option takes every value somewhere in the sweep."""
    seen = {field: {getattr(c.case, field) for c in calls}
            for field in ("guidance", "outputs", "clip", "rescale", "step", "view", "nan_unused")}
    assert seen["guidance"] == {"none", "per_sample", "scalar", "tensor0d"}
    assert seen["outputs"] == {"new", "poisoned", "alias", "alias_both", "x0_only"}
    assert seen["clip"] == {"none", "range", "threshold"} and seen["rescale"] == {0.0, 0.6}
    assert seen["step"] == {"int", "int64", "int32"} and seen["nan_unused"] == {False, True}
    assert seen["view"] >= {"contiguous", "row_strided"}
    misaligned = {c.misaligned for c in calls} - {None}
    assert not misaligned or misaligned == {"sample", "model_output", "out", "x0_out", *parity.TERMS}, misaligned
    # Each history variant, where the kernel reads it and in x0-only calls (which must not).
    for write_out in (True, False):
        histories = {c.case.terms & {"x0_prev", "x0_prev2"} for c in calls
                     if (c.case.outputs != "x0_only") == write_out}
        assert histories >= set(HISTORIES), (write_out, histories)


def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` starting one element after a 16-byte boundary."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype)
    out = buf[1:1 + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def _run_sweep_step(call: SweepCall, backend: str, inputs) -> Dict[str, torch.Tensor]:
    """One fastguide.guided_step call; like test_backends_parity._run_step, with the misaligned tensor placed."""
    case = call.case
    sample, model_output, table, step, kwargs = inputs
    kwargs = dict(kwargs)
    if call.misaligned == "sample":
        sample = _misaligned_copy(sample)
    elif call.misaligned == "model_output":
        model_output = _misaligned_copy(model_output)
    elif call.misaligned in parity.TERMS:
        kwargs[call.misaligned] = _misaligned_copy(kwargs[call.misaligned])

    def poisoned(name: str) -> torch.Tensor:
        t = torch.full(sample.shape, float("nan"), dtype=sample.dtype)
        return _misaligned_copy(t) if call.misaligned == name else t

    before = sample.clone()
    if case.outputs in ("alias", "alias_both"):
        sample = sample.clone() if call.misaligned != "sample" else _misaligned_copy(sample)
        x0 = sample if case.outputs == "alias_both" else None
        fastguide.guided_step(sample, model_output, table, step, out=sample, x0_out=x0, backend=backend, **kwargs)
        return {"out": sample}
    if case.outputs == "x0_only":
        x0 = poisoned("x0_out")
        assert fastguide.guided_step(sample, model_output, table, step, x0_out=x0, write_out=False,
                                     backend=backend, **kwargs) is None
        results = {"x0": x0}
    elif case.outputs == "poisoned":
        out, x0 = poisoned("out"), poisoned("x0_out")
        fastguide.guided_step(sample, model_output, table, step, out=out, x0_out=x0, backend=backend, **kwargs)
        results = {"out": out, "x0": x0}
    else:
        results = {"out": fastguide.guided_step(sample, model_output, table, step, backend=backend, **kwargs)}
    torch.testing.assert_close(sample, before, rtol=0, atol=0)  # inputs are never written
    return results


# The beyond-CFG kernels (BeyondCfgFeatures<mask>) have the BEYOND_CFG bit in their mask, the others never.
_STEP_KERNEL = re.compile(r"guided_step_kernel<[\w:]*?(F32|F16|BF16), (\d+), (\d+), "
                          r"(?:[\w:()\s]*?(?:Static|BeyondCfg)Features<(\d+)>|[\w:()\s]*?RuntimeFeatures)")
IO_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _step_launch(emu: Emulator) -> Tuple[str, int, Optional[int]]:
    """(storage type, pack width, static feature mask or None) of the one fused-step launch logged."""
    steps = [r for r in emu.launches() if "guided_step_kernel" in r.kernel]
    assert len(steps) == 1, [r.kernel for r in emu.launches()]
    m = _STEP_KERNEL.search(steps[0].kernel)
    assert m, steps[0].kernel
    mask = None if m.group(4) is None else int(m.group(4))
    assert ("BeyondCfgFeatures" in steps[0].kernel) == (mask is not None and bool(mask & BEYOND_CFG)), steps[0].kernel
    return m.group(1), int(m.group(2)), mask


def _expected_vector_path(call: SweepCall, dtype: torch.dtype) -> bool:
    case = call.case
    n = 1
    for d in case.shape[1:]:
        n *= d
    if n % VEC[dtype]:
        return False
    # vectorizable() looks at the tensors the kernel reads (by its mask) and at the outputs.
    write_out = case.outputs != "x0_only"
    used = {"sample", "model_output", "out", "x0_out"} | {t for t in case.terms if _mask({t}, False, False, write_out)}
    return call.misaligned not in used


@pytest.mark.parametrize("dtype", parity.DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("path", ["vector", "scalar"])
def test_step_sweep(cuda_emulated, path, dtype):
    calls = _sweep_calls(path)
    _check_options_covered(calls)
    failures, masks = [], set()
    for call in calls:
        case = call.case
        try:
            inputs = parity._step_call(case, "cpu", dtype, parity.seed_of("emulated-sweep", case.name, str(dtype)))
            expected = _run_sweep_step(call, "torch", inputs)
            cuda_emulated.clear_log()
            actual = _run_sweep_step(call, "cuda", inputs)
            assert expected.keys() == actual.keys()
            for key in expected:
                assert actual[key].dtype == dtype
                parity.assert_matches(actual[key], expected[key], parity.step_tol(dtype))
            io, vec, mask = _step_launch(cuda_emulated)
            assert io == IO_NAMES[dtype]
            if _expected_vector_path(call, dtype):
                assert vec == VEC[dtype], f"took the scalar kernel (pack of {vec})"
                want = _mask(case.terms, case.guidance != "none", case.learned_variance, case.outputs != "x0_only")
                assert mask == want, f"ran the kernel of feature mask {mask}, expected {want}"
                masks.add(mask)
            else:
                assert (vec, mask) == (1, None), f"took the vector kernel (pack of {vec}, mask {mask})"
        except (AssertionError, RuntimeError) as exc:
            failures.append(f"{case} misaligned={call.misaligned}: {exc}")
    assert not failures, f"{len(failures)} of {len(calls)} calls failed:\n" + "\n\n".join(failures[:5])
    if path == "vector":
        assert masks == set(reachable_masks()), f"vector kernels never run: {set(reachable_masks()) - masks}"


@pytest.mark.parametrize("dtype", parity.DTYPES, ids=DTYPE_IDS.get)
def test_step_out2_paths(cuda_emulated, dtype):
    """The second destination on the vector path (aligned rows of whole packs; as the halves of one [2B]
    buffer, as a loop passes them) and on the scalar fallback (odd rows, or out2 itself misaligned)."""
    from fastguide.core.args import StepArgs
    from fastguide.core.ops import run_step
    for shape, placement, vector in [((2, 4, 8, 10), "halves", True), ((3, 8, 6, 4), "separate", True),
                                     ((2, 4, 8, 10), "misaligned", False), ((3, 5, 7), "halves", False)]:
        gen = torch.Generator().manual_seed(parity.seed_of("out2-paths", shape, placement, str(dtype)))
        batch = shape[0]
        x = torch.randn(shape, generator=gen).to(dtype)
        mo = torch.randn((2 * batch,) + shape[1:], generator=gen).to(dtype)
        noise = torch.randn(shape, generator=gen).to(dtype)
        scale = 4.0 * torch.rand(batch, generator=gen)
        table = torch.randn(3, parity.NUM_COLS, generator=gen)
        nan = torch.full(shape, float("nan"), dtype=dtype)
        if placement == "halves":
            out, out2 = torch.full((2 * batch,) + shape[1:], float("nan"), dtype=dtype).split(batch)
        elif placement == "misaligned":
            out, out2 = nan.clone(), _misaligned_copy(nan)
        else:
            out, out2 = nan.clone(), nan.clone()
        want = fastguide.guided_step(x, mo, table, 1, scale=scale, noise=noise, backend="torch")
        cuda_emulated.clear_log()
        run_step(StepArgs(x, mo, table, torch.tensor(1), scale=scale, noise=noise, out=out, out2=out2), "cuda")
        assert torch.equal(out, out2)
        parity.assert_matches(out, want, parity.step_tol(dtype))
        _, vec, _ = _step_launch(cuda_emulated)
        assert (vec == VEC[dtype]) == vector, (shape, placement, vec)


# (name, terms, CFG, output mode) of the history cases: x0_prev2 alone (x0_prev's coefficient F NaN: its term
# must not enter), with x0_prev (and F2 NaN where x0_prev2 is absent), with CFG and noise, both outputs aliasing
# the history exactly (out = x0_prev, x0_out = x0_prev2: read before written), and x0-only calls, which must
# not read either (the emulator registers them only for calls that write out).
HISTORY_CASES = [
    ("x0_prev2_alone", {"x0_prev2"}, False, "new"),
    ("x0_prev_alone", {"x0_prev"}, False, "new"),
    ("both", {"x0_prev", "x0_prev2"}, False, "new"),
    ("both_cfg_noise", {"x0_prev", "x0_prev2", "noise"}, True, "new"),
    ("x0_prev2_cfg_score", {"x0_prev2", "g_score"}, True, "new"),
    ("both_aliased", {"x0_prev", "x0_prev2"}, True, "alias_history"),
    ("x0_prev2_aliased", {"x0_prev2", "noise"}, False, "alias_history"),
    ("x0_only_x0_prev2", {"x0_prev2"}, False, "x0_only"),
    ("x0_only_both", {"x0_prev", "x0_prev2", "noise"}, True, "x0_only"),
]


@pytest.mark.parametrize("path", ["vector", "misaligned", "odd"])
@pytest.mark.parametrize("dtype", parity.DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name,terms,cfg,outputs", HISTORY_CASES, ids=[c[0] for c in HISTORY_CASES])
def test_step_history_terms(cuda_emulated, name, terms, cfg, outputs, dtype, path):
    """The multistep history x0_prev (F) and x0_prev2 (F2): either alone or both, in the X0_PREV kernels (no
    feature bit of its own), on the vector path and on the scalar fallback (x0_prev2, else x0_prev, one element
    off a 16-byte boundary, or an odd row length). Each element of a present history tensor is read once, an absent one's
    coefficient (NaN here) never enters, and an x0-only call reads neither."""
    shape = (3, 5, 7) if path == "odd" else (2, 4, 8, 10)
    gen = torch.Generator().manual_seed(parity.seed_of("emulated-history", name, path, str(dtype)))
    batch, n = shape[0], math.prod(shape[1:])
    sample = torch.randn(shape, generator=gen).to(dtype)
    model_output = torch.randn(((2 if cfg else 1) * batch,) + shape[1:], generator=gen).to(dtype)
    kwargs = {t: torch.randn(shape, generator=gen).to(dtype) for t in sorted(terms)}
    if cfg:
        kwargs["scale"] = 1.0 + 4.0 * torch.rand(batch, generator=gen)
    table = torch.randn(4, parity.NUM_COLS, generator=gen)
    for term, col in (("x0_prev", parity.Col.F), ("x0_prev2", parity.Col.F2)):
        if term not in terms:
            table[:, col] = float("nan")
    write_out = outputs != "x0_only"
    misaligned = "x0_prev2" if "x0_prev2" in terms else "x0_prev"

    def run(backend: str):
        # Fresh copies of the history (the aliasing calls overwrite it), one misaligned on that path.
        args = {k: v.clone() if k in ("x0_prev", "x0_prev2") else v for k, v in kwargs.items()}
        if path == "misaligned":
            args[misaligned] = _misaligned_copy(args[misaligned])
        if outputs == "alias_history":
            out = args.get("x0_prev")
            x0 = args["x0_prev2"]
            res = fastguide.guided_step(sample, model_output, table, 2, out=out, x0_out=x0, backend=backend,
                                        **args)
            return res, x0
        x0 = torch.full(shape, float("nan"), dtype=dtype)
        res = fastguide.guided_step(sample, model_output, table, 2, x0_out=x0, write_out=write_out,
                                    backend=backend, **args)
        return res, x0

    want, want_x0 = run("torch")
    cuda_emulated.clear_log()
    got, got_x0 = run("cuda")
    tol = parity.step_tol(dtype)
    if write_out:
        assert not torch.isnan(want).any()  # the NaN coefficient of an absent term does not enter
        parity.assert_matches(got, want, tol)
    else:
        assert got is None
    parity.assert_matches(got_x0, want_x0, tol)

    io, vec, mask = _step_launch(cuda_emulated)
    assert io == IO_NAMES[dtype]
    if path == "vector":
        assert vec == VEC[dtype], f"took the scalar kernel (pack of {vec})"
        want_mask = _mask(terms, cfg, False, write_out)
        assert bool(want_mask & X0_PREV) == write_out
        assert mask == want_mask, f"ran the kernel of feature mask {mask}, expected {want_mask}"
    elif path == "misaligned" and not write_out:
        # The history is not read, so its alignment does not matter: the vector kernel runs.
        assert (vec, mask) == (VEC[dtype], _mask(terms, cfg, False, False)), (vec, mask)
    else:
        assert (vec, mask) == (1, None), f"took the vector kernel (pack of {vec}, mask {mask})"
    accesses = cuda_emulated.last_accesses
    for term in ("x0_prev", "x0_prev2"):
        expected = batch * n // vec if write_out and term in terms else 0
        assert accesses.get(term, 0) == expected, (term, accesses)


def test_step_rows_beyond_grid_limit(cuda_emulated):
    """More rows than grid.y can hold (65535): each block row loops over several sample rows. One dtype: the
    row loop does not depend on it, and 16.8 M emulated threads take a few seconds."""
    dtype = torch.float32
    gen = torch.Generator().manual_seed(parity.seed_of("many-rows", str(dtype)))
    batch = 65535 + 3
    sample = torch.randn(batch, 8, generator=gen).to(dtype)
    model_output = torch.randn(2 * batch, 8, generator=gen).to(dtype)
    noise = torch.randn(batch, 8, generator=gen).to(dtype)
    table = torch.randn(2, parity.NUM_COLS, generator=gen)
    kwargs = dict(scale=torch.rand(batch, generator=gen) * 4, noise=noise)
    expected = fastguide.guided_step(sample, model_output, table, 1, backend="torch", **kwargs)
    actual = fastguide.guided_step(sample, model_output, table, 1, backend="cuda", **kwargs)
    parity.assert_matches(actual, expected, parity.step_tol(dtype))
    [launch] = [r for r in cuda_emulated.launches() if "guided_step_kernel" in r.kernel]
    assert launch.grid[1] == 65535



# ------------------------------------------------------------------------------- heterogeneous batches

SPARSE = ("some", "none", "all")  # MixedCase.uncond values with an uncond_rows map
# The module's cases, plus a sparse map without any uncond row where it has none (its "sparse_none" case
# leaves uncond at the default "some").
HETERO_CASES = list(hetero.CASES) + ([] if any(c.uncond == "none" for c in hetero.CASES) else [
    hetero.MixedCase("sparse_no_uncond_rows", uncond="none", terms=frozenset({"noise"}))])


def _hetero_variant(case, path: str, dtype: torch.dtype):
    """(case, misaligned model_output?) of a heterogeneous case on ``path``: for the vector path the last
    dimension rounded up to a multiple of 8 (rows of whole 16-byte packs in every dtype); for the scalar path
    the case's own sizes, with model_output one element off a 16-byte boundary where those are whole packs."""
    if path == "vector":
        *lead, last = case.shape
        return dataclasses.replace(case, shape=(*lead, -(-last // 8) * 8)), False
    return case, math.prod(case.shape[1:]) % VEC[dtype] == 0


@pytest.mark.parametrize("path", ["vector", "scalar"])
@pytest.mark.parametrize("dtype", parity.DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", HETERO_CASES, ids=lambda c: c.name)
def test_heterogeneous_step(cuda_emulated, case, dtype, path):
    """test_backends_heterogeneous's cases against the reference, on the expected kernel; every block reads
    only its own sample's table row and uncond row (per-sample regions, emulator.py), each of its threads
    step_rows[b] and uncond_rows[b] once for the row (never per element)."""
    case, misaligned = _hetero_variant(case, path, dtype)
    sample, model_output, table, rows, kwargs = hetero.mixed_call(
        case, "cpu", dtype, parity.seed_of("emulated-heterogeneous", case.name, path, str(dtype)))
    if misaligned:
        model_output = _misaligned_copy(model_output)
    inputs = (sample, model_output, table, rows, kwargs)
    expected, expected_x0 = hetero.run_case(case, "torch", *inputs)
    cuda_emulated.clear_log()
    got, got_x0 = hetero.run_case(case, "cuda", *inputs)
    tol = parity.step_tol(dtype)
    if expected is not None:
        assert got.dtype == dtype
        parity.assert_matches(got, expected, tol)
    if expected_x0 is not None:
        parity.assert_matches(got_x0, expected_x0, tol)

    io, vec, mask = _step_launch(cuda_emulated)
    assert io == IO_NAMES[dtype]
    if path == "vector":
        assert vec == VEC[dtype], f"took the scalar kernel (pack of {vec})"
        cfg = case.uncond != "none_scale_free"
        want = _mask(case.terms, cfg, case.learned_variance, case.outputs != "x0_only")
        assert mask == want, f"ran the kernel of feature mask {mask}, expected {want}"
    else:
        assert (vec, mask) == (1, None), f"took the vector kernel (pack of {vec}, mask {mask})"
    # At most 65535 rows: every thread works on one row, so one read of each map per thread.
    [launch] = [r for r in cuda_emulated.launches() if "guided_step_kernel" in r.kernel]
    accesses = cuda_emulated.last_accesses
    per_sample_steps = case.shape[0] > 1  # a one-sample [1] step is a plain device step index
    assert accesses.get("step_rows", 0) == (launch.threads if per_sample_steps else 0), accesses
    assert accesses.get("uncond_rows", 0) == (launch.threads if case.uncond in SPARSE else 0), accesses


def test_heterogeneous_cases_are_reused():
    """Both paths above do see what they are meant to: each of the cases' features, whole packs on the
    vector path, and sizes of both kinds on the scalar one."""
    assert {c.uncond for c in HETERO_CASES} >= {*SPARSE, "dense", "none_scale_free"}
    assert {c.name for c in hetero.CASES} <= {c.name for c in HETERO_CASES}
    for dtype in parity.DTYPES:
        scalar = [_hetero_variant(c, "scalar", dtype) for c in HETERO_CASES]
        assert any(m for _, m in scalar) and not all(m for _, m in scalar)
        for case in HETERO_CASES:
            shape = _hetero_variant(case, "vector", dtype)[0].shape
            assert math.prod(shape[1:]) % VEC[dtype] == 0 and shape[:-1] == case.shape[:-1]


def test_sample_without_uncond_row_ignores_its_scale(cuda_emulated):
    hetero.test_sample_without_uncond_row_ignores_its_scale("cuda", "cpu")
    _step_launch(cuda_emulated)  # the one step ran on the emulated kernels


@pytest.mark.parametrize("path", ["vector", "scalar"])
def test_sparse_sample_without_uncond_row_is_exact(cuda_emulated, path):
    """m = c exactly for a sample without an uncond row: infinite cond values stay infinite (u = c with w = 1
    would make them NaN: c - c) and its scale is not used (NaN here, past the host checks: run_step)."""
    from fastguide.core.args import StepArgs
    from fastguide.core.ops import run_step
    inf = float("inf")
    n = 8 if path == "vector" else 7
    gen = torch.Generator().manual_seed(parity.seed_of("sparse-exact", path))
    sample = torch.randn(3, n, generator=gen)
    model_output = torch.randn(4, n, generator=gen)
    model_output[0, :3] = torch.tensor([inf, -inf, inf])
    model_output[2, 1] = -inf
    table = torch.randn(hetero.ROWS, parity.NUM_COLS, generator=gen)
    step_rows, uncond_rows = torch.tensor([2, 7, 4]), torch.tensor([-1, 3, -1])
    scale = torch.tensor([float("nan"), 2.5, inf])

    def step(backend: str):
        out, x0 = torch.full_like(sample, 7.0), torch.full_like(sample, 7.0)
        args = StepArgs(sample, model_output, table, 0, scale=scale, out=out, x0_out=x0, step_rows=step_rows,
                        uncond_rows=uncond_rows)
        if backend == "torch":
            reference.guided_step(args)
        else:
            run_step(args, backend)
        return out, x0

    (want_out, want_x0), (out, x0) = step("torch"), step("cuda")
    assert torch.isinf(want_x0[0, :3]).all() and not torch.isnan(want_x0).any()  # the case tests something
    torch.testing.assert_close(x0, want_x0, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5, equal_nan=True)
    _, vec, _ = _step_launch(cuda_emulated)
    assert vec == (4 if path == "vector" else 1)


def test_per_sample_regions_catch_another_samples_rows(cuda_emulated, monkeypatch):
    """The checker's per-sample regions are enforced: with every table row and uncond row registered for
    the wrong sample, the launch faults on a block reading its own (as it would on a kernel that read
    another sample's)."""
    case = dataclasses.replace(hetero.CASES[1], shape=(3, 2, 8))  # sparse_some
    sample, model_output, table, rows, kwargs = hetero.mixed_call(case, "cpu", torch.float32, 5)
    add_region = cuda_emulated.add_region
    for which in ("table", "uncond"):
        def shifted(name, base, n_rows, row_bytes, stride_bytes, writable, sample_row=-1):
            if sample_row >= 0 and which in name:
                sample_row = (sample_row + 1) % 3
            add_region(name, base, n_rows, row_bytes, stride_bytes, writable, sample_row)

        monkeypatch.setattr(cuda_emulated, "add_region", shifted)
        with pytest.raises(RuntimeError, match=r"other sample row's 4-byte read|other sample row's 16-byte read"):
            hetero.run_case(case, "cuda", sample, model_output, table, rows, kwargs)
        monkeypatch.setattr(cuda_emulated, "add_region", add_region)
    hetero.run_case(case, "cuda", sample, model_output, table, rows, kwargs)  # registered right: runs


# ------------------------------------------------------------------------------- guidance beyond CFG

def _beyond_mask(terms, learned_variance: bool, write_out: bool, extra: bool) -> int:
    """The static mask of the beyond-CFG kernel a call runs: its streams without the runtime ones."""
    mask = _mask(terms, True, learned_variance, write_out) | BEYOND_CFG | (EXTRA if extra else 0)
    return mask & ~RUNTIME_IN_BEYOND


def _combine_variant(case, path: str, dtype: torch.dtype):
    """(case, tensor to misalign or None) of a combine case on ``path``: for the vector path the last dimension
    rounded up to a multiple of 8 (rows of whole 16-byte packs in every dtype); for the scalar path the case's own
    sizes, with extra (else model_output) one element off a 16-byte boundary where those are whole packs."""
    if path == "vector":
        *lead, last = case.shape
        return dataclasses.replace(case, shape=(*lead, -(-last // 8) * 8)), None
    if math.prod(case.shape[1:]) % VEC[dtype]:
        return case, None
    return case, "extra" if case.extra else "model_output"


def _check_step_path(emu: Emulator, path: str, dtype: torch.dtype, want_mask: int) -> None:
    io, vec, mask = _step_launch(emu)
    assert io == IO_NAMES[dtype]
    if path == "vector":
        assert vec == VEC[dtype], f"took the scalar kernel (pack of {vec})"
        assert mask == want_mask, f"ran the kernel of feature mask {mask}, expected {want_mask}"
    else:
        assert (vec, mask) == (1, None), f"took the vector kernel (pack of {vec}, mask {mask})"


@pytest.mark.parametrize("path", ["vector", "scalar"])
@pytest.mark.parametrize("dtype", parity.DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", guide.CASES, ids=lambda c: c.name)
def test_combine_step(cuda_emulated, case, dtype, path):
    """test_backends_guidance_ops's combine cases (and its CFG++ cases on plain and sparse CFG) against the
    reference, on the expected kernel; each thread reads its row's combine coefficients once (a, b; d only with
    extra), and only its own sample's (per-sample regions), or else its scale once, and every element of extra
    once; extra is never written."""
    case, misaligned = _combine_variant(case, path, dtype)
    sample, model_output, table, step, kwargs = guide.combine_call(
        case, "cpu", dtype, parity.seed_of("emulated-combine", case.name, path, str(dtype)))
    if misaligned == "model_output":
        model_output = _misaligned_copy(model_output)
    elif misaligned:
        kwargs[misaligned] = _misaligned_copy(kwargs[misaligned])
    extra_before = kwargs["extra"].clone() if case.extra else None
    inputs = (sample, model_output, table, step, kwargs)
    expected, expected_x0 = guide.run_combine(case, "torch", *inputs)
    cuda_emulated.clear_log()
    got, got_x0 = guide.run_combine(case, "cuda", *inputs)
    tol = parity.step_tol(dtype)
    if case.outputs != "x0_only":
        assert got.dtype == dtype
        parity.assert_matches(got, expected, tol)
    if expected_x0 is not None:
        parity.assert_matches(got_x0, expected_x0, tol)
    if case.extra:
        assert torch.equal(kwargs["extra"], extra_before)

    _check_step_path(cuda_emulated, path, dtype,
                     _beyond_mask(case.terms, case.learned_variance, case.outputs != "x0_only", case.extra))
    [launch] = [r for r in cuda_emulated.launches() if "guided_step_kernel" in r.kernel]
    accesses = cuda_emulated.last_accesses
    combine = case.mode == "combine"
    assert accesses.get("combine", 0) == (launch.threads * (3 if case.extra else 2) if combine else 0), accesses
    assert accesses.get("scale", 0) == (0 if combine else launch.threads), accesses
    assert accesses.get("uncond_rows", 0) == (launch.threads if case.mode == "sparse" else 0), accesses
    n = math.prod(case.shape[1:])
    want_extra = case.shape[0] * n // (VEC[dtype] if path == "vector" else 1) if case.extra else 0
    assert accesses.get("extra", 0) == want_extra, accesses


# Hetero cases with a CFG scale, rerun with CFG++ (eps~ from u): dense, sparse (a sample without an uncond
# row takes eps~ from its cond prediction, as the reference's u = c), with the runtime g_score / g_mean.
EPS_FROM_UNCOND_CASES = [c for c in hetero.CASES if c.name in (
    "sparse_some", "dense_per_row_steps", "sparse_every_term", "sparse_learned_variance", "sparse_x0_only",
    "odd_rows")]


@pytest.mark.parametrize("path", ["vector", "scalar"])
@pytest.mark.parametrize("dtype", parity.DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", EPS_FROM_UNCOND_CASES, ids=lambda c: c.name)
def test_eps_from_uncond_with_scale(cuda_emulated, case, dtype, path):
    case, misaligned = _hetero_variant(case, path, dtype)
    sample, model_output, table, rows, kwargs = hetero.mixed_call(
        case, "cpu", dtype, parity.seed_of("emulated-cfg-pp", case.name, path, str(dtype)))
    kwargs["eps_from_uncond"] = True
    if misaligned:
        model_output = _misaligned_copy(model_output)
    inputs = (sample, model_output, table, rows, kwargs)
    expected, expected_x0 = hetero.run_case(case, "torch", *inputs)
    plain, _ = hetero.run_case(case, "torch", sample, model_output, table, rows,
                               {k: v for k, v in kwargs.items() if k != "eps_from_uncond"})
    cuda_emulated.clear_log()
    got, got_x0 = hetero.run_case(case, "cuda", *inputs)
    tol = parity.step_tol(dtype)
    if expected is not None:
        assert not torch.allclose(expected.float(), plain.float())  # the option changes the result
        parity.assert_matches(got, expected, tol)
    if expected_x0 is not None:
        parity.assert_matches(got_x0, expected_x0, tol)
    _check_step_path(cuda_emulated, path, dtype,
                     _beyond_mask(case.terms, case.learned_variance, case.outputs != "x0_only", False))


def _beyond_sweep_calls() -> List[Tuple[guide.CombineCase, bool, frozenset]]:
    """(case, combine?, runtime terms) reaching every beyond-CFG kernel: each combination of its static streams
    (noise, the history: x0_prev and/or x0_prev2, learned variance, extra), with a combine or CFG++ with a scale
    (extra needs a combine), g_score / g_mean drawn at random (runtime in these kernels; g_mean where the
    variance needs it)."""
    calls = []
    for i, (noise, history, lv, extra, combine) in enumerate(itertools.product(*[(False, True)] * 5)):
        if extra and not combine:
            continue
        rng = random.Random(parity.seed_of("emulated-beyond-sweep", i))
        runtime = frozenset(t for t in ("g_score", "g_mean") if rng.random() < 0.5)
        if lv and not noise:
            runtime |= {"g_mean"}  # the variance is read only for a term that uses Sigma
        # The history stream (X0_PREV): x0_prev, x0_prev2 or both, drawn from a generator of its own.
        terms = runtime | ({"noise"} if noise else set())
        if history:
            terms |= random.Random(parity.seed_of("emulated-beyond-history", i)).choice(HISTORIES)
        case = guide.CombineCase(f"beyond{i}", shape=(2, 2, 3, 8), extra=extra, terms=frozenset(terms),
                                 learned_variance=lv, eps_from_uncond=not combine or rng.random() < 0.5,
                                 clip=rng.choice(["none", "range", "threshold"]))
        calls.append((case, combine, runtime))
    return calls


@pytest.mark.parametrize("dtype", parity.DTYPES, ids=DTYPE_IDS.get)
def test_beyond_cfg_kernels_sweep(cuda_emulated, dtype):
    """Every beyond-CFG vector kernel runs and matches the reference (16 per dtype: the combinations of noise,
    the history (x0_prev, x0_prev2 or both), learned variance and extra), with g_score / g_mean present or not
    at runtime."""
    failures, masks = [], set()
    calls = _beyond_sweep_calls()
    assert {c.terms & {"x0_prev", "x0_prev2"} for c, _, _ in calls} >= set(HISTORIES)
    for case, combine, runtime in calls:
        try:
            sample, model_output, table, step, kwargs = guide.combine_call(
                case, "cpu", dtype, parity.seed_of("emulated-beyond", case.name, str(dtype)))
            if not combine:
                del kwargs["combine"]
                gen = torch.Generator().manual_seed(parity.seed_of("emulated-beyond-scale", case.name))
                kwargs["scale"] = 1.0 + 4.0 * torch.rand(sample.shape[0], generator=gen)
            expected, expected_x0 = guide.run_combine(case, "torch", sample, model_output, table, step, kwargs)
            cuda_emulated.clear_log()
            got, got_x0 = guide.run_combine(case, "cuda", sample, model_output, table, step, kwargs)
            parity.assert_matches(got, expected, parity.step_tol(dtype))
            want = _beyond_mask(case.terms, case.learned_variance, True, case.extra)
            _check_step_path(cuda_emulated, "vector", dtype, want)
            masks.add(want)
        except (AssertionError, RuntimeError) as exc:
            failures.append(f"{case} combine={combine}: {exc}")
    assert not failures, f"{len(failures)} calls failed:\n" + "\n\n".join(failures[:5])
    assert len(masks) == 16, sorted(masks)


def test_guidance_cases_are_reused():
    """The cases above are test_backends_guidance_ops's, with what each path is meant to see: whole packs on the
    vector path, on the scalar one both odd sizes and misaligned whole-pack rows (extra among them)."""
    names = {c.name for c in guide.CASES}
    assert {"combine_only", "combine_extra", "eps_from_uncond", "x0_only", "transposed"} <= names
    assert {c.mode for c in guide.CASES} == {"combine", "scale", "sparse"}
    assert {c.name for c in guide.GRAM_CASES} >= {"cond_uncond", "momentum", "transposed", "odd", "long_rows"}
    for dtype in parity.DTYPES:
        scalar = [_combine_variant(c, "scalar", dtype)[1] for c in guide.CASES]
        assert None in scalar and "extra" in scalar
        for case in guide.CASES:
            shape = _combine_variant(case, "vector", dtype)[0].shape
            assert math.prod(shape[1:]) % VEC[dtype] == 0 and shape[:-1] == case.shape[:-1]
        gram_scalar = [_gram_variant(c, "scalar", dtype)[1] for c in guide.GRAM_CASES]
        assert None in gram_scalar and "extra" in gram_scalar


# ------------------------------------------------------------------------------------ row reductions

ALL_DEVICES = [pytest.param(d, id=i) for d, i in DEVICE_IDS.items()]


def _offset_rows(shape: Tuple[int, int], offset: int, dtype: torch.dtype, gen, scale: float = 1.0) -> torch.Tensor:
    """[rows, n] random values as a view into a wider tensor, `offset` elements into each row; the row stride
    (n + offset + 5) puts every row at a different position within a 16-byte pack."""
    rows, n = shape
    wide = (scale * torch.randn(rows, n + offset + 5, generator=gen)).to(dtype)
    return wide[:, offset:offset + n]


# Around the pack width, rows split over 2..8 blocks of a cluster on sm_90, more rows than SMs.
REDUCTION_SIZES = [(1, 1), (3, 7), (2, 8), (4, 24), (5, 1000), (3, 12000), (2, 8192 * 3 + 8), (1, 8 * 16384 + 8),
                   (33, 72)]


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", parity.DTYPES, ids=DTYPE_IDS.get)
def test_per_sample_rms_sweep(cuda_emulated, dtype, device):
    cuda_emulated.configure(device=device)
    for (rows, n), offset in itertools.product(REDUCTION_SIZES, (0, 1)):
        gen = torch.Generator().manual_seed(parity.seed_of("per_sample_rms-sweep", rows, n, offset, str(dtype)))
        x = _offset_rows((rows, n), offset, dtype, gen)
        if offset == 0:
            x = x.contiguous()
        expected = fastguide.per_sample_rms(x, backend="torch")
        actual = fastguide.per_sample_rms(x, backend="cuda")
        parity.assert_matches(actual, expected, 2e-5)
    _check_cluster_usage(cuda_emulated, device, "per_sample_rms_kernel")


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", parity.DTYPES, ids=DTYPE_IDS.get)
def test_cfg_rescale_factor_sweep(cuda_emulated, dtype, device):
    cuda_emulated.configure(device=device)
    # Aligned rows without, misaligned rows with learned variance (the prediction is the first half of a row).
    for (batch, n), (offset, lv) in itertools.product(REDUCTION_SIZES, [(0, False), (1, True)]):
        if n == 1:
            continue  # the std of one element is NaN (the reference agrees; nothing to compare)
        gen = torch.Generator().manual_seed(parity.seed_of("rescale-sweep", batch, n, offset, lv, str(dtype)))
        model_output = _offset_rows((2 * batch, n * (2 if lv else 1)), offset, dtype, gen)
        if offset == 0:
            model_output = model_output.contiguous()
        scale = 8.0 * torch.rand(batch, generator=gen)
        expected = reference.cfg_rescale_factor(model_output, scale, 0.7, lv)
        actual = dispatch.resolve("cuda", torch.device("cpu")).cfg_rescale_factor(model_output, scale, 0.7, lv)
        parity.assert_matches(actual, expected, 2e-5)
    _check_cluster_usage(cuda_emulated, device, "cfg_rescale_factor_kernel")


def _check_cluster_usage(emu: Emulator, device: int, kernel: str) -> None:
    """The sizes above make the sm_90 devices reduce some rows with several blocks: clusters of up to 8 on the
    H100, and on the small partition a refused cluster launch followed by one block per row."""
    launches = [r for r in emu.launches() if kernel in r.kernel]
    clustered = [r for r in launches if r.cluster[0] > 1 and r.result == 0]
    refused = [r for r in launches if r.result != 0]
    if device == H100:
        assert clustered and not refused
        assert max(r.cluster[0] for r in clustered) == 8
    elif device == A100:
        assert not clustered and not refused
    else:
        assert refused and all(r.cluster[0] > 2 for r in refused), refused
        assert clustered and all(r.cluster[0] == 2 for r in clustered)


def _gram_variant(case, path: str, dtype: torch.dtype):
    """(case, tensor to misalign or None) of a gram case on ``path``, as ``_combine_variant``."""
    if path == "vector":
        *lead, last = case.shape
        return dataclasses.replace(case, shape=(*lead, -(-last // 8) * 8)), None
    if math.prod(case.shape[1:]) % VEC[dtype]:
        return case, None
    return case, "extra" if case.extra else "model_output"


def _check_gram(model_output, extra, momentum, learned_variance: bool, dtype: torch.dtype) -> None:
    """``fastguide.guidance_gram`` on the emulated kernels against the reference, as
    test_backends_guidance_ops.test_gram_matches_reference compares them; extra updated in place alike."""
    ref_extra = extra.clone() if extra is not None else None
    expected = fastguide.guidance_gram(model_output, ref_extra, momentum, learned_variance, backend="torch")
    got = fastguide.guidance_gram(model_output, extra, momentum, learned_variance, backend="cuda")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = expected.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(got / scale, expected / scale, rtol=tol, atol=tol)
    if extra is not None:
        parity.assert_matches(extra, ref_extra, parity.step_tol(dtype))


_GRAM_KERNEL = re.compile(r"guidance_gram_kernel<[\w:]*?(F32|F16|BF16), (\d+)>")


@pytest.mark.parametrize("path", ["vector", "scalar"])
@pytest.mark.parametrize("dtype", parity.DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", guide.GRAM_CASES, ids=lambda c: c.name)
def test_guidance_gram_cases(cuda_emulated, case, dtype, path):
    """test_backends_guidance_ops's gram cases on the expected kernel (16-byte packs, or the scalar one for odd
    sizes and misaligned rows); extra is registered writable only with a momentum, so a kernel writing it
    otherwise faults."""
    case, misaligned = _gram_variant(case, path, dtype)
    model_output, extra = guide.gram_call(case, "cpu", dtype,
                                          parity.seed_of("emulated-gram", case.name, path, str(dtype)))
    if misaligned == "extra":
        extra = _misaligned_copy(extra)
    elif misaligned:
        model_output = _misaligned_copy(model_output)
    cuda_emulated.clear_log()
    _check_gram(model_output, extra, case.momentum, case.learned_variance, dtype)
    [launch] = [r for r in cuda_emulated.launches() if "guidance_gram_kernel" in r.kernel]
    m = _GRAM_KERNEL.search(launch.kernel)
    assert m and m.group(1) == IO_NAMES[dtype], launch.kernel
    assert int(m.group(2)) == (VEC[dtype] if path == "vector" else 1), launch.kernel


GRAM_DEVICE_CONFIGS = [pytest.param((A100, "forward"), id="a100"),
                       pytest.param((SMALL_SM90, "forward"), id="sm90-no-cluster-fit"),
                       pytest.param((H100, "reverse"), id="h100-reverse-order")]


@pytest.mark.parametrize("config", GRAM_DEVICE_CONFIGS)
def test_guidance_gram_cases_on_other_devices(cuda_emulated, config):
    device, schedule = config
    cuda_emulated.configure(device=device, schedule=schedule)
    for case, dtype in itertools.product(guide.GRAM_CASES, parity.DTYPES):
        model_output, extra = guide.gram_call(case, "cpu", dtype, parity.seed_of("gram", case.name, str(dtype)))
        _check_gram(model_output, extra, case.momentum, case.learned_variance, dtype)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", parity.DTYPES, ids=DTYPE_IDS.get)
def test_guidance_gram_sweep(cuda_emulated, dtype, device):
    """Sizes around the pack width up to rows split over clusters of 8 blocks, with the momentum update: aligned
    rows (the vector kernel), or misaligned ones with a learned variance (rows of extra at their own offsets
    too), alternating over the sizes so that each kernel meets clusters of several sizes (no extra, and extra
    without a momentum: the cases above)."""
    cuda_emulated.configure(device=device)
    modes = [(1, True, 0.5, True), (0, True, -0.5, False)]  # (row offset, extra?, momentum, learned variance)
    for i, (batch, n) in enumerate(REDUCTION_SIZES):
        offset, with_extra, momentum, lv = modes[i % 2]
        gen = torch.Generator().manual_seed(parity.seed_of("gram-sweep", batch, n, offset, momentum, str(dtype)))
        model_output = _offset_rows((2 * batch, n * (2 if lv else 1)), offset, dtype, gen)
        extra = _offset_rows((batch, n), 2 * offset, dtype, gen) if with_extra else None
        if offset == 0:
            model_output = model_output.contiguous()
            extra = extra.contiguous() if with_extra else None
        _check_gram(model_output, extra, momentum, lv, dtype)
    _check_cluster_usage(cuda_emulated, device, "guidance_gram_kernel")


LSE_SIZES = [1, 2, 3, 5, 8, 9, 31, 64, 333, 4101]


@pytest.mark.parametrize("dtype", parity.DTYPES, ids=DTYPE_IDS.get)
def test_temperature_lse_grad_sweep(cuda_emulated, dtype):
    """Rows starting at every offset within a 16-byte pack (each row its own head/body/tail split), output
    rows aligned or not like the input rows, K around the pack width."""
    for k, offset in itertools.product(LSE_SIZES, (0, 1, 2, 5)):
        gen = torch.Generator().manual_seed(parity.seed_of("lse-sweep", k, offset, str(dtype)))
        logits = _offset_rows((4, k), offset, dtype, gen, scale=4.0)
        labels = torch.randint(0, k, (4,), generator=gen)
        scale = 2.0 * torch.rand(4, generator=gen) if offset % 2 else None
        tau1, tau2 = (1.0, 0.5) if k % 2 else (0.3, -2.0)
        expected = fastguide.temperature_lse_grad(logits, labels, tau1, tau2, scale, backend="torch")
        actual = fastguide.temperature_lse_grad(logits, labels, tau1, tau2, scale, backend="cuda")
        parity.assert_matches(actual, expected, parity.step_tol(dtype))


# ------------------------------------------------------------------------------- the emulation itself

class SelfTest:
    """The kernels of tests/cuda_emu/selftest.cu, with the memory they may touch registered."""

    def __init__(self, emu: Emulator):
        self.emu = emu
        self.message = ctypes.create_string_buffer(2048)

    def __call__(self, name: str, *args, regions=()) -> Tuple[int, str]:
        self.emu.clear_regions()
        for region_name, t, writable in regions:
            self.emu.add_region(region_name, t.data_ptr(), 1, t.numel() * t.element_size(), 0, writable)
        self.message.value = b""
        converted = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
        try:
            result = getattr(self.emu.lib, f"emu_selftest_{name}")(*converted, self.message, len(self.message))
        finally:
            self.emu.clear_regions()
        return result, self.message.value.decode()


@pytest.fixture
def selftest(emulator: Emulator) -> SelfTest:
    emulator.configure(device=H100)
    return SelfTest(emulator)


def _shuffle_source(lane: int, kind: str, arg: int, width: int) -> int:
    """The lane a CUDA shuffle reads (CUDA C++ Programming Guide, warp shuffle functions)."""
    base = lane // width * width
    if kind == "idx":
        return base + arg % width
    if kind == "up":
        return lane - arg if lane - base >= arg else lane
    if kind == "down":
        return lane + arg if lane - base + arg < width else lane
    src = lane ^ arg
    return src if src < base + width else lane


@pytest.mark.parametrize("kind,arg,width", [("idx", 5, 32), ("idx", 3, 8), ("up", 1, 32), ("up", 3, 16),
                                            ("down", 4, 32), ("down", 1, 8), ("xor", 16, 32), ("xor", 1, 32),
                                            ("xor", 6, 8)])
def test_emulator_shuffles(selftest, kind, arg, width):
    out = torch.zeros(64, dtype=torch.int32)
    result, msg = selftest("shuffle", out, 64, ["idx", "up", "down", "xor"].index(kind), arg, width,
                           regions=[("out", out, True)])
    assert result == 0, msg
    expected = [100 + 32 * (t // 32) + _shuffle_source(t % 32, kind, arg, width) for t in range(64)]
    assert out.tolist() == expected


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_emulator_barrier_orders_shared_memory(selftest, schedule):
    """With __syncthreads every thread sees its neighbour's write; without it some thread reads shared memory
    before it was written and gets the poison (NaN), in either order."""
    selftest.emu.configure(schedule=schedule)
    x = torch.arange(128, dtype=torch.float32)
    for barrier in (1, 0):
        out = torch.zeros(128)
        result, msg = selftest("neighbour", x, out, 128, barrier, regions=[("x", x, False), ("out", out, True)])
        assert result == 0, msg
        if barrier:
            assert out.tolist() == torch.roll(x, -1).tolist()
        else:
            assert torch.isnan(out).any()


def test_emulator_catches_bad_memory_accesses(selftest):
    x, out = torch.arange(64, dtype=torch.float32), torch.zeros(64)
    regions = [("x", x, False), ("out", out, True)]
    result, msg = selftest("offset", x, out, 64, 0, 0, regions=regions)
    assert (result, msg) == (0, "") and out.tolist() == x.tolist()
    result, msg = selftest("offset", x, out, 64, 1, 0, regions=regions)  # thread 63 reads x[64]
    assert result == -1 and "out-of-bounds 4-byte read" in msg and "thread (63,0,0)" in msg, msg
    result, msg = selftest("offset", x, out, 64, 0, 1, regions=regions)  # writes an input
    assert result == -1 and "illegal (read-only) 4-byte write" in msg and "'x'" in msg, msg
    result, msg = selftest("offset", x, out, 64, 0, 0, regions=[("x", x, False)])  # out not registered
    assert result == -1 and "out-of-bounds 4-byte write" in msg, msg


def test_emulator_catches_misaligned_vector_loads_and_overruns(selftest):
    x, out = torch.arange(64, dtype=torch.float32), torch.zeros(4)
    regions = [("x", x, False), ("out", out, True)]
    assert selftest("vector_load", x, out, 4, regions=regions) == (0, "")
    result, msg = selftest("vector_load", x, out, 1, regions=regions)
    assert result == -1 and "misaligned address" in msg and "16-byte alignment" in msg, msg
    assert selftest("local_array", out, 3, regions=regions) == (0, "")
    result, msg = selftest("local_array", out, 4, regions=regions)
    assert result == -1 and "index out of bounds" in msg, msg


def test_emulator_catches_barrier_deadlock(selftest):
    out = torch.zeros(64)
    assert selftest("early_exit", out, 64, 64, regions=[("out", out, True)]) == (0, "")
    result, msg = selftest("early_exit", out, 64, 40, regions=[("out", out, True)])
    assert result == -1 and "deadlock" in msg and "40 threads at __syncthreads, 0 at cluster.sync, 24 finished" in msg


def test_emulator_clusters(selftest):
    out = torch.full((8,), -1.0)
    result, msg = selftest("cluster", out, 8, 4, regions=[("out", out, True)])
    assert result == 0, msg
    assert out.tolist() == [1.0, 2.0, 3.0, 0.0] * 2  # each block read the next block's rank in its cluster
    assert "InvalidClusterSize" in selftest("cluster", out, 6, 4, regions=[("out", out, True)])[1]
    selftest.emu.configure(device=A100)
    assert "NotSupported" in selftest("cluster", out, 8, 4, regions=[("out", out, True)])[1]
    selftest.emu.configure(device=SMALL_SM90)
    assert "InvalidClusterSize" in selftest("cluster", out, 8, 4, regions=[("out", out, True)])[1]
    assert selftest("cluster", out, 8, 2, regions=[("out", out, True)])[0] == 0


def test_emulator_rejects_bad_launch_configurations(selftest):
    assert selftest("bad_config", 1, 1024) == (0, "")
    assert selftest("bad_config", 1, 1025)[0] == 9  # cudaErrorInvalidConfiguration, via cudaGetLastError
    assert selftest("bad_config", 65536, 32)[0] == 9
