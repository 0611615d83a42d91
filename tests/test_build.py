"""Build switches of setup.py and what a build without the extension looks like at run time.

The wheel tests build from a copy of the source tree (no compiled files, no build directory) with pip,
without build isolation, so they need no network; the editable install in the working tree is untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fastguide
from fastguide.backends import dispatch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "CMakeLists.txt", "fastguide", "kernels", "csrc")


def _copy_sources(dst: Path) -> Path:
    ignore = shutil.ignore_patterns("_C*", "__pycache__", "*.so", "*.egg-info", "build")
    dst.mkdir(parents=True)
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)
    return dst


def _pip_wheel(src: Path, out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out), str(src)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def test_pure_python_wheel_installs_and_runs_without_extension(tmp_path):
    src = _copy_sources(tmp_path / "src")
    built = _pip_wheel(src, tmp_path / "dist", FASTGUIDE_BUILD_EXT="0")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("fastguide-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastguide/kernels/__init__.py" in names  # kernels/ installs as fastguide.kernels
    assert not [n for n in names if "/_C" in n or n.endswith((".so", ".pyd"))]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import torch, fastguide\n"
        f"assert fastguide.__file__.startswith({str(site)!r}), fastguide.__file__\n"
        "why = fastguide.backends(reasons=True)\n"
        "assert why['torch'] == '' and 'fastguide._C' in why['cpp'], why\n"
        "from fastguide.core.layout import NUM_COLS\n"
        "x = torch.randn(2, 3); m = torch.randn(4, 3); table = torch.rand(1, NUM_COLS)\n"
        "out = fastguide.guided_step(x, m, table, 0, scale=2.0)\n"
        "ref = fastguide.guided_step(x, m, table, 0, scale=2.0, backend='torch')\n"
        "assert torch.equal(out, ref)\n"
        "print('ok')\n")
    # -S: no .pth files, so the editable install of the working tree cannot serve fastguide._C; the
    # installed wheel and the environment's packages (torch) come from PYTHONPATH.
    packages = Path(torch.__file__).resolve().parents[1]
    ran = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(packages)])},
                         timeout=300)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stderr


def test_failed_extension_build_fails_the_install(tmp_path):
    """Without FASTGUIDE_BUILD_EXT=0 a broken toolchain or build must fail loudly, not fall back silently."""
    src = _copy_sources(tmp_path / "src")
    cmake = src / "CMakeLists.txt"
    cmake.write_text(cmake.read_text() + "\nmessage(FATAL_ERROR \"simulated toolchain failure\")\n")
    built = _pip_wheel(src, tmp_path / "dist", FASTGUIDE_CUDA="0")
    assert built.returncode != 0
    assert "simulated toolchain failure" in built.stdout + built.stderr
    assert not list(tmp_path.glob("dist/*.whl"))


@pytest.fixture
def without_extension(monkeypatch):
    """fastguide._C as if it had not been built: importing it raises ImportError."""
    monkeypatch.setitem(sys.modules, "fastguide._C", None)
    monkeypatch.setattr(dispatch, "_cache", {})
    from fastguide.backends import abi
    monkeypatch.setattr(abi, "_extension", None)


def test_missing_extension_is_reported_with_a_reason(without_extension):
    assert fastguide.backends()["cpp"] is False
    reason = fastguide.backends(reasons=True)["cpp"]
    assert "fastguide._C" in reason and "FASTGUIDE_BUILD_EXT" in reason
    with pytest.raises(RuntimeError, match="cpp"):
        fastguide.per_sample_rms(torch.ones(2, 3), backend="cpp")


def test_missing_extension_falls_back_to_the_reference_on_cpu(without_extension):
    x = torch.randn(2, 3, 4)
    assert dispatch.resolve("auto", x.device).__name__ == "fastguide.backends.reference"
    torch.testing.assert_close(fastguide.per_sample_rms(x), x.square().mean(dim=(1, 2)).sqrt())


def test_built_extension_reports_its_parts():
    """When the extension is built it carries the CPU kernels and says whether CUDA kernels are in it."""
    why = fastguide.backends(reasons=True)["cpp"]
    if why:
        pytest.skip(f"extension not built: {why}")
    import fastguide._C as ext
    assert isinstance(ext.has_cuda(), bool)
    for kernel in ("cpu_guided_step", "cpu_cfg_rescale_factor", "cpu_temperature_lse_grad", "cpu_per_sample_rms"):
        assert callable(getattr(ext, kernel))
    for kernel in ("cuda_guided_step", "cuda_cfg_rescale_factor", "cuda_temperature_lse_grad", "cuda_per_sample_rms"):
        assert hasattr(ext, kernel) == ext.has_cuda()
    args = ext.GuidedStepArgs()
    args.sample, args.step_ptr, args.out = 4096, 0, 2 ** 47  # pointer fields are plain Python ints
    assert (args.sample, args.step_ptr, args.out) == (4096, 0, 2 ** 47)


def _editable_install(venv_pip: Path, src: Path) -> subprocess.CompletedProcess:
    """``pip install -e`` as the Quickstart runs it: with pip's build isolation (a fresh build env each time)."""
    env = dict(os.environ, FASTGUIDE_CUDA="0", MAX_JOBS="2")
    return subprocess.run([str(venv_pip), "install", "--no-deps", "-v", "-e", str(src)], capture_output=True,
                          text=True, env=env, timeout=900)


def _compiled(res: subprocess.CompletedProcess) -> list:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [line.split("Building CXX object", 1)[1].strip() for line in (res.stdout + res.stderr).splitlines()
            if "Building CXX object" in line]


def test_reinstalling_an_unchanged_checkout_compiles_nothing(tmp_path):
    """Each pip install builds in a new isolated env (new cmake, ninja and pybind11 paths): the kept build
    directory and pybind11 copy must make a second install of an unchanged checkout compile nothing, and a
    changed source recompile only itself."""
    src = _copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    pip = venv / "bin" / "pip"
    first = _compiled(_editable_install(pip, src))
    assert len(first) >= 4   # every CPU kernel and the bindings
    assert _compiled(_editable_install(pip, src)) == []
    (src / "csrc" / "cpu" / "per_sample_rms.cpp").touch()
    again = _compiled(_editable_install(pip, src))
    assert len(again) == 1 and "per_sample_rms.cpp" in again[0]
