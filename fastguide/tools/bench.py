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
import csv
import datetime
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import fastguide
from fastguide.native import cudagraph
from fastguide.tools.opcount import OpCounter

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES
CFG_SCALE = 4.0
SHAPE = (3, 32, 32)


# ---------------------------------------------------------------------------------------------------
# Networks


class FreeNet(nn.Module):
    """A nearly free eps-network: one multiply, so a loop's time is the sampler's own."""

    def forward(self, x, t, y=None):
        return x * 0.1


class SmallUNet(nn.Module):
    """A small class-conditional diffusers ``UNet2DModel`` (random init) as ``model(x, t, y)``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from diffusers import UNet2DModel
        torch.manual_seed(seed)
        self.unet = UNet2DModel(sample_size=SHAPE[1], in_channels=SHAPE[0], out_channels=SHAPE[0],
                                layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                num_class_embeds=NUM_CLASSES + 1)

    def forward(self, x, t, y=None):
        return self.unet(x, t, class_labels=y).sample


class SmallClassifier(nn.Module):
    """A small time-aware conv classifier ``clf(x, t) -> logits [B, 10]`` (random init)."""

    def __init__(self, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(SHAPE[0], 16, 3, padding=1)
        self.act = nn.SiLU()
        self.head = nn.Linear(16, NUM_CLASSES)
        self.time = nn.Linear(1, 16)

    def forward(self, x, t):
        h = self.act(self.conv(x)).mean(dim=(2, 3)) + self.time(t.reshape(-1, 1).to(x.dtype) / 1000.0)
        return self.head(self.act(h))


# ---------------------------------------------------------------------------------------------------
# Contenders: each is a function run() -> samples, built for one configuration


def _ddim_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def diffusers_cfg_loop(net, x_T, y, steps: int, dropin: bool = False) -> Callable[[], torch.Tensor]:
    """The diffusers pipeline loop: CFG by chunk + combine and ``scheduler.step`` (or ``fastguide.step``)."""
    scheduler = _ddim_scheduler()
    y_pair = torch.cat([torch.full_like(y, NULL_LABEL), y])

    def run():
        scheduler.set_timesteps(steps, device=x_T.device)
        x = x_T * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            noise_pred = net(x_in, t, y_pair)
            if dropin:
                x = fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=CFG_SCALE)
            else:
                uncond, cond = noise_pred.chunk(2)
                x = scheduler.step(uncond + CFG_SCALE * (cond - uncond), t, x).prev_sample
        return x

    return run


def fastguide_cfg(net, x_T, y, steps: int, compile: Optional[str] = None,
                  compile_options: Optional[dict] = None) -> Callable[[], torch.Tensor]:
    schedule = fastguide.Schedule.from_diffusers(_ddim_scheduler())
    guidance = [fastguide.CFG(CFG_SCALE, null_label=NULL_LABEL)]

    def run():
        return fastguide.sample(net, x_T, schedule=schedule, sampler="ddim", steps=steps, y=y, guidance=guidance,
                                compile=compile, compile_options=compile_options)

    return run


def k_diffusion_cfg(net, x_T, y, steps: int) -> Callable[[], torch.Tensor]:
    """k-diffusion's Euler sampler on the VP model through its own eps wrapper, with a CFG wrapper."""
    import k_diffusion
    from diffusers import DDPMScheduler

    class EpsModel(nn.Module):  # k-diffusion's eps wrapper calls inner_model(x, t, **kwargs)
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t, cond=None):
            return self.net(x, t, cond)

    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    denoiser = k_diffusion.external.DiscreteEpsDDPMDenoiser(EpsModel(), abar.to(x_T.device), quantize=True)
    y_pair = torch.cat([torch.full_like(y, NULL_LABEL), y])

    def cfg_denoiser(x, sigma):
        uncond, cond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=y_pair).chunk(2)
        return uncond + CFG_SCALE * (cond - uncond)

    sigmas = denoiser.get_sigmas(steps)

    def run():
        return k_diffusion.sampling.sample_euler(cfg_denoiser, x_T * sigmas[0], sigmas, disable=True)

    return run


