"""fastguide build: the Python package plus the compiled extension ``fastguide._C`` (built by CMakeLists.txt).

Build switches (environment variables, read when the package is built):

  FASTGUIDE_BUILD_EXT=0   pure-Python install: no compiler needed; the torch and Triton backends work and
                          fastguide.backends() reports the compiled ones as unavailable. Any other value
                          (default 1) builds the extension, and a failed build fails the install.
  FASTGUIDE_CUDA          0: CPU kernels only; 1: CUDA kernels required (fail without nvcc); unset: add
                          the CUDA kernels (csrc/cuda/*.cu) when a CUDA compiler is found.
  FASTGUIDE_CUDA_ARCHS    CUDA architectures in CMake syntax (default "80;90").
  FASTGUIDE_BUILD_TYPE    CMake build type (default Release).
  MAX_JOBS                parallel compile jobs (default: all cores).

Editable installs (``pip install -e .``) place ``fastguide/_C*.so`` in the source tree; the CMake build
directory ``build/cmake-<python>`` and a copy of pybind11 (``build/pybind11-<version>``) are kept, so a second
install of an unchanged checkout compiles nothing and a changed source recompiles only what depends on it,
even though pip gives every install a fresh build environment.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def build_extension_enabled() -> bool:
    return os.environ.get("FASTGUIDE_BUILD_EXT", "1") != "0"


class CMakeExtension(Extension):
    """An extension whose sources are built by CMake rather than by setuptools."""

    def __init__(self, name: str, source_dir: str):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


def _stable_pybind11(build_root: str) -> str:
    """pybind11's CMake config dir, from a copy under ``build/`` that outlives pip's isolated build env.

    Every ``pip install`` builds in a fresh temporary env; pointing CMake at that env's pybind11 would change
    the include path of every compile command, and ninja would rebuild everything although nothing changed.
    A copy per pybind11 version keeps the commands identical between installs, so an unchanged checkout
    rebuilds nothing and a changed source rebuilds only what depends on it."""
    import pybind11

    source = os.path.dirname(os.path.abspath(pybind11.__file__))
    target = os.path.join(build_root, f"pybind11-{pybind11.__version__}")
    if not os.path.isdir(os.path.join(target, "share", "cmake", "pybind11")):
        staging = target + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return os.path.join(target, "share", "cmake", "pybind11")


def _cache_generator(build_dir: str) -> str:
    """The generator a kept CMake cache was configured with ("" without a cache)."""
    cache = os.path.join(build_dir, "CMakeCache.txt")
    if not os.path.exists(cache):
        return ""
    with open(cache) as f:
        for line in f:
            if line.startswith("CMAKE_GENERATOR:"):
                return line.split("=", 1)[1].strip()
    return ""


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        if shutil.which("cmake") is None:
            raise RuntimeError("building fastguide._C needs cmake >= 3.18 on PATH "
                               "(or install with FASTGUIDE_BUILD_EXT=0 for a pure-Python install)")
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        build_root = os.path.join(ROOT, "build")
        build_dir = os.path.join(build_root, f"cmake-{sys.implementation.cache_tag}")
        ninja = shutil.which("ninja")
        generator = _cache_generator(build_dir)
        if generator and generator != ("Ninja" if ninja else generator):
            shutil.rmtree(build_dir)  # the kept build used another generator: configure afresh
            generator = ""
        configure = [
            "cmake", "-S", ext.source_dir, "-B", build_dir,
            f"-DCMAKE_BUILD_TYPE={os.environ.get('FASTGUIDE_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={os.path.dirname(target)}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={_stable_pybind11(build_root)}",
            f"-DFASTGUIDE_CUDA={os.environ.get('FASTGUIDE_CUDA', '')}",
            f"-DFASTGUIDE_CUDA_ARCHS={os.environ.get('FASTGUIDE_CUDA_ARCHS', '80;90')}",
        ]
        if ninja:
            # The kept cache may name the ninja of a deleted pip build env: always pass the current one.
            configure += ["-DCMAKE_MAKE_PROGRAM=" + ninja] + ([] if generator else ["-G", "Ninja"])
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", build_dir, "--parallel", jobs])
        if not os.path.exists(target):
            raise RuntimeError(f"CMake did not produce {target}")


if build_extension_enabled():
    ext_modules = [CMakeExtension("fastguide._C", ROOT)]
    cmdclass = {"build_ext": CMakeBuild}
else:
    ext_modules, cmdclass = [], {}

setup(
    name="fastguide",
    version="0.1.0",
    description="Fused, sync-free guided diffusion sampling for PyTorch",
    python_requires=">=3.10",
    # Every subpackage of fastguide/ (found, so a new one cannot be left out of a wheel), plus kernels/.
    packages=find_packages(include=["fastguide", "fastguide.*"]) + ["fastguide.kernels"],
    package_dir={"fastguide": "fastguide", "fastguide.kernels": "kernels"},
    package_data={"fastguide.examples.digits": ["weights/*.safetensors"]},
    entry_points={"console_scripts": ["fastguide = fastguide.tools.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        # `fastguide demo` and `fastguide train-digits`: the scikit-learn digits, shipped weights, PNG grids.
        "demo": ["scikit-learn", "safetensors", "pillow", "tqdm"],
        # `fastguide serve`: the HTTP server (fastguide.serve.http); format "png" answers also need pillow.
        "serve": ["starlette>=0.37", "uvicorn>=0.29"],
        # tests/test_build.py builds wheels without build isolation, so the build tools are test needs too.
        "test": ["pytest", "hypothesis", "diffusers>=0.30", "scikit-learn", "safetensors", "pillow", "triton",
                 "tqdm", "pybind11>=2.12", "cmake>=3.18", "ninja", "wheel", "starlette>=0.37", "uvicorn>=0.29"],
    },
)
