"""``benchmarks/step_gpu.py`` runs end to end, and what it times computes the diffusers step.

The script is for a GPU; its ``run`` also takes a CPU device (host clock instead of CUDA events) so its
plumbing and, above all, its correctness check can run here: every timed method's output is compared with
the eager diffusers step (CFG combine + ``DDIMScheduler.step``) and the error lands in the CSV. Triton runs
in its interpreter. The CPU times are meaningless and go to a temporary file.
"""

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

import fastguide

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("step_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_gpu_plumbing_and_parity_on_the_cpu(tmp_path, one_thread):
    pytest.importorskip("diffusers")
    if not fastguide.backends()["triton"]:
        pytest.skip("triton cannot run here")
    step_gpu = _load()
    out = tmp_path / "step.csv"
    args = step_gpu.parse_args(["--sizes", "1x2x3x5,2x4x8x8", "--dtypes", "float32,float16",
                                "--methods", "copy,triton,triton_launcher,compile,diffusers", "--warmup", "0",
                                "--repeats", "1", "--target-ms", "0.01", "--out", str(out)])
    step_gpu.run(args, torch.device("cpu"))
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * 2 * 5
    for r in rows:
        assert r["device"].startswith("cpu") and r["torch"] == torch.__version__ and r["date"]
        assert float(r["median_us"]) > 0
        if r["method"] != "copy" and r["method"] != "diffusers":
            # fp16: diffusers rounds every op to fp16; the step's outputs reach ~20, where an fp16 ulp is 0.016.
            tol = 1e-5 if r["dtype"] == "float32" else 4 * 0.016
            assert float(r["max_abs_err_vs_diffusers"]) < tol, r
    # The bytes a step must move: read x, u, c and write out.
    first = rows[0]
    assert int(first["bytes_moved"]) == 4 * 30 * 4


def test_step_gpu_refuses_to_time_the_interpreter_or_a_missing_gpu(capsys, monkeypatch):
    step_gpu = _load()
    assert step_gpu.main(["--list", "--sizes", "2x4x64x64"]) == 0
    assert "2x4x64x64" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert step_gpu.main(["--sizes", "2x4x64x64"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def _load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    import sys

    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_serve_benchmark_quick_run(tmp_path):
    """``benchmarks/serve.py --quick``: every policy serves the same Poisson trace at every rate, all requests
    complete, and the engine's model rows are exactly the rows the mix needs (scale-1 traffic costs no
    uncond rows); the CSV holds one row per rate x policy and the plot is written."""
    from PIL import Image

    serve = _load_script("serve")
    out = tmp_path / "serve.csv"
    threads = torch.get_num_threads()
    assert serve.main(["--quick", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # restored
    rows = list(csv.DictReader(out.open()))
    rates = sorted({float(r["rate_rps"]) for r in rows})
    assert len(rates) == 2 and len(rows) == 2 * 3
    assert {(float(r["rate_rps"]), r["policy"]) for r in rows} == {(x, p) for x in rates for p in serve.POLICIES}
    for r in rows:
        assert r["model"] == "digits" and r["torch"] == torch.__version__ and r["quick"] == "1"
        assert r["device"] and r["date"] and r["threads"] == "1" and r["backend"] == "auto"
        assert int(r["completed"]) == int(r["requests"]) > 0 and int(r["failed"]) == 0
        assert float(r["throughput_rps"]) > 0 and float(r["p99_s"]) >= float(r["p50_s"]) > 0
        assert float(r["model_rows_per_req"]) == pytest.approx(float(r["ideal_rows_per_req"]), rel=1e-3)
        assert float(r["rows_per_req_scale1"]) < float(r["rows_per_req_cfg"])
        assert float(r["model_rows_per_req"]) < float(r["dense_rows_per_req"])
        if r["policy"] == "sequential":
            assert float(r["mean_batch"]) == 1.0
    same = {}
    for r in rows:  # the same trace for every policy of a rate
        same.setdefault(r["rate_rps"], set()).add((r["requests"], r["ideal_rows_per_req"]))
    assert all(len(v) == 1 for v in same.values())
    with Image.open(out.with_suffix(".png")) as img:
        assert img.size[0] > 100 and img.size[1] > 100


def test_step_cpu_guider_rows_quick_run(tmp_path):
    """``benchmarks/step_cpu.py --guiders-only --quick``: each of the six diffusers guiders with DDIM and Euler,
    at 1 and 2 threads, has its fg.step / kernels / diffusers rows, every one checked against the fp64 diffusers
    step; the fused path dispatches more ops than its bare kernels; the thread count is restored; the CSV
    carries device, versions and the threads of each row."""
    pytest.importorskip("diffusers")
    if not fastguide.backends()["cpp"]:
        pytest.skip("the benchmark times the cpp backend")
    step_cpu = _load_script("step_cpu")
    out = tmp_path / "guiders.csv"
    threads = torch.get_num_threads()
    step_cpu.main(["--guiders-only", "--quick", "--guider-threads", "1,2", "--guider-schedulers", "ddim,euler",
                   "--guider-csv", str(out)])
    assert torch.get_num_threads() == threads
    rows = list(csv.DictReader(out.open()))
    keys = {(r["scheduler"], r["threads"], r["guider"], r["method"]) for r in rows}
    assert len(rows) == len(keys) == 2 * 2 * 6 * 3
    assert {r["guider"] for r in rows} == set(step_cpu.GUIDERS)
    assert {r["diffusers_class"] for r in rows} == {cls for cls, _ in step_cpu.GUIDERS.values()}
    for r in rows:
        assert r["device"] and r["date"] and r["torch"] == torch.__version__ and r["diffusers"] and r["quick"] == "1"
        assert r["size"] == "SD latent" and r["shape"] == "2x4x64x64" and r["threads"] in ("1", "2")
        assert float(r["median_us"]) >= float(r["p10_us"]) > 0
        assert float(r["max_abs_err_vs_fp64"]) < 1e-4, r
    ops = {(r["scheduler"], r["guider"], r["method"]): int(r["ops_per_step"]) for r in rows}
    for kind in ("ddim", "euler"):
        for guider in step_cpu.GUIDERS:
            kernels, fused, diffusers = (ops[kind, guider, m] for m in ("kernels", "fg.step", "diffusers"))
            # (not fewer than diffusers' everywhere: with Euler, MAMBO-G's [B]-sized coefficient ops outnumber
            # diffusers' few full-size ones)
            assert 1 <= kernels < fused and diffusers > 1, (kind, guider, kernels, fused, diffusers)
    assert ops["ddim", "CFG", "kernels"] == 1      # no gram: the fused step alone


def test_step_cpu_dtypes_checks_and_times_each_dtype(tmp_path, one_thread):
    """``benchmarks/step_cpu_dtypes.py``: each dtype's result checked against the reference, then timed; one row
    per dtype and method, fp32's own ratio exactly 1; bad sizes refused."""
    if fastguide.backends(reasons=True)["cpp"]:
        pytest.skip("the C++ backend is not built")
    spec = importlib.util.spec_from_file_location("step_cpu_dtypes", SCRIPT.parent / "step_cpu_dtypes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "dtypes.csv"
    assert script.main(["--sizes", "2x3x5x7", "--repeats", "2", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert sorted((r["dtype"], r["timed"]) for r in rows) == sorted(
        (d, t) for d in ("float32", "float16", "bfloat16") for t in ("guided_step", "kernel"))
    assert all(float(r["median_us"]) > 0 for r in rows)
    assert all(float(r["vs_fp32"]) == 1.0 for r in rows if r["dtype"] == "float32")
    with pytest.raises(SystemExit):
        script.parse_args(["--sizes", "2x0x3"])
