"""Tiny pyramidal TIFF slides written with tifffile, read back with real OpenSlide.

Shared by ``tests/test_data_*.py`` (import the helpers; the fixtures here are
plain functions so that ``tests/conftest.py`` stays the lead's).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from halo.data.synth import write_pyramid

__all__ = ["GLASS", "noise_slide_image", "write_slide", "write_aperio", "write_csv", "corrupt_tiles"]

GLASS = 250


def noise_slide_image(
    width: int, height: int, seed: int = 0, tissue: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """Glass with a coloured random-noise tissue rectangle ``(x, y, w, h)`` (level 0).

    Noise makes any misplaced pixel visible; the tissue is strongly saturated.
    """
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), GLASS, np.uint8)
    x, y, w, h = tissue if tissue is not None else (0, 0, width, height)
    tex = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    tex[..., 1] //= 3  # purple-pink: high saturation everywhere
    img[y : y + h, x : x + w] = tex
    return img


def write_slide(path: Path, image: np.ndarray, mpp: float | None = 0.5, levels: int = 3, tile: int = 64) -> Path:
    """Write ``image`` as a pyramidal tiled TIFF (2x levels) and return its path."""
    write_pyramid(path, image, mpp=mpp, levels=levels, tile=tile)
    return path


def _box_down(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape[0] // f, img.shape[1] // f
    return np.rint(img[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3))).astype(np.uint8)


def write_aperio(path: Path, image: np.ndarray, mpp: float = 0.25, levels: int = 3, tile: int = 64) -> Path:
    """Write ``image`` in Aperio's SVS layout: a tiled level 0 whose ImageDescription carries
    ``AppMag`` and ``MPP`` (no TIFF resolution tags), a stripped thumbnail as the second
    directory, then 4x-downsampled tiled levels, and a label image last. Return the path."""
    import tifffile

    h, w = image.shape[:2]
    head = "Aperio Image Library v12.0.16\r\n"
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(tile, tile), compression="zlib", photometric="rgb", metadata=None,
                 description=f"{head}{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) RAW|AppMag = 20|MPP = {mpp}|Filename = t")
        thumb = _box_down(image, 8)
        tw.write(thumb, photometric="rgb", metadata=None,
                 description=f"{head}{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - |AppMag = 20|MPP = {mpp}")
        for lv in range(1, levels):
            level = _box_down(image, 4**lv)
            tw.write(level, tile=(tile, tile), compression="zlib", photometric="rgb", metadata=None, subfiletype=1,
                     description=f"{head}{w}x{h} -> {level.shape[1]}x{level.shape[0]} RAW|AppMag = 20|MPP = {mpp}")
        label = np.full((64, 96, 3), 200, np.uint8)
        tw.write(label, photometric="rgb", metadata=None, subfiletype=1, description=f"{head}label 96x64")
    return path


def write_csv(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("slide", "label", "split")) -> Path:
    """Write a manifest CSV with ``columns``."""
    with open(path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow(r)
    return path


def corrupt_tiles(path: Path) -> None:
    """Overwrite the compressed tile data of the level-0 image with garbage (header stays valid)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    with open(path, "r+b") as fh:
        for off, n in spans:
            fh.seek(off)
            fh.write(b"\xff" * n)
