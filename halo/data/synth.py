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

Two tasks (``--task``):

``coarse`` (the default, described above)
    The tumour is darker and denser, so it is visible at any resolution a model trains at.
``fine``
    A cohort where resolution matters (:func:`render_fine`, parameters in :data:`FINE`). Slides are
    2048 x 2048 px by default (about 1 mm x 1 mm at 0.5 um/px); nuclei and foci have fixed physical sizes,
    so ``--mpp`` changes the pixels, not the tissue. A positive slide has one to three foci, 100-300 um
    across and 2-6 % of the tissue, whose nuclei differ from normal ones only in fine structure: a little
    larger (mean area x 1.08), elongated and irregular in outline, with coarse (0.6 um) rather than fine
    (0.3 um) chromatin texture. Stain, nuclear area fraction and the pointwise stain distribution are the
    same as in normal tissue, so after box-downsampling to 4-8 um/px a focus is not separable from
    normal tissue (``benchmarks/plot_fine_foci.py`` measures this). Negative slides have no focus. Besides
    the files above, each slide has ``slide_000_foci.json`` (centres and radii of its foci in level-0
    pixels and in microns) and ``labels.csv`` has two more columns, ``foci`` (how many) and ``foci_file``;
    the label is ``tumour`` exactly when the slide has a focus, and the mask is the foci.
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

__all__ = ["CLASSES", "FINE", "FINE_SIZE", "TASKS", "make_cohort", "make_fine_slide", "make_slide", "render_fine",
           "render_tissue", "write_pyramid", "main"]

CLASSES: tuple[str, str] = ("normal", "tumour")
"""Label names written to ``labels.csv`` (index 0 negative, 1 positive)."""

TASKS: tuple[str, str] = ("coarse", "fine")
"""The synthetic tasks: ``coarse`` (the default: dark tumour regions) and ``fine`` (see :func:`render_fine`)."""

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


# --- the "fine" task: foci that differ from normal tissue in fine structure only ----------------------------------

FINE_SIZE: tuple[int, int] = (2048, 2048)
"""Default level-0 size of a fine-task slide: 2048 x 2048 px, about 1 mm x 1 mm at 0.5 um/px."""

FINE: dict[str, object] = {
    "nuclear_fraction": 0.20,        # nuclear area / tissue area, the same in foci and in normal tissue
    "normal_radius_um": (2.2, 3.0),  # equivalent-disc radius of normal nuclei (diameter ~4.4-6 um)
    "focus_radius_um": (2.3, 3.1),   # focus nuclei: larger (mean area x 1.08; see below)
    "normal_aspect": (1.0, 1.25),    # long / short axis
    "focus_aspect": (1.15, 1.8),
    "normal_spacing": 0.0,           # centres at least this x (r_i + r_j) apart (0: only no overlap)
    "focus_spacing": 0.0,
    "normal_wobble": 0.02,           # std of the contour's 2nd-5th harmonics (fraction of the radius)
    "focus_wobble": 0.09,            # irregular, notched contours
    "normal_grain_um": 0.3,          # correlation length (Gaussian sigma) of the chromatin texture: fine
    "focus_grain_um": 0.6,           # coarse, clumped chromatin
    "chromatin_contrast": 0.5,  # chromatin OD = c * clip(1 + contrast * z, 0.15, 2.2), z: mean 0, std 1 per nucleus
    "intensity": (0.55, 0.85),       # per-nucleus haematoxylin OD scale c, the same distribution in both
    "focus_diameter_um": (100.0, 300.0),
    "focus_fraction": (0.02, 0.06),  # total focus area / tissue area on a positive slide
}
"""Parameters of the fine task (lengths in microns, so slides at any ``mpp`` show the same tissue).

A focus differs from normal tissue only in its nuclei's size, shape and chromatin texture. What a
downsampled image sees is matched: the stroma is the same field through foci and normal tissue, the
nuclear area fraction is the same (nuclei are placed until their summed area reaches it), every nucleus
draws its stain scale from the same distribution, and the chromatin's optical density has the same
pointwise distribution in both (a Gaussian texture, standardised over each nucleus, through the same map;
only its correlation length differs), so the mean colour of any region larger than a few nuclei is the same.
Nuclei do not overlap and have hard edges, so their drawn area is exact.

The size step was chosen by matching a low-resolution statistic, the grey-level variance within 64 um
patches at 4 um/px: elongated, irregular nuclei of the normal size spread their stain over more 4 um pixels
and lower it; x 1.08 in area restores it (x 1.0 and x 1.12 leave it off, and patch texture features at
4 um/px, more separable). ``*_spacing`` (a minimum centre distance, off for both) was tried and not kept.
"""


