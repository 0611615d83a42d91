"""Builds ``fastguide._C`` with the CUDA C++ kernels compiled by g++ for the CPU, against the host emulation of
CUDA in this directory (``include/`` and ``emu_runtime.cpp``; what is and is not emulated is listed at the top of
``include/cuda_runtime.h``).

``build()`` snapshots ``csrc/`` into a temporary directory, rewrites the CUDA sources into plain C++ there
(``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``emu::launch(&kernel, emu::LaunchConfig(...), args)``,
``__shared__ T x[N];`` becomes a reference to the block's instance of ``x``; line numbers are kept and ``#line``
points diagnostics and sanitizer reports at the original files), compiles every translation unit in parallel
and links the module. The CUDA translation units are compiled with -fsanitize=address in call mode plus UBSan
checks, whose callbacks (emu_runtime.cpp) check every access a kernel makes. The result is cached in the
temporary directory under a hash of every input, so repeated test runs do not rebuild.

``FASTGUIDE_CUDA_EMU_CSRC=<dir>`` builds from another copy of ``csrc`` (to check that a deliberate bug in a
kernel makes the tests fail without touching the working tree).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

COMMON_FLAGS = ["-std=c++17", "-fPIC", "-pthread"]
# CUDA sources: -Og compiles the fused step (3 x 57 kernel instantiations) in about half the time of -O1 and
# runs nearly as fast; no FMA contraction (each operation rounds once; nvcc would fuse, see cuda_runtime.h);
# __CUDA_ARCH__ of the newest target (host and device code share one pass); line tables for fault reports;
# and the checks: every load and store calls emu_runtime.cpp (ASan call mode without shadow memory), plus UBSan.
CUDA_FLAGS = [
    "-Og", "-g1", "-ffp-contract=off", "-D__CUDA_ARCH__=900",
    "-fsanitize=address", "--param=asan-instrumentation-with-call-threshold=0", "--param=asan-stack=0",
    "--param=asan-globals=0",
    "-fsanitize=alignment,null,bounds,shift,signed-integer-overflow,vla-bound,bool,enum,float-cast-overflow",
]
# The bindings and the C++ CPU kernels are only linked in (this module's tests run no CPU kernel): no
# optimisation. A pybind11 internals id of its own: the emulated module registers the same C++ classes
# (GuidedStepArgs, ...) as the real fastguide._C, which may be loaded in the same process.
BINDINGS_FLAGS = ["-O0", "-DFASTGUIDE_WITH_CUDA", '-DPYBIND11_COMPILER_TYPE="_fastguide_cuda_emu"']
CPU_FLAGS = ["-O0", "-fopenmp"]
RUNTIME_FLAGS = ["-O2", "-U_FORTIFY_SOURCE"]
LINK_FLAGS = ["-shared", "-fopenmp", "-pthread", "-ldl"]

CXX_SUFFIXES = (".cu", ".cuh", ".cpp", ".cc", ".h", ".hpp")


class BuildError(RuntimeError):
    pass


def missing_toolchain() -> str:
    """Why the emulated module cannot be built here ("" when it can)."""
    if not sys.platform.startswith("linux"):
        return f"the CUDA emulation uses Linux ucontext fibers and dladdr; this is {sys.platform}"
    for tool in ("g++", "nm"):
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH: the CUDA emulation compiles the kernels with g++"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed (pip install pybind11): the emulated module uses csrc/bindings.cpp"
    return ""


# --------------------------------------------------------------------------------------- source rewriting

def _code_mask(text: str) -> str:
    """``text`` with comments and the contents of string/char literals blanked (newlines kept), so that
    searches see only code and indices stay valid."""
    out = list(text)

    def blank(lo: int, hi: int) -> None:
        for k in range(lo, hi):
            if out[k] != "\n":
                out[k] = " "

    i, n = 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif text[i] in "\"'":
            j = i + 1
            while j < n and text[j] != text[i]:
                j += 2 if text[j] == "\\" else 1
            blank(i + 1, min(j, n))
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _matching(mask: str, i: int, open_: str, close: str) -> int:
    """Index of the bracket closing the one at ``mask[i]``."""
    depth = 0
    for j in range(i, len(mask)):
        if mask[j] == open_:
            depth += 1
        elif mask[j] == close:
            depth -= 1
            if depth == 0:
                return j
    raise BuildError(f"unbalanced {open_}{close}")


def _kernel_start(mask: str, end: int) -> int:
    """Start of the kernel expression ending just before ``end`` (``name`` or ``ns::name<args>``)."""
    j = end
    while j > 0 and mask[j - 1].isspace():
        j -= 1
    if mask[j - 1] == ">":
        depth = 0
        while j > 0:
            j -= 1
            if mask[j] == ">":
                depth += 1
            elif mask[j] == "<":
                depth -= 1
                if depth == 0:
                    break
        while j > 0 and mask[j - 1].isspace():
            j -= 1
    while j > 0 and (mask[j - 1].isalnum() or mask[j - 1] in "_:"):
        j -= 1
    return j


def _rewrite_launches(text: str, path: str) -> str:
    mask = _code_mask(text)
    edits: List[Tuple[int, int, str]] = []
    for m in re.finditer(r"<<<", mask):
        start = _kernel_start(mask, m.start())
        kernel = text[start:m.start()].strip()
        close = mask.find(">>>", m.end())
        if not kernel or close < 0:
            raise BuildError(f"{path}: cannot parse the launch at offset {m.start()}")
        config = text[m.end():close]
        paren = close + 3
        while mask[paren].isspace():
            paren += 1
        if mask[paren] != "(":
            raise BuildError(f"{path}: launch of {kernel} without an argument list")
        end = _matching(mask, paren, "(", ")")
        args = text[paren + 1:end].strip()
        call = f"::emu::launch(&{kernel}, ::emu::LaunchConfig({config.strip()}){', ' + args if args else ''})"
        newlines = text[start:end + 1].count("\n")
        edits.append((start, end + 1, call.replace("\n", " ") + "\n" * newlines))
    for start, end, new in reversed(edits):
        text = text[:start] + new + text[end:]
    return text


_SHARED = re.compile(r"(?P<extern>\bextern\s+)?\b__shared__\b(?P<decl>[^;]*);")
_DECL = re.compile(r"^\s*(?P<type>[A-Za-z_][\w:<>,\s*]*?)\s+(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]+\]\s*)*)$")


def _rewrite_shared(text: str, path: str) -> str:
    mask = _code_mask(text)
    edits = []
    for m in _SHARED.finditer(mask):
        decl = text[m.start("decl"):m.end("decl")]
        d = _DECL.match(decl)
        if m.group("extern") or d is None or "alignas" in decl or "__align__" in decl:
            raise BuildError(f"{path}: the emulation supports only `__shared__ Type name[dims];` "
                             f"(no extern/dynamic shared memory, alignment or initialiser): {text[m.start():m.end()]!r}")
        name, typ, dims = d.group("name"), " ".join(d.group("type").split()), d.group("dims").strip()
        # A static tag per declaration (and per template instantiation) identifies the variable; the block's
        # instance is created poisoned on first use.
        new = (f"static char {name}__emu_tag; using {name}__emu_type = {typ} {dims}; "
               f"{name}__emu_type& {name} = ::emu::block_shared<{name}__emu_type>(&{name}__emu_tag);")
        edits.append((m.start(), m.end(), new + "\n" * text[m.start():m.end()].count("\n")))
    for start, end, new in reversed(edits):
        text = text[:start] + new + text[end:]
    return text


def rewrite_cuda_source(text: str, path: str) -> str:
    """A CUDA source or header as plain C++ for the emulation (same line numbering)."""
    out = _rewrite_shared(_rewrite_launches(text, path), path)
    left = _code_mask(out)
    if "<<<" in left:
        raise BuildError(f"{path}: a kernel launch was not rewritten")
    return out


# ---------------------------------------------------------------------------------------------- building

def _read_tree(root: Path) -> Dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def _tool_version(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def _cache_key(csrc_dir: Path, csrc: Dict[str, bytes], emu: Dict[str, bytes]) -> str:
    import pybind11

    h = hashlib.sha256(str(csrc_dir).encode() + b"\0")  # the #line paths in reports
    for tree in (csrc, emu):
        for name, data in tree.items():
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    for part in (_tool_version(["g++", "-dumpfullversion"]), sys.version, pybind11.__version__,
                 sysconfig.get_config_var("EXT_SUFFIX"), repr((COMMON_FLAGS, CUDA_FLAGS, BINDINGS_FLAGS, CPU_FLAGS,
                                                               RUNTIME_FLAGS, LINK_FLAGS))):
        h.update(str(part).encode() + b"\0")
    return h.hexdigest()


def _with_line(text: str, origin: Path) -> str:
    return f'#line 1 "{origin}"\n' + text


def _generate(csrc_dir: Path, csrc: Dict[str, bytes], work: Path) -> Tuple[List[Path], List[Path], Path]:
    """Writes the rewritten tree under work/csrc; returns (cuda sources, cpu sources, bindings)."""
    cuda, cpu = [], []
    for name, data in csrc.items():
        origin = csrc_dir / name
        target = work / "csrc" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not name.endswith(CXX_SUFFIXES):
            target.write_bytes(data)
            continue
        text = data.decode()
        if name.startswith("cuda/"):
            text = rewrite_cuda_source(text, name)
            if name.endswith(".cu"):
                target = target.with_suffix(".cpp")
                cuda.append(target)
        elif name.startswith("cpu/") and name.endswith(".cpp"):
            cpu.append(target)
        target.write_text(_with_line(text, origin))
    if not cuda:
        raise BuildError(f"no CUDA sources (*.cu) in {csrc_dir / 'cuda'}")
    bindings = work / "csrc" / "bindings.cpp"
    if not bindings.exists():
        raise BuildError(f"{csrc_dir / 'bindings.cpp'} not found")
    selftest = work / "emu" / "selftest.cpp"
    selftest.parent.mkdir(parents=True, exist_ok=True)
    selftest.write_text(_with_line(rewrite_cuda_source((HERE / "selftest.cu").read_text(), "selftest.cu"),
                                   HERE / "selftest.cu"))
    cuda.append(selftest)
    return cuda, cpu, bindings


def _compile(job: Tuple[List[str], Path]) -> Tuple[Path, float, str]:
    cmd, obj = job
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"compilation failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return obj, time.perf_counter() - start, proc.stderr


def _prune(cache_root: Path, days: float = 7.0) -> None:
    """Removes builds unused for `days` and abandoned build directories (one per source change piles up)."""
    now = time.time()
    for entry in cache_root.iterdir():
        stamps = [p.stat().st_mtime for p in entry.glob("_C*")] or [entry.stat().st_mtime]
        limit = 1.0 if entry.name.startswith("build-") else days
        if now - max(stamps) > limit * 86400:
            shutil.rmtree(entry, ignore_errors=True)


def build(csrc_dir: Optional[Path] = None, jobs: Optional[int] = None, verbose: bool = False) -> Path:
    """Path of the emulated ``_C`` module for ``csrc_dir`` (default: $FASTGUIDE_CUDA_EMU_CSRC or the repository's
    csrc), building it unless a cached build of identical inputs exists."""
    import pybind11

    csrc_dir = Path(csrc_dir or os.environ.get("FASTGUIDE_CUDA_EMU_CSRC") or ROOT / "csrc").resolve()
    csrc = _read_tree(csrc_dir)  # one snapshot: other edits during the build do not mix in
    # The emulation's build inputs (emulator.py and the tests may change without a rebuild).
    emu = {name: data for name, data in _read_tree(HERE).items()
           if name.startswith("include/") or name.endswith((".cpp", ".cu")) or name == "build.py"}
    key = _cache_key(csrc_dir, csrc, emu)
    cache_root = Path(tempfile.gettempdir()) / "fastguide-cuda-emu"
    final = cache_root / key[:24]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    module = final / f"_C{suffix}"
    if module.exists():
        os.utime(module)  # recently used: kept by _prune
        return module

    cache_root.mkdir(parents=True, exist_ok=True)
    _prune(cache_root)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_root))
    try:
        cuda, cpu, bindings = _generate(csrc_dir, csrc, work)
        includes = [f"-I{HERE / 'include'}", f"-I{work / 'csrc'}", f"-I{sysconfig.get_paths()['include']}",
                    f"-I{pybind11.get_include()}"]
        runtime_obj = work / "obj" / "emu_runtime.o"
        runtime_obj.parent.mkdir()
        jobs_list = [(["g++", *COMMON_FLAGS, *RUNTIME_FLAGS, f"-I{HERE / 'include'}", "-c", str(HERE / "emu_runtime.cpp"),
                       "-o", str(runtime_obj)], runtime_obj)]
        for src in cuda:
            obj = work / "obj" / f"cuda_{src.stem}.o"
            jobs_list.append((["g++", *COMMON_FLAGS, *CUDA_FLAGS, *includes, "-c", str(src), "-o", str(obj)], obj))
        for src in cpu:
            obj = work / "obj" / f"cpu_{src.stem}.o"
            jobs_list.append((["g++", *COMMON_FLAGS, *CPU_FLAGS, *includes, "-c", str(src), "-o", str(obj)], obj))
        obj = work / "obj" / "bindings.o"
        jobs_list.append((["g++", *COMMON_FLAGS, *BINDINGS_FLAGS, *includes, "-c", str(bindings), "-o", str(obj)],
                          obj))
        # Longest first (the fused step, then the bindings), so that two cores finish together.
        jobs_list.sort(key=lambda j: (0 if "guided_step" in j[1].name else 1 if "bindings" in j[1].name else 2))
        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
            results = list(pool.map(_compile, jobs_list))
        if verbose:
            for obj, seconds, _ in results:
                print(f"  {obj.name}: {seconds:.1f} s", file=sys.stderr)
        out = work / "module" / module.name
        out.parent.mkdir()
        link = ["g++", *[str(o) for o, _, _ in results], *LINK_FLAGS, "-o", str(out)]
        proc = subprocess.run(link, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"link failed: {' '.join(link)}\n{proc.stdout}{proc.stderr}")
        # Every sanitizer callback the instrumentation calls must be one of the runtime's.
        undefined = subprocess.run(["nm", "-u", str(out)], capture_output=True, text=True).stdout
        missing = sorted(set(re.findall(r"\b(__(?:asan|ubsan)_\w+)", undefined)))
        if missing:
            raise BuildError(f"sanitizer callbacks missing from emu_runtime.cpp: {', '.join(missing)}")
        try:
            os.rename(out.parent, final)  # atomic; another process may have finished the same build first
        except OSError:
            if not module.exists():
                raise
        return module
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
