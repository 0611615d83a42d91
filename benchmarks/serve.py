"""CPU benchmark of the serving engine (``fastguide.serve.Engine``): Poisson traffic against three batching
policies, side by side.

For every model one seeded request mix is drawn (steps, sampler, label, seed and guidance per request) and
for every arrival rate (requests/s) seeded Poisson arrival times: a trace is the mix's first n requests at
those times (so all rates share one mix). The same trace is replayed against an engine of each policy in
turn, the policies' order rotating from rate to rate (so slow drifts of a shared machine hit all of them
alike):

  sequential  one request at a time
  static      a batch of up to ``--max-batch`` starts together and the next is admitted only when its
              longest member has finished
  continuous  requests join at the next iteration and leave as soon as they finish

Per run: throughput (completed requests / makespan, the first arrival to the last answer), p50 / p99 / mean
latency (the client's clock: just before ``submit`` to the future's answer, so queueing is included), the
engine's iterations and mean batch (requests per iteration), and model rows per request
(``engine.metrics.model_rows / requests``) next to the rows the mix needs ideally (a cond row per stage,
plus an uncond row per stage only where CFG runs at a scale other than 1; ``ideal_rows_per_req``), split by
traffic class (``rows_per_req_scale1``, ``rows_per_req_cfg``) and against dense CFG batching (two rows per
stage for every request, ``dense_rows_per_req``). ``throughput_vs_static`` and ``p99_vs_static`` compare each
run with the static run of the same trace; ``flat_cost_bound`` is the most continuous batching could gain
over static on it (static's iterations over continuous's with the queue never empty, from the requests'
stage counts): the throughput ratio if an iteration cost the same at any batch size.

The mix: steps uniform in a per-model range, samplers ddpm / ddim / euler_ancestral / dpmpp_2m / heun, half
the traffic at CFG scale 1 (sent without a cfg entry; ``--scale1 cfg`` sends ``{"type": "cfg", "scale": 1}``
instead), the rest CFG at a scale uniform in [2, 4]; on digits a fifth of the requests (either half) also
take ADM classifier guidance (the noisy classifier on x_t). Models:

  digits  the shipped 8x8 digits UNet (``fastguide.generation.models.digits()``), steps 10-50
  unet32  a class-conditional diffusers ``UNet2DModel`` at 3x32x32, random weights (seeded), block channels
          (32, 64), one layer per block, 11 class embeddings (null label 10), DDPM schedule, steps 8-24

A trace holds ``rate * --duration`` requests, kept within [--min-requests, --max-requests]; ``--requests N``
fixes the count instead. Above capacity the queue grows through the whole trace, so an overloaded run's
latency depends on the trace's length: compare policies at the same rate, not across runs of other lengths.

Rows are appended to benchmarks/results/serve_cpu.csv (``--out``) with the CPU, core count, torch threads,
torch / diffusers / fastguide versions, the git commit and the date; throughput and p99 against the rate,
one line per policy and one panel per model, go to the CSV's name with ``.png`` (matplotlib when
importable, else drawn with PIL). A table is printed.

    python benchmarks/serve.py [--quick] [--models digits,unet32] [--rates 4,16 | digits:4,16;unet32:1,2]
                               [--duration 10 | --requests N] [--max-batch 8] [--backend auto] [--threads 1]
                               [--out benchmarks/results/serve_cpu.csv]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import fastguide
from fastguide.serve import Engine
from fastguide.tools.bench import cpu_model, version, write_csv

RESULTS = Path(__file__).resolve().parent / "results" / "serve_cpu.csv"
POLICIES = ("sequential", "static", "continuous")
SAMPLERS = (("ddpm", 0.3), ("ddim", 0.3), ("euler_ancestral", 0.15), ("dpmpp_2m", 0.15), ("heun", 0.1))
CLASSIFIER_SCALE = 5.0     # the digits demo's ADM scale; fixed, since it keys the loop cache


@dataclass
class ModelSetup:
    name: str
    steps: tuple                 # (lo, hi) inclusive
    rates: tuple                 # default arrival rates, requests/s: under- to over-load on 2 CPU cores
    classifier: Optional[str]    # a served classifier network for some of the traffic, or None
    build: object                # () -> ModelSpec


def digits_spec():
    from fastguide.generation.models import digits
    return digits()


class ClassUNet(torch.nn.Module):
    """A class-conditional diffusers ``UNet2DModel`` (random, seeded) as ``model(x, t, y)``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from diffusers import UNet2DModel
        torch.manual_seed(seed)
        self.unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, num_class_embeds=11)
        self.eval()

    def forward(self, x, t, y=None):
        return self.unet(x, t, class_labels=y).sample