def _fine_foci(rng: np.random.Generator, tissue: np.ndarray, mpp: float, fraction: tuple[float, float]
               ) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Place one to three foci inside ``tissue``; returns the level-0 mask and ``[{y, x, radius}]`` in pixels."""
    from scipy.ndimage import distance_transform_edt

    h, w = tissue.shape
    t_area = float(tissue.sum())
    k = int(rng.integers(1, 4))
    target = t_area * rng.uniform(*fraction)
    lo, hi = (d / 2 / mpp for d in FINE["focus_diameter_um"])  # type: ignore[attr-defined]
    radius = float(np.clip(math.sqrt(target / k / math.pi), lo, hi))
    while k > 1 and k * math.pi * radius**2 > 1.5 * target:  # a small slide: fewer foci rather than more area
        k -= 1
    step = 8
    dist = distance_transform_edt(tissue[::step, ::step]) * step
    mask = np.zeros((h, w), bool)
    foci: list[dict[str, float]] = []
    for _ in range(k):
        r = float(np.clip(radius * rng.uniform(0.8, 1.2), lo, hi))
        ok = np.argwhere(dist > r * 1.3)
        if ok.size == 0:
            ok = np.argwhere(dist >= dist.max())
        py, px = (ok[rng.integers(len(ok))] * step).astype(float)
        y0, y1 = max(0, int(py - 1.4 * r)), min(h, int(py + 1.4 * r) + 1)
        x0, x1 = max(0, int(px - 1.4 * r)), min(w, int(px + 1.4 * r) + 1)
        ly, lx = np.mgrid[y0:y1, x0:x1]
        ang = np.arctan2(ly - py, lx - px)
        wob = 1 + 0.12 * np.sin(3 * ang + rng.uniform(0, 6.3)) + 0.08 * np.sin(5 * ang + rng.uniform(0, 6.3))
        mask[y0:y1, x0:x1] |= np.hypot(ly - py, lx - px) < r * wob
        foci.append({"y": float(py), "x": float(px), "radius": float(r)})
    return mask & tissue, foci


def _fine_nuclei(rng: np.random.Generator, region: np.ndarray, mpp: float, kind: str, texture: np.ndarray,
                 target: np.ndarray, taken: np.ndarray) -> tuple[int, float]:
    """Place and draw nuclei of ``kind`` (``normal`` or ``focus``) with centres in ``region``, in place.

    Candidates are uniform over ``region`` and accepted in random order unless they touch an accepted
    nucleus (``taken`` holds every accepted nucleus' footprint) or lie closer than ``FINE[kind_spacing]``
    times the sum of the two radii to one of this kind, until their summed area reaches the nuclear area
    fraction of the region. Edges are hard (no partial pixels), so the drawn area is exact; each nucleus'
    chromatin texture is standardised over its footprint, so its mean stain is its intensity whatever the
    texture's grain. Returns the number drawn and their area over the region's.
    """
    n_px = int(region.sum())
    if n_px == 0:
        return 0, 0.0
    goal = float(FINE["nuclear_fraction"]) * n_px  # type: ignore[arg-type]
    r_lo, r_hi = (r / mpp for r in FINE[f"{kind}_radius_um"])  # type: ignore[attr-defined]
    mean_area = math.pi * (r_lo**2 + r_lo * r_hi + r_hi**2) / 3
    n_cand = int(6 * goal / mean_area) + 8
    flat = np.flatnonzero(region.ravel())[rng.integers(0, n_px, n_cand)]
    h, w = region.shape
    cy = flat // w + rng.uniform(0, 1, n_cand)
    cx = flat % w + rng.uniform(0, 1, n_cand)
    rad = rng.uniform(r_lo, r_hi, n_cand)
    asp = rng.uniform(*FINE[f"{kind}_aspect"], n_cand)  # type: ignore[misc]
    rot = rng.uniform(0, math.pi, n_cand)
    harm = rng.normal(0, float(FINE[f"{kind}_wobble"]), (n_cand, 4))  # type: ignore[arg-type]
    phase = rng.uniform(0, 2 * math.pi, (n_cand, 4))
    inten = rng.uniform(*FINE["intensity"], n_cand)  # type: ignore[misc]
    contrast = float(FINE["chromatin_contrast"])  # type: ignore[arg-type]
    spacing = float(FINE[f"{kind}_spacing"])  # type: ignore[arg-type]
    cell = max(1.0, 2 * spacing * r_hi)
    grid: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    ks = np.arange(2, 6)
    area = 0
    drawn = 0
    for i in range(n_cand):
        if area >= goal:
            break
        gy, gx = int(cy[i] // cell), int(cx[i] // cell)
        if spacing > 0 and any(
            (cy[i] - oy) ** 2 + (cx[i] - ox) ** 2 < (spacing * (rad[i] + orad)) ** 2
            for a in (-1, 0, 1) for b in (-1, 0, 1) for oy, ox, orad in grid.get((gy + a, gx + b), ())
        ):
            continue
        # the contour r(phi) = R (1 + sum a_k cos(k phi + p_k)) on an ellipse of axes R sqrt(e), R / sqrt(e):
        # area pi R^2 (1 + sum a_k^2 / 2), so R is scaled to keep the drawn radius' disc area
        r0 = rad[i] / math.sqrt(1 + 0.5 * float(np.sum(harm[i] ** 2)))
        reach = r0 * math.sqrt(asp[i]) * (1 + float(np.abs(harm[i]).sum())) + 1.5
        y0, y1 = max(0, int(cy[i] - reach)), min(h, int(cy[i] + reach) + 2)
        x0, x1 = max(0, int(cx[i] - reach)), min(w, int(cx[i] + reach) + 2)
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy += 0.5 - cy[i]
        dx += 0.5 - cx[i]
        c, s = math.cos(rot[i]), math.sin(rot[i])
        u = (c * dx + s * dy) / math.sqrt(asp[i])
        v = (-s * dx + c * dy) * math.sqrt(asp[i])
        phi = np.arctan2(v, u)
        edge = r0 * (1 + np.sum(harm[i][:, None, None] * np.cos(ks[:, None, None] * phi + phase[i][:, None, None]),
                                axis=0))
        foot = np.hypot(u, v) < edge
        n_foot = int(foot.sum())
        if n_foot < 3 or (taken[y0:y1, x0:x1] & foot).any():
            continue
        taken[y0:y1, x0:x1] |= foot
        z = texture[y0:y1, x0:x1][foot]
        z = (z - z.mean()) / (z.std() + 1e-6)
        patch = target[y0:y1, x0:x1]
        patch[foot] = np.maximum(patch[foot], inten[i] * np.clip(1 + contrast * z, 0.15, 2.2))
        grid.setdefault((gy, gx), []).append((float(cy[i]), float(cx[i]), float(rad[i])))
        area += n_foot
        drawn += 1
    return drawn, area / n_px


def render_fine(
    rng: np.random.Generator, size: tuple[int, int], mpp: float = 0.5, tumour: bool = False,
    focus_fraction: tuple[float, float] | None = None, focus_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, float]]]:
    """Render one slide of the fine task at level 0 (see :data:`FINE`).

    Parameters
    ----------
    rng:
        Random generator (the slide is a pure function of its state).
    size:
        ``(width, height)`` in pixels.
    mpp:
        Microns per pixel: nuclei and foci have fixed physical sizes.
    tumour:
        Add one to three foci (``FINE["focus_fraction"]`` of the tissue, each 100-300 um across).
    focus_fraction:
        Override the range of the foci's total area as a fraction of the tissue.
    focus_mask:
        ``bool (height, width)``: use this focus region instead of random foci (measurements that need
        many focus patches); ``tumour`` is then ignored.

    Returns
    -------
    image:
        ``uint8`` ``(height, width, 3)``.
    tissue:
        ``bool`` ``(height, width)``.
    focus:
        ``bool`` ``(height, width)``, the foci (all False for a negative slide).
    foci:
        ``[{"y", "x", "radius"}]`` in level-0 pixels, one per focus (empty for a negative slide or a given mask).
    """
    from scipy.ndimage import gaussian_filter

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.45, 0.55), w * rng.uniform(0.45, 0.55)
    ay, ax = h * rng.uniform(0.36, 0.44), w * rng.uniform(0.36, 0.44)
    env = 1.0 - np.hypot((yy - cy) / ay, (xx - cx) / ax)
    tissue = env + 0.2 * _field(rng, (h, w), (12, 12), (1.0, 1.0)).astype(np.float32) > 0.0
    del yy, xx, env
    foci: list[dict[str, float]] = []
    if focus_mask is not None:
        focus = np.asarray(focus_mask, bool) & tissue
    elif tumour:
        focus, foci = _fine_foci(rng, tissue, mpp, focus_fraction or FINE["focus_fraction"])  # type: ignore[arg-type]
    else:
        focus = np.zeros((h, w), bool)
    # stroma: thin fibres (about 2 um x 16 um correlation), the same through foci and normal tissue
    low = (max(2, int(h * mpp / 4)), max(2, int(w * mpp / 32)))
    fib = _field(rng, (h, w), low, (0.7, 1.5)).astype(np.float32)
    conc_e = np.where(tissue, 0.42 + 0.10 * fib, 0.0).astype(np.float32)
    conc_h = np.where(tissue, 0.06 + 0.02 * fib, 0.0).astype(np.float32)
    del fib
    nuc = np.zeros((h, w), np.float32)
    taken = np.zeros((h, w), bool)
    for kind, region in (("focus", focus), ("normal", tissue & ~focus)):
        sigma = float(FINE[f"{kind}_grain_um"]) / mpp  # type: ignore[arg-type]
        tex = gaussian_filter(rng.standard_normal((h, w), dtype=np.float32), sigma, mode="wrap")
        tex /= tex.std() + 1e-9
        _fine_nuclei(rng, region, mpp, kind, tex, nuc, taken)
        del tex
    conc_h = np.maximum(conc_h, nuc)
    od = conc_h[..., None] * _H.astype(np.float32) + conc_e[..., None] * _E.astype(np.float32)
    img = _GLASS * np.exp(-od) + rng.normal(0.0, 2.0, (h, w, 1)).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), tissue, focus, foci


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


def _mask_png(path: Path, mask: np.ndarray, levels: int) -> None:
    """Save ``mask`` (level 0) at the coarsest level's scale: a pixel is set when most of its block is."""
    from PIL import Image

    f = 2 ** (levels - 1)
    h, w = mask.shape[0] // f, mask.shape[1] // f
    small = mask[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3)) >= 0.5
    Image.fromarray((small * 255).astype(np.uint8)).save(path)


