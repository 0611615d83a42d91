"""The CUDA C++ sources compile for every target architecture (compile only, no GPU needed).

Every ``csrc/cuda/*.cu`` is compiled with nvcc to an object for sm_80 and sm_90, as CMakeLists.txt does
for ``fastguide._C``. From the same compilations: ptxas reports no register spills (a spilled kernel
would move its registers through local memory), the entry points declared in ``fastguide_cuda.h`` are
defined, and the fused step's vectorised kernels move data with 16-byte loads and stores. Skipped when
nvcc is not installed. Runs the compilations in parallel (about a minute on two cores).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = ("80", "90")
ENTRY_POINTS = {
    "guided_step.cu": "fastguide::cuda::guided_step(fastguide::GuidedStepArgs const&, void*)",
    "cfg_rescale_factor.cu":
        "fastguide::cuda::cfg_rescale_factor(fastguide::CfgRescaleFactorArgs const&, void*)",
    "temperature_lse_grad.cu":
        "fastguide::cuda::temperature_lse_grad(fastguide::TemperatureLseGradArgs const&, void*)",
    "per_sample_rms.cu": "fastguide::cuda::per_sample_rms(fastguide::PerSampleRmsArgs const&, void*)",
    "guidance_gram.cu": "fastguide::cuda::guidance_gram(fastguide::GuidanceGramArgs const&, void*)",
}


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found: the CUDA sources are compiled only with it")


class KernelUsage(NamedTuple):
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int


class Compiled(NamedTuple):
    source: str
    arch: str
    returncode: int
    log: str
    obj: Path
    ptx: List[Path]
    kernels: Dict[str, KernelUsage]


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> Dict[str, KernelUsage]:
    """Per-kernel register count and spills from ``ptxas -v`` output."""
    kernels: Dict[str, KernelUsage] = {}
    name, frame = None, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            name, frame = m.group(1), None
        elif (m := _FRAME.search(line)) and name:
            frame = tuple(int(v) for v in m.groups())
        elif (m := _REGS.search(line)) and name:
            stack, stores, loads = frame or (0, 0, 0)
            kernels[name] = KernelUsage(int(m.group(1)), stack, stores, loads)
            name = None
    return kernels


def compile_one(source: Path, arch: str, out_dir: Path) -> Compiled:
    work = out_dir / f"{source.stem}_sm{arch}"
    work.mkdir()
    obj = work / f"{source.stem}.o"
    cmd = [NVCC, "-std=c++17", "-O3", f"-I{CSRC}", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", "-keep", f"-keep-dir={work}", "-c", str(source), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    ptx = sorted(work.glob("*.ptx"))
    return Compiled(source.name, arch, proc.returncode, log, obj, ptx, parse_ptxas(log))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Dict[tuple, Compiled]:
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    # The fused step has by far the most kernels: start it first so it overlaps the small files.
    jobs = sorted(((src, arch) for src in CUDA_SOURCES for arch in ARCHS),
                  key=lambda job: job[0].name != "guided_step.cu")
    workers = max(2, min(len(jobs), os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: compile_one(job[0], job[1], out_dir), jobs))
    return {(r.source, r.arch): r for r in results}


def demangle(names):
    names = list(names)
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    proc = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return proc.stdout.splitlines() if proc.returncode == 0 else names


def test_sources_exist():
    assert {p.name for p in CUDA_SOURCES} >= set(ENTRY_POINTS), "an op's .cu file is missing"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [p.name for p in CUDA_SOURCES])
def test_compiles(compiled, source, arch):
    result = compiled[(source, arch)]
    assert result.returncode == 0, f"nvcc failed for {source} sm_{arch}:\n{result.log[-6000:]}"
    assert result.obj.is_file()
    assert result.kernels, f"ptxas reported no kernels for {source} sm_{arch}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [p.name for p in CUDA_SOURCES])
def test_no_register_spills(compiled, source, arch):
    result = compiled[(source, arch)]
    if result.returncode != 0:
        pytest.fail(f"{source} did not compile for sm_{arch}")
    spilled = {name: usage for name, usage in result.kernels.items()
               if usage.spill_stores or usage.spill_loads or usage.stack_bytes}
    pretty = dict(zip(demangle(spilled), spilled.values()))
    assert not spilled, f"kernels with local-memory spills or stack frames on sm_{arch}: {pretty}"


def test_step_kernels_cover_every_dtype_and_stay_in_registers(compiled):
    """One vectorised kernel per feature combination and dtype, plus a scalar fallback per dtype, none of
    them using more than 128 registers (two 256-thread blocks per SM at least)."""
    result = compiled[("guided_step.cu", "90")]
    if result.returncode != 0:
        pytest.fail("guided_step.cu did not compile")
    names = demangle(result.kernels)
    for dtype in ("F32", "F16", "BF16"):
        ours = [n for n in names if f"detail::{dtype}," in n]
        assert any("RuntimeFeatures" in n for n in ours), f"no scalar fallback kernel for {dtype}"
        assert sum("StaticFeatures" in n for n in ours) >= 32, f"too few specialised kernels for {dtype}"
    heavy = {n: u.registers for n, u in zip(names, result.kernels.values()) if u.registers > 128}
    assert not heavy, f"step kernels above 128 registers: {heavy}"


def test_step_kernels_use_16_byte_accesses(compiled):
    result = compiled[("guided_step.cu", "90")]
    if result.returncode != 0:
        pytest.fail("guided_step.cu did not compile")
    assert result.ptx, "nvcc -keep left no PTX"
    ptx = "\n".join(p.read_text() for p in result.ptx)
    assert "ld.global.v4.u32" in ptx, "the vectorised step kernels do not use 16-byte loads"
    assert "st.global.wb.v4.u32" in ptx, "the vectorised step kernels do not use 16-byte stores"


def test_reductions_use_clusters_on_sm90_only(compiled):
    """The rescale, RMS and gram reductions combine a row's blocks through distributed shared memory on Hopper;
    the sm_80 build must contain no cluster instructions."""
    for source in ("cfg_rescale_factor.cu", "per_sample_rms.cu", "guidance_gram.cu"):
        for arch, expected in (("90", True), ("80", False)):
            result = compiled[(source, arch)]
            if result.returncode != 0:
                pytest.fail(f"{source} did not compile for sm_{arch}")
            ptx = "\n".join(p.read_text() for p in result.ptx)
            assert ("barrier.cluster" in ptx) == expected, f"{source} sm_{arch}: cluster use {not expected}"


@pytest.mark.parametrize("source", sorted(ENTRY_POINTS))
def test_entry_points_are_defined(compiled, source):
    """Each object defines the host function that fastguide_cuda.h declares (what the bindings call)."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    result = compiled[(source, "90")]
    if result.returncode != 0:
        pytest.fail(f"{source} did not compile")
    symbols = subprocess.run([nm, "-C", "--defined-only", str(result.obj)], capture_output=True, text=True,
                             check=True).stdout
    assert ENTRY_POINTS[source] in symbols


def test_public_header_is_plain_cpp():
    """The bindings include fastguide_cuda.h from a C++ translation unit: it must need no CUDA headers."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    header = CSRC / "cuda" / "fastguide_cuda.h"
    proc = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-x", "c++", str(header)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
