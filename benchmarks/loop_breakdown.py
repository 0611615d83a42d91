"""Where a step of the native CFG loop goes on the CPU, and how it compares with the diffusers loop.

Three measurements, every one of them interleaved (contenders alternate within each repeat, so the noise of a
shared machine hits them alike) and reported as medians:

1. **Breakdown** of one steady-state step of ``fastguide.sample`` (CFG with a null label + DDIM, 50 steps,
   2x4x64x64 latents, the near-free network ``x * 0.5``): each op the stage runs, timed by itself in micro-runs
   on the loop's own objects (its device tables, host step index and pair buffers): the network, the ``[x; x]``
   cat, the model timestep's row (a view of the loop's table: an eager loop passes its stages the step index
   as a host int), the fused step (``ops.run_step``, split into its host side and the C++ kernel), the output
   allocation, and what is left of the measured per-step time (the stage's
   Python: ``StepArgs``, the output check, the loop itself). "paired" is the loop as shipped (the fused step
   writes both halves of the next ``[x; x]`` input, ``StepArgs.out2``), "plain" the same loop with that
   switched off (``fastguide.native.spec._PAIR_INPUTS = False``: a ``torch.cat`` and an output allocation
   per step).
2. **Side by side**: ``fastguide.sample`` (paired and plain) against the diffusers loop (``torch.cat``,
   ``scale_model_input``, chunk, CFG combine, ``DDIMScheduler.step``), same network and shape, us per step.
3. **The sampler's share inside a real loop**: a tiny diffusers ``UNet2DConditionModel`` (random weights)
   between the steps, 2x4x32x32 latents, DDIM and Euler ancestral. Per step, the time of everything except the
   UNet forward: the input (cat + ``scale_model_input``) and the sampler proper (``fastguide.step`` vs chunk +
   CFG combine + ``scheduler.step``), each timed inside the loop and back to back (the same loop with the UNet
   replaced by a stored output), to show what a real network between steps costs the sampler part.

Rows are appended to ``benchmarks/results/loop_breakdown_cpu.csv`` with the CPU model, versions and date, and
the tables are printed. The whole run takes about 40 s on two quiet cores (a loaded machine stretches it:
every figure is a median, and a busy core mostly shows up as a wider spread between runs).

    python benchmarks/loop_breakdown.py [--threads 1,2] [--repeats 41] [--unet-repeats 4] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

import fastguide
from fastguide.backends import abi
from fastguide.core import ops
from fastguide.core.args import StepArgs
from fastguide.native import loop as fg_loop
from fastguide.native import sampling as fg_sampling
from fastguide.native import spec as fg_spec
from fastguide.tools.bench import cpu_model, version, write_csv

RESULTS = Path(__file__).resolve().parent / "results" / "loop_breakdown_cpu.csv"
SHAPE = (2, 4, 64, 64)
STEPS = 50
SCALE = 7.5
NULL = 10


def free_net(x, t, y):
    return x * 0.5


def ddim_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def set_pairing(on: bool) -> None:
    if fg_spec._PAIR_INPUTS != on:
        fg_spec._PAIR_INPUTS = on
        fg_sampling.clear_caches()


def median_us(samples: List[float]) -> float:
    return statistics.median(samples) * 1e6


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, inner: int = 1,
                before: Callable[[str], None] = lambda name: None) -> Dict[str, List[float]]:
    """Seconds per call of each function, ``repeats`` times, the functions alternating within a repeat
    (``before(name)`` runs untimed ahead of each timed block)."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            before(name)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return times


# ---------------------------------------------------------------------------------------------- loops

def fastguide_loop(x_T, y, schedule, paired: bool, steps: int = STEPS) -> Callable[[], torch.Tensor]:
    guidance = [fastguide.CFG(SCALE, null_label=NULL)]

    def run():
        set_pairing(paired)
        return fastguide.sample(free_net, x_T, schedule=schedule, sampler="ddim", steps=steps, y=y,
                                guidance=guidance)
    return run


