"""GPU benchmark of one CFG + DDIM step (eta = 0, epsilon prediction) across backends, in one run.

For each sample shape, from SD latents (2x4x64x64) to pixel-space ADM-256 batches (64x3x256x256), and each
dtype, it times side by side, with CUDA events (warmup, then the median over interleaved repeats):

  copy             ``dst.copy_(src)`` moving the same bytes the step must move (read x, u, c; write out):
                   the device's practical bandwidth, the floor of a bandwidth-bound step
  triton           ``fastguide.guided_step(..., out=out, backend="triton")`` (checked entry point)
  triton_launcher  the Triton launcher alone on prepared row views (no argument checks)
  cuda             the same call with ``backend="cuda"`` when that backend is built
  compile          ``torch.compile`` of the same math writing into a buffer
  diffusers        the eager diffusers path: chunk, CFG combine, ``DDIMScheduler.step``

and prints ratios: the fraction of copy bandwidth, the speedup over ``torch.compile`` and over diffusers.
Rows are appended to ``benchmarks/results/step_gpu.csv`` with the device name, versions and date.
Small shapes fit in L2, so their "bandwidth" is cache bandwidth for every method alike.

    python benchmarks/step_gpu.py                       # everything (needs a CUDA GPU)
    python benchmarks/step_gpu.py --list                # the plan only, no GPU needed
    python benchmarks/step_gpu.py --sizes 2x4x64x64 --dtypes float16 --methods copy,triton,diffusers
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

DEFAULT_SIZES = "2x4x64x64,4x4x128x128,16x4x128x128,16x3x256x256,64x3x256x256"
METHODS = ("copy", "triton", "triton_launcher", "cuda", "compile", "diffusers")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GUIDANCE_SCALE = 7.5
NUM_INFERENCE_STEPS = 50
STEP_INDEX = 10          # which of the 50 DDIM steps is timed (any interior one does the same work)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "step_gpu.csv"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help="comma-separated sample shapes BxCxHxW (the model output has 2B rows)")
    p.add_argument("--dtypes", default="float32,float16", help=f"comma-separated, of {sorted(DTYPES)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per method before timing")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per method (the median is kept)")
    p.add_argument("--target-ms", type=float, default=2.0,
                   help="each repeat times enough back-to-back calls to last about this long")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV to append results to")
    p.add_argument("--list", action="store_true", help="print the planned cases and exit (no GPU needed)")
    args = p.parse_args(argv)
    try:
        args.sizes = [tuple(int(d) for d in s.lower().split("x")) for s in args.sizes.split(",") if s]
    except ValueError:
        p.error(f"--sizes must look like 2x4x64x64,64x3x256x256, got {args.sizes!r}")
    if not args.sizes or any(len(s) < 2 or min(s) < 1 for s in args.sizes):
        p.error("--sizes needs shapes with a batch and at least one more positive dimension")
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        p.error(f"--dtypes must be of {sorted(DTYPES)}, got {bad or args.dtypes}")
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"--methods must be of {METHODS}, got {bad or args.methods}")
    if args.warmup < 0 or args.repeats < 1 or args.target_ms <= 0:
        p.error("--warmup >= 0, --repeats >= 1 and --target-ms > 0")
    return args


def shape_str(shape: Tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


# ----------------------------------------------------------------------------------------- the DDIM step

def make_scheduler():
    """Stable Diffusion's DDIM configuration, or None without diffusers."""
    try:
        from diffusers import DDIMScheduler
    except ImportError:
        return None
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                          steps_offset=1, prediction_type="epsilon")
    sched.set_timesteps(NUM_INFERENCE_STEPS)
    return sched


