"""fastguide.examples.digits: data contract, shipped weights, documented accuracies, the demo."""

import io
import math
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import fastguide
from fastguide.tools import cli
from fastguide.examples import digits
from fastguide.examples.digits import data, evaluate


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle():
    return digits.load()


# ---- data -------------------------------------------------------------------------------------------

def test_split_is_fixed_disjoint_and_stratified():
    train, held = data.split_indices()
    assert len(train) + len(held) == 1797 and not set(train) & set(held)
    _, labels = data._raw()
    counts = np.bincount(labels[held], minlength=10) / np.bincount(labels, minlength=10)
    assert np.abs(counts - 0.2).max() < 0.02
    x, y = digits.load_real()
    assert x.shape == (359, 1, 8, 8) and y.shape == (359,) and x.min() == -1 and x.max() == 1


def test_to_sklearn_maps_back_to_the_sklearn_pixels():
    from sklearn.datasets import load_digits

    pixels = load_digits().data[:50]
    x = digits.from_sklearn(pixels)
    assert x.shape == (50, 1, 8, 8) and x.dtype == torch.float32
    np.testing.assert_allclose(digits.to_sklearn(x), pixels, atol=1e-5)
    out = digits.to_sklearn(torch.tensor([-1.5, 1.5, 0.0, 0.25]).repeat(16).reshape(1, 1, 8, 8))
    assert out.shape == (1, 64) and out[0, :4].tolist() == [0.0, 16.0, 8.0, 10.0]
    with pytest.raises(ValueError, match="1, 8, 8"):
        digits.to_sklearn(torch.zeros(2, 64))


# ---- evaluation tools --------------------------------------------------------------------------------

def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
    assert evaluate.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.0, 0.5, 3.0])
    assert evaluate.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # Doubling the spread around the mean: Tr(S + 4S - 2 * 2S) = Tr(S).
    mu = a.mean(0)
    assert evaluate.frechet_distance(a, mu + 2 * (a - mu)) == pytest.approx(np.trace(np.cov(a, rowvar=False)),
                                                                            rel=1e-6)


def test_png_writer_round_trip(tmp_path):
    image = (np.arange(7 * 5).reshape(7, 5) * 7).astype(np.uint8)
    path = tmp_path / "x.png"
    evaluate.write_png(str(path), image)
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color = struct.unpack(">IIBB", blob[16:26])
    assert (width, height, depth, color) == (5, 7, 8, 0)
    idat_len = struct.unpack(">I", blob[33:37])[0]
    assert blob[37:41] == b"IDAT"
    raw = zlib.decompress(blob[41:41 + idat_len])
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(7, 6)
    assert (rows[:, 0] == 0).all() and np.array_equal(rows[:, 1:], image)


def test_judge_is_strong_on_real_held_out_digits():
    assert evaluate.evaluator_accuracy_on_held_out() > 0.97


# ---- the shipped networks ------------------------------------------------------------------------------

def test_bundle_contract(bundle):
    b, x, t = bundle, torch.randn(6, 1, 8, 8), torch.tensor([0.0, 10.0, 100.0, 500.0, 900.0, 999.0])
    y = torch.tensor([0, 1, 2, 3, 9, digits.NULL_LABEL])
    assert b.model(x, t, y).shape == (6, 1, 8, 8)
    torch.testing.assert_close(b.model(x, t, None), b.model(x, t, torch.full((6,), digits.NULL_LABEL)))
    assert b.noisy_classifier(x, t).shape == (6, 10)
    torch.testing.assert_close(b.clean_classifier(x, t), b.clean_classifier(x, t.flip(0)))  # ignores t
    assert b.discriminator(x, t, y[:6].clamp(max=9)).shape == (6,)
    assert b.schedule.kind == "vp" and b.sampler in fastguide.samplers.SAMPLERS and b.steps >= 1
    assert tuple(b.image_shape) == (1, 8, 8)
    for net in (b.model, b.noisy_classifier, b.clean_classifier, b.discriminator):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert any(isinstance(m, nn.ReLU) for m in b.clean_classifier.modules())


def test_guidance_specs(bundle):
    assert digits.guidance("none", bundle) == []
    (cfg,) = digits.guidance("cfg", bundle)
    assert isinstance(cfg, fastguide.CFG) and cfg.null_label == digits.NULL_LABEL and cfg.scale > 1
    (adm,) = digits.guidance("adm", bundle)
    assert adm.classifier is bundle.noisy_classifier and adm.input == "xt" and adm.tau1 == adm.tau2 == 1
    (naive,) = digits.guidance("offshelf_xt", bundle)
    assert naive.classifier is bundle.clean_classifier and naive.input == "xt"
    assert (naive.tau1, naive.tau2, naive.gamma) == (1.0, 1.0, 0.0)
    (ma,) = digits.guidance("offshelf", bundle)
    assert ma.input == "x0" and ma.tau2 < ma.tau1 and ma.gamma > 0
    assert any(isinstance(m, nn.Softplus) for m in ma.classifier.modules())
    assert not any(isinstance(m, nn.ReLU) for m in ma.classifier.modules())
    (dg,) = digits.guidance("dg", bundle)
    assert isinstance(dg, fastguide.DiscriminatorGuidance) and dg.discriminator is bundle.discriminator
    with pytest.raises(ValueError, match="unknown"):
        digits.guidance("clip", bundle)


