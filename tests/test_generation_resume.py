"""`fastguide generate` repairs damaged runs, refuses bad arguments and foreign run directories before any
work, and `fastguide evaluate` scores a set; the API form and the per-seed seeding contract.

One process throughout (the API and the CLI in this process; `python -m fastguide` once), digits at 5 steps.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastguide
from fastguide.generation import GenerateConfig, GenerationError, evaluate, generate
from fastguide.generation.generate import _resolve, sample_seeds
from fastguide.generation.models import digits_scores
from fastguide.tools import cli

ROOT = Path(__file__).resolve().parents[1]
SEEDS, STEPS, SHARD, BATCH = "0-39", 5, 8, 4
ARGS = ["--seeds", SEEDS, "--steps", str(STEPS), "--shard-size", str(SHARD), "--batch", str(BATCH),
        "--backend", "torch", "--threads", "1", "--quiet"]

pytestmark = pytest.mark.usefixtures("one_thread")  # the CLI's --threads 1 must not outlive this module


def config(out, **kw):
    base = dict(out=str(out), seeds=SEEDS, steps=STEPS, shard_size=SHARD, batch=BATCH, backend="torch", quiet=True)
    return GenerateConfig(**{**base, **kw})


def files(out: Path):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def arrays(path: Path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("finished") / "run"
    result = generate(config(out))
    return out, result


def test_api_result_and_manifest(finished):
    out, result = finished
    assert result.samples_path == str(out / "samples.npz") and result.num_samples == 40 and result.num_shards == 5
    assert result.generated == 40 and result.reused == 0 and result.samples_per_s > 0
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = manifest["config"]
    assert cfg["model"] == "digits" and cfg["method"] == "none" and cfg["steps"] == STEPS
    assert cfg["sampler"] == "ddpm" and cfg["seeds"] == SEEDS and cfg["shard_size"] == SHARD
    assert cfg["fastguide_version"] == fastguide.__version__ and cfg["label"] == "random"
    for entry in manifest["shards"]:
        side = json.loads((out / entry["file"]).with_suffix(".json").read_text())
        assert side["sha256"] == entry["sha256"]
    z = arrays(out / "samples.npz")
    assert z["arr_0"].shape == (40, 8, 8, 1) and z["arr_0"].dtype == np.uint8
    assert np.array_equal(z["seeds"], np.arange(40)) and z["arr_1"].dtype == np.int64


def test_each_sample_comes_from_its_own_seed(finished, one_thread):
    """Sample s = fastguide.sample from Generator(s): one randint for the label, then x_T, then the steps."""
    out, _ = finished
    shard = arrays(out / "shards" / "shard_00002.npz")
    seed = int(shard["seeds"][5])
    plan = _resolve(config(out))
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(10, (1,), generator=g)
    x_T = torch.randn(1, 1, 8, 8, generator=g)
    x = fastguide.sample(plan.net, x_T, schedule=plan.spec.schedule, sampler="ddpm", steps=STEPS, y=label,
                         guidance=[], generator=[g], clip_denoised=(-1.0, 1.0), backend="torch")
    assert int(shard["labels"][5]) == int(label)
    np.testing.assert_allclose(shard["samples"][5], x[0].numpy(), atol=1e-6, rtol=0)
    alone, labels = sample_seeds(plan, [seed])  # a batch of one: the same sample
    np.testing.assert_allclose(alone[0], shard["samples"][5], atol=1e-6, rtol=0)


def test_label_modes(tmp_path, one_thread):
    fixed = generate(config(tmp_path / "fixed", seeds="0-3", label=7, shard_size=4))
    assert (arrays(Path(fixed.samples_path))["arr_1"] == 7).all()
    cycle = generate(config(tmp_path / "cycle", seeds="8-11", label="cycle", shard_size=4))
    assert arrays(Path(cycle.samples_path))["arr_1"].tolist() == [8, 9, 0, 1]


def test_truncated_flipped_and_missing_shards_are_redone(tmp_path, finished):
    """Through `python -m fastguide generate`: damaged shards are found and redone, the rest kept."""
    src, _ = finished
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = files(out)
    shard = out / "shards"
    data = (shard / "shard_00001.npz").read_bytes()
    (shard / "shard_00001.npz").write_bytes(data[: len(data) // 2])              # truncated
    flipped = bytearray((shard / "shard_00003.npz").read_bytes())
    flipped[len(flipped) // 2] ^= 0x40
    (shard / "shard_00003.npz").write_bytes(bytes(flipped))                    # one flipped bit
    (shard / "shard_00004.json").unlink()                                       # killed before its sidecar
    (shard / "shard_00000.npz.tmp-dead").write_bytes(b"half")                   # a killed writer's temporary
    (out / "samples.npz").unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "fastguide", "generate", *ARGS[:-1], "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "redoing shard 1 (shard_00001.npz: size" in proc.stderr and "truncated" in proc.stderr
    assert "redoing shard 3 (shard_00003.npz: sha256 mismatch" in proc.stderr
    assert "redoing shard 4 (shard_00004.npz: no checksum sidecar" in proc.stderr
    assert "2 done, 3 to do" in proc.stderr
    after = files(out)
    assert sorted(after) == sorted(before)  # the temporary is gone, nothing extra
    for name in before:
        if name.endswith(".npz"):
            assert after[name] == before[name], name  # redone shards are byte for byte the originals
    runs = json.loads(after["manifest.json"])["runs"]
    assert runs[-1]["shards_generated"] == 3 and set(runs[-1]["shards_redone"]) == {"1", "3", "4"}


def test_a_different_configuration_is_refused_naming_what_differs(tmp_path, finished, capsys, one_thread):
    src, _ = finished
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = files(out)
    for extra, words in ((["--steps", "6"], "steps: 5 there, 6 now"),
                         (["--method", "cfg"], "method: 'none' there, 'cfg' now"),
                         (["--shard-size", "5"], "shard_size: 8 there, 5 now"),
                         (["--seeds", "0-40"], "seeds: '0-39' there, '0-40' now")):
        args = [a for a in ARGS]
        for flag, value in zip(extra[::2], extra[1::2]):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        assert cli.main(["generate", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "another configuration" in err and words in err, err
    assert files(out) == before
    with pytest.raises(GenerationError, match="label: 'random' there, 3 now"):
        generate(config(out, label=3))


def test_directory_with_foreign_shards_is_refused(tmp_path):
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard_00000.npz").write_bytes(b"x")
    with pytest.raises(GenerationError, match="holds shards but there is no manifest.json"):
        generate(config(out))


def test_unwritable_out_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file_not_dir"
    blocker.write_text("a regular file")
    for out in (blocker / "sub", blocker):
        assert cli.main(["generate", *ARGS, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and ("cannot create" in err or "not writable" in err), err
    assert blocker.read_text() == "a regular file"


@pytest.mark.parametrize("change, words", [
    (["--seeds", "5-3"], "--seeds: range '5-3' runs backwards"),
    (["--seeds", "0-9,3"], "--seeds: seed 3 listed more than once"),
    (["--seeds", "-4"], "--seeds"),
    (["--seeds", "x1"], "--seeds: cannot read 'x1'"),
    (["--label", "10"], "--label 10 is not a class of model digits (0..9)"),
    (["--method", "adm", "--cfg-scale", "2"], "--cfg-scale does not apply to --method adm (it takes "
                                              "--classifier-scale)"),
    (["--method", "nope"], "--method 'nope' is not a method of model digits"),
    (["--method", "cfg", "--cfg-scale", "-1"], "--cfg-scale must be a finite number >= 0"),
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--shard-size", "0"], "--shard-size must be a positive integer"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--sampler", "bogus"], "--sampler must be one of"),
    (["--backend", "bogus"], "--backend 'bogus'"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--unconditional", "--method", "cfg"], "--unconditional with --method cfg"),
    (["--model", "no_such_pkg_xyz:factory"], "--model 'no_such_pkg_xyz:factory': cannot import"),
    (["--timeout", "0"], "--timeout must be a positive number"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, change, words):
    out = tmp_path / "run"
    args = list(ARGS)
    for flag, value in zip(change[::2], change[1::2]) if "--unconditional" not in change else []:
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if "--unconditional" in change:
        args += change
    try:
        code = cli.main(["generate", *args, "--out", str(out)])
    except SystemExit as e:  # argparse's own refusals (wrong type)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert not out.exists()


def test_evaluate_scores_the_float_shards_and_falls_back_to_uint8(tmp_path, finished, capsys):
    src, _ = finished
    scores = evaluate(str(src))
    assert scores["source"] == "float shards" and scores["n"] == 40 and scores["model"] == "digits"
    assert 0.0 <= scores["accuracy"] <= 1.0 and np.isfinite(scores["fd"]) and scores["fd"] > 0
    assert sum(row["count"] for row in scores["per_class"].values()) == 40
    assert sum(row["predicted"] for row in scores["per_class"].values()) == 40
    z = arrays(src / "samples.npz")
    shards = [arrays(src / "shards" / f"shard_{i:05d}.npz")["samples"] for i in range(5)]
    exact = digits_scores(torch.from_numpy(np.concatenate(shards)), z["arr_1"])
    assert scores["accuracy"] == exact["accuracy"] and scores["fd"] == exact["fd"]  # the float samples exactly

    out = tmp_path / "copy"
    shutil.copytree(src, out)
    shutil.rmtree(out / "shards")
    approx = evaluate(str(out))
    assert approx["source"] == "uint8 samples.npz" and "float_unavailable" in approx
    assert abs(approx["accuracy"] - scores["accuracy"]) <= 2 / 40 and abs(approx["fd"] - scores["fd"]) < 1.0
    with pytest.raises(GenerationError, match="--source float"):
        evaluate(str(out), source="float")

    assert cli.main(["evaluate", str(src)]) == 0
    text = capsys.readouterr().out
    assert "class accuracy" in text and "FD" in text and "scored from float shards" in text
    assert cli.main(["evaluate", str(src), "--json", "--source", "uint8"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "uint8 samples.npz"
    assert cli.main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "no samples.npz" in capsys.readouterr().err
    assert cli.main(["evaluate", str(src), "--model", "fastguide.generation.models:digits"]) == 2
    assert "was generated by --model 'digits'" in capsys.readouterr().err
