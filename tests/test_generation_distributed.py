"""`torchrun -m fastguide generate`: 1, 2 and 3 processes write the same set, and a run killed with SIGKILL
part-way resumes (with another world size) to exactly the uninterrupted set.

Every job runs on the CPU with gloo over loopback, one thread per process, the digits model at 5 steps and
48 seeds in shards of 8 (two batches of 4 each, so finished batches of unfinished shards are kept as
partial files). The reference set is made in this process through the API (one process).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastguide.generation import GenerateConfig, generate
from fastguide.generation.models import digits

ROOT = Path(__file__).resolve().parents[1]
SEEDS, STEPS, SHARD, BATCH = "0-47", 5, 8, 4
NUM_SHARDS = 6
ARGS = ["--seeds", SEEDS, "--steps", str(STEPS), "--shard-size", str(SHARD), "--batch", str(BATCH),
        "--backend", "torch", "--threads", "1"]
SLOW_CALL_S = 0.12  # per model call in the kill test, so the kill lands mid-run on any machine


def slow_digits():
    """The digits model, slowed down: the same samples, ~0.6 s per batch (a model factory for --model)."""
    spec = digits()
    unet = spec.model

    def model(x, t, y=None):
        time.sleep(SLOW_CALL_S)
        return unet(x, t, y)
    spec.model = model
    return spec


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    return env


def torchrun(nproc: int, *args: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "fastguide", "generate", *args]


def run(cmd, timeout=120):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load_set(out: Path):
    with np.load(out / "samples.npz") as z:
        result = {k: z[k] for k in z.files}
    for i in range(NUM_SHARDS):
        with np.load(out / "shards" / f"shard_{i:05d}.npz") as z:
            result.update({f"{k}{i}": z[k] for k in z.files})
    return result


def assert_same_set(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("reference") / "run"
    generate(GenerateConfig(out=str(out), seeds=SEEDS, steps=STEPS, shard_size=SHARD, batch=BATCH, backend="torch",
                            quiet=True))
    return load_set(out)


def test_reference_layout(reference):
    assert reference["arr_0"].shape == (48, 8, 8, 1) and reference["arr_0"].dtype == np.uint8
    assert reference["arr_1"].dtype == np.int64 and set(reference["arr_1"]) <= set(range(10))
    assert np.array_equal(reference["seeds"], np.arange(48))
    assert reference["samples0"].shape == (8, 1, 8, 8) and reference["samples0"].dtype == np.float32


@pytest.mark.parametrize("nproc", [2, 3])
def test_world_size_does_not_change_the_set(tmp_path, reference, nproc):
    out = tmp_path / "run"
    proc = run(torchrun(nproc, *ARGS, "--out", str(out)))
    assert f"on {nproc} processes" in proc.stderr
    assert_same_set(load_set(out), reference)  # bitwise: batches never depend on the world size
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["runs"][-1]["world_size"] == nproc
    assert len(manifest["shards"]) == NUM_SHARDS and all(len(s["sha256"]) == 64 for s in manifest["shards"])
    assert not list((out / "shards" / "partial").iterdir())  # finished shards leave no partial files


def _done_shards(out: Path):
    return sorted(p.name for p in (out / "shards").glob("shard_*.json")) if (out / "shards").exists() else []


def test_kill9_part_way_then_resume_gives_the_uninterrupted_set(tmp_path, reference):
    out = tmp_path / "run"
    args = [*ARGS, "--model", "test_generation_distributed:slow_digits", "--out", str(out)]
    proc = subprocess.Popen(torchrun(2, *args), env=_env(), cwd=str(ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while len(_done_shards(out)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and both workers, at once
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    done = _done_shards(out)
    assert 2 <= len(done) < NUM_SHARDS, (done, err[-2000:])
    assert not (out / "samples.npz").exists()

    resumed = run(torchrun(3, *args))  # another world size: shards, not ranks, define the set
    assert f"{len(done)} done" in resumed.stderr, resumed.stderr
    got = load_set(out)
    assert_same_set(got, reference)
    assert len(np.unique(got["seeds"])) == 48  # nothing lost, nothing twice
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_rerun_of_a_finished_run_generates_nothing(tmp_path, reference):
    out = tmp_path / "run"
    run([sys.executable, "-m", "fastguide", "generate", *ARGS, "--out", str(out), "--quiet"])
    shutil.rmtree(out / "shards" / "partial")
    args = [a if a != str(BATCH) else "3" for a in ARGS]  # --batch may change between a run and its rerun
    assert args != ARGS
    proc = run([sys.executable, "-m", "fastguide", "generate", *args, "--out", str(out)])
    assert "6 done, 0 to do" in proc.stderr and "(0 generated, 48 reused)" in proc.stderr
    assert_same_set(load_set(out), reference)