def _vp_chain(steps: int):
    """Respaced DDPM chain (guided-diffusion): timesteps, abar, abar_prev, posterior variance (float64)."""
    schedule = fastguide.Schedule.ddpm(timestep_spacing="guided")
    ts = schedule.timesteps(steps).astype("int64")
    abar = torch.tensor(schedule.alphas_cumprod[ts], dtype=torch.float64)
    abar_prev = torch.cat([abar[1:], torch.ones(1, dtype=torch.float64)])
    beta = 1 - abar / abar_prev
    post_var = beta * (1 - abar_prev) / (1 - abar)
    return schedule, ts.tolist(), abar.tolist(), abar_prev.tolist(), beta.tolist(), post_var.tolist()


def gd_cond_fn_loop(net, clf, x_T, y, steps: int, method: str, generator_seed: int = 0):
    """A guided-diffusion-style ``p_sample_loop``: per step the model, x0^, the posterior mean and variance,
    ``cond_fn`` through autograd, ``mean + variance * grad`` and the noise, each its own torch op.
    ``method="adm"``: grad of log softmax(clf(x_t, t))_y; ``"ma"``: clf on the clipped x0^ with
    ``tau1 l_y - logsumexp(tau2 l)`` and the extra variance gamma * Sigma_max * sin(pi i / N)."""
    _, ts, abar, abar_prev, beta, post_var = _vp_chain(steps)
    sigma_max = max(post_var)
    tau1, tau2, gamma = 1.0, 0.5, 0.3

    def cond_fn(inp, t):
        with torch.enable_grad():
            leaf = inp.detach().requires_grad_(True)
            logits = clf(leaf, t)
            if method == "adm":
                objective = torch.log_softmax(logits, dim=-1)[torch.arange(len(y)), y].sum()
            else:
                objective = (tau1 * logits[torch.arange(len(y)), y] - torch.logsumexp(tau2 * logits, dim=-1)).sum()
            return torch.autograd.grad(objective, leaf)[0]

    def run():
        g = torch.Generator(device=x_T.device).manual_seed(generator_seed)
        x = x_T
        n = len(ts)
        for i, t in enumerate(ts):
            t_batch = torch.full((x.shape[0],), float(t), device=x.device)
            eps = net(x, t_batch, None)
            x0 = (x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])
            if method == "ma":
                x0 = x0.clamp(-1, 1)
            mean = (math.sqrt(abar_prev[i]) * beta[i] / (1 - abar[i])) * x0 + \
                (math.sqrt(1 - beta[i]) * (1 - abar_prev[i]) / (1 - abar[i])) * x
            variance = post_var[i]
            if method == "adm":
                mean = mean + variance * cond_fn(x, t_batch)
            else:
                extra = max(0.0, gamma * sigma_max * math.sin(math.pi * (n - 1 - i) / n))
                mean = mean + (variance + extra) * cond_fn(x0, t_batch)
            x = mean + math.sqrt(variance) * torch.randn(x.shape, generator=g, device=x.device) if i < n - 1 else mean
        return x

    return run


def fastguide_classifier(net, clf, x_T, y, steps: int, method: str, compile: Optional[str] = None):
    schedule = fastguide.Schedule.ddpm(timestep_spacing="guided")
    spec = fastguide.ClassifierGuidance(clf, 1.0) if method == "adm" else \
        fastguide.ClassifierGuidance(clf, 1.0, input="x0", tau1=1.0, tau2=0.5, gamma=0.3)
    clip = None if method == "adm" else (-1.0, 1.0)

    def unconditional(x, t, _y):  # built once: compiled loops are cached per model object
        return net(x, t, None)

    def run():
        g = torch.Generator(device=x_T.device).manual_seed(0)
        return fastguide.sample(unconditional, x_T, schedule=schedule, sampler="ddpm",
                                steps=steps, y=y, guidance=[spec], generator=g, clip_denoised=clip,
                                compile=compile)

    return run


