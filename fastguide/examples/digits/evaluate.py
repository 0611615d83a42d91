"""How the digits demo judges samples, with tools that no guidance method uses.

* Class accuracy: an RBF support-vector classifier (scikit-learn ``SVC(gamma=0.001)``) fit on the raw
  training split (64 pixels, 0..16 scale). It is never used to guide, so guidance cannot "fool" it by
  exploiting its gradients.
* Fréchet distance (FD): ``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))`` between Gaussians fitted to
  two sets of 64-d pixel vectors on scikit-learn's 0..16 scale, against the held-out real digits. The
  feature space is the raw pixels: fixed, model-free and reproducible (FID's Inception features do not exist
  for 8x8 digits). Like FID it is biased upward for small sets, so only compare sets of the same size; the
  demo prints the FD of as many real training digits as a floor.
"""

from __future__ import annotations

import struct
import zlib
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from .data import held_out_arrays, to_sklearn, train_arrays


@lru_cache(maxsize=1)
def evaluator():
    """The fitted scikit-learn SVC that judges class accuracy (fit once per process on the training split)."""
    from sklearn.svm import SVC

    pixels, labels = train_arrays()
    return SVC(gamma=0.001, C=10.0).fit(pixels, labels)


def evaluator_accuracy_on_held_out() -> float:
    """How well the judge itself does on real held-out digits (the ceiling of the class accuracy column)."""
    pixels, labels = held_out_arrays()
    return float((evaluator().predict(pixels) == labels).mean())


def class_accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of samples ``x`` ([N, 1, 8, 8] in [-1, 1]) that the evaluator assigns their requested label ``y``.

    >>> class_accuracy(samples, labels)
    """
    pred = evaluator().predict(to_sklearn(x))
    return float((pred == y.cpu().numpy()).mean())


def _gaussian(features: np.ndarray):
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(cov)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` [N, D] and ``b`` [M, D].

    ``Tr((S_a S_b)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the symmetric
    ``S_a^(1/2) S_b S_a^(1/2)``, which has the same spectrum and needs no general matrix square root.

    >>> frechet_distance(to_sklearn(samples), held_out_arrays()[0])
    """
    mu_a, cov_a = _gaussian(a)
    mu_b, cov_b = _gaussian(b)
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0.0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def fd_to_held_out(x: torch.Tensor) -> float:
    """Fréchet distance of samples ``x`` to the held-out real digits in 0..16 pixel space."""
    return frechet_distance(to_sklearn(x), held_out_arrays()[0])


def real_floor_fd(n: int, seed: int = 0) -> float:
    """FD of ``n`` real *training* digits (drawn with replacement if ``n`` exceeds the split) to the held-out
    set: what a perfect generator would score with ``n`` samples."""
    pixels, _ = train_arrays()
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(pixels), size=n, replace=n > len(pixels))
    return frechet_distance(pixels[rows], held_out_arrays()[0])