def unet32_spec():
    from fastguide.generation.models import ModelSpec
    net = ClassUNet(0)
    return ModelSpec(model=net, schedule=fastguide.Schedule.ddpm(), sample_shape=(3, 32, 32), networks={"model": net},
                     num_classes=10, null_label=10, sampler="ddim", steps=50, clip=(-1.0, 1.0), name="unet32",
                     network_kinds={"model": "model"})


MODELS = {
    "digits": ModelSetup("digits", (10, 50), (3.0, 8.0, 16.0, 32.0), "noisy_classifier", digits_spec),
    "unet32": ModelSetup("unet32", (8, 24), (1.0, 2.0, 4.0, 8.0), None, unet32_spec),
}
QUICK = {"digits": ModelSetup("digits", (3, 8), (10.0, 200.0), "noisy_classifier", digits_spec)}


def request_mix(setup: ModelSetup, n: int, seed: int, scale1: str) -> List[dict]:
    """``n`` request bodies, drawn from ``seed``: the same list for every policy of a trace."""
    rng = np.random.default_rng(seed)
    names = [s for s, _ in SAMPLERS]
    weights = np.array([w for _, w in SAMPLERS])
    bodies = []
    for _ in range(n):
        body = {"label": int(rng.integers(0, 10)), "seed": int(rng.integers(0, 2 ** 31)),
                "steps": int(rng.integers(setup.steps[0], setup.steps[1] + 1)),
                "sampler": names[int(rng.choice(len(names), p=weights / weights.sum()))]}
        guidance = []
        if rng.random() < 0.5:
            guidance.append({"type": "cfg", "scale": round(float(rng.uniform(2.0, 4.0)), 3)})
        elif scale1 == "cfg":
            guidance.append({"type": "cfg", "scale": 1.0})
        if setup.classifier is not None and rng.random() < 0.2:
            guidance.append({"type": "classifier", "network": setup.classifier, "scale": CLASSIFIER_SCALE})
        if guidance:
            body["guidance"] = guidance
        bodies.append(body)
    return bodies


def arrivals(rate: float, n: int, seed: int) -> np.ndarray:
    """Poisson arrival times (s) of ``n`` requests at ``rate`` per second, the first at 0."""
    gaps = np.random.default_rng(seed + 1_000_003).exponential(1.0 / rate, size=n)
    t = np.cumsum(gaps)
    return t - t[0]


def cfg_scale(body: dict) -> float:
    return next((float(g.get("scale", 1.0)) for g in body.get("guidance", []) if g["type"] == "cfg"), 1.0)


def ideal_rows(engine: Engine, bodies: Sequence[dict]) -> List[tuple]:
    """Per request (cond rows, uncond rows) the mix needs: a cond row per stage, an uncond row per stage
    whose CFG is active at a scale other than 1 (``u + 1 (c - u) = c``)."""
    from fastguide.serve.requests import parse_request
    out = []
    for body in bodies:
        spec = engine._activate(parse_request(body, engine.served)).spec
        uncond = sum(1 for k in spec.kinds if k.cfg) if cfg_scale(body) != 1.0 else 0
        out.append((spec.num_stages, uncond))
    return out


def flat_cost_bound(stages: Sequence[int], max_batch: int) -> float:
    """Static's iterations over continuous's for these requests (in order) with the queue never empty."""
    static = sum(max(stages[i:i + max_batch]) for i in range(0, len(stages), max_batch))
    left, active, continuous = list(stages), [], 0
    while left or active:
        while len(active) < max_batch and left:
            active.append(left.pop(0))
        active = [s - 1 for s in active if s > 1]
        continuous += 1
    return static / continuous