# ---------------------------------------------------------------------------------------------------
# Measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable, device: torch.device) -> float:
    """Seconds of one call, the device drained before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def count_ops(fn: Callable) -> int:
    with OpCounter() as counter:
        fn()
    return counter.count


@dataclass
class Case:
    """One configuration: its contenders, the networks' calls per step alone, and the results."""

    section: str
    network: str
    batch: int
    steps: int
    guidance: str
    baseline: str
    contenders: Dict[str, Callable] = field(default_factory=dict)
    counted: Sequence[str] = ()           # contenders whose ops are counted (eager ones)
    networks_alone: Optional[Callable] = None  # one step's network calls, by themselves
    notes: Dict[str, str] = field(default_factory=dict)
    times: Dict[str, List[float]] = field(default_factory=dict)


def _free_or_unet(name: str):
    return FreeNet() if name == "free" else SmallUNet()


def build_cases(device: torch.device, quick: bool) -> List[Case]:
    steps = 20 if quick else 50
    cases: List[Case] = []
    gen = torch.Generator().manual_seed(0)
    try:
        import k_diffusion  # noqa: F401
        k_note = ""
    except ImportError:
        k_note = ("k_diffusion is not installed: k-diffusion contender skipped (pip install k-diffusion; here its "
                  "dependencies would replace the installed torch)")
    cuda = device.type == "cuda"
    graphs = cudagraph.driver.supports(device)   # (the tests drive this path on the CPU with a stand-in)
    networks = {"free": FreeNet().to(device), "unet": SmallUNet().to(device)}
    for net in networks.values():
        net.eval()
    cfg_grid = [("free", 1), ("free", 8), ("unet", 1)] if quick else \
        [(n, b) for n in ("free", "unet") for b in (1, 8, 64)]
    for name, batch in cfg_grid:
        net = networks[name]
        x_T = torch.randn((batch,) + SHAPE, generator=gen).to(device)
        y = (torch.arange(batch) % NUM_CLASSES).to(device)
        case = Case("cfg", name, batch, steps, "CFG w=4 (DDIM)", "diffusers",
                    counted=("diffusers", "fastguide-dropin", "fastguide-eager"))
        case.contenders["diffusers"] = diffusers_cfg_loop(net, x_T, y, steps)
        case.contenders["fastguide-dropin"] = diffusers_cfg_loop(net, x_T, y, steps, dropin=True)
        case.contenders["fastguide-eager"] = fastguide_cfg(net, x_T, y, steps)
        # Compiling the UNet on two CPU cores takes minutes: the quick run compiles the free network only.
        if not (quick and name == "unet"):
            case.contenders["fastguide-inductor"] = fastguide_cfg(net, x_T, y, steps, compile="inductor")
        if cuda:
            case.contenders["fastguide-inductor-ro"] = fastguide_cfg(net, x_T, y, steps, compile="inductor",
                                                                     compile_options={"mode": "reduce-overhead"})
        if graphs:
            case.contenders["fastguide-graph"] = fastguide_cfg(net, x_T, y, steps, compile="graph")
        if k_note:
            case.notes["k-diffusion"] = k_note
        else:
            case.contenders["k-diffusion"] = k_diffusion_cfg(net, x_T, y, steps)
            case.counted = tuple(case.counted) + ("k-diffusion",)
        x_pair = torch.cat([x_T, x_T])
        t_pair = torch.full((2 * batch,), 500.0, device=device)
        y_pair = torch.cat([torch.full_like(y, NULL_LABEL), y])
        case.networks_alone = lambda net=net, x=x_pair, t=t_pair, yy=y_pair: net(x, t, yy)
        cases.append(case)

    clf = SmallClassifier().to(device)
    clf_grid = [("free", 8)] if quick else [("free", 8), ("unet", 8)]
    for name, batch in clf_grid:
        x_T = torch.randn((batch,) + SHAPE, generator=gen).to(device)
        y = (torch.arange(batch) % NUM_CLASSES).to(device)
        null = torch.full((batch,), NULL_LABEL, device=device)
        # Classifier guidance steers the unconditional model: the class-conditional UNet gets the null label.
        net = (lambda x, t, _y=None, net=networks[name], null=null: net(x, t, null))
        for method, label in (("adm", "ADM classifier (DDPM)"), ("ma", "Ma et al. x0 classifier (DDPM)")):
            case = Case("classifier", name, batch, steps, label, "gd-cond_fn",
                        counted=("gd-cond_fn", "fastguide-eager"))
            case.contenders["gd-cond_fn"] = gd_cond_fn_loop(net, clf, x_T, y, steps, method)
            case.contenders["fastguide-eager"] = fastguide_classifier(net, clf, x_T, y, steps, method)
            if not quick and name == "free":  # (the UNet's compile with autograd takes minutes on CPU)
                case.contenders["fastguide-inductor"] = fastguide_classifier(net, clf, x_T, y, steps, method,
                                                                             compile="inductor")
            if graphs:
                case.contenders["fastguide-graph"] = fastguide_classifier(net, clf, x_T, y, steps, method,
                                                                          compile="graph")
            t_b = torch.full((batch,), 500.0, device=device)

            def alone(net=net, clf=clf, x=x_T, t=t_b):
                net(x, t, None)
                with torch.enable_grad():
                    leaf = x.detach().requires_grad_(True)
                    torch.autograd.grad(clf(leaf, t).sum(), leaf)

            case.networks_alone = alone
            cases.append(case)
    return cases