# ---------------------------------------------------------------------------------------------------------
# A tiny PNG writer (8-bit grayscale), so the demo's grid needs neither Pillow nor matplotlib (its labels,
# ``labelled_grid_image``, are drawn with Pillow where it is installed).

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str, image: np.ndarray) -> None:
    """Write a 2-D uint8 array as an 8-bit grayscale PNG."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    h, w = image.shape
    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(h))  # filter type 0 on every row
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) \
        + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def _grid_layout(bands: Sequence[torch.Tensor], zoom: int, gap: int, band_gap: int):
    """Where ``grid_image`` puts things: (the top row and height of each band, the left column of each
    column of digits, the image's (height, width))."""
    columns = max(b.shape[1] for b in bands)
    cell = 8 * zoom
    heights = [b.shape[0] * (cell + gap) - gap for b in bands]
    tops = [band_gap + sum(heights[:i]) + band_gap * i for i in range(len(bands))]
    lefts = [band_gap + j * (cell + gap) for j in range(columns)]
    shape = (sum(heights) + band_gap * (len(bands) + 1), columns * (cell + gap) - gap + 2 * band_gap)
    return list(zip(tops, heights)), lefts, shape


def grid_image(bands: Sequence[torch.Tensor], zoom: int = 3, gap: int = 1, band_gap: int = 6) -> np.ndarray:
    """Tile samples into a uint8 image: one band per tensor in ``bands`` ([rows, columns, 1, 8, 8] each, in
    [-1, 1]), each digit enlarged ``zoom`` times (nearest neighbour), white ink on black, gray gaps."""
    cell = 8 * zoom
    band_rows, _, shape = _grid_layout(bands, zoom, gap, band_gap)
    out = np.full(shape, 96, dtype=np.uint8)
    for band, (top, _) in zip(bands, band_rows):
        pixels = ((band.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        for i in range(band.shape[0]):
            for j in range(band.shape[1]):
                r, c = top + i * (cell + gap), band_gap + j * (cell + gap)
                out[r:r + cell, c:c + cell] = np.kron(pixels[i, j, 0], np.ones((zoom, zoom), dtype=np.uint8))
    return out


def labelled_grid_image(bands: Sequence[torch.Tensor], band_labels: Sequence[Sequence[str]],
                        column_labels: Sequence[str], corner: str = "", zoom: int = 3, gap: int = 1,
                        band_gap: int = 6, font_size: int = 12) -> np.ndarray:
    """``grid_image`` with a white margin of labels, drawn with Pillow: to the left of each band its lines of
    ``band_labels`` (e.g. method, model), above each column its ``column_labels`` entry (e.g. the class),
    and ``corner`` above the band labels. The grid itself sits unchanged at the bottom right.

    >>> labelled_grid_image(bands, [("cfg", "conditional model")], [str(c) for c in range(10)], "class")
    """
    from PIL import Image, ImageDraw, ImageFont

    if len(band_labels) != len(bands):
        raise ValueError(f"{len(bands)} bands but {len(band_labels)} band labels")
    try:
        font = ImageFont.load_default(size=font_size)
    except (TypeError, ValueError, OSError):  # an older Pillow, or one without FreeType: its bitmap font
        font = ImageFont.load_default()
    grid = grid_image(bands, zoom, gap, band_gap)
    band_rows, lefts, _ = _grid_layout(bands, zoom, gap, band_gap)
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))

    def size(text):
        x0, y0, x1, y1 = measure.textbbox((0, 0), text, font=font)
        return x1 - x0, y1

    line_h = max(size(t)[1] for t in ("Ag", *column_labels, corner)) + 2
    # A band too short for its lines (one sample row) gets them joined on one line.
    band_labels = [[", ".join(lines)] if len(lines) > 1 and line_h * len(lines) > height + band_gap else
                   list(lines) for lines, (_, height) in zip(band_labels, band_rows)]
    pad = 6
    left = pad + max([size(t)[0] for lines in band_labels for t in lines] + [size(corner)[0]]) + pad
    top = pad + line_h + 2
    image = Image.new("L", (left + grid.shape[1], top + grid.shape[0]), 255)
    image.paste(Image.fromarray(grid), (left, top))  # uint8 2-D: mode "L"
    draw = ImageDraw.Draw(image)
    cell = 8 * zoom
    for label, x in zip(column_labels, lefts):
        w, _ = size(label)
        draw.text((left + x + (cell - w) // 2, pad), label, fill=0, font=font)
    if corner:
        draw.text((left - pad - size(corner)[0], pad), corner, fill=0, font=font)
    for lines, (band_top, height) in zip(band_labels, band_rows):
        y = top + band_top + max(0, (height - line_h * len(lines)) // 2)
        for k, line in enumerate(lines):
            draw.text((pad, y + k * line_h), line, fill=0 if k == 0 else 80, font=font)
    return np.asarray(image, dtype=np.uint8)