def make_fine_slide(
    out_dir: str | os.PathLike[str], name: str, seed: int, index: int, tumour: bool,
    size: tuple[int, int], mpp: float, levels: int,
) -> tuple[str, str, float, int, str]:
    """Render and write one fine-task slide, its foci mask and ``{name}_foci.json``.

    Returns ``(tif name, mask name, foci fraction of the tissue, number of foci, json name)``.
    """
    import json

    rng = np.random.default_rng([seed, index, int(tumour), 1])
    img, tissue, focus, foci = render_fine(rng, size, mpp, tumour)
    out = Path(out_dir)
    write_pyramid(out / f"{name}.tif", img, mpp=mpp, levels=levels)
    _mask_png(out / f"{name}_mask.png", focus, levels)
    frac = float(focus.sum() / max(1, tissue.sum()))
    record = {
        "slide": f"{name}.tif", "label": CLASSES[int(tumour)], "mpp": mpp, "size": [int(size[0]), int(size[1])],
        "tissue_fraction": round(float(tissue.mean()), 6), "foci_fraction": round(frac, 6),
        "foci": [{"x": round(f["x"], 2), "y": round(f["y"], 2), "radius": round(f["radius"], 2),
                  "x_um": round(f["x"] * mpp, 2), "y_um": round(f["y"] * mpp, 2),
                  "radius_um": round(f["radius"] * mpp, 2)} for f in foci],
    }
    (out / f"{name}_foci.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return f"{name}.tif", f"{name}_mask.png", frac, len(foci), f"{name}_foci.json"


def make_cohort(
    out_dir: str | os.PathLike[str],
    slides: int = 40,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    mpp: float = 0.5,
    levels: int = 3,
    val_fraction: float = 0.25,
    workers: int | None = None,
    task: str = "coarse",
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
        ``(width, height)`` of level 0 (default 2048 x 1536, or :data:`FINE_SIZE` for ``task="fine"``);
        both are rounded down to a multiple of ``2 ** (levels - 1)`` so every level halves exactly.
    mpp:
        Microns per level-0 pixel; level ``L`` has ``mpp * 2**L``.
    levels:
        Pyramid levels.
    val_fraction:
        Fraction of each class in the ``val`` split (stratified, at least one each
        when a class has two or more slides).
    workers:
        Processes to render with (default: up to 2).
    task:
        ``"coarse"`` (dark tumour regions) or ``"fine"`` (foci that differ only in fine structure; adds
        ``foci`` and ``foci_file`` columns and a ``_foci.json`` per slide). Labels and splits are drawn
        the same way for both.

    Returns
    -------
    pathlib.Path
        Path of ``labels.csv``.
    """
    if slides < 1:
        raise ValueError(f"slides must be >= 1, got {slides}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if size is None:
        size = FINE_SIZE if task == "fine" else (2048, 1536)
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
    render = make_fine_slide if task == "fine" else make_slide
    if workers > 1 and slides > 1:
        with ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(render, *zip(*args)))
    else:
        results = [render(*a) for a in args]
    csv_path = out / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        wr = csv.writer(fh)
        if task == "fine":
            wr.writerow(["slide", "label", "split", "mask", "tumour_fraction", "foci", "foci_file"])
            for i, (tif, mask, frac, n_foci, foci_file) in enumerate(results):
                wr.writerow([tif, CLASSES[labels[i]], split[i], mask, f"{frac:.4f}", n_foci, foci_file])
        else:
            wr.writerow(["slide", "label", "split", "mask", "tumour_fraction"])
            for i, (tif, mask, frac) in enumerate(results):
                wr.writerow([tif, CLASSES[labels[i]], split[i], mask, f"{frac:.4f}"])
    return csv_path


def main(argv: list[str] | None = None) -> int:
    """Command line: ``halo-synth --out data/synth --slides 40 --seed 0 [--task fine] [--size HEIGHT WIDTH]``.

    ``--size`` is HEIGHT then WIDTH, as ``halo-plan --image`` takes it; :func:`make_cohort`'s ``size``
    is ``(width, height)``, as halo.data's sizes are."""
    p = argparse.ArgumentParser(prog="halo-synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/synth", help="output directory (default data/synth)")
    p.add_argument("--slides", type=int, default=40, help="number of slides (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--task", choices=TASKS, default="coarse",
                   help="coarse: dark tumour regions (default); fine: foci that differ only in fine structure")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                   help="level-0 size in pixels, HEIGHT then WIDTH (H x W, as halo-plan --image and every halo "
                        "message; default 1536 2048, 1536 high and 2048 wide; 2048 2048 for --task fine)")
    p.add_argument("--mpp", type=float, default=0.5, help="microns per level-0 pixel (default 0.5)")
    p.add_argument("--levels", type=int, default=3, help="pyramid levels (default 3)")
    p.add_argument("--workers", type=int, default=None, help="processes (default up to 2)")
    a = p.parse_args(argv)
    size = None
    if a.size is not None:
        height, width = a.size
        f = 2 ** (max(a.levels, 1) - 1)
        if min(height // f * f, width // f * f) < 16 * f:
            p.error(f"--size {height} {width}: {height} x {width} (H x W) is too small for {a.levels} levels "
                    f"(each side at least {16 * f} pixels)")
        size = (width, height)  # make_cohort's size is (width, height), as halo.data's sizes are
    t = time.perf_counter()
    path = make_cohort(a.out, slides=a.slides, seed=a.seed, size=size, mpp=a.mpp,
                       levels=a.levels, workers=a.workers, task=a.task)
    print(f"wrote {a.slides} slides and {path} in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
