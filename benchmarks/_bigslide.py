"""A very large synthetic pyramidal TIFF, written tile by tile in bounded memory (for bench_100k_read).

The slide is H&E-like tissue (halo.data.synth's stain model: pink stroma with purple nuclei)
on glass. Where the tissue lies is a smooth scalar *field* known on a coarse grid of nodes,
one node per level-0 tile corner: tissue is ``field > 0``, the field bilinearly interpolated
between nodes (an ellipse nearly as large as the slide, its edge made irregular by smooth
noise, so the tissue bounding box spans the slide while its corners are glass). Because
bilinear interpolation never leaves the range of its nodes, a tile whose nodes are all
positive is all tissue and one whose nodes are all negative is all glass: only tiles on the
boundary need a per-pixel mask.

The texture of a tile is one of a small library of 256 x 256 tiles cut from a 1024 x 1024
tissue render (and a glass render), chosen per tile by a hash of its position and turned by
one of the 8 flips/quarter turns. Each pyramid level has its own library, the renders
2x2-mean-reduced to that level, so every tile of every level is generated on its own, the
levels are written one after the other, and nothing larger than a tile's batch is held.
Levels halve with rounding up (``ceil(w / 2)``), as scanners round, so the coarse levels'
downsamples are not whole numbers. Tiles are JPEG (YCbCr 4:2:0 through imagecodecs),
mpp is in the resolution tags (ResolutionUnit centimeter), as ``halo.data.synth.write_pyramid``
writes it, so OpenSlide's generic-tiff reader opens it and halo reads its levels with tifffile.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["SlideSpec", "write_big_slide", "cached_slide", "level_sizes"]

TILE = 256
_VERSION = 1  # bump when the content changes: cached files of another version are rewritten


class SlideSpec:
    """Parameters of one synthetic slide (the cache key)."""

    def __init__(self, size: int, mpp: float = 0.5, tile: int = TILE, quality: int = 85, seed: int = 0,
                 min_side: int = 1024) -> None:
        self.size, self.mpp, self.tile, self.quality, self.seed, self.min_side = (
            int(size), float(mpp), int(tile), int(quality), int(seed), int(min_side))

    def key(self) -> dict[str, float | int]:
        return {"size": self.size, "mpp": self.mpp, "tile": self.tile, "quality": self.quality, "seed": self.seed,
                "min_side": self.min_side, "version": _VERSION}

    def name(self) -> str:
        return f"slide_{self.size}_t{self.tile}_q{self.quality}_mpp{self.mpp:g}_s{self.seed}_v{_VERSION}.tif"


def level_sizes(w: int, h: int, min_side: int = 1024) -> list[tuple[int, int]]:
    """``(width, height)`` of each level: halved with rounding up until the longest side is <= ``min_side``."""
    out = [(w, h)]
    while max(out[-1]) > min_side:
        lw, lh = out[-1]
        out.append((-(-lw // 2), -(-lh // 2)))
    return out


def _reduce2(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2, img.shape[1] // 2
    return np.rint(img[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))).astype(np.uint8)


# halo.data.synth's stain model (copied: importing halo imports torch, ~0.5 GB of the writer's RSS)
_H = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
_GLASS = 246.0


def _field(rng: np.random.Generator, shape: tuple[int, int], low: tuple[int, int], sigma: tuple[float, float]
           ) -> np.ndarray:
    """Smooth noise of ``shape``, unit std (as halo.data.synth._field)."""
    from scipy.ndimage import gaussian_filter, zoom

    f = gaussian_filter(rng.standard_normal(low), sigma, mode="wrap")
    f = zoom(f, (shape[0] / low[0], shape[1] / low[1]), order=1, grid_mode=True, mode="grid-wrap")
    f = f[: shape[0], : shape[1]]
    return (f - f.mean()) / (f.std() + 1e-9)


def _nuclei(rng: np.random.Generator, shape: tuple[int, int], density: float, radii: tuple[int, int],
            intensity: tuple[float, float]) -> np.ndarray:
    """Soft discs scattered over ``shape`` at ``density`` per pixel (max-composited)."""
    h, w = shape
    target = np.zeros(shape, np.float32)
    n = rng.poisson(density * h * w)
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    rad = rng.integers(radii[0], radii[1] + 1, n)
    val = rng.uniform(intensity[0], intensity[1], n)
    for radius in np.unique(rad):
        sel = rad == radius
        r = np.arange(-radius - 1, radius + 2)
        dy, dx = np.meshgrid(r, r, indexing="ij")
        prof = np.clip(radius + 0.5 - np.hypot(dy, dx), 0.0, 1.0).ravel()
        keep = prof > 0
        dy, dx, prof = dy.ravel()[keep], dx.ravel()[keep], prof[keep]
        yy = np.clip(ys[sel][:, None] + dy[None, :], 0, h - 1)
        xx = np.clip(xs[sel][:, None] + dx[None, :], 0, w - 1)
        np.maximum.at(target.ravel(), (yy * w + xx).ravel(), (val[sel][:, None] * prof[None, :]).ravel())
    return target


def _renders(seed: int, side: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """A ``side`` x ``side`` all-tissue render and a glass render, level 0 (synth's stain model)."""
    rng = np.random.default_rng([seed, 100])
    h = w = side
    fib = _field(rng, (h, w), (h // 8, w // 64), (0.7, 1.5)).astype(np.float32)
    conc_e = (0.45 + 0.12 * fib).astype(np.float32)
    conc_h = np.maximum((0.06 + 0.02 * fib).astype(np.float32), _nuclei(rng, (h, w), 1 / 260, (2, 4), (0.55, 0.85)))
    od = conc_h[..., None] * _H.astype(np.float32) + conc_e[..., None] * _E.astype(np.float32)
    img = _GLASS * np.exp(-od) + rng.normal(0.0, 2.0, (h, w, 1)).astype(np.float32)
    tis = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    glass = np.clip(np.rint(_GLASS + rng.normal(0.0, 2.0, (h, w, 1))), 0, 255).astype(np.uint8)
    return tis, np.ascontiguousarray(np.broadcast_to(glass, (h, w, 3)))


def _dihedral(t: np.ndarray) -> list[np.ndarray]:
    out = []
    for k in range(4):
        r = np.rot90(t, k)
        out += [np.ascontiguousarray(r), np.ascontiguousarray(r[:, ::-1])]
    return out


def _library(render: np.ndarray, level: int, tile: int) -> list[np.ndarray]:
    """Tiles of ``tile`` x ``tile`` at ``level``: cuts of the reduced render (tiled when smaller), 8 turns each."""
    img = render
    for _ in range(level):
        if min(img.shape[:2]) < 2:
            break
        img = _reduce2(img)
    s = img.shape[0]
    if s >= tile:
        cuts = [img[i:i + tile, j:j + tile] for i in range(0, s, tile) for j in range(0, s, tile)]
    else:
        reps = -(-tile // s)
        cuts = [np.tile(img, (reps, reps, 1))[:tile, :tile]]
    return [v for c in cuts for v in _dihedral(c)]


def _nodes(spec: SlideSpec) -> np.ndarray:
    """The tissue field at level-0 tile corners, ``(ny, nx)``: node ``(j, i)`` is level-0 pixel ``(i*tile, j*tile)``."""
    n = -(-spec.size // spec.tile) + 2
    rng = np.random.default_rng([spec.seed, 7])
    v = (np.arange(n) * spec.tile / spec.size)[:, None]
    u = (np.arange(n) * spec.tile / spec.size)[None, :]
    env = 1.0 - np.hypot((u - 0.5) / 0.50, (v - 0.5) / 0.55)
    noise = _field(rng, (n, n), (8, 8), (1.0, 1.0))
    return (env + 0.30 * noise).astype(np.float32)


def _interp(nodes: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear field at level-0 positions ``ys`` (rows) x ``xs`` (columns), in node units."""
    ny, nx = nodes.shape
    iy = np.clip(np.floor(ys).astype(np.int64), 0, ny - 2)
    ix = np.clip(np.floor(xs).astype(np.int64), 0, nx - 2)
    wy = (ys - iy).astype(np.float32)[:, None]
    wx = (xs - ix).astype(np.float32)[None, :]
    a = nodes[iy][:, ix]
    b = nodes[iy][:, ix + 1]
    c = nodes[iy + 1][:, ix]
    d = nodes[iy + 1][:, ix + 1]
    return (1 - wy) * ((1 - wx) * a + wx * b) + wy * ((1 - wx) * c + wx * d)


def _tiles(spec: SlideSpec, level: int, size: tuple[int, int], nodes: np.ndarray, tis: list[np.ndarray],
           gls: list[np.ndarray], stats: dict[str, int]) -> Iterator[np.ndarray]:
    """Every tile of ``level``, row-major, each a fresh ``(tile, tile, 3)`` array or a library tile."""
    t = spec.tile
    lw, lh = size
    fx, fy = spec.size / lw, spec.size / lh  # level-0 pixels per level pixel
    ny, nx = nodes.shape
    across, down = -(-lw // t), -(-lh // t)
    offs = np.arange(t, dtype=np.float64) + 0.5
    for ty in range(down):
        y_lo, y_hi = ty * t * fy / t, (ty + 1) * t * fy / t  # node units
        j0, j1 = max(0, int(math.floor(y_lo))), min(ny - 1, int(math.ceil(y_hi)))
        band = nodes[j0:j1 + 1]
        for tx in range(across):
            x_lo, x_hi = tx * t * fx / t, (tx + 1) * t * fx / t
            i0, i1 = max(0, int(math.floor(x_lo))), min(nx - 1, int(math.ceil(x_hi)))
            patch = band[:, i0:i1 + 1]
            h = (ty * 73856093) ^ (tx * 19349663) ^ (level * 83492791) ^ spec.seed
            h = (h * 2654435761) & 0xFFFFFFFF
            lo, hi = float(patch.min()), float(patch.max())
            if lo > 0:
                stats["tissue"] += 1
                yield tis[h % len(tis)]
            elif hi <= 0:
                stats["glass"] += 1
                yield gls[h % len(gls)]
            else:
                stats["boundary"] += 1
                ys = (ty * t + offs) * fy / t
                xs = (tx * t + offs) * fx / t
                mask = _interp(nodes, ys, xs) > 0
                yield np.where(mask[..., None], tis[h % len(tis)], gls[(h >> 8) % len(gls)])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_big_slide(path: str | os.PathLike[str], spec: SlideSpec, maxworkers: int = 2,
                    log: bool = True) -> dict[str, float | int | list]:
    """Write the slide of ``spec`` to ``path`` streaming tile by tile; returns the write's figures."""
    import tifffile

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    tis_r, gls_r = _renders(spec.seed)
    nodes = _nodes(spec)
    sizes = level_sizes(spec.size, spec.size, spec.min_side)
    stats = {"tissue": 0, "glass": 0, "boundary": 0}
    per_level = []
    tmp = Path(str(path) + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for lv, (lw, lh) in enumerate(sizes):
            tl = time.perf_counter()
            tis, gls = _library(tis_r, lv, spec.tile), _library(gls_r, lv, spec.tile)
            f = spec.size / lw
            ppcm = 1e4 / (spec.mpp * f)
            tw.write(
                _tiles(spec, lv, (lw, lh), nodes, tis, gls, stats),
                shape=(lh, lw, 3), dtype=np.uint8, tile=(spec.tile, spec.tile),
                photometric="rgb", compression="jpeg", compressionargs={"level": spec.quality},
                subfiletype=1 if lv else 0, metadata=None, resolution=(ppcm, ppcm), resolutionunit="CENTIMETER",
                maxworkers=maxworkers, buffersize=16 * 2**20,
            )
            per_level.append([lw, lh, round(time.perf_counter() - tl, 2)])
            if log:
                print(f"  level {lv}: {lw}x{lh} in {per_level[-1][2]:.1f} s (peak RSS {_peak_rss_mb():.0f} MB)",
                      flush=True)
    os.replace(tmp, path)
    total = sum(stats.values())
    return {"write_s": round(time.perf_counter() - t0, 2), "write_cpu_s": round(time.process_time() - cpu0, 2),
            "bytes": os.path.getsize(path), "writer_peak_rss_mb": round(_peak_rss_mb(), 1), "levels": per_level,
            "tiles": total, "tissue_tiles": stats["tissue"], "glass_tiles": stats["glass"],
            "boundary_tiles": stats["boundary"], "maxworkers": maxworkers}


def cached_slide(directory: str | os.PathLike[str], spec: SlideSpec, maxworkers: int = 2
                 ) -> tuple[Path, dict, bool]:
    """``(path, write figures, reused)``: the slide of ``spec`` under ``directory``, written if absent.

    A JSON sidecar keeps the parameters and the figures of the write that made the file;
    a file whose sidecar does not match ``spec`` (or is missing) is rewritten.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / spec.name()
    side = path.with_suffix(".json")
    if path.exists() and side.exists():
        try:
            meta = json.loads(side.read_text())
        except ValueError:
            meta = {}
        if meta.get("spec") == spec.key() and meta.get("bytes") == path.stat().st_size:
            return path, meta, True
    meta = write_big_slide(path, spec, maxworkers=maxworkers)
    meta["spec"] = spec.key()
    side.write_text(json.dumps(meta, indent=1))
    return path, meta, False