def run_trace(spec, policy: str, bodies: Sequence[dict], times: np.ndarray, args) -> dict:
    engine = Engine(spec, max_batch=args.max_batch, max_queue=len(bodies) + 1, backend=args.backend, policy=policy)
    engine.start()
    engine.wait_ready(600)
    n = len(bodies)
    submitted, done = [0.0] * n, [math.nan] * n
    failures = []
    finished = threading.Semaphore(0)

    def on_done(i):
        def callback(fut):
            done[i] = time.perf_counter()
            if fut.cancelled() or fut.exception() is not None:
                failures.append((i, fut.exception()))
            finished.release()
        return callback

    lag = 0.0
    t0 = time.perf_counter()
    for i, (body, at) in enumerate(zip(bodies, times)):
        wait = t0 + at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        submitted[i] = time.perf_counter()
        lag = max(lag, submitted[i] - (t0 + at))
        engine.submit(body).add_done_callback(on_done(i))
    for _ in range(n):
        finished.acquire()
    engine.close()
    m = engine.metrics
    ok = [i for i in range(n) if i not in {j for j, _ in failures}]
    lat = np.array([done[i] - submitted[i] for i in ok])
    makespan = max(done) - t0
    return {"requests": n, "completed": len(ok), "failed": len(failures),
            "makespan_s": makespan, "throughput_rps": len(ok) / makespan,
            "p50_s": float(np.percentile(lat, 50)) if len(lat) else math.nan,
            "p99_s": float(np.percentile(lat, 99)) if len(lat) else math.nan,
            "mean_s": float(lat.mean()) if len(lat) else math.nan,
            "max_submit_lag_ms": lag * 1e3, "iterations": m.iterations,
            "mean_batch": m.batch_size.total / max(m.batch_size.count, 1),
            "ms_per_iteration": makespan / max(m.iterations, 1) * 1e3,
            "model_rows_per_req": m.model_rows / n,
            "uncond_rows_per_req": (m.model_rows - (m.batch_size.total)) / n,
            "_errors": failures[:3]}


def trace_size(rate: float, args) -> int:
    if args.requests:
        return args.requests
    return int(min(max(round(rate * args.duration), args.min_requests), args.max_requests))


