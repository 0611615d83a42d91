"""The C++ kernels' half-precision storage conversions: F16C for fp16 and AVX2 for bf16 stores where the CPU has
them, the portable selects otherwise (``FASTGUIDE_PORTABLE_CONVERSIONS=1``), both exactly torch's casts on every
fp16 and bf16 value.

The checks run in this process (the path this CPU picks) and again in a child process with the portable path
forced, so both paths stay tested on any x86-64 machine.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import fastguide
from fastguide.core.layout import NUM_COLS, Col

pytestmark = pytest.mark.skipif(bool(fastguide.backends(reasons=True)["cpp"]), reason="C++ backend not built")

PORTABLE = "FASTGUIDE_PORTABLE_CONVERSIONS"
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _scaled(sample: torch.Tensor, a: float) -> torch.Tensor:
    """out = A x (a row whose only nonzero coefficient is A), computed in fp32 and stored in the sample's dtype."""
    table = torch.zeros(1, NUM_COLS)
    table[0, Col.A] = a
    return fastguide.guided_step(sample, torch.zeros_like(sample), table, 0, backend="cpp")


def _every_value(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


# Whole rows of 16-value vectors, and rows of 21845 = 5 * 4096 + 1365 values, whose last tile ends in a
# 5-value tail that the vector loops leave to the scalar conversion.
SHAPES = ((4, 16384), (3, 21845))


def check_every_value_round_trips(dtype: torch.dtype) -> None:
    """All 65536 bit patterns loaded to fp32 and stored back (out = 1 x): every value comes back as itself
    (subnormals and infinities included; -0 as 0, since the zero terms add +0), every NaN as a NaN."""
    values = _every_value(dtype)
    nan = torch.isnan(values)
    for shape in SHAPES:
        sample = values[:shape[0] * shape[1]].reshape(shape)
        out = _scaled(sample, 1.0).reshape(-1)
        n = out.numel()
        assert torch.equal(torch.isnan(out), nan[:n]), f"{dtype} {shape}: NaNs moved"
        same = out[~nan[:n]].float() == values[:n][~nan[:n]].float()
        assert bool(same.all()), f"{dtype} {shape}: {int((~same).sum())} values changed on the way through"


def check_rounding_matches_torch(dtype: torch.dtype) -> None:
    """fp32 results A x stored in ``dtype`` round to nearest even as torch's cast does, for scales that make
    halfway cases, subnormal results and overflow to Inf."""
    values = _every_value(dtype)
    finite = values[torch.isfinite(values)]
    sample = finite[:finite.numel() // 7 * 7].reshape(7, -1)
    for a in (1.0 / 3.0, 3.0, 0.7, 2.0 ** -11, 1.0 + 2.0 ** -11, 1.0 + 2.0 ** -8):
        expected = (sample.float() * torch.tensor(a, dtype=torch.float32)).to(dtype)
        actual = _scaled(sample, a)
        assert not torch.isnan(actual).any()
        mismatched = int((actual != expected).sum())
        assert mismatched == 0, f"{dtype}, A = {a}: {mismatched} values differ from torch's rounding"


def check_all() -> None:
    for dtype in HALF_DTYPES:
        check_every_value_round_trips(dtype)
        check_rounding_matches_torch(dtype)


def _cpu_has_avx2_f16c() -> bool:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    with open("/proc/cpuinfo") as info:
        flags = next((line.split() for line in info if line.startswith("flags")), [])
    return "avx2" in flags and "f16c" in flags


def test_half_conversions_of_this_cpu_are_exact():
    from fastguide import _C
    forced_portable = os.environ.get(PORTABLE, "0") not in ("", "0")
    assert _C.cpu_avx2_conversions() == (_cpu_has_avx2_f16c() and not forced_portable)
    check_all()


def test_portable_half_conversions_are_exact():
    """The same checks in a child process with the portable loops forced."""
    env = dict(os.environ, **{PORTABLE: "1"})
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "portable conversions: exact" in result.stdout


if __name__ == "__main__":
    from fastguide import _C
    assert not _C.cpu_avx2_conversions(), f"{PORTABLE}=1 did not turn the AVX2 conversions off"
    check_all()
    print("portable conversions: exact")
