"""Slides in: each rank opens the slide itself and reads only its own block.

Public contract (relied on outside the project)::

    plan = halo.data.plan_region(path, grid=(rows, cols), multiple=32, mpp=None, level=None)
    block = halo.data.read_block(plan, row, col)   # uint8 (h, w, 3)
    full = halo.data.read_full(plan)               # the blocks tile it exactly

Frames: level-0 pixels ``(x, y)`` / ``(width, height)``; level pixels (a pyramid
level's stored pixels, ``plan.level_factors`` level-0 pixels each); target pixels at
the training resolution (a level's own pixels, or a box filter of them); arrays
``(height, width, 3)``. ``plan.reader`` names the library that read the pixels
(``"tifffile"`` or ``"openslide"``). Nothing here knows about autograd or
``torch.distributed``.
"""

from halo.data.augment import IDENTITY, Augment, AugmentSpec, MacenkoNormalizer
from halo.data.dataset import SKIPPED_COLUMNS, ManifestError, ManifestRow, SlideDataset, SlideItem, slide_ref
from halo.data.prefetch import Prefetcher
from halo.data.region import RegionPlan, block_rect, content_window, plan_region, read_block, read_full, read_rect
from halo.data.slide import (
    LevelChoice,
    Slide,
    SlideDamagedError,
    SlideError,
    SlideOpenError,
    SlideReadError,
    SlideResolutionError,
    SlideTooSmallError,
    open_slide,
    select_level,
)
from halo.data.tissue import TissueOptions, tissue_bbox, tissue_mask

__all__ = [
    "plan_region",
    "read_block",
    "read_full",
    "read_rect",
    "block_rect",
    "content_window",
    "RegionPlan",
    "SlideDataset",
    "SlideItem",
    "ManifestRow",
    "ManifestError",
    "SKIPPED_COLUMNS",
    "slide_ref",
    "Prefetcher",
    "Augment",
    "AugmentSpec",
    "IDENTITY",
    "MacenkoNormalizer",
    "TissueOptions",
    "tissue_mask",
    "tissue_bbox",
    "Slide",
    "open_slide",
    "select_level",
    "LevelChoice",
    "SlideError",
    "SlideOpenError",
    "SlideReadError",
    "SlideDamagedError",
    "SlideResolutionError",
    "SlideTooSmallError",
]