def parse_rates(text: Optional[str], models: Sequence[str], setups: Dict[str, ModelSetup]) -> Dict[str, List[float]]:
    if not text:
        return {m: list(setups[m].rates) for m in models}
    if ":" not in text:
        rates = [float(r) for r in text.split(",")]
        return {m: rates for m in models}
    out = {m: list(setups[m].rates) for m in models}
    for part in text.split(";"):
        name, _, values = part.partition(":")
        if name.strip() not in setups:
            raise SystemExit(f"--rates: unknown model {name.strip()!r} (models: {', '.join(setups)})")
        out[name.strip()] = [float(r) for r in values.split(",")]
    return out


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("+dirty" if sha and dirty else "")


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a seconds-long run (digits, 2 rates, 3-8 steps)")
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)} (default all)")
    p.add_argument("--rates", default=None, help="arrival rates in requests/s: '4,16' for every model or "
                                                 "'digits:4,16;unet32:1,2' (default per model)")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals per trace (default 10, "
                                                                "quick 0.5), within --min/--max-requests")
    p.add_argument("--requests", type=int, default=None, help="a fixed number of requests per trace instead")
    p.add_argument("--min-requests", type=int, default=None, help="default 24 (quick 8)")
    p.add_argument("--max-requests", type=int, default=None, help="default 160 (quick 16)")
    p.add_argument("--max-batch", type=int, default=None, help="the engine's max_batch (default 8, quick 4)")
    p.add_argument("--steps", default=None, help="the mix's step range LO-HI for every model (default per model: "
                                                 "digits 10-50, unet32 8-24); wider spreads favour continuous "
                                                 "batching, as static batches last as long as their longest member")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma list (default all three)")
    p.add_argument("--backend", default="auto", help="the fused step's backend (default auto)")
    p.add_argument("--scale1", choices=("none", "cfg"), default="none",
                   help="how scale-1 traffic is sent: no cfg entry (default) or a cfg entry with scale 1")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the traces' seed (default 0)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"CSV to append to (default {RESULTS}); the plot "
                                                             "goes next to it as .png")
    p.add_argument("--no-plot", action="store_true", help="write no plot")
    args = p.parse_args(argv)
    q = args.quick
    args.duration = args.duration if args.duration is not None else (0.5 if q else 10.0)
    args.min_requests = args.min_requests if args.min_requests is not None else (8 if q else 24)
    args.max_requests = args.max_requests if args.max_requests is not None else (16 if q else 160)
    args.max_batch = args.max_batch or (4 if q else 8)
    setups = QUICK if q else MODELS
    args.model_list = [m.strip() for m in args.models.split(",")] if args.models else list(setups)
    for m in args.model_list:
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r} (models: {', '.join(MODELS)})")
    args.setups = {m: setups.get(m, MODELS[m]) for m in args.model_list}
    if args.steps:
        try:
            lo, hi = (int(v) for v in args.steps.split("-"))
        except ValueError:
            p.error(f"--steps must be LO-HI, e.g. 10-100, got {args.steps!r}")
        if not 1 <= lo <= hi:
            p.error(f"--steps must have 1 <= LO <= HI, got {args.steps!r}")
        args.setups = {m: dataclasses.replace(s, steps=(lo, hi)) for m, s in args.setups.items()}
    args.rate_map = parse_rates(args.rates, args.model_list, args.setups)
    args.policy_list = [x.strip() for x in args.policies.split(",")]
    for x in args.policy_list:
        if x not in POLICIES:
            p.error(f"--policies: unknown policy {x!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": cpu_model() or "cpu",
            "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "diffusers": version("diffusers"), "fastguide": fastguide.__version__, "git": git_commit(),
            "python": sys.version.split()[0], "backend": args.backend, "max_batch": args.max_batch,
            "scale1_as": args.scale1, "seed": args.seed, "quick": int(args.quick), "loadavg_before": _loadavg()}
    rows = []
    started = time.perf_counter()
    try:
        for model in args.model_list:
            setup = args.setups[model]
            spec = setup.build()
            probe = Engine(spec, max_batch=1, backend=args.backend)
            sizes = [trace_size(rate, args) for rate in args.rate_map[model]]
            mix = request_mix(setup, max(sizes), args.seed, args.scale1)   # every trace takes its first n
            for ri, (rate, n) in enumerate(zip(args.rate_map[model], sizes)):
                bodies = mix[:n]
                times = arrivals(rate, n, args.seed * 1000 + ri)
                need = ideal_rows(probe, bodies)
                scale1 = [r for b, r in zip(bodies, need) if cfg_scale(b) == 1.0]
                cfg = [r for b, r in zip(bodies, need) if cfg_scale(b) != 1.0]
                ideal = {"ideal_rows_per_req": sum(c + u for c, u in need) / n,
                         "dense_rows_per_req": sum(2 * c for c, _ in need) / n,
                         "rows_per_req_scale1": sum(c + u for c, u in scale1) / max(len(scale1), 1),
                         "rows_per_req_cfg": sum(c + u for c, u in cfg) / max(len(cfg), 1),
                         "scale1_share": len(scale1) / n,
                         "flat_cost_bound": flat_cost_bound([c for c, _ in need], args.max_batch),
                         "classifier_share": sum(any(g["type"] == "classifier" for g in b.get("guidance", []))
                                                 for b in bodies) / n}
                if ri == 0:   # untimed: the model, the loop cache and the allocator warmed up
                    run_trace(spec, "continuous", bodies[:2 * args.max_batch], times[:2 * args.max_batch] * 0, args)
                order = args.policy_list[ri % len(args.policy_list):] + args.policy_list[:ri % len(args.policy_list)]
                results = {}
                for policy in order:
                    res = run_trace(spec, policy, bodies, times, args)
                    errors = res.pop("_errors")
                    results[policy] = res
                    print(f"{model} {rate:g} req/s {policy}: {res['throughput_rps']:.2f} req/s, p50 "
                          f"{res['p50_s']:.3f} s, p99 {res['p99_s']:.3f} s, batch {res['mean_batch']:.1f}, "
                          f"{res['ms_per_iteration']:.1f} ms/iter ({time.perf_counter() - started:.0f} s)",
                          file=sys.stderr, flush=True)
                    for i, e in errors:
                        print(f"  request {i} failed: {e!r}", file=sys.stderr)
                for policy in args.policy_list:
                    res = results[policy]
                    base = results.get("static")
                    rows.append({"model": model, "steps_range": f"{setup.steps[0]}-{setup.steps[1]}", "rate_rps": rate,
                                 "policy": policy, **res,
                                 "throughput_vs_static": res["throughput_rps"] / base["throughput_rps"] if base
                                 else math.nan,
                                 "p99_vs_static": res["p99_s"] / base["p99_s"] if base else math.nan, **ideal})
    finally:
        torch.set_num_threads(previous_threads)
    elapsed = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out, meta, float_format=".4g")
    print_table(rows, meta, elapsed)
    print(f"appended to {args.out}")
    if not args.no_plot:
        path = args.out.with_suffix(".png")
        library = plot(rows, path, f"fastguide serve, {meta['device']} ({meta['cores']} cores, {args.threads} "
                                   f"thread), max_batch {args.max_batch}, {meta['date']}")
        print(f"wrote {path} ({library})")
    return 0


