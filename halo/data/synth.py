"""``halo-synth``: a synthetic cohort of pyramidal tiled TIFF slides with labels.

Each slide is H&E-like tissue on glass, rendered in optical-density space from
haematoxylin and eosin stain vectors: fibrous pink stroma with small purple
nuclei. A positive ("tumour") slide also has one to three small regions (a few
percent of the tissue area) of denser, larger, darker nuclei, so the label
depends on a small region that a model has to find, as in metastasis detection.
Ground-truth tumour masks are saved at the coarsest level's scale.

Files written to ``out_dir``: ``slide_000.tif`` ... (generic tiled TIFF, a
series of 2x-reduced levels, mpp in the resolution tags, read by OpenSlide),
``slide_000_mask.png`` ... and ``labels.csv`` with columns
``slide,label,split,mask,tumour_fraction``. Everything is deterministic in the seed.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["CLASSES", "make_cohort", "make_slide", "render_tissue", "write_pyramid", "main"]

CLASSES: tuple[str, str] = ("normal", "tumour")
"""Label names written to ``labels.csv`` (index 0 negative, 1 positive)."""

_H = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
_GLASS = 246.0


def write_pyramid(
    path: str | os.PathLike[str],
    image: np.ndarray,
    mpp: float | None = 0.5,
    levels: int = 3,
    tile: int = 256,
    compression: str | None = "zlib",
) -> None:
    """Write an RGB image as a pyramidal tiled TIFF that OpenSlide's generic-tiff reader opens.

    Levels are separate TIFF directories, each halved (2x2 mean) from the previous;
    mpp goes in X/YResolution with ResolutionUnit centimeter (``openslide.mpp-x``).

    Parameters
    ----------
    path:
        Output file.
    image:
        ``uint8`` ``(height, width, 3)``, level 0.
    mpp:
        Microns per level-0 pixel, or None to write no resolution.
    levels:
        Number of pyramid levels (stops early when a level would be < 1 pixel).
    tile:
        Tile side, a multiple of 16.
    compression:
        ``"zlib"`` (lossless, fast), or None.
    """
    import tifffile

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (height, width, 3), got {image.dtype} {image.shape}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    img = image
    with tifffile.TiffWriter(path, bigtiff=img.nbytes > 2**31) as tw:
        for lv in range(levels):
            kw: dict[str, object] = {}
            if mpp is not None:
                ppcm = 1e4 / (mpp * 2**lv)
                kw = {"resolution": (ppcm, ppcm), "resolutionunit": "CENTIMETER"}
            tw.write(
                img,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                compressionargs={"level": 1} if compression == "zlib" else None,
                subfiletype=1 if lv else 0,
                metadata=None,
                **kw,
            )
            h, w = img.shape[0] // 2, img.shape[1] // 2
            if h < 1 or w < 1:
                break
            img = img[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
            img = np.rint(img).astype(np.uint8)


def _field(rng: np.random.Generator, shape: tuple[int, int], low: tuple[int, int], sigma: tuple[float, float]
           ) -> np.ndarray:
    """Smooth noise of ``shape``: low-resolution Gaussian noise, blurred, bilinearly upsampled, unit std."""
    from scipy.ndimage import gaussian_filter, zoom

    f = gaussian_filter(rng.standard_normal(low), sigma, mode="wrap")
    f = zoom(f, (shape[0] / low[0], shape[1] / low[1]), order=1, grid_mode=True, mode="grid-wrap")
    f = f[: shape[0], : shape[1]]
    return (f - f.mean()) / (f.std() + 1e-9)


def _stamp(target: np.ndarray, ys: np.ndarray, xs: np.ndarray, radius: int, value: np.ndarray) -> None:
    """Draw soft discs of ``radius`` at ``(ys, xs)`` into ``target`` (max-composite), in place."""
    r = np.arange(-radius - 1, radius + 2)
    dy, dx = np.meshgrid(r, r, indexing="ij")
    prof = np.clip(radius + 0.5 - np.hypot(dy, dx), 0.0, 1.0).ravel()
    keep = prof > 0
    dy, dx, prof = dy.ravel()[keep], dx.ravel()[keep], prof[keep]
    h, w = target.shape
    yy = np.clip(ys[:, None] + dy[None, :], 0, h - 1)
    xx = np.clip(xs[:, None] + dx[None, :], 0, w - 1)
    np.maximum.at(target.ravel(), (yy * w + xx).ravel(), (value[:, None] * prof[None, :]).ravel())


def _nuclei(rng: np.random.Generator, region: np.ndarray, density: float, radii: tuple[int, int],
            intensity: tuple[float, float], target: np.ndarray) -> None:
    """Scatter nuclei over ``region`` (bool) at ``density`` per pixel; radii and intensity ranges."""
    h, w = region.shape
    n = rng.poisson(density * h * w)
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    inside = region[ys, xs]
    ys, xs = ys[inside], xs[inside]
    rad = rng.integers(radii[0], radii[1] + 1, ys.size)
    val = rng.uniform(intensity[0], intensity[1], ys.size)
    for r in np.unique(rad):
        sel = rad == r
        _stamp(target, ys[sel], xs[sel], int(r), val[sel])


def render_tissue(
    rng: np.random.Generator, size: tuple[int, int], tumour: bool, tumour_fraction: tuple[float, float] = (0.02, 0.05)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one slide at level 0.

    Parameters
    ----------
    rng:
        Random generator (the slide is a pure function of its state).
    size:
        ``(width, height)`` in pixels.
    tumour:
        Add tumour regions.
    tumour_fraction:
        Range of the tumour area as a fraction of the tissue area.

    Returns
    -------
    image:
        ``uint8`` ``(height, width, 3)``.
    tissue:
        ``bool`` ``(height, width)``.
    tumour_mask:
        ``bool`` ``(height, width)`` (all False for a negative slide).
    """
    from scipy.ndimage import distance_transform_edt

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.42, 0.58), w * rng.uniform(0.42, 0.58)
    ay, ax = h * rng.uniform(0.28, 0.38), w * rng.uniform(0.28, 0.38)
    env = 1.0 - np.hypot((yy - cy) / ay, (xx - cx) / ax)
    tissue = env + 0.25 * _field(rng, (h, w), (12, 16), (1.0, 1.0)).astype(np.float32) > 0.0
    del yy, xx, env
    tumour_mask = np.zeros((h, w), bool)
    if tumour:
        area = tissue.sum() * rng.uniform(*tumour_fraction)
        k = int(rng.integers(1, 4))
        radius = math.sqrt(area / k / math.pi)
        step = 8
        dist = distance_transform_edt(tissue[::step, ::step]) * step
        for _ in range(k):
            ok = np.argwhere(dist > radius * 1.4)
            if ok.size == 0:
                ok = np.argwhere(dist >= dist.max())
            py, px = ok[rng.integers(len(ok))] * step
            y0, y1 = max(0, int(py - 1.5 * radius)), min(h, int(py + 1.5 * radius) + 1)
            x0, x1 = max(0, int(px - 1.5 * radius)), min(w, int(px + 1.5 * radius) + 1)
            ly, lx = np.mgrid[y0:y1, x0:x1]
            ang = np.arctan2(ly - py, lx - px)
            wob = 1 + 0.15 * np.sin(3 * ang + rng.uniform(0, 6.3)) + 0.1 * np.sin(5 * ang + rng.uniform(0, 6.3))
            tumour_mask[y0:y1, x0:x1] |= np.hypot(ly - py, lx - px) < radius * wob
        tumour_mask &= tissue
    stroma = tissue & ~tumour_mask
    fib = _field(rng, (h, w), (h // 8, w // 64), (0.7, 1.5)).astype(np.float32)
    conc_e = np.where(tissue, 0.45 + 0.12 * fib, 0.0).astype(np.float32)
    conc_h = np.where(tissue, 0.06 + 0.02 * fib, 0.0).astype(np.float32)
    nuc = np.zeros((h, w), np.float32)
    _nuclei(rng, stroma, 1 / 260, (2, 4), (0.55, 0.85), nuc)
    if tumour:
        conc_e[tumour_mask] *= 0.7
        conc_h[tumour_mask] += 0.12
        _nuclei(rng, tumour_mask, 1 / 70, (5, 8), (1.1, 1.5), nuc)
    conc_h = np.maximum(conc_h, nuc)
    od = conc_h[..., None] * _H.astype(np.float32) + conc_e[..., None] * _E.astype(np.float32)
    img = _GLASS * np.exp(-od) + rng.normal(0.0, 2.0, (h, w, 1)).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), tissue, tumour_mask


def make_slide(
    out_dir: str | os.PathLike[str], name: str, seed: int, index: int, tumour: bool,
    size: tuple[int, int], mpp: float, levels: int,
) -> tuple[str, str, float]:
    """Render and write one slide and its mask; returns ``(tif name, mask name, tumour fraction)``."""
    from PIL import Image

    rng = np.random.default_rng([seed, index, int(tumour)])
    img, tissue, tmask = render_tissue(rng, size, tumour)
    out = Path(out_dir)
    write_pyramid(out / f"{name}.tif", img, mpp=mpp, levels=levels)
    f = 2 ** (levels - 1)
    h, w = tmask.shape[0] // f, tmask.shape[1] // f
    small = tmask[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3)) >= 0.5
    Image.fromarray((small * 255).astype(np.uint8)).save(out / f"{name}_mask.png")
    frac = float(tmask.sum() / max(1, tissue.sum()))
    return f"{name}.tif", f"{name}_mask.png", frac


