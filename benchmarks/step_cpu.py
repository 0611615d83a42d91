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
  fg.step    the drop-in ``fastguide.step(noise_pred, t, x, scheduler=s, guidance_scale=w, out=buf)`` (its repeat
             calls take the repeat lane, ``fastguide/dropin/repeat.py``)
  fg.tuple   the call a pipeline makes, ``fastguide.step(noise_pred, t, x, scheduler=s, guidance_scale=w,
             return_dict=False)[0]`` (no ``out=``: one output allocated per step, as on the diffusers path)
  fused_op   the public fused op on the same row (``fastguide.guided_step``, every argument checked on every
             call): the same kernel, with the general path's host cost
  diffusers  chunk, CFG combine, ``scheduler.step(..., return_dict=False)[0]`` (what the SD3 / Flux pipelines do)

with the ops each dispatches per step (``fastguide.tools.opcount.OpCounter``: torch ops plus fastguide's direct
kernel calls). Both steppers have the scheduler's step index reset to the same step before every call.
These rows go to benchmarks/results/step_cpu_flow.csv (``--csv`` elsewhere, ``--no-csv`` nowhere).

diffusers guiders (``--guiders``, or ``--guiders-only``): each of ClassifierFreeGuidance (7.5),
ClassifierFreeZeroStarGuidance (4), AdaptiveProjectedGuidance (7.5, momentum -0.5, norm threshold 15),
AdaptiveProjectedMixGuidance (defaults: CFG 3.5 up to step 5, then APG 10 with momentum -0.5),
MagnitudeAwareGuidance (4, alpha 8) and TangentialClassifierFreeGuidance (4) with SD's DDIMScheduler (``--guider-
schedulers ddim,euler`` adds EulerDiscreteScheduler), at step 25 of 50, at the SD latent (2x4x64x64) and at 2^24
elements per sample batch (4x4x1024x1024), at 1 and 2 threads (``--guider-threads``), all 18 methods of a shape
interleaved in one ``measure``:

  fg.step    ``fastguide.step(model_output, t, x, scheduler=s, guider=g, out=buf)``: one ``guidance_gram`` pass
             (none for plain CFG), the per-sample coefficients (a few ops on [B] tensors), one fused step
  kernels    the fused path's two kernels alone (``fastguide.guidance_gram`` + ``fastguide.guided_step`` with the
             step's ``combine``, computed once): fg.step minus kernels is the drop-in's host cost
  diffusers  ``scheduler.step(g.forward(pred_cond=c, pred_uncond=u).pred, t, x).prev_sample``

Every call first sets ``g.set_state(step=25, num_inference_steps=50, timestep=t)`` as a pipeline does; each
method has its own guider (a copy made before the first call), and APG's momentum buffer is never reset, so
the timed calls see its steady state (a tensor running average, updated every call on every path). The
predictions are correlated as a network's are (c = u + 0.25 noise); before timing, each fused output is
checked against diffusers'. diffusers 0.42's MAMBO-G cannot take 4-D latents (``torch.norm`` over three dims
raises), so its diffusers row gets token-shaped views ``[B, C, H*W]`` of the same tensors (no copy). Ops per
step as for the flow rows; page faults per step tell fresh allocations (glibc mmaps every temporary over 32 MiB
and the kernel zeroes its pages) apart. These rows go to benchmarks/results/guiders_cpu.csv (``--guider-csv``
elsewhere); ``--quick`` is a smoke test (the SD latent only, 3 calls of each method).

    python benchmarks/step_cpu.py [--repeats 15] [--small-repeats 300] [--flow | --flow-only] [--flow-repeats 400]
                                  [--guiders | --guiders-only] [--guider-repeats 7] [--guider-small-repeats 300]
                                  [--guider-threads 1,2] [--guider-schedulers ddim] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
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
GUIDER_RESULTS = Path(__file__).resolve().parent / "results" / "guiders_cpu.csv"
GUIDER_STEP = STEPS // 2
GUIDER_SHAPES = [("2^24 per half", (4, 4, 1024, 1024)), ("SD latent", (2, 4, 64, 64))]
GUIDERS = {   # name: (diffusers class, keyword arguments)
    "CFG": ("ClassifierFreeGuidance", dict(guidance_scale=7.5)),
    "CFG-Zero*": ("ClassifierFreeZeroStarGuidance", dict(guidance_scale=4.0)),
    "APG": ("AdaptiveProjectedGuidance", dict(guidance_scale=7.5, adaptive_projected_guidance_momentum=-0.5,
                                              adaptive_projected_guidance_rescale=15.0)),
    "APG-mix": ("AdaptiveProjectedMixGuidance", {}),
    "MAMBO-G": ("MagnitudeAwareGuidance", dict(guidance_scale=4.0)),
    "TCFG": ("TangentialClassifierFreeGuidance", dict(guidance_scale=4.0)),
}
GUIDER_METHODS = ("fg.step", "kernels", "diffusers")


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

    def fg_tuple():
        scheduler._step_index = index
        return fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=FLOW_GUIDANCE,
                              return_dict=False)[0]

    def diffusers_step():
        scheduler._step_index = index
        uncond, cond = noise_pred.chunk(2)
        return scheduler.step(uncond + FLOW_GUIDANCE * (cond - uncond), t, x, return_dict=False)[0]

    fns = {
        "copy": lambda: copy_dst.copy_(copy_src),
        "fg.step": fg_step,
        "fg.tuple": fg_tuple,
        "fused_op": lambda: fastguide.guided_step(x, noise_pred, table, index, scale=FLOW_GUIDANCE, out=op_out,
                                                  backend="cpp"),
        "diffusers": diffusers_step,
    }
    expected = diffusers_step()   # same math, same answer: otherwise the timings compare different work
    fg_step(), fns["fused_op"]()
    torch.testing.assert_close(step_out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fg_tuple(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op_out, expected, rtol=1e-5, atol=1e-5)
    ops = {name: ops_per_call(fns[name]) for name in ("fg.step", "fg.tuple", "fused_op", "diffusers")}
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


def guider_scheduler(kind: str):
    """SD's DDIM (as above) or EulerDiscreteScheduler of the same betas, 50 steps."""
    if kind == "ddim":
        return stable_diffusion_ddim()
    from diffusers import EulerDiscreteScheduler
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1)
    scheduler.set_timesteps(STEPS)
    scheduler.is_scale_input_called = True      # else every step logs a warning (a pipeline scales the input)
    return scheduler


