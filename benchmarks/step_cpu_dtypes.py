"""The C++ fused step's time per storage dtype: fp32, fp16 and bf16 side by side, as ratios to fp32.

A CFG + DDIM step (``fastguide.guided_step(..., out=buf, backend="cpp")``, step 25 of 50) at each size, and the
kernel alone (``fastguide._C.cpu_guided_step`` on an argument block built once), the three dtypes interleaved
in blocks of 10 calls (so machine noise hits them alike), medians. fp16 and bf16 move half of fp32's bytes; the
kernels compute in fp32 and convert each tile on load and store (fp16 with F16C and bf16 stores with AVX2
where the CPU has them: ``fastguide._C.cpu_avx2_conversions()``; ``FASTGUIDE_PORTABLE_CONVERSIONS=1`` times
the portable conversions instead). Before timing, each half-precision result is checked against the torch
reference at that dtype's tolerance. Rows are appended to benchmarks/results/step_cpu_dtypes.csv (``--csv``
elsewhere, ``--no-csv`` nowhere) with the CPU model, versions and date.

    python benchmarks/step_cpu_dtypes.py [--sizes 2x4x64x64,2x16x128x128] [--repeats 400] [--threads T]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

import fastguide
from fastguide.backends import abi
from fastguide.core.args import StepArgs
from fastguide.tools.bench import cpu_model, version, write_csv

RESULTS = Path(__file__).resolve().parent / "results" / "step_cpu_dtypes.csv"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 1.5e-1}   # of results reaching ~10
BLOCK = 10


def _calls(shape, table) -> dict:
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(shape, generator=gen)
    model_output32 = torch.randn((2 * shape[0],) + tuple(shape[1:]), generator=gen)
    calls = {}
    for name, dtype in DTYPES.items():
        x, model_output = x32.to(dtype), model_output32.to(dtype)
        out = torch.empty_like(x)
        expected = fastguide.guided_step(x, model_output, table, 25, scale=7.5, backend="torch")
        fastguide.guided_step(x, model_output, table, 25, scale=7.5, out=out, backend="cpp")
        torch.testing.assert_close(out.float(), expected.float(), rtol=TOLERANCE[name], atol=TOLERANCE[name])
        calls[name] = (lambda x=x, m=model_output, o=out:
                       fastguide.guided_step(x, m, table, 25, scale=7.5, out=o, backend="cpp"))
        # The kernel alone: its argument block built once (the StepArgs kept alive with it).
        step = StepArgs(x, model_output, table, 25, scale=torch.full((shape[0],), 7.5), out=torch.empty_like(x))
        launch = abi.guided_step_args(step)
        calls[name + " kernel"] = (lambda launch=launch, step=step: abi.extension().cpu_guided_step(launch.args))
    return calls


def run(sizes, repeats: int) -> list:
    table = fastguide.samplers.build("ddim", fastguide.Schedule.ddpm(), steps=50).table
    rows = []
    for shape in sizes:
        calls = _calls(shape, table)
        times = {name: [] for name in calls}
        for r in range(max(1, repeats // BLOCK) + 1):
            for name, call in calls.items():
                for _ in range(BLOCK):
                    start = time.perf_counter()
                    call()
                    if r:  # round 0 warms caches and the thread pool
                        times[name].append(time.perf_counter() - start)
        for name, ts in times.items():
            dtype, _, what = name.partition(" ")
            fp32 = statistics.median(times["float32" + (" kernel" if what else "")])
            rows.append(dict(shape="x".join(map(str, shape)), dtype=dtype, timed=what or "guided_step",
                             median_us=statistics.median(ts) * 1e6, vs_fp32=statistics.median(ts) / fp32,
                             repeats=len(ts), avx2_conversions=fastguide._C.cpu_avx2_conversions()))
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2x4x64x64,2x16x128x128", help="comma-separated BxCxHxW shapes")
    parser.add_argument("--repeats", type=int, default=400, help="timed calls per dtype and size")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--csv", type=Path, default=RESULTS, help="where the rows are appended")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    try:
        args.sizes = [tuple(int(d) for d in s.split("x")) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be comma-separated BxCxHxW shapes, got {args.sizes!r}")
    if any(len(s) < 2 or min(s) < 1 for s in args.sizes):
        parser.error(f"--sizes: every shape needs a batch and at least one more dimension >= 1, got {args.sizes}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    why = fastguide.backends(reasons=True)["cpp"]
    if why:
        raise SystemExit(f"the cpp backend is not available: {why}")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=cpu_model() or "cpu",
                cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                fastguide=fastguide.__version__, numpy=version("numpy"))
    rows = run(args.sizes, args.repeats)
    print(f"{meta['device']}, {meta['torch_threads']} threads, AVX2/F16C conversions: {rows[0]['avx2_conversions']}")
    for row in rows:
        print(f"{row['shape']:>16} {row['dtype']:>9} {row['timed']:>12} {row['median_us']:9.1f} us  "
              f"{row['vs_fp32']:.2f}x fp32's time")
    if not args.no_csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, args.csv, meta, float_format=".4g")
        print(f"appended to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