def diffusers_loop(x_T, y) -> Callable[[], torch.Tensor]:
    scheduler = ddim_scheduler()
    y_pair = torch.cat([torch.full_like(y, NULL), y])

    def run():
        scheduler.set_timesteps(STEPS)
        x = x_T * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            noise_pred = free_net(x_in, t, y_pair)
            uncond, cond = noise_pred.chunk(2)
            x = scheduler.step(uncond + SCALE * (cond - uncond), t, x).prev_sample
        return x
    return run


# ------------------------------------------------------------------------------------------ breakdown

class Timed:
    """Wraps the callables a stage runs and adds up the time spent in each, inside real loops."""

    def __init__(self):
        self.total: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        clock, total, calls = time.perf_counter, self.total, self.calls

        def timed(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                total[name] = total.get(name, 0.0) + clock() - start
                calls[name] = calls.get(name, 0) + 1
        return timed


class _Extension:
    """``fastguide._C`` with the CPU step kernel timed."""

    def __init__(self, module, timed: Timed):
        self._module = module
        self.cpu_guided_step = timed.wrap("kernel", module.cpu_guided_step)

    def __getattr__(self, name):
        return getattr(self._module, name)


def instrumented(run: Callable, timed: Timed, loops: int) -> None:  # noqa: C901
    """Run ``run`` ``loops`` times with the stage's ops timed: the network (wrapped by the caller), the
    timestep row, the output check, ``StepArgs``, ``run_step`` and inside it the argument block, the
    kernel and the output allocation, and ``torch.cat``."""
    patches = [(fg_loop, "_at"), (fg_loop, "_check_model_output"), (fg_loop, "StepArgs"), (ops, "run_step"),
               (abi, "guided_step_args"), (torch, "cat"), (torch, "empty_like")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in patches]
    names = {"_at": "timestep", "_check_model_output": "check", "StepArgs": "StepArgs", "run_step": "run_step",
             "guided_step_args": "abi", "cat": "cat", "empty_like": "alloc"}
    extension = abi._extension
    try:
        for obj, name, fn in saved:
            setattr(obj, name, timed.wrap(names[name], fn))
        abi._extension = _Extension(abi.extension(), timed)
        for _ in range(loops):
            run()
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        abi._extension = extension


def wrapper_cost(loops: int = 20000) -> float:
    """Seconds a timing wrapper adds to a call (it is inside the parent's time when nested)."""
    timed = Timed()
    noop = timed.wrap("noop", lambda: None)
    bare = lambda: None  # noqa: E731
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(loops):
            noop()
        mid = time.perf_counter()
        for _ in range(loops):
            bare()
        best = min(best, ((mid - start) - (time.perf_counter() - mid)) / loops)
    return best


def alone(x_T, y, schedule) -> Dict[str, Callable[[], object]]:
    """The same ops by themselves (hot caches), on the loop's own objects."""
    gp, spec = fg_sampling._built_loop("ddim", schedule, STEPS, {}, [fastguide.CFG(SCALE, null_label=NULL)],
                                       SHAPE[0], None)
    tables = fg_spec.cached_tables(spec, SHAPE[0], x_T.device)
    inputs = fg_spec.make_inputs(spec, (), y, torch.full((SHAPE[0],), SCALE), SHAPE[0], x_T.device)
    counter = STEPS // 2  # the host step index an eager loop's stages get
    coeffs, t_model2, scale = tables.coeffs, tables.t_model2, inputs.cfg_scale
    x = x_T.clone()
    pair_in, x_in, _ = fg_loop.pair_buffer(x)
    pair_in.copy_(torch.cat([x, x]))
    dest = fg_loop.pair_buffer(x)
    model_output = free_net(pair_in, None, inputs.y_pair)
    paired = StepArgs(x_in, model_output, coeffs, counter, scale=scale, out=dest[1], out2=dest[2])
    launch = abi.guided_step_args(paired)
    plain = StepArgs(x, model_output, coeffs, counter, scale=scale, out=torch.empty_like(x))
    launch_plain = abi.guided_step_args(plain)
    kernel = abi.extension().cpu_guided_step
    fns = {
        "network": lambda: free_net(pair_in, None, inputs.y_pair),
        "timestep": lambda: fg_loop._at(t_model2, counter),
        "check": lambda: fg_loop._check_model_output(model_output, 4, x_in, False),
        "StepArgs": lambda: StepArgs(x_in, model_output, coeffs, counter, scale=scale, out=dest[1], out2=dest[2]),
        "run_step paired": lambda: ops.run_step(
            StepArgs(x_in, model_output, coeffs, counter, scale=scale, out=dest[1], out2=dest[2]), "cpp"),
        "abi paired": lambda: abi.guided_step_args(paired),
        "kernel paired": lambda: kernel(launch.args),
        "run_step plain": lambda: ops.run_step(StepArgs(x, model_output, coeffs, counter, scale=scale), "cpp"),
        "abi plain": lambda: abi.guided_step_args(plain),
        "kernel plain": lambda: kernel(launch_plain.args),
        "cat": lambda: torch.cat([x, x]),
        "alloc": lambda: torch.empty_like(x, memory_format=torch.contiguous_format),
    }
    fns["_keep"] = (launch, launch_plain, plain, dest, pair_in)
    return fns


ITEMS = [  # (row label, in-loop key), in the order printed
    ("network (x * 0.5 on the [2B] batch)", "network"),
    ("cat ([x; x] model input)", "cat"),
    ("timestep row (a view of the loop's table)", "timestep"),
    ("fused step: host side (run_step, dispatch, alias checks)", "run_step_host"),
    ("fused step: argument block (backends/abi.py)", "abi"),
    ("fused step: C++ kernel", "kernel"),
    ("allocation (step output)", "alloc"),
    ("StepArgs + model-output check", "args_check"),
]


def breakdown(threads: int, repeats: int, x_T, y, schedule) -> List[dict]:
    """One steady-state step, paired and plain: each op's time inside the loop (and alone), and the rest.

    Steady state is the difference of a 50-step and a 10-step loop over 40 steps (per-call work cancels:
    x_T's cat into the first stage, the setup). The ops are timed inside instrumented loops, by the same
    difference; the instrumented step is a little slower than the plain one (the timers), which the "rest"
    row absorbs, and the uninstrumented steady-state step is given below it."""
    short = STEPS // 5
    hot = {name: median_us(t) for name, t in interleaved(
        {k: v for k, v in alone(x_T, y, schedule).items() if not k.startswith("_")}, repeats, inner=20).items()}
    hot["args_check"] = hot["StepArgs"] + hot["check"]
    overhead = wrapper_cost() * 1e6
    guidance = [fastguide.CFG(SCALE, null_label=NULL)]
    rows = []
    for variant in ("paired", "plain"):
        for key in ("abi", "kernel"):
            hot[key] = hot[f"{key} {variant}"]
        # (alone, the plain step's run_step includes its output allocation)
        hot["run_step_host"] = hot[f"run_step {variant}"] - hot["abi"] - hot["kernel"] \
            - (hot["alloc"] if variant == "plain" else 0.0)
        timers = {n: Timed() for n in (STEPS, short)}

        def loop(n, timed=None):
            net = timed.wrap("network", free_net) if timed is not None else free_net
            set_pairing(variant == "paired")
            return lambda: fastguide.sample(net, x_T, schedule=schedule, sampler="ddim", steps=n, y=y,
                                            guidance=guidance)
        plain_runs = {n: loop(n) for n in (STEPS, short)}
        for run in plain_runs.values():
            run()
        walls = {("plain", n): [] for n in (STEPS, short)}
        walls.update({("timed", n): [] for n in (STEPS, short)})
        for _ in range(repeats):
            for n in (STEPS, short):
                start = time.perf_counter()
                plain_runs[n]()
                walls[("plain", n)].append(time.perf_counter() - start)
                start = time.perf_counter()
                instrumented(loop(n, timers[n]), timers[n], 1)
                walls[("timed", n)].append(time.perf_counter() - start)

        def per_step(kind):
            return (statistics.mean(walls[(kind, STEPS)]) - statistics.mean(walls[(kind, short)])) \
                / (STEPS - short) * 1e6
        inside = {k: (timers[STEPS].total.get(k, 0.0) - timers[short].total.get(k, 0.0)) / repeats
                  / (STEPS - short) * 1e6 for k in timers[STEPS].total}
        calls = {k: (timers[STEPS].calls.get(k, 0) - timers[short].calls.get(k, 0)) / repeats / (STEPS - short)
                 for k in timers[STEPS].calls}
        nested = sum(calls.get(k, 0.0) for k in ("abi", "kernel", "alloc")) * overhead
        inside["run_step_host"] = inside["run_step"] - inside["abi"] - inside["kernel"] - inside.get("alloc", 0.0) \
            - nested
        inside["args_check"] = inside["StepArgs"] + inside["check"]
        step_timed, step_plain = per_step("timed"), per_step("plain")
        setup = statistics.mean(walls[("plain", STEPS)]) * 1e6 - STEPS * step_plain
        accounted = 0.0
        for label, key in ITEMS:
            us = inside.get(key, 0.0)
            if calls.get(key, 1.0) < 0.5:
                us = 0.0  # not a per-step op of this variant
            accounted += us
            rows.append(dict(section="breakdown", threads=threads, contender=f"fastguide-{variant}", item=label,
                             us_per_step=us, alone_us=hot[key] if us else "", share=us / step_timed, ratio="",
                             repeats=repeats))
        for label, us, share in (
                ("rest (stage and loop Python, timers)", step_timed - accounted, (step_timed - accounted) / step_timed),
                ("step, instrumented ((t50 - t10) / 40)", step_timed, 1.0),
                ("step, not instrumented ((t50 - t10) / 40)", step_plain, ""),
                ("per-call setup (once per loop)", setup, "")):
            rows.append(dict(section="breakdown", threads=threads, contender=f"fastguide-{variant}", item=label,
                             us_per_step=us, alone_us="", share=share, ratio="", repeats=repeats))
    return rows


def side_by_side(threads: int, repeats: int, x_T, y, schedule) -> List[dict]:
    loops = {"fastguide-paired": fastguide_loop(x_T, y, schedule, True),
             "fastguide-plain": fastguide_loop(x_T, y, schedule, False),
             "diffusers": diffusers_loop(x_T, y)}
    for run in loops.values():
        run()
        run()
    switch = {"fastguide-paired": lambda: set_pairing(True), "fastguide-plain": lambda: set_pairing(False)}

    def warm(name):  # a changed switch rebuilds the loop: one untimed run after it
        if name in switch and fg_spec._PAIR_INPUTS != (name == "fastguide-paired"):
            loops[name]()
    times = interleaved(loops, repeats, before=warm)
    base = median_us(times["diffusers"]) / STEPS
    rows = []
    for name, samples in times.items():
        us = median_us(samples) / STEPS
        rows.append(dict(section="side_by_side", threads=threads, contender=name, item="us per step (loop / 50)",
                         us_per_step=us, alone_us="", share="", ratio=base / us, repeats=repeats))
    return rows


# ------------------------------------------------------------------------------------- inside a real loop

def tiny_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8).eval()


