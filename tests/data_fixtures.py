"""Tiny pyramidal TIFF slides written with tifffile, read back with real OpenSlide.

Shared by ``tests/test_data_*.py`` (import the helpers; the fixtures here are
plain functions so that ``tests/conftest.py`` stays the lead's).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from halo.data.synth import write_pyramid

__all__ = ["GLASS", "noise_slide_image", "write_slide", "write_csv", "corrupt_tiles"]

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
