"""``fastguide bench --quick`` end to end: a table on stdout, a CSV with device and versions, a PNG."""

import csv

import torch
from PIL import Image

from fastguide.tools import bench


def test_bench_quick_writes_table_csv_and_plot(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert bench.main(["--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # restored
    out = capsys.readouterr().out
    assert "fastguide-eager" in out and "diffusers" in out and "gd-cond_fn" in out
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
    try:
        assert bench.main(["--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    finally:
        cudagraph.clear_graph_cache()
    rows = list(csv.DictReader((tmp_path / "bench_cpu.csv").open()))
    graph = [r for r in rows if r["contender"] == "fastguide-graph"]
    assert {r["section"] for r in graph} == {"cfg", "classifier"}
    assert len(graph) == 5   # 3 CFG configurations, ADM and Ma et al. classifier guidance
    assert all(float(r["ms_per_step"]) > 0 for r in graph)
    assert cudagraph.cached_graph_count() == 0