def make_guider(name: str, scheduler):
    """The guider as a pipeline leaves it after step 0's ``prepare_inputs`` (APG's momentum buffer exists)."""
    from diffusers import guiders
    cls, kwargs = GUIDERS[name]
    guider = getattr(guiders, cls)(**kwargs)
    guider.set_state(step=0, num_inference_steps=STEPS, timestep=scheduler.timesteps[0])
    guider.prepare_inputs({})
    return guider


def guider_fns(name: str, scheduler, x, model_output, out) -> dict:
    """fg.step, kernels and diffusers of one guider at step GUIDER_STEP, each with its own guider."""
    index = GUIDER_STEP
    t = scheduler.timesteps[index]
    indexed = hasattr(scheduler, "_step_index")      # Euler's step counter, reset before every call
    guider = make_guider(name, scheduler)
    uncond, cond = model_output.chunk(2)
    buffer = getattr(guider, "momentum_buffer", None)
    momentum = None if buffer is None else float(buffer.momentum)
    if buffer is not None:   # APG's steady state for these predictions: e = (c - u) + beta e
        buffer.running_average = (cond - uncond) / (1 - momentum)
    g_fg, g_diff, g_kern = guider, copy.deepcopy(guider), copy.deepcopy(guider)
    for g in (g_fg, g_diff, g_kern):
        g.set_state(step=index, num_inference_steps=STEPS, timestep=t)
    # the kernels' inputs: this step's combine from the drop-in's own translation (on a copy), a running
    # average of the sample's shape updated in place by the gram (the fused path's momentum update)
    fused = fastguide.dropin.guiders.translate(copy.deepcopy(g_kern), model_output, x, scheduler, "cpp")
    running = None if buffer is None else g_kern.momentum_buffer.running_average.clone()
    needs_gram = name != "CFG"
    table = fastguide.dropin.plan_for(scheduler).table(x.device)
    combine = fused.combine
    kern_out = torch.empty_like(x)
    if name == "MAMBO-G" and x.dim() > 3:        # diffusers' mambo_guidance raises for 4-D latents
        uncond, cond = uncond.flatten(2), cond.flatten(2)

    def fg_step():
        g_fg.set_state(step=index, num_inference_steps=STEPS, timestep=t)
        if indexed:
            scheduler._step_index = index
        return fastguide.step(model_output, t, x, scheduler=scheduler, guider=g_fg, out=out, backend="cpp")

    def kernels():
        g_kern.set_state(step=index, num_inference_steps=STEPS, timestep=t)
        if needs_gram:
            fastguide.guidance_gram(model_output, extra=running, momentum=momentum, backend="cpp")
        return fastguide.guided_step(x, model_output, table, index, combine=combine,
                                     extra=running if fused.extra is not None else None, out=kern_out,
                                     backend="cpp")

    def diffusers_step():
        g_diff.set_state(step=index, num_inference_steps=STEPS, timestep=t)
        if indexed:
            scheduler._step_index = index
        pred = g_diff.forward(pred_cond=cond, pred_uncond=uncond).pred
        return scheduler.step(pred.view(x.shape), t, x).prev_sample

    return {"fg.step": fg_step, "kernels": kernels, "diffusers": diffusers_step}, g_kern