def print_table(rows: List[dict], meta: dict, elapsed: float) -> None:
    print(f"fastguide serve on {meta['device']} ({meta['cores']} cores, {meta['threads']} torch thread(s)), torch "
          f"{meta['torch']}, fastguide {meta['fastguide']} ({meta['git']}), backend {meta['backend']}, max_batch "
          f"{meta['max_batch']}, scale-1 traffic sent as {meta['scale1_as']!r}, {elapsed:.0f} s")
    head = (f"{'model':<7} {'rate':>5} {'policy':<10} {'n':>4} {'req/s':>6} {'vs st':>6} {'p50 s':>7} {'p99 s':>7} "
            f"{'p99/st':>6} {'batch':>5} {'ms/it':>6} {'rows/req':>8} {'ideal':>6} {'dense':>6} {'s1':>5} {'cfg':>5} "
            f"{'bound':>5}")
    print(head)
    print("(vs st, p99/st: against static on the same trace; rows/req: model rows per request, measured; ideal / "
          "dense: needed / with an uncond row every stage; s1, cfg: needed per scale-1 / CFG request; bound: "
          "flat_cost_bound)")
    for r in rows:
        print(f"{r['model']:<7} {r['rate_rps']:>5g} {r['policy']:<10} {r['requests']:>4} {r['throughput_rps']:>6.2f} "
              f"{r['throughput_vs_static']:>5.2f}x {r['p50_s']:>7.3f} {r['p99_s']:>7.3f} {r['p99_vs_static']:>6.2f} "
              f"{r['mean_batch']:>5.1f} {r['ms_per_iteration']:>6.1f} {r['model_rows_per_req']:>8.1f} "
              f"{r['ideal_rows_per_req']:>6.1f} {r['dense_rows_per_req']:>6.1f} {r['rows_per_req_scale1']:>5.1f} "
              f"{r['rows_per_req_cfg']:>5.1f} {r['flat_cost_bound']:>4.2f}x")


# ---------------------------------------------------------------------------------------------------
# The plot: per model, throughput and p99 latency against the arrival rate, one line per policy

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _series(rows, model, policy, key):
    pts = [(r["rate_rps"], r[key]) for r in rows if r["model"] == model and r["policy"] == policy]
    return [(x, y) for x, y in sorted(pts) if y == y and y > 0]