def ddim_alphas(sched) -> Tuple[int, float, float]:
    """(timestep, alphā_t, alphā_prev) of the timed step, as diffusers' DDIMScheduler.step computes them."""
    if sched is not None:
        t = int(sched.timesteps[STEP_INDEX])
        prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
        abar = sched.alphas_cumprod.double()
        return t, float(abar[t]), float(abar[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
    # Same schedule without diffusers: scaled_linear betas, "leading" spacing with steps_offset=1.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    stride = 1000 // NUM_INFERENCE_STEPS
    t = (NUM_INFERENCE_STEPS - 1 - STEP_INDEX) * stride + 1
    prev = t - stride
    return t, float(abar[t]), float(abar[prev]) if prev >= 0 else float(abar[0])


def ddim_table(abar_t: float, abar_prev: float, device) -> torch.Tensor:
    """The coefficient row of an eta=0 epsilon DDIM step (fastguide.core.layout): with a = sqrt(abar_t),
    s = sqrt(1 - abar_t), x0 = (x - s*eps)/a and out = a_prev*x0 + sqrt(1 - a_prev^2)*eps."""
    from fastguide.core.layout import NUM_COLS, Col
    a, s, a_prev = math.sqrt(abar_t), math.sqrt(1 - abar_t), math.sqrt(abar_prev)
    row = torch.zeros(1, NUM_COLS, dtype=torch.float64)
    row[0, Col.P_X], row[0, Col.P_M] = 1 / a, -s / a
    row[0, Col.Q_M] = 1.0
    row[0, Col.B], row[0, Col.C] = a_prev, math.sqrt(1 - a_prev ** 2)
    return row.to(device=device, dtype=torch.float32)


def compiled_step():
    """torch.compile of the same math, fp32 compute, written into the caller's buffer."""
    def cfg_ddim(x, model_output, out, w: float, p_x: float, p_m: float, b: float, c: float):
        u, cond = model_output.float().chunk(2)
        eps = u + w * (cond - u)
        x0 = p_x * x.float() + p_m * eps
        out.copy_(b * x0 + c * eps)
    return torch.compile(cfg_ddim, fullgraph=True, dynamic=False)


# ------------------------------------------------------------------------------------------------ timing

class _Clock:
    """CUDA events on a GPU; a host clock elsewhere (only for checking this script without one)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return (time.perf_counter() - start) * 1e3


def time_interleaved(fns: Dict[str, Callable[[], None]], warmup: int, repeats: int, target_ms: float,
                     device: torch.device) -> Dict[str, float]:
    """Median microseconds per call of each fn; repeats alternate between fns so drift hits all alike."""
    clock = _Clock(device)
    inner = {}
    for name, fn in fns.items():
        for _ in range(max(1, warmup)):
            fn()
        if clock.cuda:
            torch.cuda.synchronize()
        start = clock.start()
        for _ in range(3):
            fn()
        per_call_ms = max(clock.elapsed_ms(start) / 3, 1e-4)
        inner[name] = max(1, min(2000, int(target_ms / per_call_ms)))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock.start()
            for _ in range(inner[name]):
                fn()
            samples[name].append(clock.elapsed_ms(start) * 1e3 / inner[name])
    return {name: statistics.median(v) for name, v in samples.items()}


# ------------------------------------------------------------------------------------------------- cases

def run_case(shape, dtype, methods, sched, table, timestep, coeffs, compiled, args, available, device):
    import fastguide
    from fastguide.backends.rows import as_rows

    gen = torch.Generator(device=device).manual_seed(0)
    batch = shape[0]
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    model_output = torch.randn((2 * batch,) + shape[1:], device=device, dtype=dtype, generator=gen)
    elems = x.numel()
    step_bytes = 4 * elems * x.element_size()          # read x, u, c; write out
    copy_src = torch.empty(2 * elems, device=device, dtype=dtype).normal_(generator=gen)
    copy_dst = torch.empty_like(copy_src)              # 2 x (2n) elements moved: the same bytes
    outs = {m: torch.full_like(x, float("nan")) for m in methods if m not in ("copy", "diffusers")}
    fns: Dict[str, Callable[[], None]] = {}
    results: Dict[str, torch.Tensor] = {}

    if "copy" in methods:
        fns["copy"] = lambda: copy_dst.copy_(copy_src)
    for backend in ("triton", "cuda"):
        if backend in methods and available[backend]:
            def fused(backend=backend, out=outs.get(backend)):
                fastguide.guided_step(x, model_output, table, 0, scale=GUIDANCE_SCALE, out=out, backend=backend)
            fns[backend] = fused
            results[backend] = outs[backend]
    if "triton_launcher" in methods and available["triton"]:
        from fastguide.core.args import StepArgs
        from fastguide.kernels import guided_step as triton_step
        x_rows, m_rows = as_rows(x), as_rows(model_output)
        out_rows = as_rows(outs["triton_launcher"])
        scale_vec = torch.full((batch,), GUIDANCE_SCALE, device=device)
        launch_args = StepArgs(x_rows, m_rows, table, 0, scale=scale_vec, out=out_rows)
        fns["triton_launcher"] = lambda: triton_step.guided_step(launch_args)
        results["triton_launcher"] = outs["triton_launcher"]
    if "compile" in methods:
        p_x, p_m, b, c = coeffs
        fns["compile"] = lambda out=outs["compile"]: compiled(x, model_output, out, GUIDANCE_SCALE, p_x, p_m, b, c)
        results["compile"] = outs["compile"]
    holder: Dict[str, torch.Tensor] = {}
    if "diffusers" in methods and sched is not None:
        def diffusers_step():
            u, cond = model_output.chunk(2)
            guided = u + GUIDANCE_SCALE * (cond - u)
            holder["prev"] = sched.step(guided, timestep, x).prev_sample
        fns["diffusers"] = diffusers_step

    timings = time_interleaved(fns, args.warmup, args.repeats, args.target_ms, device)

    # Every fused result against the eager diffusers result (or the compiled one without diffusers).
    expected = None
    if "diffusers" in fns:
        fns["diffusers"]()
        expected = holder["prev"].float()
    elif "compile" in results:
        expected = results["compile"].float()
    errors = {}
    for name, res in results.items():
        errors[name] = float((res.float() - expected).abs().max()) if expected is not None else float("nan")
    return timings, errors, step_bytes


def plan(args: argparse.Namespace) -> List[Tuple[Tuple[int, ...], str]]:
    return [(shape, dtype) for shape in args.sizes for dtype in args.dtypes]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.list:
        for shape, dtype in plan(args):
            print(f"{shape_str(shape):>16}  {dtype:<9} methods: {', '.join(args.methods)}")
        return 0
    if not torch.cuda.is_available():
        print("step_gpu.py needs a CUDA GPU (use --list to see the plan)", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter would time numpy, not the GPU", file=sys.stderr)
        return 2
    run(args, torch.device("cuda"))
    return 0


def run(args: argparse.Namespace, device: torch.device) -> None:
    """Time every case on ``device`` (a GPU; CPU only to check this script), print and append the CSV."""
    import fastguide
    from fastguide.tools import bench
    available = fastguide.backends()
    reasons = fastguide.backends(reasons=True)
    for backend in ("triton", "cuda"):
        if backend in args.methods and not available[backend]:
            print(f"skipping {backend}: {reasons[backend]}")
    sched = make_scheduler()
    if "diffusers" in args.methods and sched is None:
        print("skipping diffusers: not installed")
    timestep, abar_t, abar_prev = ddim_alphas(sched)
    table = ddim_table(abar_t, abar_prev, device)
    a, s, a_prev = math.sqrt(abar_t), math.sqrt(1 - abar_t), math.sqrt(abar_prev)
    coeffs = (1 / a, -s / a, a_prev, math.sqrt(1 - a_prev ** 2))
    compiled = None
    if "compile" in args.methods:
        for knob in ("cache_size_limit", "recompile_limit"):   # one compile per (shape, dtype)
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        compiled = compiled_step()

    triton_version, diffusers_version = bench.version("triton"), bench.version("diffusers")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{device_name} | torch {torch.__version__} | triton {triton_version} | diffusers "
          f"{diffusers_version} | {date}")
    print(f"CFG (w={GUIDANCE_SCALE}) + DDIM step {STEP_INDEX}/{NUM_INFERENCE_STEPS} (t={timestep}), eta=0, "
          f"out= preallocated; median us per call")

    rows = []
    header = (f"{'shape':>14} {'dtype':<8} {'method':<16} {'us':>9} {'GB/s':>8} {'of copy':>8} "
              f"{'vs compile':>10} {'vs diffusers':>12} {'max err':>9}")
    print(header)
    print("-" * len(header))
    for shape, dtype_name in plan(args):
        dtype = DTYPES[dtype_name]
        timings, errors, step_bytes = run_case(shape, dtype, args.methods, sched, table, timestep, coeffs,
                                               compiled, args, available, device)
        copy_gbps = step_bytes / (timings["copy"] * 1e-6) / 1e9 if "copy" in timings else float("nan")
        for method, us in timings.items():
            gbps = step_bytes / (us * 1e-6) / 1e9
            row = {
                "date": date, "device": device_name, "torch": torch.__version__, "triton": triton_version,
                "diffusers": diffusers_version, "dtype": dtype_name, "shape": shape_str(shape),
                "elements": math.prod(shape), "bytes_moved": step_bytes, "method": method,
                "median_us": round(us, 3), "gbps": round(gbps, 1),
                "frac_of_copy": round(gbps / copy_gbps, 3) if method != "copy" else 1.0,
                "speedup_vs_compile": round(timings["compile"] / us, 3)
                if "compile" in timings and method != "copy" else "",
                "speedup_vs_diffusers": round(timings["diffusers"] / us, 3)
                if "diffusers" in timings and method != "copy" else "",
                "max_abs_err_vs_diffusers": f"{errors[method]:.2e}" if method in errors else "",
            }
            rows.append(row)
            print(f"{row['shape']:>14} {dtype_name:<8} {method:<16} {us:9.2f} {gbps:8.1f} "
                  f"{row['frac_of_copy']:8.3f} {str(row['speedup_vs_compile']):>10} "
                  f"{str(row['speedup_vs_diffusers']):>12} {row['max_abs_err_vs_diffusers']:>9}")
        print()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists() or args.out.stat().st_size == 0
    with args.out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
