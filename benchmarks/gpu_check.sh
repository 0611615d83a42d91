#!/usr/bin/env bash
# The project's one prepared GPU verification run (an H200, sm_90; no network there).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run [--wheels DIR]    # rehearsal on a CPU machine (well under a minute)
#
# Parts, in order, each time-boxed with `timeout`, logged to its own log, and run whatever the earlier ones
# gave (a failure costs only its own box):
#   env       python / torch / CUDA device / triton / nvcc / cmake seen there (decides gpu or CPU mode)
#   wheels    install the carried wheels (wheels/, made by benchmarks/fetch_gpu_wheels.sh; --wheels DIR)
#             into a temporary site dir on PYTHONPATH: only what the machine lacks, resolved by pip against
#             the installed packages (diffusers, and its needs the machine does not have)
#   build     fastguide._C with the CUDA kernels for sm_90 on all cores (pip install -e .; fallbacks:
#             --break-system-packages, then a non-editable --target install used with PYTHONSAFEPATH=1);
#             dry run: CPU-only build (FASTGUIDE_CUDA=0), skipped when fastguide._C is already importable
#   backends  pytest tests/test_backends_parity.py tests/test_backends_triton_kernels.py
#   native    pytest tests/test_native_cudagraph.py tests/test_native_loops_cuda.py
#   dropin    pytest tests/test_dropin_diffusers.py tests/test_dropin_guidance.py tests/test_dropin_compile.py
#   serve     pytest tests/test_serve*.py (when such files exist)
#   step_gpu  python benchmarks/step_gpu.py (CSV into $OUT); dry run: the same flags with --list
#   bench     python -m fastguide bench --quick --device cuda (CSV and PNG into $OUT); dry run: flags checked
#
# $OUT receives at most 8 files, flat: summary.txt (the table printed last), logs.txt (the tail of every
# part's log), pytest_summary.txt (counts, failures, skip reasons, slowest tests of every pytest part),
# step_gpu.csv, bench_cuda.csv, bench_cuda.png. Exit status: 0 when no part FAILed, else 1.
#
# Options: --dry-run (no GPU parts; CPU build), --wheels DIR (default wheels/), -h/--help.
# Environment (time boxes in seconds; the defaults sum to 455 s; the whole run is also capped by
# GPU_CHECK_TOTAL_S, 470 s: a part gets at most what is left of it less 15 s, so all ends within 8 minutes):
#   GPU_CHECK_TOTAL_S=470  GPU_CHECK_ENV_S=20  GPU_CHECK_WHEELS_S=20  GPU_CHECK_BUILD_S=100
#   GPU_CHECK_BACKENDS_S=80  GPU_CHECK_NATIVE_S=45  GPU_CHECK_DROPIN_S=35  GPU_CHECK_SERVE_S=20
#   GPU_CHECK_STEP_S=45  GPU_CHECK_BENCH_S=90
# A part past its box gets SIGINT (pytest still writes its report: partial counts), then SIGKILL 10 s later.
#   GPU_CHECK_TEST_TIMEOUT_S=60   per-test limit when pytest-timeout is installed (0: none)
#   GPU_CHECK_PYTEST_ARGS         extra pytest arguments for every pytest part (e.g. "-x")
#   GPU_CHECK_STEP_ARGS           step_gpu.py arguments (default: three sizes, fp16 and fp32, fewer repeats)
#   GPU_CHECK_BENCH_ARGS          fastguide bench arguments (default "--quick --repeats 3")
#   GPU_CHECK_SKIP_BUILD=1        skip the build part (any mode)
#   GPU_CHECK_DRY_COLLECT=1       dry run: also `pytest --collect-only` the GPU test files (~30 s on 2 cores)
#   GPU_CHECK_LOG_TAIL=150        lines of each part's log kept in logs.txt
#   FASTGUIDE_CUDA_ARCHS=90       architectures of the CUDA build
#   PYTHON=python3                the interpreter (the one holding torch)
#   GPU_CHECK_FORCE_GPU=1         walk the GPU path without a GPU (rehearsing the parsing: the tests then run
#                                 their CPU cases, the benchmarks fail)
# Scratch files (logs, junit reports, the site dir, TMPDIR of the parts) live in a fresh directory under
# ${TMPDIR:-/tmp}; it is kept and named in summary.txt. Nothing is written into the repository except by
# the build (fastguide/_C*.so and build/), and nothing under $HOME: the Triton, Inductor and matplotlib
# caches go into the scratch directory too (only pip's `rustc --version`, where a rustup proxy is on PATH,
# may touch $RUSTUP_HOME).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY=0
WHEELS_DIR="$ROOT/wheels"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS_DIR=${2:?--wheels needs a directory}; shift ;;
    --wheels=*) WHEELS_DIR=${1#*=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
T_TOTAL=${GPU_CHECK_TOTAL_S:-470}
T_ENV=${GPU_CHECK_ENV_S:-20}
T_WHEELS=${GPU_CHECK_WHEELS_S:-20}
T_BUILD=${GPU_CHECK_BUILD_S:-100}
T_BACKENDS=${GPU_CHECK_BACKENDS_S:-80}
T_NATIVE=${GPU_CHECK_NATIVE_S:-45}
T_DROPIN=${GPU_CHECK_DROPIN_S:-35}
T_SERVE=${GPU_CHECK_SERVE_S:-20}
T_STEP=${GPU_CHECK_STEP_S:-45}
T_BENCH=${GPU_CHECK_BENCH_S:-90}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT_S:-60}
LOG_TAIL=${GPU_CHECK_LOG_TAIL:-150}
STEP_ARGS=${GPU_CHECK_STEP_ARGS:---sizes 2x4x64x64,16x4x128x128,64x3x256x256 --dtypes float16,float32 --warmup 5 --repeats 15}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---quick --repeats 3}
RESERVE=15           # seconds kept back from the total: the last part's kill grace and the summary
MAX_OUT_FILES=8
START=$SECONDS