def plot(rows: List[dict], path: Path, title: str) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    panels = [("throughput_rps", "throughput (req/s)"), ("p99_s", "p99 latency (s)")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        _plot_pil(rows, models, policies, panels, path, title)
        return "PIL"
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False)
    for j, model in enumerate(models):
        for i, (key, label) in enumerate(panels):
            ax = axes[i][j]
            for k, policy in enumerate(policies):
                pts = _series(rows, model, policy, key)
                ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color=f"C{k}", label=policy)
            if key == "throughput_rps":
                rates = sorted({r["rate_rps"] for r in rows if r["model"] == model})
                ax.plot(rates, rates, ":", color="gray", label="offered")
            ax.set_xscale("log")
            ax.set_yscale("log")
            rates = sorted({r["rate_rps"] for r in rows if r["model"] == model})
            ax.set_xticks(rates, [f"{r:g}" for r in rates], minor=False)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("arrival rate (req/s)")
            ax.set_ylabel(label)
            ax.set_title(model, fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


def _plot_pil(rows, models, policies, panels, path: Path, title: str) -> None:
    from PIL import Image, ImageDraw
    pw, ph, left, top, gap = 330, 220, 60, 40, 60
    width = len(models) * (pw + left + 20) + 20
    height = top + len(panels) * (ph + gap) + 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    for j, model in enumerate(models):
        rates = sorted({r["rate_rps"] for r in rows if r["model"] == model})
        for i, (key, label) in enumerate(panels):
            x0, y0 = 20 + j * (pw + left + 20) + left, top + i * (ph + gap) + 10
            ys = [y for p in policies for _, y in _series(rows, model, p, key)]
            if key == "throughput_rps":
                ys += rates
            if not ys:
                continue
            xlo, xhi = math.log10(min(rates)), math.log10(max(rates))
            xlo, xhi = (xlo - 0.1, xhi + 0.1) if xhi > xlo else (xlo - 0.5, xhi + 0.5)
            ylo, yhi = math.floor(math.log10(min(ys)) * 2) / 2, math.ceil(math.log10(max(ys)) * 2) / 2
            yhi = yhi if yhi > ylo else ylo + 0.5

            def xy(x, y):
                return (x0 + (math.log10(x) - xlo) / (xhi - xlo) * pw,
                        y0 + ph - (math.log10(y) - ylo) / (yhi - ylo) * ph)

            e = ylo
            while e <= yhi + 1e-9:
                _, y = xy(10 ** xlo, 10 ** e)
                draw.line((x0, y, x0 + pw, y), fill=(225, 225, 225))
                draw.text((x0 - 55, y - 6), f"{10 ** e:.3g}", fill="black")
                e += 0.5
            for r in rates:
                x, _ = xy(r, 10 ** ylo)
                draw.line((x, y0 + ph, x, y0 + ph + 4), fill="black")
                draw.text((x - 8, y0 + ph + 6), f"{r:g}", fill="black")
            draw.rectangle((x0, y0, x0 + pw, y0 + ph), outline="black")
            draw.text((x0, y0 - 14), f"{model}: {label} vs arrival rate (req/s), log-log", fill="black")
            if key == "throughput_rps":
                for a, b in zip(rates, rates[1:]):
                    draw.line(xy(a, a) + xy(b, b), fill=(160, 160, 160), width=1)
            for k, policy in enumerate(policies):
                pts = [xy(x, y) for x, y in _series(rows, model, policy, key)]
                color = _COLORS[k % len(_COLORS)]
                if len(pts) > 1:
                    draw.line(pts, fill=color, width=2)
                for px, py in pts:
                    draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
            if i == 0:
                for k, policy in enumerate(policies):
                    ly = y0 + 6 + 13 * k
                    draw.rectangle((x0 + 6, ly, x0 + 14, ly + 8), fill=_COLORS[k % len(_COLORS)])
                    draw.text((x0 + 18, ly - 2), policy, fill="black")
                draw.text((x0 + 18, y0 + 6 + 13 * len(policies) - 2), "gray: offered load", fill=(120, 120, 120))
    img.save(path)


if __name__ == "__main__":
    sys.exit(main())
