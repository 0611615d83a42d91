"""CPU benchmark of the fused CFG + DDIM step, every figure a ratio measured in the same run.

For a large tensor (2^24 elements per CFG half) and the Stable Diffusion latent (2x4x64x64) it times, side by
side and interleaved (so machine noise hits all methods alike):

  copy       torch ``dst.copy_(src)``: the bandwidth floor (bytes read + written per second)
  fused      ``fastguide.guided_step(..., out=buf, backend="cpp")``: CFG combine + DDIM in one kernel
  compiled   ``torch.compile`` of the same math writing into a buffer (inductor, compile time excluded)
  diffusers  the eager diffusers path: chunk, CFG combine, ``DDIMScheduler.step`` (eta = 0)

A step reads x, uncond and cond and writes out once, so its bandwidth is 4 * N * itemsize / time; copy's is
2 * N * itemsize / time. The 10th percentile is recorded next to the median: on a shared machine a method
whose OpenMP team was descheduled can lose milliseconds on a call. Results are appended to benchmarks/results/step_cpu.csv with the CPU model, versions
and date; a table of ratios is printed.

Flow matching (``--flow``, or ``--flow-only`` for just these rows): CFG + ``FlowMatchEulerDiscreteScheduler``
(SD3's shift 3, 28 steps, the middle step) at SD3's latent (2x16x128x128) and a Flux-style token shape
(2x4096x64), interleaved the same way:

  copy       the bandwidth floor, as above
  fg.step    the drop-in ``fastguide.step(noise_pred, t, x, scheduler=s, guidance_scale=w, out=buf)``
  fused_op   the bare fused kernel on the same row (``fastguide.guided_step``): the drop-in's Python cost is the
             difference
  diffusers  chunk, CFG combine, ``scheduler.step(..., return_dict=False)[0]`` (what the SD3 / Flux pipelines do)

with the ops each dispatches per step (``fastguide.tools.opcount.OpCounter``: torch ops plus fastguide's direct
kernel calls). Both steppers have the scheduler's step index reset to the same step before every call.
These rows go to benchmarks/results/step_cpu_flow.csv (``--csv`` elsewhere, ``--no-csv`` nowhere).

    python benchmarks/step_cpu.py [--repeats 15] [--small-repeats 300] [--flow | --flow-only] [--flow-repeats 400]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import fastguide
from fastguide.tools.bench import cpu_model, version, write_csv
from fastguide.core.layout import NUM_COLS, Col

RESULTS = Path(__file__).resolve().parent / "results" / "step_cpu.csv"
FLOW_RESULTS = Path(__file__).resolve().parent / "results" / "step_cpu_flow.csv"
GUIDANCE = 7.5
STEPS = 50
FLOW_STEPS, FLOW_SHIFT, FLOW_GUIDANCE = 28, 3.0, 7.0          # SD3's defaults
FLOW_SHAPES = [("SD3 latent", (2, 16, 128, 128)), ("Flux tokens", (2, 4096, 64))]


def stable_diffusion_ddim():
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(STEPS)
    return scheduler


def ddim_row(scheduler, t: int):
    """The DDIM (eta = 0, epsilon prediction) coefficient row of timestep t, by hand from alphas_cumprod:
    x0 = (x - s eps) / a,  out = a_prev x0 + sqrt(1 - a_prev^2) eps."""
    abar = scheduler.alphas_cumprod.double()
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar_prev = abar[prev] if prev >= 0 else torch.tensor(float(scheduler.final_alpha_cumprod))
    a, s, a_prev = abar[t].sqrt(), (1 - abar[t]).sqrt(), abar_prev.sqrt()
    row = torch.zeros(1, NUM_COLS, dtype=torch.float64)
    row[0, Col.P_X], row[0, Col.P_M] = 1 / a, -s / a
    row[0, Col.Q_M] = 1.0
    row[0, Col.B], row[0, Col.C] = a_prev, (1 - a_prev ** 2).sqrt()
    return row.float(), (float(a), float(s), float(a_prev), float((1 - a_prev ** 2).sqrt()))


def ddim_math(x, noise_pred, w: float, a: float, s: float, a_prev: float, c_prev: float, out):
    uncond, cond = noise_pred.chunk(2)
    eps = uncond + w * (cond - uncond)
    x0 = (x - s * eps) / a
    out.copy_(a_prev * x0 + c_prev * eps)


def measure(fns: dict, repeats: int, block: int, faults: dict = None) -> dict:
    """(median, 10th percentile) seconds per call of each function. Methods take turns in blocks of ``block`` calls (after a
    warm-up block each), so slow drifts of a shared machine hit all of them alike, while a tiny call is
    still timed after calls of its own kind (not right after another method's threads or allocations).
    ``faults``, if given, receives each method's minor page faults per timed call (read around each block)."""
    import resource
    times = {name: [] for name in fns}
    flt = {name: 0 for name in fns}
    rounds = max(1, repeats // block)
    for r in range(rounds + 1):
        for name, fn in fns.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(block):
                start = time.perf_counter()
                fn()
                if r:  # round 0 warms caches, the allocator and thread pools
                    times[name].append(time.perf_counter() - start)
            if r:
                flt[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    if faults is not None:
        faults.update({name: flt[name] / len(times[name]) for name in fns})
    return {name: (statistics.median(ts), sorted(ts)[len(ts) // 10]) for name, ts in times.items()}


def run_size(label: str, shape, repeats: int, block: int, scheduler) -> list:
    gen = torch.Generator().manual_seed(0)
    batch = shape[0]
    x = torch.randn(shape, generator=gen)
    noise_pred = torch.randn((2 * batch,) + tuple(shape[1:]), generator=gen)
    t = int(scheduler.timesteps[STEPS // 2])
    table, (a, s, a_prev, c_prev) = ddim_row(scheduler, t)
    fused_out, compiled_out = torch.empty_like(x), torch.empty_like(x)
    copy_src, copy_dst = torch.randn(x.numel()), torch.empty(x.numel())
    compiled = torch.compile(ddim_math, fullgraph=True, dynamic=False)

    def diffusers_step():
        uncond, cond = noise_pred.chunk(2)
        return scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample

    fns = {
        "copy": lambda: copy_dst.copy_(copy_src),
        "fused": lambda: fastguide.guided_step(x, noise_pred, table, 0, scale=GUIDANCE, out=fused_out, backend="cpp"),
        "compiled": lambda: compiled(x, noise_pred, GUIDANCE, a, s, a_prev, c_prev, compiled_out),
        "diffusers": diffusers_step,
    }
    start = time.perf_counter()
    compiled(x, noise_pred, GUIDANCE, a, s, a_prev, c_prev, compiled_out)
    compile_s = time.perf_counter() - start
    # Same math, same answer: otherwise the timings compare different work.
    expected = diffusers_step()
    fns["fused"]()
    torch.testing.assert_close(fused_out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled_out, expected, rtol=1e-4, atol=1e-4)

    timings = measure(fns, repeats, block)
    nbytes = x.numel() * x.element_size()
    moved = {"copy": 2 * nbytes, "fused": 4 * nbytes, "compiled": 4 * nbytes, "diffusers": 4 * nbytes}
    copy_bw = moved["copy"] / timings["copy"][0]
    rows = []
    for name, (sec, p10) in timings.items():
        bw = moved[name] / sec
        rows.append(dict(size=label, shape="x".join(map(str, shape)), method=name, median_us=sec * 1e6,
                         p10_us=p10 * 1e6, gbytes_per_s=bw / 1e9, bw_vs_copy=bw / copy_bw,
                         fused_speedup=sec / timings["fused"][0], repeats=repeats,
                         compile_s=compile_s if name == "compiled" else ""))
    return rows


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    scheduler.set_timesteps(FLOW_STEPS)
    return scheduler


def ops_per_call(fn) -> int:
    """The ops one warm call dispatches under ``OpCounter`` (torch ops plus direct fastguide kernels)."""
    from fastguide.tools.opcount import OpCounter
    fn()
    with OpCounter() as counter:
        fn()
    return counter.count


def run_flow(label: str, shape, repeats: int, block: int) -> list:
    """CFG + FlowMatchEulerDiscreteScheduler at the schedule's middle step: drop-in, bare kernel, diffusers."""
    scheduler = flow_scheduler()
    index = FLOW_STEPS // 2
    t = scheduler.timesteps[index]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    noise_pred = torch.randn((2 * shape[0],) + tuple(shape[1:]), generator=gen)
    step_out, op_out = torch.empty_like(x), torch.empty_like(x)
    copy_src, copy_dst = torch.randn(x.numel()), torch.empty(x.numel())
    table = fastguide.dropin.plan_for(scheduler).table(x.device)

    def fg_step():
        scheduler._step_index = index
        return fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=FLOW_GUIDANCE, out=step_out)

    def diffusers_step():
        scheduler._step_index = index
        uncond, cond = noise_pred.chunk(2)
        return scheduler.step(uncond + FLOW_GUIDANCE * (cond - uncond), t, x, return_dict=False)[0]

    fns = {
        "copy": lambda: copy_dst.copy_(copy_src),
        "fg.step": fg_step,
        "fused_op": lambda: fastguide.guided_step(x, noise_pred, table, index, scale=FLOW_GUIDANCE, out=op_out,
                                                  backend="cpp"),
        "diffusers": diffusers_step,
    }
    expected = diffusers_step()   # same math, same answer: otherwise the timings compare different work
    fg_step(), fns["fused_op"]()
    torch.testing.assert_close(step_out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op_out, expected, rtol=1e-5, atol=1e-5)
    ops = {name: ops_per_call(fns[name]) for name in ("fg.step", "fused_op", "diffusers")}
    # Page faults tell the two modes of an allocating path apart: glibc serves a 2 MiB temporary from its heap
    # or from a fresh mmap (512 faults), by an adaptive threshold whose state differs from process to process
    # (MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ pin it).
    faults = {}
    timings = measure(fns, repeats, block, faults)
    nbytes = x.numel() * x.element_size()
    copy_bw = 2 * nbytes / timings["copy"][0]
    rows = []
    for name, (sec, p10) in timings.items():
        moved = (2 if name == "copy" else 4) * nbytes
        rows.append(dict(size=label, shape="x".join(map(str, shape)), method=name, median_us=sec * 1e6,
                         p10_us=p10 * 1e6, gbytes_per_s=moved / sec / 1e9, bw_vs_copy=moved / sec / copy_bw,
                         fused_speedup=sec / timings["fg.step"][0], ops_per_step=ops.get(name, ""),
                         faults_per_step=faults[name], repeats=repeats))
    return rows


def print_rows(rows: list, meta: dict, ops: bool = False) -> None:
    print(f"{meta['device']}, {meta['cores']} cores, torch {meta['torch']}, triton {meta['triton']}, "
          f"diffusers {meta['diffusers']}, {meta['date']}")
    head = f"{'size':<14} {'method':<10} {'median':>11} {'p10':>11} {'GB/s':>7} {'bw/copy':>8} {'time/fused':>11}"
    print(head + (f" {'ops/step':>9} {'faults/step':>12}" if ops else ""))
    for r in rows:
        line = (f"{r['size']:<14} {r['method']:<10} {r['median_us']:>9.1f}us {r['p10_us']:>9.1f}us "
                f"{r['gbytes_per_s']:>7.2f} {r['bw_vs_copy']:>8.3f} {r['fused_speedup']:>10.2f}x")
        if ops:
            line += f" {r['ops_per_step']:>9} {r['faults_per_step']:>12.0f}"
        print(line)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="repeats of the 2^24-element case")
    parser.add_argument("--small-repeats", type=int, default=300, help="repeats of the SD-latent case")
    parser.add_argument("--flow", action="store_true", help="also time CFG + FlowMatchEulerDiscreteScheduler")
    parser.add_argument("--flow-only", action="store_true", help="time only the flow-matching rows")
    parser.add_argument("--flow-repeats", type=int, default=400, help="repeats of each flow-matching shape")
    parser.add_argument("--csv", type=Path, default=None, help="where the flow rows go (default "
                        "benchmarks/results/step_cpu_flow.csv; the DDIM rows always go to step_cpu.csv)")
    parser.add_argument("--no-csv", action="store_true", help="print only (a loaded machine's numbers)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    why = fastguide.backends(reasons=True)["cpp"]
    if why:
        raise SystemExit(f"the cpp backend is not available: {why}")
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                device=cpu_model() or platform.processor() or platform.machine(), cores=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__,
                triton=version("triton"), diffusers=version("diffusers"), fastguide=fastguide.__version__)
    if not args.flow_only:
        scheduler = stable_diffusion_ddim()
        rows = run_size("2^24 per half", (4, 4, 1024, 1024), args.repeats, 1, scheduler)
        rows += run_size("SD latent", (2, 4, 64, 64), args.small_repeats, 20, scheduler)
        print_rows(rows, meta)
        if not args.no_csv:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            write_csv(rows, RESULTS, meta, float_format=".4g")
            print(f"appended to {RESULTS}")
    if args.flow or args.flow_only:
        rows = []
        for label, shape in FLOW_SHAPES:
            rows += run_flow(label, shape, args.flow_repeats, 20)
        print(f"CFG + FlowMatchEulerDiscreteScheduler (shift {FLOW_SHIFT}, step {FLOW_STEPS // 2} of "
              f"{FLOW_STEPS}), fp32")
        print_rows(rows, meta, ops=True)
        if not args.no_csv:
            path = args.csv or FLOW_RESULTS
            path.parent.mkdir(parents=True, exist_ok=True)
            write_csv(rows, path, meta, float_format=".4g")
            print(f"appended to {path}")


if __name__ == "__main__":
    main()