# ------------------------------------------------------------------------------------------ scratch space
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || { echo "gpu_check: no scratch dir" >&2; exit 2; }
LOGS="$WORK/logs"; SITE="$WORK/site"; JUNIT="$WORK/junit"
mkdir -p "$LOGS" "$SITE" "$JUNIT" "$WORK/tmp" "$WORK/home-cache"
: > "$WORK/parts.tsv"; : > "$WORK/warnings.txt"
if [ -z "${OUT:-}" ]; then
  OUT="$WORK/out"
  echo "OUT is not set: results go to $OUT" >> "$WORK/warnings.txt"
fi
mkdir -p "$OUT" || { echo "gpu_check: cannot create OUT=$OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "OUT was not empty: its $(find "$OUT" -type f | wc -l) earlier files count towards the 8-file limit" \
    >> "$WORK/warnings.txt"
fi

export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
export TMPDIR="$WORK/tmp"
export HYPOTHESIS_STORAGE_DIRECTORY="$WORK/hypothesis"
export MPLCONFIGDIR="$WORK/home-cache/matplotlib"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$WORK/home-cache/triton}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/home-cache/inductor}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="$PATH:/usr/local/cuda/bin"
fi
NPROC=$(nproc 2>/dev/null || "$PY" -c 'import os; print(os.cpu_count() or 1)')

# ------------------------------------------------------------------ the Python helpers (parsing, summaries)
HELP="$WORK/gpu_check_helpers.py"
cat > "$HELP" <<'PYEOF'
"""Helpers of benchmarks/gpu_check.sh: each subcommand prints '@@STATUS X' / '@@DETAIL text' for its part."""
import csv, json, os, re, shutil, subprocess, sys, textwrap, zipfile
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlparse


def say(status=None, detail=None):
    if status:
        print(f"@@STATUS {status}")
    if detail is not None:
        print("@@DETAIL " + " ".join(str(detail).split()))


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def version_of(module):
    try:
        return __import__(module).__version__
    except Exception:
        return "none"


def cmd_env():
    import platform
    print(f"python {platform.python_version()} at {sys.executable}")
    parts, cuda = [f"py {platform.python_version()}"], 0
    try:
        import torch
        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) at {torch.__file__}")
        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            cuda = 1
            cap = torch.cuda.get_device_capability(0)
            name = torch.cuda.get_device_name(0)
            print(f"device {name}, sm_{cap[0]}{cap[1]}, {torch.cuda.device_count()} visible")
            parts.insert(0, f"{name} sm_{cap[0]}{cap[1]}")
        else:
            print("no CUDA device visible to torch")
            parts.insert(0, "no CUDA device")
    except Exception as e:
        print(f"torch does not import: {e!r}")
        say("FAIL", f"torch does not import: {e!r}")
        print("@@CUDA 0")
        return 1
    parts.append(f"triton {version_of('triton')}")
    print(f"triton {version_of('triton')}, diffusers (before the wheels) {version_of('diffusers')}")
    for tool in ("nvcc", "cmake", "ninja", "cuobjdump"):
        path = shutil.which(tool)
        line = ""
        if path and tool in ("nvcc", "cmake"):
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
            line = next((l for l in reversed(out) if "release" in l or "version" in l), out[-1] if out else "")
            if tool == "nvcc":
                m = re.search(r"release ([0-9.]+)", line)
                parts.append(f"nvcc {m.group(1) if m else '?'}")
        print(f"{tool}: {path or 'not on PATH'} {line}")
        if tool == "nvcc" and not path:
            parts.append("no nvcc")
    print(f"cores {os.cpu_count()}")
    print(f"@@CUDA {cuda}")
    say("PASS", ", ".join(parts))
    return 0


def _wheel_name(path):
    name, version = Path(path).name.split("-")[:2]
    return name, version


def _installed(name):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _top_level(wheel):
    """The importable top-level names of a wheel (top_level.txt, else its RECORD's first path parts)."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tl = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if tl:
            return [l.strip() for l in z.read(tl[0]).decode().splitlines() if l.strip()]
        tops = set()
        for n in names:
            first = n.split("/")[0]
            if first.endswith((".dist-info", ".data")):
                continue
            tops.add(first[:-3] if first.endswith(".py") else first)
        return sorted(t for t in tops if t.isidentifier())


def _extract(wheel, site):
    """Install a wheel without pip: unpack it (purelib/platlib of .data moved up; scripts skipped)."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    for data in Path(site).glob("*.data"):
        for sub in ("purelib", "platlib"):
            if (data / sub).is_dir():
                shutil.copytree(data / sub, site, dirs_exist_ok=True)
        shutil.rmtree(data)


