"""``fastguide bench``: end-to-end guided sampling throughput on the device at hand, side by side.

Every figure is measured in one run, contenders interleaved within each repeat (so machine noise hits them
alike), and reported as the median over repeats:

* **CFG** (DDIM, eta = 0, guidance scale 4, null label): a nearly free network (one multiply: pure sampler
  overhead) and a small class-conditional diffusers ``UNet2DModel`` (random init, 3x32x32), at batch 1, 8
  and 64. Contenders: ``diffusers`` (the real ``DDIMScheduler`` loop: ``scale_model_input``, chunk, CFG
  combine, ``scheduler.step``), ``fastguide-dropin`` (the same loop with ``fastguide.step``),
  ``fastguide-eager``, ``fastguide-inductor`` and, on CUDA, ``fastguide-inductor-ro``
  (``mode="reduce-overhead"``) and ``fastguide-graph`` (``fastguide.sample(compile=...)``), and a
  k-diffusion sampler with a CFG wrapper when ``k_diffusion`` is installed.
* **Classifier guidance** (DDPM, 3x32x32, a small conv classifier): a guided-diffusion-style loop with a
  ``cond_fn`` (``p_sample`` with ``condition_mean``; for Ma et al. the classifier on x0^ with the
  temperature objective and the sine-schedule variance) against ``fastguide.sample`` with
  ``ClassifierGuidance`` (ADM: ``input="xt"``; Ma et al.: ``input="x0"``).

Columns: samples/s; ms per step (loop time / steps); ms per step of the networks alone (the same calls
timed by themselves); overhead per step (the difference: the sampler's cost around the networks, host and
device); speedup over the section's baseline (``diffusers`` or ``gd-cond_fn``) in ms per step; sampler ops
per step (torch ops dispatched plus fastguide kernels called directly, counted with
``fastguide.tools.opcount.OpCounter`` over one loop, minus the networks' own ops; eager contenders only: compiled
code launches its kernels without the dispatcher).

A table goes to stdout, rows are appended to ``<out>/bench_<device>.csv`` (device name, torch / triton /
diffusers versions, date, threads) and a bar chart of the overhead per step is written to
``<out>/bench_<device>.png`` (matplotlib when importable, else drawn with PIL).

    fastguide bench [--quick] [--device cpu|cuda] [--out benchmarks/results] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

import fastguide
from fastguide.tools.progress import QUIET_HELP, Progress, progress_enabled

from .report import (WITHIN_NOISE, cpu_model, device_name, format_overhead, plot, print_table,  # noqa: F401
                     version, within_noise, write_csv)
from .runner import Case, build_cases, measure  # noqa: F401

DESCRIPTION = """\
End-to-end guided sampling throughput on the device at hand, side by side:
diffusers' DDIM loop and a guided-diffusion cond_fn loop against fastguide (its
diffusers drop-in step, eager, torch.compile and, on CUDA, CUDA-graph loops),
for CFG and classifier guidance. k-diffusion joins only where it is installed
(it is no dependency: its own dependencies can replace the installed torch).

A table goes to stdout (an overhead at or below zero reads "within noise"),
rows are appended to OUT/bench_<device>.csv and a bar chart of the overhead per
step is written to OUT/bench_<device>.png. Progress goes to stderr when it is a
terminal."""


def build_parser() -> argparse.ArgumentParser:
    """The ``fastguide bench`` parser."""
    parser = argparse.ArgumentParser(prog="fastguide bench", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized run: fewer configurations and steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to measure on, e.g. cpu or cuda (default: cuda when torch sees a GPU, "
                             "else cpu)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help="folder for bench_<device>.csv (appended) and bench_<device>.png "
                             "(default: benchmarks/results)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per contender, reported as the median (default 7, --quick 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on CPU: 1; tiny loops only lose to thread wake-ups)")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``fastguide bench``; returns the exit status.

    >>> from fastguide.tools import bench
    >>> bench.main(["--quick", "--out", "/tmp/bench"])     # table on stdout, CSV and PNG in /tmp/bench
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    repeats = args.repeats or (5 if args.quick else 7)
    previous_threads = torch.get_num_threads()
    threads = args.threads or (1 if device.type == "cpu" else previous_threads)
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        with Progress(None, "fastguide bench", enabled=progress_enabled(args.quiet)) as progress:
            progress.stage("building the networks and contenders")
            cases = build_cases(device, args.quick)
            with torch.no_grad():
                rows = measure(cases, device, repeats, sample_s=0.03 if args.quick else 0.1, progress=progress)
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=device_name(device),
                torch=torch.__version__, triton=version("triton"), diffusers=version("diffusers"),
                fastguide=fastguide.__version__, threads=threads, quick=int(args.quick), repeats=repeats)
    print(f"fastguide bench on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, diffusers "
          f"{meta['diffusers']}, {threads} thread(s), median of {repeats}, {elapsed:.0f} s)")
    print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.type
    write_csv(rows, out / f"bench_{tag}.csv", meta)
    library = plot(rows, out / f"bench_{tag}.png", f"fastguide bench, {meta['device']}, {meta['date']}")
    print(f"wrote {out / f'bench_{tag}.csv'} and {out / f'bench_{tag}.png'} ({library})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