def _case_label(case: Case) -> str:
    return f"{case.section}:{case.network}/B{case.batch}" + ("" if case.section == "cfg" else
                                                             f"/{case.guidance.split()[0]}")


def measure(cases: List[Case], device: torch.device, repeats: int, sample_s: float,
            progress=None) -> List[dict]:
    """Warm every contender up (compiles, captures), then time them interleaved ``repeats`` times; each timed
    sample runs a contender's loop often enough to last about ``sample_s`` seconds (timer and scheduler
    noise of these shared cores would swamp a single sub-millisecond loop). ``progress``: a
    ``fastguide.tools.cli.Progress`` told each stage (warm-ups, repeats, op counts) as it starts and ends."""
    if progress is None:
        from fastguide.tools.cli import Progress
        progress = Progress(None, "", enabled=False)
    progress.set_total(sum(len(c.contenders) + 1 for c in cases) + repeats + len(cases))
    inner: Dict[tuple, int] = {}
    for case in cases:
        case.contenders["_networks"] = lambda c=case: [c.networks_alone() for _ in range(c.steps)]
        for name, fn in case.contenders.items():
            progress.stage(f"warm-up {_case_label(case)} {name.lstrip('_')}")
            fn()
            inner[(id(case), name)] = max(1, math.ceil(sample_s / max(time_once(fn, device), 1e-6)))
            progress.advance()
    for r in range(repeats):
        progress.stage(f"timing, repeat {r + 1}/{repeats}")
        for case in cases:
            for name, fn in case.contenders.items():
                n = inner[(id(case), name)]
                case.times.setdefault(name, []).append(time_once(lambda: [fn() for _ in range(n)], device) / n)
        progress.advance()
    for case in cases:
        del case.contenders["_networks"]
    rows = []
    for case in cases:
        progress.stage(f"counting ops {_case_label(case)}")
        net_ops = count_ops(case.networks_alone)
        net_ms = 1e3 * statistics.median(case.times["_networks"]) / case.steps
        base_ms = 1e3 * statistics.median(case.times[case.baseline]) / case.steps
        for name, fn in case.contenders.items():
            ms = 1e3 * statistics.median(case.times[name]) / case.steps
            ops = ""
            if name in case.counted:
                ops = f"{(count_ops(fn) - case.steps * net_ops) / case.steps:.1f}"
            rows.append(dict(section=case.section, network=case.network, batch=case.batch, steps=case.steps,
                             guidance=case.guidance, contender=name,
                             samples_per_s=case.batch / (ms * case.steps / 1e3), ms_per_step=ms,
                             net_ms_per_step=net_ms, overhead_ms_per_step=ms - net_ms,
                             speedup=base_ms / ms, sampler_ops_per_step=ops, note=""))
        for name, note in case.notes.items():
            rows.append(dict(section=case.section, network=case.network, batch=case.batch, steps=case.steps,
                             guidance=case.guidance, contender=name, samples_per_s="", ms_per_step="",
                             net_ms_per_step="", overhead_ms_per_step="", speedup="", sampler_ops_per_step="",
                             note=note))
        progress.advance()
    return rows


