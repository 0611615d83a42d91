"""``fastguide bench --quick`` end to end: a table on stdout, a CSV with device and versions, a PNG; progress
on stderr only when it is a terminal; overheads at or below zero read "within noise" in table and plot."""

import csv
import io
import sys

import torch
from PIL import Image

from fastguide.tools import bench


class FakeTTY(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


def _row(contender, overhead, ms=1.0):
    return dict(section="cfg", network="free", batch=1, steps=20, guidance="CFG w=4 (DDIM)", contender=contender,
                samples_per_s=50.0, ms_per_step=ms, net_ms_per_step=ms - overhead, overhead_ms_per_step=overhead,
                speedup=1.0, sampler_ops_per_step="6.2", note="")


def test_table_says_within_noise_for_an_overhead_at_or_below_zero():
    assert bench.format_overhead(-0.112) == bench.format_overhead(0.0) == "within noise"
    assert bench.format_overhead(0.25) == "0.25" and bench.format_overhead("") == "-"
    out = io.StringIO()
    bench.print_table([_row("diffusers", 0.343), _row("fastguide-eager", -0.112)], out)
    lines = out.getvalue().splitlines()
    assert "overhead ms/step" in lines[0]
    (eager,) = [line for line in lines if "fastguide-eager" in line]
    (base,) = [line for line in lines if "diffusers" in line]
    assert "within noise" in eager and "-0.112" not in out.getvalue()
    assert "0.343" in base and "within noise" not in base


def test_table_and_plot_share_one_noise_rule(tmp_path, monkeypatch):
    calls = []

    def everything_is_noise(v):
        calls.append(v)
        return True

    monkeypatch.setattr(bench.report, "within_noise", everything_is_noise)
    out = io.StringIO()
    bench.print_table([_row("diffusers", 0.343)], out)
    assert "within noise" in out.getvalue() and "0.343" not in out.getvalue()
    assert calls == [0.343]
    calls.clear()
    bench.plot([_row("diffusers", 0.343), _row("fastguide-eager", -0.112)], tmp_path / "p.png", "t")
    assert 0.343 in calls and -0.112 in calls


def test_bench_quick_writes_table_csv_and_plot(tmp_path, capsys, monkeypatch):
    threads = torch.get_num_threads()
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)   # a terminal: progress shows there
    assert bench.main(["--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # restored
    captured = capsys.readouterr()
    out = captured.out
    assert "fastguide-eager" in out and "diffusers" in out and "gd-cond_fn" in out
    assert "fastguide bench:" in err.getvalue() and "warm-up" in err.getvalue() and "counting ops" in err.getvalue()
    assert "warm-up" not in out and "\r" not in out   # results only on stdout
    rows = list(csv.DictReader((tmp_path / "bench_cpu.csv").open()))
    measured = [r for r in rows if r["ms_per_step"]]
    assert {r["contender"] for r in measured} >= {"diffusers", "fastguide-dropin", "fastguide-eager",
                                                 "fastguide-inductor", "gd-cond_fn"}
    for r in rows:
        assert r["device"] and r["torch"] == torch.__version__ and r["diffusers"] and r["date"]
    for r in measured:
        assert float(r["ms_per_step"]) > 0 and float(r["samples_per_s"]) > 0
        assert abs(float(r["ms_per_step"]) - float(r["net_ms_per_step"]) - float(r["overhead_ms_per_step"])) < 1e-3
    baseline = [r for r in measured if r["contender"] in ("diffusers", "gd-cond_fn")]
    assert all(abs(float(r["speedup"]) - 1.0) < 1e-9 for r in baseline)
    eager_ops = [float(r["sampler_ops_per_step"]) for r in measured
                 if r["contender"] == "fastguide-eager" and r["section"] == "cfg"]
    diffusers_ops = [float(r["sampler_ops_per_step"]) for r in measured
                     if r["contender"] == "diffusers" and r["section"] == "cfg"]
    assert eager_ops and max(eager_ops) < min(diffusers_ops)
    image = Image.open(tmp_path / "bench_cpu.png")
    assert image.size[0] > 200 and image.size[1] > 200


def test_bench_graph_contenders_run_through_the_capture_path(tmp_path, monkeypatch):
    """On a GPU the bench times ``compile="graph"`` loops; here the CUDA runtime is replaced by the CPU
    stand-in of ``tests/graph_replay_emu.py`` so that code path runs too. The stand-in's times measure
    nothing and are not kept; what is checked is that every graph contender runs and reports."""
    from graph_replay_emu import ReplayDriver

    from fastguide.native import cudagraph

    cudagraph.clear_graph_cache()
    monkeypatch.setattr(cudagraph, "driver", ReplayDriver())
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)   # a terminal, but --quiet: no progress
    try:
        assert bench.main(["--quick", "--repeats", "1", "--quiet", "--out", str(tmp_path)]) == 0
    finally:
        cudagraph.clear_graph_cache()
    assert err.getvalue() == ""
    rows = list(csv.DictReader((tmp_path / "bench_cpu.csv").open()))
    graph = [r for r in rows if r["contender"] == "fastguide-graph"]
    assert {r["section"] for r in graph} == {"cfg", "classifier"}
    assert len(graph) == 5   # 3 CFG configurations, ADM and Ma et al. classifier guidance
    assert all(float(r["ms_per_step"]) > 0 for r in graph)
    assert cudagraph.cached_graph_count() == 0