def test_shipped_classifiers_do_their_jobs(bundle):
    x, y = digits.load_real()
    with torch.no_grad():
        clean_acc = (bundle.clean_classifier(x, None).argmax(1) == y).double().mean().item()
        t = torch.full((len(y),), 100.0)
        noisy_x = fastguide.training.q_sample(bundle.schedule, x, t.long(), torch.randn(x.shape,
                                              generator=torch.Generator().manual_seed(0)))
        noisy_acc = (bundle.noisy_classifier(noisy_x, t).argmax(1) == y).double().mean().item()
        clean_on_noisy = (bundle.clean_classifier(noisy_x, None).argmax(1) == y).double().mean().item()
    assert clean_acc > 0.95 and noisy_acc > 0.9
    assert noisy_acc > clean_on_noisy  # the noisy classifier is the one trained for x_t


# Class accuracy (SVC judge) of 20 samples per class, seed 0, the bundle's sampler and steps, as documented in
# the README's digits section ("Reference accuracies checked by the tests"). Sampling is deterministic on one
# machine; across CPUs, BLAS and torch versions rounding differences can send a few trajectories elsewhere,
# which acts like drawing fresh samples, so the tolerance is the binomial sampling noise: 3 standard errors
# at n = 200 with p(1-p) floored at 0.05 * 0.95 (so near-perfect methods still get ~4.6 points), plus one
# sample.
REFERENCE_N_PER_CLASS = 20
REFERENCE_ACCURACY = {
    ("conditional", "none"): 1.000,
    ("conditional", "cfg"): 1.000,
    ("conditional", "adm"): 1.000,
    ("conditional", "offshelf_xt"): 1.000,
    ("conditional", "offshelf"): 1.000,
    ("conditional", "dg"): 1.000,
    ("unconditional", "none"): 0.100,
    ("unconditional", "adm"): 0.965,
    ("unconditional", "offshelf_xt"): 0.480,
    ("unconditional", "offshelf"): 0.945,
}


@pytest.mark.parametrize("setting, method", sorted(REFERENCE_ACCURACY))
def test_shipped_weights_reproduce_documented_accuracy(bundle, setting, method):
    y = torch.arange(10).repeat(REFERENCE_N_PER_CLASS)
    x = digits.sample(bundle, y, method, seed=0, unconditional=setting == "unconditional")
    acc = evaluate.class_accuracy(x, y)
    expected, n = REFERENCE_ACCURACY[(setting, method)], len(y)
    tolerance = 3 * math.sqrt(max(expected * (1 - expected), 0.05 * 0.95) / n) + 1 / n
    assert abs(acc - expected) <= tolerance, (setting, method, acc, expected, tolerance)


# ---- the demo ------------------------------------------------------------------------------------------

class FakeTTY(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


def test_demo_quick_runs_and_writes_the_labelled_grid(tmp_path, capsys, monkeypatch, bundle):
    from PIL import Image

    from fastguide.examples.digits import demo

    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)   # a terminal: the demo shows its stages there
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in digits.METHODS + ("x0^", "+ softplus", "+ joint temperatures", "+ sine schedule"):
        assert name in out
    assert "fastguide demo:" in err.getvalue() and "sampling and scoring offshelf (unconditional)" in err.getvalue()
    assert "sampling and scoring" not in out and "\r" not in out
    blob = (tmp_path / "digits_demo.png").read_bytes()
    width, height = struct.unpack(">II", blob[16:24])
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and width > height / 10 > 0
    assert "class acc" in (tmp_path / "digits_demo.txt").read_text()

    # Labelled: the bare grid (2 sample rows per band, one band per table row) sits at the bottom right, with
    # a margin of method/model labels to its left and class labels above it.
    n_bands = len(demo.configs(bundle)) + len(demo.ablation_configs(bundle))
    bands = [torch.zeros(2, 10, 1, 8, 8)] * n_bands
    bare = evaluate.grid_image(bands)
    image = np.asarray(Image.open(tmp_path / "digits_demo.png").convert("L"))
    h, w = bare.shape
    assert image.shape[0] > h and image.shape[1] > w
    top, left = image.shape[0] - h, image.shape[1] - w
    assert (image[top:top + 6, left:] == 96).all()             # the grid's own gray border, where expected
    band_rows, lefts, _ = evaluate._grid_layout(bands, 3, 1, 6)
    for band_top, band_h in band_rows:                           # every band has ink in its label margin
        margin = image[top + band_top:top + band_top + band_h, :left]
        assert (margin < 128).sum() > 20 and (margin > 200).mean() > 0.5
    header = image[:top, left:]
    for x in lefts:                                              # every column has a label above it
        assert (header[:, x:x + 24] < 128).sum() > 5
    assert "(labelled;" in out


def test_demo_grid_without_pillow_is_the_bare_grid(tmp_path, monkeypatch):
    from fastguide.examples.digits import demo

    rows = [demo.Row(f"m{i}", "conditional", 1.0, 1.0, None, 0.0, torch.rand(30, 1, 8, 8) * 2 - 1)
            for i in range(3)]
    path = str(tmp_path / "g.png")
    assert demo.write_grid(path, rows[:2], rows[2:], per_class=3)           # labelled, with Pillow
    labelled = struct.unpack(">II", open(path, "rb").read()[16:24])
    monkeypatch.setitem(sys.modules, "PIL", None)                              # no Pillow: bare grid
    assert not demo.write_grid(path, rows[:2], rows[2:], per_class=3)
    bare = evaluate.grid_image([r.samples[:20].reshape(2, 10, 1, 8, 8) for r in rows])
    assert struct.unpack(">II", open(path, "rb").read()[16:24]) == (bare.shape[1], bare.shape[0])
    assert labelled[0] > bare.shape[1] and labelled[1] > bare.shape[0]
