"""What ``fastguide bench`` reports: the machine and versions, the table, the CSV and the plot."""

from __future__ import annotations

import csv
import math
import os
import platform
import sys
from pathlib import Path
from typing import List

import torch

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