# ---------------------------------------------------------------------------------------------------
# Output


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, "" where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model()
    if model:
        return model + f" ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def version(module: str) -> str:
    """``module.__version__``, or "none" where it is not installed."""
    try:
        return __import__(module).__version__
    except Exception:  # not installed: recorded as such
        return "none"


def within_noise(overhead_ms_per_step: float) -> bool:
    """The loop ran no slower than its networks timed alone: the sampler's overhead is below what this
    measurement resolves (the two medians differ by timing noise), so it is shown as "within noise" in the
    table and as an x in the plot, never as a negative cost."""
    return overhead_ms_per_step <= 0


WITHIN_NOISE = "within noise"


def format_overhead(v) -> str:
    """The overhead column's cell: ``WITHIN_NOISE`` where ``within_noise``, else the number."""
    if isinstance(v, (int, float)) and within_noise(v):
        return WITHIN_NOISE
    return _fmt(v)


def _fmt(v, digits=3) -> str:
    if v == "" or v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def print_table(rows: List[dict], out=None) -> None:
    out = out or sys.stdout
    header = ("section", "network", "batch", "guidance", "contender", "samples/s", "ms/step", "net ms/step",
              "overhead ms/step", "speedup", "ops/step")
    keys = ("section", "network", "batch", "guidance", "contender", "samples_per_s", "ms_per_step",
            "net_ms_per_step", "overhead_ms_per_step", "speedup", "sampler_ops_per_step")
    table = [header] + [tuple(format_overhead(r[k]) if k == "overhead_ms_per_step" else _fmt(r[k]) for k in keys)
                        for r in rows if r["note"] == ""]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) if j < 5 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))),
              file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)
    for note in sorted({r["note"] for r in rows if r["note"]}):
        print(f"note: {note}", file=out)


def write_csv(rows: List[dict], path: Path, meta: dict, float_format: str = ".6g") -> None:
    """Append ``rows`` to the CSV at ``path``, each prefixed by ``meta`` (device, versions, date); a header
    when the file is new. Floats are written with ``float_format``."""
    fields = list(meta) + list(rows[0])
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **{k: (format(v, float_format) if isinstance(v, float) else v)
                                        for k, v in row.items()}})


