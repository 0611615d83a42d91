"""benchmarks/gpu_check.sh --dry-run: the GPU verification run rehearsed on the CPU.

One run of the script (about 20 s on two cores) in a scratch copy of the parts of the checkout it reads, with
OUT, TMPDIR and HOME in the test's own tmp dir and a wheels dir holding one dummy wheel built here (no
network): the wheel-install part must install it into the script's temporary site dir, the GPU parts must be
skipped with their reason, OUT must keep to the device tool's limits (8 flat files; OUT is pre-seeded with
extra files so the limit is enforced), and nothing may be written outside OUT and TMPDIR.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FETCH = ROOT / "benchmarks" / "fetch_gpu_wheels.sh"
PARTS = ("env", "wheels", "build", "backends", "native", "dropin", "serve", "step_gpu", "bench")
GPU_PARTS = ("backends", "native", "dropin", "serve", "step_gpu", "bench")
DUMMY = "gpucheckdummy"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_dummy_wheel(dest: Path) -> Path:
    """A minimal pure-Python wheel (what `pip wheel` would make of a one-module package)."""
    version = "0.1"
    info = f"{DUMMY}-{version}.dist-info"
    files = {
        f"{DUMMY}/__init__.py": b"VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {DUMMY}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test_tools_gpu_check\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
        f"{info}/top_level.txt": f"{DUMMY}\n".encode(),
    }
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"{DUMMY}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    (dest / "requirements.txt").write_text(f"{DUMMY}\n")
    return wheel


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def scratch_checkout(dest: Path) -> Path:
    """What the dry run reads of the checkout: the script, step_gpu.py, and the test files it looks for
    (empty stand-ins: the dry run only checks that they exist)."""
    (dest / "benchmarks").mkdir(parents=True)
    (dest / "tests").mkdir()
    shutil.copy2(SCRIPT, dest / "benchmarks" / SCRIPT.name)
    shutil.copy2(ROOT / "benchmarks" / "step_gpu.py", dest / "benchmarks" / "step_gpu.py")
    for test in ROOT.glob("tests/test_*.py"):
        (dest / "tests" / test.name).write_text("")
    return dest


def parse_summary(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)\s+(PASS|FAIL|SKIP)\s+(\d+)\s+(.*)$", line)
        if m and m.group(1) in PARTS:
            rows[m.group(1)] = (m.group(2), m.group(4).strip())
    return rows


def test_dry_run(tmp_path):
    repo = scratch_checkout(tmp_path / "repo")
    wheels = tmp_path / "wheels"
    make_dummy_wheel(wheels)
    out, tmp, home = tmp_path / "out", tmp_path / "tmp", tmp_path / "home"
    for d in (out, tmp, home):
        d.mkdir()
    for i in range(9):                     # earlier files: 9 + the run's own exceed the 8-file limit
        (out / f"extra_{i}.txt").write_text(f"seeded file {i}\n")
    before_repo, before_wheels = snapshot(repo), snapshot(wheels)

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(OUT=str(out), TMPDIR=str(tmp), HOME=str(home), PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)])),
               # pip's user agent runs `rustc --version`; a rustup proxy then writes $RUSTUP_HOME (~/.rustup)
               RUSTUP_HOME=str(tmp / "rustup-home"))
    try:
        import fastguide._C  # noqa: F401  (importable: the script skips the build by itself)
    except ImportError:
        env["GPU_CHECK_SKIP_BUILD"] = "1"  # never build inside a test
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), "--dry-run", "--wheels", str(wheels)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    log = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, log

    summary = (out / "summary.txt").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip()), "the summary table is printed last"
    rows = parse_summary(summary)
    assert set(rows) == set(PARTS), summary
    assert "mode=dry" in summary
    for part in GPU_PARTS:
        status, reason = rows[part]
        assert status == "SKIP", (part, summary)
        if part == "serve" and "test_serve" in reason:
            continue                      # no tests/test_serve*.py in this checkout
        assert "no CUDA" in reason or "dry run" in reason, (part, summary)
    assert rows["step_gpu"][1].count("flags ok"), summary      # step_gpu.py --list took the planned flags
    assert rows["bench"][1].count("flags ok"), summary
    assert rows["env"][0] == "PASS", summary
    assert rows["build"][0] == "SKIP" and rows["build"][1], summary
    assert rows["wheels"][0] == "PASS" and DUMMY in rows["wheels"][1], summary

    # The dummy wheel went into the script's site dir, inside TMPDIR, and imports from there.
    site = Path(re.search(r"^site dir \(first on PYTHONPATH\): (\S+)$", summary, re.M).group(1))
    assert tmp in site.parents, site
    assert (site / DUMMY / "__init__.py").is_file()
    check = subprocess.run([sys.executable, "-c", f"import {DUMMY}; print({DUMMY}.VALUE, {DUMMY}.__file__)"],
                           env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True, cwd=tmp)
    assert check.returncode == 0 and check.stdout.split()[0] == "42", check.stderr
    assert check.stdout.split()[1].startswith(str(site))

    # OUT: at most 8 plain files, flat; the seeded extras merged into logs.txt with a warning.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, sorted(p.name for p in files)
    assert all(p.parent == out and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    assert {"summary.txt", "logs.txt", "pytest_summary.txt"} <= {p.name for p in files}
    assert "8-file limit" in summary
    logs = (out / "logs.txt").read_text()
    assert "seeded file 8" in logs and "===== wheels" in logs and "===== bench" in logs

    # Nothing written outside OUT and TMPDIR: the checkout, the wheels dir and HOME are untouched.
    assert snapshot(repo) == before_repo
    assert snapshot(wheels) == before_wheels
    assert list(home.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "out", "repo", "tmp", "wheels"]


def test_scripts_parse_and_lint():
    for script in (SCRIPT, FETCH):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--dry-run" in r.stdout and "GPU_CHECK_TOTAL_S" in r.stdout
    r = subprocess.run(["bash", str(SCRIPT), "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(SCRIPT), str(FETCH)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