def make_cohort(
    out_dir: str | os.PathLike[str],
    slides: int = 40,
    seed: int = 0,
    size: tuple[int, int] = (2048, 1536),
    mpp: float = 0.5,
    levels: int = 3,
    val_fraction: float = 0.25,
    workers: int | None = None,
) -> Path:
    """Write a synthetic cohort and its ``labels.csv``; deterministic in ``seed``.

    Parameters
    ----------
    out_dir:
        Directory to write to (created).
    slides:
        Number of slides; half (rounded down) are tumour.
    seed:
        Seed of everything.
    size:
        ``(width, height)`` of level 0; both are rounded down to a multiple of
        ``2 ** (levels - 1)`` so every level halves exactly.
    mpp:
        Microns per level-0 pixel; level ``L`` has ``mpp * 2**L``.
    levels:
        Pyramid levels.
    val_fraction:
        Fraction of each class in the ``val`` split (stratified, at least one each
        when a class has two or more slides).
    workers:
        Processes to render with (default: up to 2).

    Returns
    -------
    pathlib.Path
        Path of ``labels.csv``.
    """
    if slides < 1:
        raise ValueError(f"slides must be >= 1, got {slides}")
    f = 2 ** (levels - 1)
    size = (size[0] // f * f, size[1] // f * f)
    if min(size) < 16 * f:
        raise ValueError(f"size {size} too small for {levels} levels")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(slides)])
    rng.shuffle(labels)
    split = np.array(["train"] * slides, dtype=object)
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(val_fraction * idx.size))
        if idx.size >= 2:
            n_val = max(1, min(n_val, idx.size - 1))
        split[idx[:n_val]] = "val"
    names = [f"slide_{i:03d}" for i in range(slides)]
    args = [(out, names[i], seed, i, bool(labels[i]), size, mpp, levels) for i in range(slides)]
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    if workers > 1 and slides > 1:
        with ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(make_slide, *zip(*args)))
    else:
        results = [make_slide(*a) for a in args]
    csv_path = out / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["slide", "label", "split", "mask", "tumour_fraction"])
        for i, (tif, mask, frac) in enumerate(results):
            wr.writerow([tif, CLASSES[labels[i]], split[i], mask, f"{frac:.4f}"])
    return csv_path


def main(argv: list[str] | None = None) -> int:
    """Command line: ``halo-synth --out data/synth --slides 40 --seed 0``."""
    p = argparse.ArgumentParser(prog="halo-synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/synth", help="output directory (default data/synth)")
    p.add_argument("--slides", type=int, default=40, help="number of slides (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, nargs=2, default=(2048, 1536), metavar=("WIDTH", "HEIGHT"),
                   help="level-0 size in pixels (default 2048 1536)")
    p.add_argument("--mpp", type=float, default=0.5, help="microns per level-0 pixel (default 0.5)")
    p.add_argument("--levels", type=int, default=3, help="pyramid levels (default 3)")
    p.add_argument("--workers", type=int, default=None, help="processes (default up to 2)")
    a = p.parse_args(argv)
    t = time.perf_counter()
    path = make_cohort(a.out, slides=a.slides, seed=a.seed, size=tuple(a.size), mpp=a.mpp,
                       levels=a.levels, workers=a.workers)
    print(f"wrote {a.slides} slides and {path} in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