def make_scheduler(kind: str):
    from diffusers import EulerAncestralDiscreteScheduler
    if kind == "ddim":
        return ddim_scheduler()
    return EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear")


def timed_loop(scheduler, unet, latents, context, contender: str, steps: int, stored=None, seed: int = 0):
    """One diffusers-style CFG loop; returns per-step seconds of (input part, sampler part, UNet) and the
    UNet outputs (for the back-to-back replay). ``stored``: replay these outputs instead of the UNet."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = latents * scheduler.init_noise_sigma
    inp, samp, net, outputs = [], [], [], []
    for i, t in enumerate(scheduler.timesteps):
        t0 = time.perf_counter()
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        t1 = time.perf_counter()
        if stored is None:
            with torch.no_grad():
                noise_pred = unet(x_in, t, encoder_hidden_states=context).sample
            outputs.append(noise_pred)
        else:
            noise_pred = stored[i]
        t2 = time.perf_counter()
        if contender == "fastguide":
            x = fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=SCALE, generator=gen)
        else:
            uncond, cond = noise_pred.chunk(2)
            x = scheduler.step(uncond + SCALE * (cond - uncond), t, x, generator=gen).prev_sample
        t3 = time.perf_counter()
        inp.append(t1 - t0)
        net.append(t2 - t1)
        samp.append(t3 - t2)
    return inp, samp, net, outputs


def in_loop(threads: int, repeats: int, steps: int) -> List[dict]:
    unet = tiny_unet()
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    context = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(2))
    rows = []
    for kind in ("ddim", "euler_ancestral"):
        schedulers = {c: make_scheduler(kind) for c in ("fastguide", "diffusers")}
        stored = timed_loop(schedulers["diffusers"], unet, latents, context, "diffusers", steps)[3]
        for c in schedulers:  # warm-up (plans, caches)
            timed_loop(schedulers[c], unet, latents, context, c, steps, stored=stored)
        acc = {(c, mode): ([], [], []) for c in schedulers for mode in ("in_loop", "back_to_back")}
        for _ in range(repeats):
            for c in schedulers:
                for mode in ("in_loop", "back_to_back"):
                    inp, samp, net, _ = timed_loop(schedulers[c], unet, latents, context, c, steps,
                                                   stored=stored if mode == "back_to_back" else None)
                    for bucket, values in zip(acc[(c, mode)], (inp, samp, net)):
                        bucket.extend(values)
        base = {mode: median_us(acc[("diffusers", mode)][1]) for mode in ("in_loop", "back_to_back")}
        for (c, mode), (inp, samp, net) in sorted(acc.items(), key=lambda kv: (kv[0][1] != "in_loop", kv[0][0])):
            for item, values in (("input (cat + scale_model_input)", inp), ("sampler (CFG + step)", samp)):
                us = median_us(values)
                rows.append(dict(section=f"unet_{kind}_{mode}", threads=threads, contender=c, item=item,
                                 us_per_step=us, alone_us="", share="",
                                 ratio=base[mode] / us if item.startswith("sampler") else "", repeats=repeats))
            if mode == "in_loop":
                rows.append(dict(section=f"unet_{kind}_{mode}", threads=threads, contender=c,
                                 item="UNet forward", us_per_step=median_us(net), alone_us="", share="", ratio="",
                                 repeats=repeats))
    return rows


# ---------------------------------------------------------------------------------------------- output

def print_rows(rows: List[dict]) -> None:
    section = None
    for r in rows:
        key = (r["section"], r["threads"])
        if key != section:
            section = key
            print(f"\n== {r['section']}  ({r['threads']} thread{'s' if r['threads'] > 1 else ''})")
        share = f"{100 * r['share']:5.1f}%" if isinstance(r["share"], float) else ""
        ratio = f"x{r['ratio']:.2f}" if isinstance(r["ratio"], float) else ""
        hot = f"(alone {r['alone_us']:.1f})" if isinstance(r["alone_us"], float) else ""
        print(f"  {r['contender']:18s} {r['item']:58s} {r['us_per_step']:9.1f} us  {share:>7s} {ratio:>7s} {hot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--unet-repeats", type=int, default=4, help="repeats of the in-loop UNet section (0: skip it)")
    parser.add_argument("--unet-steps", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="a few repeats, for a smoke test")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()
    if args.repeats < 1 or args.unet_repeats < 0 or args.unet_steps < 2:
        parser.error("--repeats must be >= 1, --unet-repeats >= 0 and --unet-steps >= 2")
    repeats = 3 if args.quick else args.repeats
    unet_repeats, unet_steps = (1, 5) if args.quick else (args.unet_repeats, args.unet_steps)
    from fastguide.samplers.schedule import Schedule
    schedule = Schedule.from_diffusers(ddim_scheduler())
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    rows: List[dict] = []
    started = time.perf_counter()
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            rows += side_by_side(threads, repeats, x_T, y, schedule)
            rows += breakdown(threads, repeats, x_T, y, schedule)
            if unet_repeats:
                rows += in_loop(threads, unet_repeats, unet_steps)
    finally:
        set_pairing(True)
    print_rows(rows)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if not args.no_csv:
        meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=cpu_model(),
                    cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                    diffusers=version("diffusers"), fastguide=fastguide.__version__)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, RESULTS, meta)
        print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
