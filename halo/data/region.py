"""Region planning and block reads: each rank reads only its own block of a slide.

Frames:

* **level 0** - full-resolution pixels; ``(x, y)`` locations, ``(width, height)`` sizes.
* **level L** - the stored pixels of the level read, ``plan.level_factors`` =
  ``(w0 / wL, h0 / hL)`` level-0 pixels per level pixel along x and y (scanner
  pyramids round level sizes, so these are rarely whole numbers).
* **target** - the training resolution (see :func:`halo.data.slide.select_level`).
  At an exact level (``plan.level_scale == (1.0, 1.0)``) target pixels *are* the
  level's pixels; otherwise target pixel ``t`` is the box-filter average of level
  pixels ``[t * s, (t + 1) * s)`` with ``s = plan.level_scale`` per axis
  (``plan.downsample`` level-0 pixels per target pixel). ``plan.target_factors``
  maps target to level 0 per axis.
* **padded** - the region a model sees before augmentation: ``plan.padded_size``
  target pixels whose top-left is target pixel ``plan.origin``. Its pixels inside
  ``plan.content`` (the tissue bounding box) come from the slide, all others are
  background. Block ``(row, col)`` of the *augmented* padded region is what rank
  ``(row, col)`` trains on.

Pixels are computed as pure functions of their global target coordinates: reads of
a level's stored pixels at integer level coordinates (:meth:`Slide.read_level`, never
OpenSlide's level-0-located ``read_region`` at a non-whole downsample), or a box
filter whose weights depend only on the global index, so blocks tile
:func:`read_full` exactly, with or without augmentation. ``plan.reader`` says which
library read the pixels (``"tifffile"`` or ``"openslide"``), ``plan.vendor`` the format.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from typing import Any

import numpy as np

from halo.data.augment import AugmentSpec, MacenkoNormalizer
from halo.data.slide import METADATA, Slide, SlideTooSmallError, open_cached, select_level
from halo.data.tissue import TissueOptions, tissue_bbox, tissue_mask

__all__ = ["RegionPlan", "plan_region", "read_block", "read_full", "block_rect"]

Box = tuple[tuple[int, int], tuple[int, int]]
"""``((x, y), (width, height))`` in the frame the docstring names."""

_CHUNK_PIXELS = 1 << 22  # source pixels per read chunk: ~16 MiB of RGBA


@dataclass(frozen=True, kw_only=True, eq=False)
class RegionPlan:
    """Where and how to read one slide for a grid of ranks. Frozen and picklable.

    Attributes
    ----------
    path:
        Slide path.
    grid:
        ``(rows, cols)`` of ranks sharing the image.
    multiple:
        Block height and width are multiples of this (the network's total stride).
    level, level_downsample:
        Pyramid level read, and OpenSlide's level-0 pixels per level pixel (mean of the axes).
    downsample:
        Level-0 pixels per target pixel (``> level_downsample`` means resampling; at
        an exact level it is ``level_downsample``, nominal: see ``target_factors``).
    mpp:
        Microns per target pixel, or None when the slide has no mpp.
    origin:
        ``(x, y)`` target pixel of the padded region's top-left (may be negative).
    content:
        ``((x, y), (width, height))`` in target pixels: the tissue box read from the slide.
    padded_size:
        ``(width, height)`` of the un-augmented padded region, in target pixels.
    rot90:
        True when ``padded_size`` also tiles the grid after a quarter turn.
    tissue_box:
        ``((x, y), (width, height))`` of the tissue in level-0 pixels.
    slide_dimensions:
        ``(width, height)`` of level 0.
    thumb_mask:
        ``bool`` ``(h, w)`` tissue mask of the thumbnail, or None.
    thumb_downsample:
        ``(sx, sy)`` level-0 pixels per thumbnail pixel.
    stain:
        Macenko normaliser fitted on the thumbnail, applied to every block, or None.
    background:
        Grey level of padding and of pixels outside the scan.
    level_factors:
        ``(w0 / wL, h0 / hL)``: level-0 pixels per pixel of ``level``, along x and y.
    level_scale:
        ``(sx, sy)``: level pixels per target pixel; ``(1.0, 1.0)`` reads the level's
        stored pixels as they are.
    target_size:
        ``(width, height)`` of the whole slide in target pixels.
    reader:
        ``"tifffile"`` or ``"openslide"``: which library read the slide's pixels.
    vendor:
        OpenSlide's vendor (``"aperio"``, ``"generic-tiff"``, ``"dicom"`` ...).
    """

    path: str
    grid: tuple[int, int]
    multiple: int
    level: int
    level_downsample: float
    downsample: float
    mpp: float | None
    origin: tuple[int, int]
    content: Box
    padded_size: tuple[int, int]
    rot90: bool
    tissue_box: Box
    slide_dimensions: tuple[int, int]
    thumb_mask: np.ndarray | None = field(default=None, repr=False)
    thumb_downsample: tuple[float, float] = (1.0, 1.0)
    stain: MacenkoNormalizer | None = None
    background: int = 255
    level_factors: tuple[float, float] = (1.0, 1.0)
    level_scale: tuple[float, float] = (1.0, 1.0)
    target_size: tuple[int, int] = (0, 0)
    reader: str = "openslide"
    vendor: str = ""

    @property
    def scale(self) -> float:
        """Target pixels per level pixel (1.0: the level is read as is)."""
        return self.level_downsample / self.downsample

    @property
    def exact(self) -> bool:
        """True when target pixels are the level's stored pixels (no resampling)."""
        return self.level_scale == (1.0, 1.0)

    @property
    def target_factors(self) -> tuple[float, float]:
        """``(fx, fy)``: level-0 pixels per target pixel along x and y."""
        return self.level_factors[0] * self.level_scale[0], self.level_factors[1] * self.level_scale[1]

    def shape(self, augment: AugmentSpec | None = None) -> tuple[int, int]:
        """``(height, width)`` of the (augmented) padded region."""
        w, h = self.padded_size
        return augment.output_shape(h, w) if augment is not None else (h, w)

    def block_shape(self, augment: AugmentSpec | None = None) -> tuple[int, int]:
        """``(height, width)`` of every block of the (augmented) padded region."""
        h, w = self.shape(augment)
        return h // self.grid[0], w // self.grid[1]

    @property
    def block_size(self) -> tuple[int, int]:
        """``(width, height)`` of every un-augmented block."""
        h, w = self.block_shape()
        return w, h

    @property
    def padded_box_level0(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """``((x, y), (width, height))`` of the padded region in level-0 pixels (heatmaps)."""
        fx, fy = self.target_factors
        return (self.origin[0] * fx, self.origin[1] * fy), (self.padded_size[0] * fx, self.padded_size[1] * fy)


def plan_region(
    path: str | os.PathLike[str],
    grid: tuple[int, int] = (1, 1),
    multiple: int = 32,
    mpp: float | None = None,
    level: int | None = None,
    *,
    tissue: TissueOptions | None = None,
    rot90: bool = True,
    stain_normalize: bool = False,
    keep_mask: bool = True,
    background: int = 255,
    base_mpp: Any = METADATA,
    canvas: int | None = None,
) -> RegionPlan:
    """Plan the region of a slide that a ``rows x cols`` grid of ranks will read.

    The region is the tissue bounding box (found on a thumbnail) at the target
    resolution, centred in a background padding that makes every block equal with
    height and width multiples of ``multiple``.

    Parameters
    ----------
    path:
        Slide path (any format OpenSlide reads).
    grid:
        ``(rows, cols)``.
    multiple:
        Block sides are multiples of this.
    mpp:
        Target microns per pixel; the matching level is read, or the nearest finer
        one resampled. None: use ``level``. A level the slide's reader cannot read
        exactly (OpenSlide at a non-whole downsample) is resampled from a finer one.
    level:
        Pyramid level to read when ``mpp`` is None or the slide has no mpp (default 0).
    tissue:
        Tissue detection options; ``TissueOptions(enabled=False)`` keeps the whole slide.
    rot90:
        Pad so that the region also tiles the grid after a quarter turn (needed for
        ``Augment(rot90=True)`` on non-square grids).
    stain_normalize:
        Fit a Macenko normaliser on the thumbnail's tissue and apply it to every read.
    keep_mask:
        Store the thumbnail tissue mask in the plan.
    background:
        Grey level of padding.
    base_mpp:
        The slide's level-0 microns per pixel, overriding its metadata; None: none
        (see :func:`halo.data.slide.select_level`).
    canvas:
        Pad the region's sides to multiples of this too (None: only of what the grid
        needs). Padding, and so the region's place on the network's stride grid, then
        depends on the grid only through ``lcm(unit, canvas)``: every grid whose unit
        (``lcm(rows, cols) * multiple`` with ``rot90``) divides ``canvas`` pads a slide
        the same, so a model predicts it the same on each of those meshes.

    Returns
    -------
    RegionPlan

    Raises
    ------
    SlideOpenError, SlideReadError, SlideResolutionError
        From opening, reading the thumbnail, or choosing the level; all name the file.
    SlideTooSmallError
        The slide at the target resolution is smaller than ``grid * multiple``.
    ValueError
        Bad ``grid`` or ``multiple``.
    """
    rows, cols = (int(g) for g in grid)
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be (rows, cols) with both >= 1, got {grid!r}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if canvas is not None and int(canvas) < 1:
        raise ValueError(f"canvas must be None or >= 1, got {canvas}")
    opts = tissue if tissue is not None else TissueOptions()
    slide = open_cached(path)
    choice = select_level(slide, mpp=mpp, level=level, base_mpp=base_mpp)
    w0, h0 = slide.dimensions
    d = choice.downsample
    wt, ht = choice.target_size
    scale = choice.level_scale
    fx, fy = choice.level_factors[0] * scale[0], choice.level_factors[1] * scale[1]  # level 0 per target px
    if ht < rows * multiple or wt < cols * multiple:
        raise SlideTooSmallError(
            slide.path,
            f"{ht} x {wt} (H x W) pixels at level {choice.level}, downsample {d:g} "
            f"is smaller than a grid of {rows} x {cols} (rows x cols) times multiple {multiple} "
            f"(needs at least {rows * multiple} x {cols * multiple} (H x W))",
        )
    mask = None
    tds: tuple[float, float] = (1.0, 1.0)
    box = None
    stain = None
    if opts.enabled or stain_normalize:
        thumb, tds = slide.thumbnail(opts.thumb_size)
        mask = tissue_mask(thumb, opts)
        if opts.enabled:
            box = tissue_bbox(mask, tds, (w0, h0), opts.margin)
        if stain_normalize:
            stain = MacenkoNormalizer.fit(thumb, mask if mask.sum() >= 16 else None)
    if box is None:  # disabled, or a blank slide: keep everything
        box = ((0, 0), (w0, h0))
    (bx, by), (bw, bh) = box
    cx0, cy0 = int(math.floor(bx / fx + 1e-9)), int(math.floor(by / fy + 1e-9))
    cx1 = min(wt, max(cx0 + 1, int(math.ceil((bx + bw) / fx - 1e-9))))
    cy1 = min(ht, max(cy0 + 1, int(math.ceil((by + bh) / fy - 1e-9))))
    cw, ch = cx1 - cx0, cy1 - cy0
    if rot90:
        unit_h = unit_w = math.lcm(rows, cols) * multiple
    else:
        unit_h, unit_w = rows * multiple, cols * multiple
    if canvas is not None:
        unit_h, unit_w = math.lcm(unit_h, int(canvas)), math.lcm(unit_w, int(canvas))
    ph = -(-ch // unit_h) * unit_h
    pw = -(-cw // unit_w) * unit_w
    return RegionPlan(
        path=slide.path,
        grid=(rows, cols),
        multiple=int(multiple),
        level=choice.level,
        level_downsample=choice.level_downsample,
        downsample=d,
        mpp=choice.mpp,
        origin=(cx0 - (pw - cw) // 2, cy0 - (ph - ch) // 2),
        content=((cx0, cy0), (cw, ch)),
        padded_size=(pw, ph),
        rot90=bool(rot90),
        tissue_box=((int(bx), int(by)), (int(bw), int(bh))),
        slide_dimensions=(int(w0), int(h0)),
        thumb_mask=mask if keep_mask else None,
        thumb_downsample=tds,
        stain=stain,
        background=int(background),
        level_factors=choice.level_factors,
        level_scale=scale,
        target_size=(int(wt), int(ht)),
        reader=slide.reader,
        vendor=slide.vendor,
    )


def block_rect(plan: RegionPlan, row: int, col: int, augment: AugmentSpec | None = None) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of block ``(row, col)`` in the augmented padded region."""
    rows, cols = plan.grid
    if not (0 <= row < rows and 0 <= col < cols):
        raise IndexError(f"block ({row}, {col}) outside grid {rows}x{cols} of {plan.path}")
    bh, bw = plan.block_shape(augment)
    return row * bh, (row + 1) * bh, col * bw, (col + 1) * bw


def read_block(
    plan: RegionPlan, row: int, col: int, *, augment: AugmentSpec | None = None, slide: Slide | None = None
) -> np.ndarray:
    """Read block ``(row, col)`` of the (augmented) padded region; nothing else is read.

    Parameters
    ----------
    plan:
        From :func:`plan_region`.
    row, col:
        This rank's place in the grid.
    augment:
        Augmentation drawn identically on every rank of the image, or None.
    slide:
        An open slide to read from (default: a per-process cached handle).

    Returns
    -------
    numpy.ndarray
        ``uint8`` ``(h, w, 3)`` with ``(h, w) == plan.block_shape(augment)``.

    Raises
    ------
    SlideReadError
        The read failed; the message names path, level, (x, y) and (width, height).
    """
    rect = block_rect(plan, row, col, augment)
    if augment is not None:
        h, w = plan.shape()
        rect = augment.source_rect(rect, h, w)
    img = read_rect(plan, rect, slide=slide)
    return augment(img) if augment is not None else img


def read_full(plan: RegionPlan, *, augment: AugmentSpec | None = None, slide: Slide | None = None) -> np.ndarray:
    """Read the whole (augmented) padded region: for tests and small images only.

    Returns
    -------
    numpy.ndarray
        ``uint8`` ``plan.shape(augment) + (3,)``.
    """
    h, w = plan.shape()
    img = read_rect(plan, (0, h, 0, w), slide=slide)
    return augment(img) if augment is not None else img


def content_window(
    plan: RegionPlan, rect: tuple[int, int, int, int]
) -> tuple[tuple[int, int, int, int], tuple[slice, slice]] | None:
    """Where ``rect = (y0, y1, x0, x1)`` of the padded region meets the slide's content box.

    Returns
    -------
    tuple or None
        ``((ty0, ty1, tx0, tx1), (rows, cols))``: that part in target pixels (the level's pixels
        when ``plan.exact``), and the slices of ``rect`` it fills; None if ``rect`` is all padding.
    """
    y0, y1, x0, x1 = rect
    (cx, cy), (cw, ch) = plan.content
    ox, oy = plan.origin
    ty0, ty1 = max(oy + y0, cy), min(oy + y1, cy + ch)
    tx0, tx1 = max(ox + x0, cx), min(ox + x1, cx + cw)
    if ty1 <= ty0 or tx1 <= tx0:
        return None
    return (ty0, ty1, tx0, tx1), (slice(ty0 - oy - y0, ty1 - oy - y0), slice(tx0 - ox - x0, tx1 - ox - x0))


def read_rect(plan: RegionPlan, rect: tuple[int, int, int, int], *, slide: Slide | None = None) -> np.ndarray:
    """Pixels ``rect = (y0, y1, x0, x1)`` of the un-augmented padded region, stain-normalised as
    :func:`read_block` does: any window of the region, e.g. a block with margins
    (:func:`halo.predict_blockwise`).

    Returns
    -------
    numpy.ndarray
        ``uint8`` ``(y1 - y0, x1 - x0, 3)``; outside the content box, ``plan.background``.
    """
    img = _read_padded(plan, rect, slide)
    return plan.stain(img) if plan.stain is not None else img


def _read_padded(plan: RegionPlan, rect: tuple[int, int, int, int], slide: Slide | None) -> np.ndarray:
    """Pixels ``rect = (y0, y1, x0, x1)`` of the un-augmented padded region, before stain normalisation."""
    y0, y1, x0, x1 = rect
    out = np.full((y1 - y0, x1 - x0, 3), plan.background, np.uint8)
    window = content_window(plan, rect)
    if window is None:
        return out
    (ty0, _, tx0, _), (rows, cols) = window
    s = slide if slide is not None else open_cached(plan.path)
    _read_target(s, plan, tx0, ty0, out[rows, cols])
    return out


def _read_target(slide: Slide, plan: RegionPlan, tx0: int, ty0: int, dst: np.ndarray) -> None:
    """Fill ``dst`` ``(h, w, 3)`` with target pixels whose top-left is ``(tx0, ty0)``, chunk by chunk.

    Every read is :meth:`Slide.read_level` at integer level coordinates.
    """
    th, tw = dst.shape[:2]
    if plan.exact:  # target pixels are the level's pixels
        rows_per = max(1, _CHUNK_PIXELS // max(1, tw))
        tile = slide.tile_rows(plan.level)
        if tile:  # chunks end on tile rows, so no tile is decoded twice (1.73x the decodes otherwise)
            rows_per = max(1, rows_per // tile) * tile
        r = 0
        while r < th:
            end = min(th, ((ty0 + r) // tile + rows_per // tile) * tile - ty0 if tile else r + rows_per)
            end = max(end, r + 1)
            dst[r:end] = slide.read_level(plan.level, (tx0, ty0 + r), (tw, end - r), plan.background)
            r = end
        return
    sx, sy = plan.level_scale  # level pixels per target pixel, per axis
    ix, wx = _box_taps(tx0, tw, sx)
    sx0, sx1 = int(ix.min()), int(ix.max()) + 1
    rows_per = max(1, int(_CHUNK_PIXELS // max(1.0, tw * sx * sy)))
    for r in range(0, th, rows_per):
        n = min(rows_per, th - r)
        iy, wy = _box_taps(ty0 + r, n, sy)
        sy0, sy1 = int(iy.min()), int(iy.max()) + 1
        src = slide.read_level(plan.level, (sx0, sy0), (sx1 - sx0, sy1 - sy0), plan.background).astype(np.float32)
        tmp = wy[:, 0, None, None] * src[iy[:, 0] - sy0]
        for k in range(1, iy.shape[1]):
            tmp = tmp + wy[:, k, None, None] * src[iy[:, k] - sy0]
        acc = wx[None, :, 0, None] * tmp[:, ix[:, 0] - sx0]
        for k in range(1, ix.shape[1]):
            acc = acc + wx[None, :, k, None] * tmp[:, ix[:, k] - sx0]
        dst[r : r + n] = np.clip(np.rint(acc), 0, 255).astype(np.uint8)


def _box_taps(t0: int, n: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Box-filter taps for target pixels ``t0 .. t0+n-1`` at ``s`` source pixels each.

    Target pixel ``t`` covers source ``[t*s, (t+1)*s)``; tap ``k`` is source pixel
    ``floor(t*s) + k`` with weight ``overlap / s``. Depends only on the global ``t``.

    Returns
    -------
    idx, weight:
        ``(n, K)`` int64 source indices and float32 weights.
    """
    t = np.arange(t0, t0 + n, dtype=np.float64)
    lo = t * s
    hi = (t + 1) * s
    k = int(math.ceil(s)) + 1
    idx = np.floor(lo).astype(np.int64)[:, None] + np.arange(k)[None, :]
    left = np.maximum(idx, lo[:, None])
    right = np.minimum(idx + 1, hi[:, None])
    wgt = (np.clip(right - left, 0.0, None) / s).astype(np.float32)
    last = np.maximum(np.ceil(hi).astype(np.int64) - 1, idx[:, 0])
    idx = np.minimum(idx, last[:, None])  # zero-weight taps point at a pixel already read
    return idx, wgt