def tcfg_fp64(cond, uncond, w: float, original: bool):
    """diffusers' TCFG ``normalized_guidance`` with its SVD in fp64 (diffusers casts to fp32, whose SVD of a
    2 x n matrix loses the answer at large n: at 2^22 elements per sample its error is as large as the step)."""
    vh = torch.linalg.svd(torch.stack([cond, uncond], 1).double().flatten(2), full_matrices=False).Vh
    v1 = vh[:, 0]
    u = uncond.double().flatten(1)
    projected = ((u * v1).sum(1, keepdim=True) * v1).view(uncond.shape)
    return (cond.double() if original else projected) + w * (cond.double() - projected)


def reference_fp64(name: str, guider, scheduler, x, model_output):
    """The diffusers step of ``guider`` (a copy, at its steady state) on fp64 copies of the tensors: what
    every method is checked against (TCFG's SVD by ``tcfg_fp64``)."""
    guider = copy.deepcopy(guider)
    buffer = getattr(guider, "momentum_buffer", None)
    if buffer is not None:
        buffer.running_average = buffer.running_average.double()
    uncond, cond = model_output.double().chunk(2)
    if name == "TCFG":
        pred = tcfg_fp64(cond, uncond, float(guider.guidance_scale), guider.use_original_formulation)
    else:
        if name == "MAMBO-G":
            uncond, cond = uncond.flatten(2), cond.flatten(2)
        pred = guider.forward(pred_cond=cond, pred_uncond=uncond).pred
    if hasattr(scheduler, "_step_index"):
        scheduler._step_index = GUIDER_STEP
    return scheduler.step(pred.reshape(x.shape), scheduler.timesteps[GUIDER_STEP], x.double()).prev_sample


def guider_data(shape):
    """x and [uncond; cond] with c = u + 0.25 noise: correlated as a network's are (independent halves make
    TCFG's 2x2 Gram nearly isotropic, its principal direction ill-conditioned, and the fp32 SVD's answer noise)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    uncond = torch.randn(shape, generator=gen)
    cond = uncond + 0.25 * torch.randn(shape, generator=gen)
    return x, torch.cat([uncond, cond])


def run_guiders(label: str, shape, repeats: int, block: int, threads: list, kind: str) -> list:
    """Every guider's fg.step / kernels / diffusers at one shape, checked, then timed at each thread count."""
    from fastguide.tools.opcount import OpCounter
    scheduler = guider_scheduler(kind)
    x, model_output = guider_data(shape)
    out = torch.empty_like(x)
    fns, errs, ops = {}, {}, {}
    for name in GUIDERS:
        methods, guider = guider_fns(name, scheduler, x, model_output, out)
        expected = reference_fp64(name, guider, scheduler, x, model_output)
        # Same math, same answer (twice: APG's running average must stay in step on every path; the second,
        # warm, call's ops are counted). diffusers' own error is recorded, not checked (its fp32 TCFG SVD fails
        # at 2^24 elements).
        for warm in (False, True):
            for method, fn in methods.items():
                if warm:
                    with OpCounter() as counter:
                        got = fn()
                    ops[name, method] = counter.count
                else:
                    got = fn()
                err = float((got.double() - expected).abs().max())
                errs[name, method] = max(err, errs.get((name, method), 0.0))
                if method != "diffusers" and not err <= 1e-4 * (1 + float(expected.abs().max())):
                    raise AssertionError(f"{name} {method}: max abs error {err:.3g} vs the fp64 diffusers step")
                fns[name, method] = fn
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        faults = {}
        timings = measure(fns, repeats, block, faults)
        for (name, method), (sec, p10) in timings.items():
            fused_sec = timings[name, "fg.step"][0]
            rows.append(dict(scheduler=kind, size=label, shape="x".join(map(str, shape)), threads=n, guider=name,
                             diffusers_class=GUIDERS[name][0], method=method, median_us=sec * 1e6,
                             p10_us=p10 * 1e6, fused_speedup=sec / fused_sec, ops_per_step=ops[name, method],
                             faults_per_step=faults[name, method], max_abs_err_vs_fp64=errs[name, method],
                             repeats=repeats))
    return rows