def plot(rows: List[dict], path: Path, title: str) -> str:
    """Bar chart of the overhead per step, one group per configuration; returns the library used."""
    measured = [r for r in rows if r["note"] == ""]
    groups = []
    for r in measured:
        g = f"{r['section']}:{r['network']}/B{r['batch']}" + ("" if r["section"] == "cfg" else
                                                           f"/{r['guidance'].split()[0]}")
        if g not in groups:
            groups.append(g)
    contenders = []
    for r in measured:
        if r["contender"] not in contenders:
            contenders.append(r["contender"])
    value = {(f"{r['section']}:{r['network']}/B{r['batch']}" + ("" if r["section"] == "cfg" else
                                                                 f"/{r['guidance'].split()[0]}"),
              r["contender"]): r["overhead_ms_per_step"] for r in measured}
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pil(groups, contenders, value, path, title)
        return "PIL"
    floor = min([v for v in value.values() if not within_noise(v)] or [1.0]) / 2  # where the x marks sit
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(groups)), 4.5))
    width = 0.8 / len(contenders)
    for j, c in enumerate(contenders):
        xs = [i + j * width for i, g in enumerate(groups) if (g, c) in value]
        ys = [value[(g, c)] for g in groups if (g, c) in value]
        ax.bar([x for x, y in zip(xs, ys) if not within_noise(y)], [y for y in ys if not within_noise(y)], width,
               label=c, color=f"C{j}")
        ax.plot([x for x, y in zip(xs, ys) if within_noise(y)], [floor] * sum(within_noise(y) for y in ys), "x",
                color=f"C{j}")
    ax.set_yscale("log")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"sampler overhead per step (ms, log; x: {WITHIN_NOISE})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return "matplotlib"


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def _plot_pil(groups, contenders, value, path: Path, title: str) -> None:
    """The same grouped bar chart (log scale) drawn with PIL."""
    from PIL import Image, ImageDraw
    bar_w, gap, left, top, bottom, height = 14, 18, 70, 40, 150, 320
    width = left + len(groups) * (len(contenders) * bar_w + gap) + 190
    img = Image.new("RGB", (width, top + height + bottom), "white")
    draw = ImageDraw.Draw(img)
    values = [v for v in value.values() if not within_noise(v)] or [1.0]
    lo = math.floor(math.log10(min(values)))
    hi = math.ceil(math.log10(max(values)))
    hi = hi if hi > lo else lo + 1

    def y_of(v):
        return top + height - (math.log10(v) - lo) / (hi - lo) * height

    draw.text((left, 8), title, fill="black")
    draw.line((left, top, left, top + height), fill="black")
    draw.line((left, top + height, width - 190, top + height), fill="black")
    for e in range(lo, hi + 1):
        y = y_of(10.0 ** e)
        draw.line((left - 4, y, width - 190, y), fill=(225, 225, 225))
        draw.text((5, y - 6), f"{10.0 ** e:g} ms", fill="black")
    for i, g in enumerate(groups):
        x0 = left + gap // 2 + i * (len(contenders) * bar_w + gap)
        for j, c in enumerate(contenders):
            if (g, c) in value:
                x = x0 + j * bar_w
                if not within_noise(value[(g, c)]):
                    draw.rectangle((x, y_of(value[(g, c)]), x + bar_w - 2, top + height),
                                   fill=_COLORS[j % len(_COLORS)])
                else:  # within_noise: drawn as an x
                    y = top + height - 8
                    draw.line((x, y - 5, x + bar_w - 3, y + 5), fill=_COLORS[j % len(_COLORS)], width=2)
                    draw.line((x, y + 5, x + bar_w - 3, y - 5), fill=_COLORS[j % len(_COLORS)], width=2)
        label = Image.new("RGB", (bottom - 10, 12), "white")
        ImageDraw.Draw(label).text((0, 0), g, fill="black")
        label = label.rotate(60, expand=True, fillcolor="white")
        img.paste(label, (x0, top + height + 4))
    for j, c in enumerate(contenders):
        y = top + 14 * j
        draw.rectangle((width - 180, y, width - 170, y + 10), fill=_COLORS[j % len(_COLORS)])
        draw.text((width - 165, y), c, fill="black")
    draw.text((width - 180, top + 14 * len(contenders) + 6), "overhead ms/step", fill="black")
    draw.text((width - 180, top + 14 * len(contenders) + 20), f"x: {WITHIN_NOISE}", fill="black")
    img.save(path)


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
    from fastguide.tools.cli import QUIET_HELP

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
    from fastguide.tools.cli import Progress, progress_enabled

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