def cmd_wheels(wheels_dir, site):
    wheels_dir = Path(wheels_dir)
    wheels = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
    if not wheels:
        say("SKIP", f"no wheels in {wheels_dir} (make them with benchmarks/fetch_gpu_wheels.sh and carry wheels/)")
        return 0
    by_name = {norm(_wheel_name(w)[0]): w for w in wheels}
    req_file = wheels_dir / "requirements.txt"
    if req_file.is_file():
        reqs = [l.split("#")[0].strip() for l in req_file.read_text().splitlines()]
        reqs = [r for r in reqs if r]
    else:
        reqs = [_wheel_name(w)[0] for w in wheels]
    print(f"{len(wheels)} wheels in {wheels_dir}; requirements: {' '.join(reqs)}")
    pip = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check"]
    have_pip = subprocess.run(pip + ["--version"], capture_output=True).returncode == 0
    plan, how = None, ""
    if have_pip:
        report = Path(site).parent / "wheel_plan.json"
        r = subprocess.run(pip + ["install", "--dry-run", "--quiet", "--no-index", "--find-links", str(wheels_dir),
                                  "--no-cache-dir", "--report", str(report)] + reqs)
        if r.returncode == 0 and report.is_file():
            items = json.loads(report.read_text())["install"]
            plan = []
            for item in items:
                url = item["download_info"]["url"]
                path = Path(unquote(urlparse(url).path)) if url.startswith("file:") else by_name.get(
                    norm(item["metadata"]["name"]))
                plan.append(str(path))
            how = "resolved by pip against the installed packages"
        else:
            print("pip could not resolve the requirements against the installed packages; "
                  "falling back to: every carried wheel whose package is not installed")
    if plan is None:
        plan = [str(w) for w in wheels if _installed(_wheel_name(w)[0]) is None]
        how = "not installed here"
    for req in reqs:
        name = re.split(r"[<>=!~\[; ]", req)[0]
        print(f"  {name}: installed here {_installed(name) or 'no'}")
    if plan:
        print("installing into", site, ":", " ".join(Path(p).name for p in plan))
        if have_pip:
            r = subprocess.run(pip + ["install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                                      "--target", site] + plan)
            if r.returncode != 0:
                say("FAIL", f"pip install --target failed (rc {r.returncode})")
                return 1
        else:
            print("no pip: unpacking the wheels")
            for p in plan:
                _extract(p, site)
    # Check: every requirement imports with the site dir first on the path.
    env = dict(os.environ, PYTHONPATH=site + os.pathsep + os.environ.get("PYTHONPATH", ""))
    failed, got = [], []
    for req in reqs:
        name = re.split(r"[<>=!~\[; ]", req)[0]
        wheel = by_name.get(norm(name))
        modules = _top_level(wheel) if wheel else [name.replace("-", "_")]
        code = ("import importlib, importlib.metadata as md, sys\n"
                f"mods = {modules!r}\n"
                "for m in mods: importlib.import_module(m)\n"
                f"print(md.version({name!r}), importlib.import_module(mods[0]).__file__)\n")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            failed.append(name)
            print(f"  import {name} FAILED: {r.stderr.strip().splitlines()[-1:] }")
        else:
            ver, where = r.stdout.split()
            print(f"  import {name} ok: {ver} from {where}")
            got.append(f"{name} {ver}" + ("" if where.startswith(site) else " (machine's)"))
    names = ", ".join(_wheel_name(p)[0] for p in plan)
    detail = f"installed {len(plan)} ({how})" + (f": {names}" if plan else "") + f"; imports: {', '.join(got)}"
    if failed:
        say("FAIL", f"does not import: {', '.join(failed)}; " + detail)
        return 1
    say("PASS", detail)
    return 0


def cmd_built(mode):
    try:
        import fastguide
        import fastguide._C as ext
        import fastguide.kernels  # noqa: F401  (the package_dir mapping: an install, not just the tree)
    except Exception as e:
        say("FAIL", f"fastguide does not import after the build: {e!r}")
        return 1
    avail, why = fastguide.backends(), fastguide.backends(reasons=True)
    print("fastguide from", fastguide.__file__, "; _C at", ext.__file__)
    print("backends:", avail, why)
    arches = ""
    if shutil.which("cuobjdump"):
        r = subprocess.run(["cuobjdump", "--list-elf", ext.__file__], capture_output=True, text=True)
        found = sorted(set(re.findall(r"sm_\d+a?", r.stdout)))
        arches = f"; cubins {','.join(found) or 'none'}"
        print("cuobjdump --list-elf:", r.stdout.strip() or r.stderr.strip())
    state = " ".join(f"{k}={'ok' if v else 'no'}" for k, v in avail.items())
    if mode == "gpu" and not avail.get("cuda"):
        say("FAIL", f"built, but the cuda backend is unavailable: {why.get('cuda')}; {state}{arches}")
        return 1
    say(None, f"{state}{arches}")
    return 0


def _junit_cases(xml):
    import xml.etree.ElementTree as ET
    root = ET.parse(xml).getroot()
    cases = []
    for tc in root.iter("testcase"):
        tid = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        outcome, msg = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                msg = (child.get("message") or child.text or "").strip()
                if child.tag == "skipped" and child.get("type") == "pytest.xfail":
                    outcome = "xfailed"
                break
        cases.append((tid, outcome, msg, float(tc.get("time") or 0)))
    return cases


def _short(msg, n=110):
    msg = " ".join(msg.split())
    msg = re.sub(r"^Skipped: ", "", msg)
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def cmd_junit(xml, log, rc, secs, box):
    rc = int(rc)
    if not Path(xml).is_file():
        tail = [l for l in Path(log).read_text(errors="replace").splitlines() if l.strip() and not l.startswith("###")]
        last = tail[-1] if tail else ""
        if rc == 124:
            say("FAIL", f"timed out at {box} s, no report: {_short(last, 80)}")
        else:
            say("FAIL", f"pytest rc {rc} without a report: {_short(last, 80)}")
        return
    cases = _junit_cases(xml)
    n = Counter(c[1] for c in cases)
    passed, failed = n["passed"], n["failed"] + n["error"]
    skipped = n["skipped"]
    reasons = Counter(_short(c[2], 60) for c in cases if c[1] == "skipped")
    top = f" (skips: {reasons.most_common(1)[0][0]})" if reasons else ""
    counts = f"{passed} passed, {failed} failed, {skipped} skipped" + (f", {n['xfailed']} xfailed" if n["xfailed"] else "")
    first_fail = next((c[0].split("::")[-1] for c in cases if c[1] in ("failed", "error")), "")
    if rc == 124:
        say("FAIL", f"timed out at {box} s; partial: {counts}" + (f"; first failure {first_fail}" if first_fail else ""))
    elif rc == 5 or not cases:
        say("SKIP", "no tests collected")
    elif rc == 0 and passed == 0 and skipped:
        say("SKIP", f"all {skipped} tests skipped{top}")
    elif rc == 0:
        say("PASS", counts + top)
    else:
        say("FAIL", counts + (f"; first failure {first_fail}" if first_fail else f"; pytest rc {rc}"))


def cmd_pytest_summary(work, out_file, *parts):
    work = Path(work)
    statuses = {}
    for line in (work / "parts.tsv").read_text().splitlines():
        name, status, secs, detail = (line.split("\t") + ["", "", ""])[:4]
        statuses[name] = (status, secs, detail)
    lines = ["fastguide GPU check: pytest parts", ""]
    for part in parts:
        status, secs, detail = statuses.get(part, ("?", "?", "not run"))
        lines.append(f"=== {part}: {status} ({secs} s) {detail}")
        cmd = work / "logs" / f"{part}.cmd"
        if cmd.is_file():
            lines.append("    command: " + cmd.read_text().strip())
        xml = work / "junit" / f"{part}.xml"
        if not xml.is_file():
            lines.append("    no junit report")
            lines.append("")
            continue
        cases = _junit_cases(xml)
        n = Counter(c[1] for c in cases)
        lines.append("    " + ", ".join(f"{v} {k}" for k, v in sorted(n.items())) + f" of {len(cases)}")
        bad = [c for c in cases if c[1] in ("failed", "error")]
        if bad:
            lines.append(f"    failures ({len(bad)}):")
            for tid, outcome, msg, t in bad[:40]:
                lines.append(f"      {outcome.upper()} {tid}")
                for l in msg.splitlines()[:6]:
                    lines.append("        " + l[:200])
            if len(bad) > 40:
                lines.append(f"      ... and {len(bad) - 40} more")
        skips = Counter(_short(c[2], 150) for c in cases if c[1] == "skipped")
        if skips:
            lines.append("    skip reasons:")
            for reason, k in skips.most_common(12):
                lines.append(f"      {k:4d} x {reason}")
        slow = sorted(cases, key=lambda c: -c[3])[:8]
        lines.append("    slowest: " + "; ".join(f"{c[0].split('::')[-1]} {c[3]:.1f}s" for c in slow))
        lines.append("")
    Path(out_file).write_text("\n".join(lines) + "\n")


def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def cmd_step_figure(path):
    rows = list(csv.DictReader(open(path))) if Path(path).is_file() else []
    if not rows:
        say("FAIL", f"no rows in {path}")
        return
    biggest = max(int(r["elements"]) for r in rows)
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sel = {r["method"]: r for r in rows if int(r["elements"]) == biggest and r["dtype"] == dtype}
        bits = []
        for m in ("triton", "cuda"):
            if m in sel:
                r = sel[m]
                s = f"{m} {float(r['frac_of_copy']):.2f} of copy"
                if _f(r.get("speedup_vs_compile")):
                    s += f", {float(r['speedup_vs_compile']):.1f}x compile"
                if _f(r.get("speedup_vs_diffusers")):
                    s += f", {float(r['speedup_vs_diffusers']):.1f}x diffusers"
                err = _f(r.get("max_abs_err_vs_diffusers"))
                if err is not None and err > (5e-2 if dtype != "float32" else 1e-4):
                    s += f", ERR {err:.1e}"
                bits.append(s)
        shape = next(r["shape"] for r in rows if int(r["elements"]) == biggest)
        out.append(f"{shape} {dtype}: " + ("; ".join(bits) or "no fused method timed"))
    say(None, f"{len(rows)} rows; " + " | ".join(out))


def cmd_bench_figure(path):
    rows = [r for r in csv.DictReader(open(path))] if Path(path).is_file() else []
    rows = [r for r in rows if not r.get("note") and _f(r.get("speedup"))]
    if not rows:
        say("FAIL", f"no measured rows in {path}")
        return
    best = {}
    for r in rows:
        if r["contender"] in ("diffusers", "gd-cond_fn"):
            continue
        key = f"{r['section']} {r['network']}/B{r['batch']}" + ("" if r["section"] == "cfg" else
                                                                 " " + r["guidance"].split()[0])
        if key not in best or float(r["speedup"]) > float(best[key]["speedup"]):
            best[key] = r
    bits = [f"{k}: {v['contender'].replace('fastguide-', 'fg-')} {float(v['speedup']):.1f}x" for k, v in best.items()]
    say(None, f"{len(rows)} rows; best vs baseline: " + "; ".join(bits))


TEXT = (".txt", ".csv", ".log", ".xml", ".json", ".md")
PRIORITY = ["summary.txt", "pytest_summary.txt", "logs.txt", "step_gpu.csv", "bench_cuda.csv", "bench_cuda.png"]


def cmd_enforce(out, limit, warnings):
    """$OUT as the tool returns it: plain files at most two folders down, names of [A-Za-z0-9._-], 16 MiB
    each, at most `limit` files: extra text files are merged into logs.txt, other extras dropped."""
    out, limit, cap = Path(out), int(limit), 16 * 1024 * 1024
    warn = []
    for p in sorted(out.rglob("*"), key=lambda p: -len(p.parts)):
        rel = p.relative_to(out)
        if p.is_symlink() or (not p.is_file() and not p.is_dir()):
            p.unlink()
            warn.append(f"removed {rel}: not a plain file")
        elif p.is_file() and len(rel.parts) > 3:
            dest = out / re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(rel.parts))
            p.rename(dest)
            warn.append(f"moved {rel} to {dest.name}: more than two folders down")
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    for p in list(out.rglob("*")):
        if p.is_file() and not re.fullmatch(r"[A-Za-z0-9._-]+", p.name):
            new = p.with_name(re.sub(r"[^A-Za-z0-9._-]", "_", p.name))
            p.rename(new)
            warn.append(f"renamed {p.name} to {new.name}")
    for p in list(out.rglob("*")):
        if p.is_file() and p.stat().st_size > cap:
            if p.suffix in TEXT:
                data = p.read_bytes()[-(cap - 200):]
                p.write_bytes(b"[gpu_check: truncated to its last 16 MiB]\n" + data)
                warn.append(f"truncated {p.name} to 16 MiB")
            else:
                p.unlink()
                warn.append(f"dropped {p.name}: over 16 MiB")
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > limit:
        rank = lambda p: (PRIORITY.index(p.name) if p.name in PRIORITY else len(PRIORITY), str(p))
        files.sort(key=rank)
        keep, extra = files[:limit], files[limit:]
        logs = out / "logs.txt"
        if logs not in keep:          # make room for the file that takes the merged extras
            extra.append(keep.pop())
            keep.append(logs)
        merged, dropped = [], []
        for p in extra:
            if p == logs:
                continue
            if p.suffix in TEXT or p.suffix == "":
                with logs.open("a", errors="replace") as f:
                    f.write(f"\n===== merged from {p.relative_to(out)} (8-file limit) =====\n")
                    f.write(p.read_text(errors="replace"))
                merged.append(str(p.relative_to(out)))
            else:
                dropped.append(str(p.relative_to(out)))
            p.unlink()
        if merged:
            warn.append(f"8-file limit: merged {', '.join(merged)} into logs.txt")
        if dropped:
            warn.append(f"8-file limit: dropped {', '.join(dropped)}")
    if warn:
        with open(warnings, "a") as f:
            f.write("\n".join(warn) + "\n")
        for w in warn:
            print("WARNING:", w)


def cmd_summary(work, out, mode, total, budget, site):
    work, out = Path(work), Path(out)
    parts = [l.split("\t") for l in (work / "parts.tsv").read_text().splitlines() if l.strip()]
    env_detail = next((p[3] for p in parts if p[0] == "env"), "")
    counts = Counter(p[1] for p in parts)
    overall = "FAIL" if counts["FAIL"] else "PASS"
    width = 100
    lines = [f"fastguide GPU check  mode={mode}  {overall}: {counts['PASS']} PASS, {counts['FAIL']} FAIL, "
             f"{counts['SKIP']} SKIP  ({total} s of a {budget} s budget)",
             f"where: {env_detail}",
             f"{'part':<9} {'status':<6} {'secs':>5}  detail",
             f"{'-' * 9} {'-' * 6} {'-' * 5}  {'-' * (width - 24)}"]
    for name, status, secs, detail in (p + [""] * (4 - len(p)) for p in parts):
        wrapped = textwrap.wrap(detail, width - 24) or [""]
        lines.append(f"{name:<9} {status:<6} {secs:>5}  {wrapped[0]}")
        lines += [" " * 24 + w for w in wrapped[1:3]]
        if len(wrapped) > 3:
            lines[-1] = lines[-1][: width - 3] + "..."
    lines.append(f"site dir (first on PYTHONPATH): {site}")
    lines.append(f"scratch (logs, junit): {work}")
    warns = [w for w in (work / "warnings.txt").read_text().splitlines() if w.strip()]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    names = files + ([] if "summary.txt" in files else ["summary.txt"])
    lines.append(f"OUT {out}: {len(names)} files (limit 8): {' '.join(names)}")
    if len(names) > 8:
        warns.append(f"OUT holds {len(names)} files: over the 8-file limit")
    for w in warns[:6]:
        lines.append("WARNING: " + w)
    if len(warns) > 6:
        lines.append(f"WARNING: ... {len(warns) - 6} more in logs.txt")
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    print(text, end="")
    return 1 if overall == "FAIL" else 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    sys.exit(globals()["cmd_" + cmd.replace("-", "_")](*args) or 0)
PYEOF

# -------------------------------------------------------------------------------------------- part runner
# record NAME STATUS SECS DETAIL: one row of the summary, echoed as it happens.
record() {
  local detail=${4//$'\t'/ }
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${detail//$'\n'/ }" >> "$WORK/parts.tsv"
  echo "[gpu_check] $1: $2 (${3}s) $detail"
}

# box WANT: WANT seconds, or what is left of the total (0 when nothing is).
box() {
  local want=$1 left=$(( T_TOTAL - (SECONDS - START) - RESERVE ))
  (( left < want )) && want=$left
  (( want < 1 )) && want=0
  echo "$want"
}

# boxed NAME BOX CMD...: run CMD under `timeout` (SIGINT first: pytest then still writes its report),
# appending to logs/NAME.log; sets RC.
boxed() {
  local name=$1 secs=$2; shift 2
  local log="$LOGS/$name.log"
  if [ "${secs:-0}" -lt 1 ]; then      # (timeout 0 would mean no limit at all)
    printf '### %s: not run, no time left in its box or the total budget: %s\n' "$name" "$*" >> "$log"
    RC=124
    return
  fi
  printf '### %s: %s\n### box %ss, started %s\n' "$name" "$*" "$secs" "$(date -u +%H:%M:%S)" >> "$log"
  timeout -s INT -k 10 "$secs" "$@" >> "$log" 2>&1
  RC=$?
  printf '### rc=%s\n' "$RC" >> "$log"
}

# The last '@@STATUS' / '@@DETAIL' a helper wrote to a part's log.
tag() { grep "^@@$2 " "$LOGS/$1.log" 2>/dev/null | tail -n 1 | cut -d' ' -f2-; }
last_line() { grep -v '^###' "$LOGS/$1.log" 2>/dev/null | grep -v '^@@' | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-120; }
note() { echo "$2" >> "$LOGS/$1.log"; }
rc_word() { if [ "$1" = 124 ] || [ "$1" = 137 ]; then echo "timed out at $2 s"; else echo "rc $1"; fi; }

# ---------------------------------------------------------------------------------------------------- env
part_env() {
  local t0=$SECONDS b status; b=$(box "$T_ENV")
  boxed env "$b" "$PY" "$HELP" env
  CUDA=$(tag env CUDA); CUDA=${CUDA:-0}
  status=$(tag env STATUS)
  if [ -n "$status" ]; then
    record env "$status" $((SECONDS - t0)) "$(tag env DETAIL)"
  else
    record env FAIL $((SECONDS - t0)) "$(rc_word "$RC" "$b"): $(last_line env)"
  fi
}

# ------------------------------------------------------------------------------------------------- wheels
part_wheels() {
  local t0=$SECONDS b; b=$(box "$T_WHEELS")
  if [ ! -d "$WHEELS_DIR" ]; then
    note wheels "no wheels dir $WHEELS_DIR"
    record wheels SKIP $((SECONDS - t0)) "no $WHEELS_DIR: nothing carried (make it with benchmarks/fetch_gpu_wheels.sh; carry wheels/)"
    return
  fi
  boxed wheels "$b" "$PY" "$HELP" wheels "$WHEELS_DIR" "$SITE"
  local status; status=$(tag wheels STATUS)
  if [ "$RC" != 0 ] && [ -z "$status" ]; then
    record wheels FAIL $((SECONDS - t0)) "$(rc_word "$RC" "$b"): $(last_line wheels)"
  else
    record wheels "${status:-FAIL}" $((SECONDS - t0)) "$(tag wheels DETAIL)"
  fi
}

# -------------------------------------------------------------------------------------------------- build
part_build() {
  local t0=$SECONDS b; b=$(box "$T_BUILD")
  local log="$LOGS/build.log"
  if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    local have="not importable"
    "$PY" -c 'import fastguide._C' >/dev/null 2>&1 && have="importable"
    note build "GPU_CHECK_SKIP_BUILD=1: not built (fastguide._C $have)"
    record build SKIP $((SECONDS - t0)) "GPU_CHECK_SKIP_BUILD=1: not built (fastguide._C $have)"
    return
  fi
  if [ "$MODE" != gpu ]; then
    if "$PY" -c 'import fastguide._C' >> "$log" 2>&1; then
      note build "fastguide._C already importable: not rebuilt ($MODE)"
      record build SKIP $((SECONDS - t0)) "fastguide._C already importable: not rebuilt ($MODE mode; GPU runs build FASTGUIDE_CUDA=1)"
      return
    fi
    boxed build "$b" env FASTGUIDE_CUDA=0 MAX_JOBS="$NPROC" "$PY" -m pip install --no-build-isolation --no-deps \
      --no-cache-dir -e .
    if [ "$RC" = 0 ]; then
      record build PASS $((SECONDS - t0)) "CPU-only build (FASTGUIDE_CUDA=0, pip install -e .)"
    else
      record build FAIL $((SECONDS - t0)) "CPU-only build failed ($(rc_word "$RC" "$b")): $(last_line build)"
    fi
    return
  fi
  local how="pip install -e ."
  local -a cuda_env=(env FASTGUIDE_CUDA=1 "FASTGUIDE_CUDA_ARCHS=${FASTGUIDE_CUDA_ARCHS:-90}" MAX_JOBS="$NPROC")
  local -a pip_i=("$PY" -m pip install -v --no-build-isolation --no-deps --no-cache-dir)
  boxed build "$b" "${cuda_env[@]}" "${pip_i[@]}" -e .
  if [ "$RC" != 0 ] && [ "$RC" != 124 ] && grep -q 'externally-managed' "$log"; then
    how="pip install -e . --break-system-packages"
    boxed build "$(box $((b - (SECONDS - t0))))" "${cuda_env[@]}" "${pip_i[@]}" --break-system-packages -e .
  fi
  if [ "$RC" != 0 ] && [ "$RC" != 124 ] && [ "$RC" != 137 ]; then
    how="pip install --target (non-editable) + PYTHONSAFEPATH=1"
    boxed build "$(box $((b - (SECONDS - t0))))" "${cuda_env[@]}" "${pip_i[@]}" --target "$WORK/fgpkg" .
    if [ "$RC" = 0 ]; then
      export PYTHONPATH="$WORK/fgpkg:$PYTHONPATH" PYTHONSAFEPATH=1
    fi
  fi
  if [ "$RC" != 0 ] && [ "$RC" != 124 ] && [ "$RC" != 137 ] && ! "$PY" -m pip --version >/dev/null 2>&1; then
    # No pip at all: the extension in place (fastguide.kernels then needs an install: the check says so).
    how="python setup.py build_ext --inplace (no pip)"
    boxed build "$(box $((b - (SECONDS - t0))))" "${cuda_env[@]}" "$PY" setup.py build_ext --inplace
  fi
  if [ "$RC" != 0 ]; then
    record build FAIL $((SECONDS - t0)) "$how: $(rc_word "$RC" "$b"): $(grep -E 'error|Error' "$log" | tail -n 1 | cut -c1-100)"
    return
  fi
  boxed build "$(box 60)" "$PY" "$HELP" built gpu
  local status; status=$(tag build STATUS)
  record build "${status:-PASS}" $((SECONDS - t0)) "$how, sm_${FASTGUIDE_CUDA_ARCHS:-90}, $NPROC jobs: $(tag build DETAIL)"
}

# ----------------------------------------------------------------------------------------------- pytests
# pytest_part NAME BOX FILE...: the existing FILEs under pytest on CUDA; SKIP (with why) elsewhere.
pytest_part() {
  local name=$1 want=$2; shift 2
  local t0=$SECONDS b files=() f
  for f in "$@"; do [ -f "$f" ] && files+=("$f"); done
  note "$name" "files: ${files[*]:-none} (asked for: $*)"
  if [ ${#files[@]} = 0 ]; then
    record "$name" SKIP 0 "no test files (looked for: $*)"
    return
  fi
  local -a args=(-p no:cacheprovider -q -rs --durations=10)
  if [ "$TEST_TIMEOUT" != 0 ] && "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then
    args+=("--timeout=$TEST_TIMEOUT")
  fi
  # shellcheck disable=SC2206  # word splitting of the extra arguments is intended
  local -a extra=(${GPU_CHECK_PYTEST_ARGS:-})
  if [ "$MODE" != gpu ]; then
    local why="$NO_GPU_REASON; ${#files[@]} file(s) found"
    if [ "$MODE" = dry ] && [ "${GPU_CHECK_DRY_COLLECT:-0}" = 1 ]; then
      b=$(box 120)
      boxed "$name" "$b" "$PY" -m pytest --collect-only -q -p no:cacheprovider "${files[@]}"
      if [ "$RC" = 0 ]; then
        why="$why, $(grep -Eo '[0-9]+ tests? collected' "$LOGS/$name.log" | tail -n 1 || true)"
      else
        record "$name" FAIL $((SECONDS - t0)) "collection failed ($(rc_word "$RC" "$b")): $(last_line "$name")"
        return
      fi
    fi
    note "$name" "SKIP: $why"
    record "$name" SKIP $((SECONDS - t0)) "$why"
    return
  fi
  b=$(box "$want")
  if [ "$b" = 0 ]; then record "$name" SKIP 0 "the total time budget ($T_TOTAL s) is spent"; return; fi
  echo "$PY -m pytest ${args[*]} ${extra[*]} ${files[*]}" > "$LOGS/$name.cmd"
  boxed "$name" "$b" "$PY" -m pytest "${args[@]}" "${extra[@]}" --junitxml="$JUNIT/$name.xml" "${files[@]}"
  "$PY" "$HELP" junit "$JUNIT/$name.xml" "$LOGS/$name.log" "$RC" $((SECONDS - t0)) "$b" > "$WORK/junit_$name.txt" 2>&1
  cat "$WORK/junit_$name.txt" >> "$LOGS/$name.log"
  local status; status=$(tag "$name" STATUS)
  record "$name" "${status:-FAIL}" $((SECONDS - t0)) "$(tag "$name" DETAIL)"
}

# ------------------------------------------------------------------------------------------- benchmarks
part_step() {
  local t0=$SECONDS b
  # shellcheck disable=SC2206
  local -a args=($STEP_ARGS)
  if [ ! -f benchmarks/step_gpu.py ]; then record step_gpu SKIP 0 "no benchmarks/step_gpu.py"; return; fi
  if [ "$MODE" != gpu ]; then
    b=$(box 30)
    boxed step_gpu "$b" "$PY" benchmarks/step_gpu.py "${args[@]}" --out "$WORK/step_gpu_dry.csv" --list
    if [ "$RC" = 0 ]; then
      record step_gpu SKIP $((SECONDS - t0)) "$NO_GPU_REASON; flags ok: $(grep -c 'methods:' "$LOGS/step_gpu.log") cases planned (--list)"
    else
      record step_gpu FAIL $((SECONDS - t0)) "step_gpu.py rejects the planned flags ($(rc_word "$RC" "$b")): $(last_line step_gpu)"
    fi
    return
  fi
  b=$(box "$T_STEP")
  if [ "$b" = 0 ]; then record step_gpu SKIP 0 "the total time budget ($T_TOTAL s) is spent"; return; fi
  boxed step_gpu "$b" "$PY" benchmarks/step_gpu.py "${args[@]}" --out "$OUT/step_gpu.csv"
  if [ "$RC" = 0 ]; then
    "$PY" "$HELP" step-figure "$OUT/step_gpu.csv" >> "$LOGS/step_gpu.log" 2>&1
    local status; status=$(tag step_gpu STATUS)
    record step_gpu "${status:-PASS}" $((SECONDS - t0)) "$(tag step_gpu DETAIL)"
  else
    record step_gpu FAIL $((SECONDS - t0)) "$(rc_word "$RC" "$b"): $(last_line step_gpu)"
  fi
}

part_bench() {
  local t0=$SECONDS b
  # shellcheck disable=SC2206
  local -a args=($BENCH_ARGS)
  if [ "$MODE" != gpu ]; then
    b=$(box 30)
    boxed bench "$b" "$PY" -m fastguide bench --help
    if [ "$RC" != 0 ]; then
      record bench FAIL $((SECONDS - t0)) "fastguide bench --help: $(rc_word "$RC" "$b"): $(last_line bench)"
      return
    fi
    local flag missing=()
    for flag in "${args[@]}" --device --out; do
      case "$flag" in --*) grep -q -- "${flag%%=*}" "$LOGS/bench.log" || missing+=("$flag") ;; esac
    done
    if [ ${#missing[@]} -gt 0 ]; then
      record bench FAIL $((SECONDS - t0)) "fastguide bench lacks the planned flags: ${missing[*]}"
    else
      record bench SKIP $((SECONDS - t0)) "$NO_GPU_REASON; flags ok: ${args[*]} --device cuda --out DIR"
    fi
    return
  fi
  b=$(box "$T_BENCH")
  if [ "$b" = 0 ]; then record bench SKIP 0 "the total time budget ($T_TOTAL s) is spent"; return; fi
  boxed bench "$b" "$PY" -m fastguide bench "${args[@]}" --device cuda --out "$WORK/bench"
  local f
  for f in bench_cuda.csv bench_cuda.png; do [ -f "$WORK/bench/$f" ] && cp "$WORK/bench/$f" "$OUT/$f"; done
  if [ "$RC" = 0 ]; then
    "$PY" "$HELP" bench-figure "$WORK/bench/bench_cuda.csv" >> "$LOGS/bench.log" 2>&1
    local status; status=$(tag bench STATUS)
    record bench "${status:-PASS}" $((SECONDS - t0)) "$(tag bench DETAIL)"
  else
    record bench FAIL $((SECONDS - t0)) "$(rc_word "$RC" "$b"): $(last_line bench)"
  fi
}

# ------------------------------------------------------------------------------------------------ the run
echo "[gpu_check] scratch $WORK, OUT $OUT, budget ${T_TOTAL}s, $([ "$DRY" = 1 ] && echo dry run)"
CUDA=0
part_env
if [ "$DRY" = 1 ]; then
  MODE=dry
  if [ "$CUDA" = 1 ]; then NO_GPU_REASON="dry run: CUDA parts not run"; else NO_GPU_REASON="no CUDA device (dry run)"; fi
elif [ "$CUDA" = 1 ] || [ "${GPU_CHECK_FORCE_GPU:-0}" = 1 ]; then
  MODE=gpu; NO_GPU_REASON=""
else
  MODE=cpu; NO_GPU_REASON="no CUDA device: torch.cuda.is_available() is False"
fi
part_wheels
part_build
pytest_part backends "$T_BACKENDS" tests/test_backends_parity.py tests/test_backends_triton_kernels.py
pytest_part native "$T_NATIVE" tests/test_native_cudagraph.py tests/test_native_loops_cuda.py
pytest_part dropin "$T_DROPIN" tests/test_dropin_diffusers.py tests/test_dropin_guidance.py tests/test_dropin_compile.py
shopt -s nullglob
SERVE_FILES=(tests/test_serve*.py)
shopt -u nullglob
if [ ${#SERVE_FILES[@]} -gt 0 ]; then
  pytest_part serve "$T_SERVE" "${SERVE_FILES[@]}"
else
  note serve "no tests/test_serve*.py"
  record serve SKIP 0 "no tests/test_serve*.py in this checkout"
fi
part_step
part_bench

# ----------------------------------------------------------------------------------------------- outputs
"$PY" "$HELP" pytest-summary "$WORK" "$OUT/pytest_summary.txt" backends native dropin serve \
  >> "$LOGS/summary.log" 2>&1 || echo "pytest summary failed: see logs.txt" >> "$WORK/warnings.txt"
{
  echo "fastguide GPU check logs: the last $LOG_TAIL lines of each part's log (full logs: $LOGS)"
  for part in env wheels build backends native dropin serve step_gpu bench summary; do
    f="$LOGS/$part.log"
    [ -f "$f" ] || continue
    echo
    echo "===== $part ($(wc -l < "$f") lines) ====="
    tail -n "$LOG_TAIL" "$f"
  done
} > "$OUT/logs.txt"
"$PY" "$HELP" enforce "$OUT" $((MAX_OUT_FILES - 1)) "$WORK/warnings.txt"
echo
"$PY" "$HELP" summary "$WORK" "$OUT" "$MODE" $((SECONDS - START)) "$T_TOTAL" "$SITE"
exit $?