def print_guider_rows(rows: list, meta: dict) -> None:
    print(f"{meta['device']}, {meta['cores']} cores, torch {meta['torch']}, diffusers {meta['diffusers']}, "
          f"{meta['date']}, load average {meta['load_avg']}")
    print(f"{'sched':<5} {'size':<14} {'thr':>3} {'guider':<10} {'method':<10} {'median':>12} {'p10':>12} "
          f"{'time/fg':>8} {'ops/step':>9} {'faults/step':>12} {'err/fp64':>9}")
    for r in rows:
        print(f"{r['scheduler']:<5} {r['size']:<14} {r['threads']:>3} {r['guider']:<10} {r['method']:<10} "
              f"{r['median_us']:>10.1f}us {r['p10_us']:>10.1f}us {r['fused_speedup']:>7.2f}x "
              f"{r['ops_per_step']:>9} {r['faults_per_step']:>12.0f} {r['max_abs_err_vs_fp64']:>9.1e}")
    # the summary: diffusers / fg.step per configuration, and the drop-in's host share
    configs = list(dict.fromkeys((r["scheduler"], r["size"], r["threads"]) for r in rows))
    value = {(r["scheduler"], r["size"], r["threads"], r["guider"], r["method"]): r["median_us"] for r in rows}
    print("\ndiffusers time / fg.step time (share of fg.step outside its two kernels: 1 - kernels / fg.step)")
    print(f"{'guider':<10} " + " ".join(f"{f'{k} {s} {n}t':>30}" for k, s, n in configs))
    for name in dict.fromkeys(r["guider"] for r in rows):
        cells = []
        for k, s, n in configs:
            fg, kern, diff = (value[k, s, n, name, m] for m in GUIDER_METHODS)
            cells.append(f"{f'{diff / fg:.2f}x ({1 - kern / fg:+.0%})':>30}")
        print(f"{name:<10} " + " ".join(cells))


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
    parser.add_argument("--guiders", action="store_true", help="also time the diffusers guiders (fused vs diffusers)")
    parser.add_argument("--guiders-only", action="store_true", help="time only the guider rows")
    parser.add_argument("--guider-repeats", type=int, default=7, help="repeats of the 2^24-element guider rows")
    parser.add_argument("--guider-small-repeats", type=int, default=300, help="repeats of the SD-latent guider rows")
    parser.add_argument("--guider-threads", default="1,2", help="thread counts of the guider rows (comma-separated)")
    parser.add_argument("--guider-schedulers", default="ddim", help="ddim and/or euler (comma-separated)")
    parser.add_argument("--guider-csv", type=Path, default=None, help="where the guider rows go (default "
                        "benchmarks/results/guiders_cpu.csv)")
    parser.add_argument("--quick", action="store_true", help="guider rows: the SD latent only, 3 repeats (a smoke "
                        "test)")
    args = parser.parse_args(argv)
    args.guider_threads = [int(n) for n in args.guider_threads.split(",")]
    args.guider_schedulers = args.guider_schedulers.split(",")
    bad = set(args.guider_schedulers) - {"ddim", "euler"}
    if bad or min(args.guider_threads) < 1:
        parser.error("--guider-schedulers takes ddim, euler; --guider-threads positive counts")
    return args


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
    if not (args.flow_only or args.guiders_only):
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
    if args.guiders or args.guiders_only:
        run_guider_section(args, meta)


def run_guider_section(args, meta: dict) -> None:
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)   # "Guiders are currently an experimental feature"
    try:
        _run_guider_section(args, meta)
    finally:
        diffusers_logger.setLevel(level)  # (the tests run this in-process)


def _run_guider_section(args, meta: dict) -> None:
    before, load = torch.get_num_threads(), os.getloadavg()[0]
    shapes = [s for s in GUIDER_SHAPES if s[0] == "SD latent"] if args.quick else GUIDER_SHAPES
    rows = []
    try:
        for kind in args.guider_schedulers:
            for label, shape in shapes:
                big = label != "SD latent"
                repeats = 3 if args.quick else args.guider_repeats if big else args.guider_small_repeats
                block = 1 if big or args.quick else 20
                rows += run_guiders(label, shape, repeats, block, args.guider_threads, kind)
    finally:
        torch.set_num_threads(before)
    meta = {k: v for k, v in meta.items() if k != "torch_threads"}      # a column of each row here
    meta["load_avg"] = f"{load:.2f} -> {os.getloadavg()[0]:.2f}"     # 1-minute load at the start and the end
    meta["quick"] = int(args.quick)
    print(f"diffusers guiders + scheduler step, step {GUIDER_STEP} of {STEPS}, fp32")
    print_guider_rows(rows, meta)
    if not args.no_csv:
        path = args.guider_csv or GUIDER_RESULTS
        path.parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, path, meta, float_format=".4g")
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
