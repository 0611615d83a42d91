"""CPU benchmark of ``fastguide generate``: samples/s against world size and batch size, with scaling efficiency.

For every (world size, batch) pair it generates the same seed set into a fresh directory — one process with
``python -m fastguide generate``, more with ``torchrun --standalone`` (gloo over loopback) — one intra-op
thread per process, and reads the sampling-phase throughput that the run records in its manifest (global
samples / wall time from the first batch to the last rank finishing; process start-up and model loading
excluded, and reported separately as the command's wall time). Pairs are run in rounds, interleaved, and the
median of the rounds is kept. Every set is checked to be bitwise identical to the first one of its batch size
("same set": the world size never changes the samples).

  speedup         samples/s of W processes over 1 process at the same batch
  efficiency      speedup / W (1.0 = perfect scaling)
  samples/CPU-s   samples per CPU second summed over the processes (sampling phase): what distribution
                  costs in work, whatever else runs on the machine
  CPU eff.        samples/CPU-s of W processes over 1 process (1.0 = no distribution overhead)

Results are appended to benchmarks/results/generate_cpu.csv with the CPU model, core count, versions and
date; a table is printed.

    python benchmarks/generate.py [--worlds 1,2] [--batches 8,32] [--seeds 0-767] [--steps 25] [--rounds 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fastguide
from fastguide.generation import parse_seeds
from fastguide.tools.bench import cpu_model, write_csv

RESULTS = Path(__file__).resolve().parent / "results" / "generate_cpu.csv"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="1,2", help="process counts (default 1,2)")
    p.add_argument("--batches", default="8,32", help="batch sizes (default 8,32)")
    p.add_argument("--seeds", default="0-767", help="seed set of every run (default 0-767)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25, the digits default)")
    p.add_argument("--method", default="none", help="digits guidance method (default none)")
    p.add_argument("--shard-size", type=int, default=32, help="seeds per shard (default 32)")
    p.add_argument("--backend", default="auto", help="fastguide.sample backend (default auto)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the median is kept (default 1)")
    p.add_argument("--out", default=str(RESULTS), help=f"CSV to append to (default {RESULTS})")
    return p.parse_args(argv)


def command(world: int, batch: int, out: str, args) -> list:
    gen = ["generate", "--model", "digits", "--method", args.method, "--seeds", args.seeds, "--steps",
           str(args.steps), "--batch", str(batch), "--shard-size", str(args.shard_size), "--backend", args.backend,
           "--threads", "1", "--quiet", "--out", out]
    if world == 1:
        return [sys.executable, "-m", "fastguide", *gen]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
            "-m", "fastguide", *gen]


def run_once(world: int, batch: int, args, tmp: str) -> dict:
    out = os.path.join(tmp, f"w{world}_b{batch}_{time.monotonic_ns()}")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    start = time.perf_counter()
    proc = subprocess.run(command(world, batch, out, args), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"world {world} batch {batch} failed:\n{proc.stderr[-3000:]}")
    record = json.loads(Path(out, "manifest.json").read_text())["runs"][-1]
    with np.load(os.path.join(out, "samples.npz")) as z:
        images = z["arr_0"].copy()
    return {"samples_per_s": record["samples_per_s"], "sampling_s": record["seconds"], "wall_s": wall,
            "samples_per_cpu_s": record["samples_generated"] / max(record["cpu_seconds"], 1e-9), "images": images}


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    batch_sizes = [int(b) for b in args.batches.split(",")]
    n = len(parse_seeds(args.seeds))
    runs = {(w, b): [] for b in batch_sizes for w in worlds}
    load_before = _loadavg()
    first = {}  # batch -> the images of its first run: every other world size must match them bitwise
    with tempfile.TemporaryDirectory(prefix="fastguide-bench-generate-") as tmp:
        for r in range(args.rounds):
            for (w, b) in runs:
                res = run_once(w, b, args, tmp)
                images = res.pop("images")
                res["identical"] = bool(np.array_equal(images, first.setdefault(b, images)))
                runs[(w, b)].append(res)
                print(f"round {r + 1}: {w} process{'es' if w > 1 else ''}, batch {b}: {res['samples_per_s']:.1f} "
                      f"samples/s ({res['wall_s']:.1f} s wall)", file=sys.stderr, flush=True)
    rows = []
    for (w, b), results in runs.items():
        rate = statistics.median(x["samples_per_s"] for x in results)
        base = statistics.median(x["samples_per_s"] for x in runs[(1, b)]) if (1, b) in runs else float("nan")
        same = [x["identical"] for x in results]
        per_cpu = statistics.median(x["samples_per_cpu_s"] for x in results)
        base_cpu = statistics.median(x["samples_per_cpu_s"] for x in runs[(1, b)]) if (1, b) in runs else float("nan")
        rows.append({"world_size": w, "batch": b, "samples": n, "steps": args.steps, "method": args.method,
                     "samples_per_s": rate, "speedup": rate / base, "efficiency": rate / base / w,
                     "samples_per_cpu_s": per_cpu, "cpu_efficiency": per_cpu / base_cpu,
                     "sampling_s": statistics.median(x["sampling_s"] for x in results),
                     "wall_s": statistics.median(x["wall_s"] for x in results),
                     "same_set": "yes" if all(same) else "NO"})
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": cpu_model() or "cpu",
            "cores": os.cpu_count(), "torch": torch.__version__, "fastguide": fastguide.__version__,
            "python": sys.version.split()[0], "backend": args.backend, "threads_per_process": 1,
            "rounds": args.rounds, "loadavg_before": load_before}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out, meta)
    print(f"fastguide generate on {meta['device']} ({meta['cores']} cores), torch {meta['torch']}: digits "
          f"{args.method}, {n} seeds, {args.steps} steps, one thread per process, median of {args.rounds} "
          f"round(s)")
    print(f"load average before the runs: {load_before} (other work on the machine takes cores from the runs)")
    print(f"{'processes':>9s} {'batch':>5s} {'samples/s':>9s} {'speedup':>7s} {'efficiency':>10s} "
          f"{'samples/CPU-s':>13s} {'CPU eff.':>8s} {'wall s':>6s} {'same set':>8s}")
    for row in rows:
        print(f"{row['world_size']:9d} {row['batch']:5d} {row['samples_per_s']:9.1f} {row['speedup']:6.2f}x "
              f"{row['efficiency']:10.2f} {row['samples_per_cpu_s']:13.1f} {row['cpu_efficiency']:8.2f} "
              f"{row['wall_s']:6.1f} {row['same_set']:>8s}")
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
