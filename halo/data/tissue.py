"""Tissue detection on a low-resolution thumbnail.

Saturation separates stained tissue from (grey-white) glass. Stains are often
bimodal (dark epithelium, pale stroma) and plain Otsu would put its threshold
inside the tissue, so tissue is ``saturation > min(otsu, floor)``; small objects
(dust, pen specks) are then removed. All thresholds are configurable through
:class:`TissueOptions`.

Frames: the mask is in thumbnail pixels; :func:`tissue_bbox` returns a box in
level-0 pixels, ``(x, y)`` top-left and ``(width, height)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TissueOptions", "tissue_mask", "tissue_bbox"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TissueOptions:
    """How tissue is found on the thumbnail.

    Attributes
    ----------
    thumb_size:
        Longest side (pixels) of the thumbnail the mask is computed on.
    floor:
        Saturation threshold ceiling in [0, 1]: the threshold is ``min(otsu, floor)``.
        Use ``floor=1.0`` for plain Otsu.
    min_object_fraction:
        Connected components smaller than this fraction of the thumbnail area are removed.
    margin:
        Margin added around the tissue bounding box, as a fraction of its larger side.
    enabled:
        False reads the whole slide (no crop).
    """

    thumb_size: int = 1024
    floor: float = 8 / 255
    min_object_fraction: float = 1e-4
    margin: float = 0.02
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.thumb_size < 8:
            raise ValueError(f"TissueOptions.thumb_size must be >= 8, got {self.thumb_size}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"TissueOptions.floor must be in [0, 1], got {self.floor}")
        if not 0.0 <= self.min_object_fraction < 1.0:
            raise ValueError(
                f"TissueOptions.min_object_fraction must be in [0, 1), got {self.min_object_fraction}"
            )
        if self.margin < 0:
            raise ValueError(f"TissueOptions.margin must be >= 0, got {self.margin}")


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` in [0, 1] of a ``uint8`` ``(h, w, 3)`` image."""
    x = rgb.astype(np.float32)
    mx = x.max(axis=-1)
    mn = x.min(axis=-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)


def tissue_mask(thumb: np.ndarray, options: TissueOptions = TissueOptions()) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail.

    Parameters
    ----------
    thumb:
        ``uint8`` ``(h, w, 3)``, background white.
    options:
        Thresholds.

    Returns
    -------
    numpy.ndarray
        ``bool`` ``(h, w)``; True on tissue. Empty if the slide is blank.
    """
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    sat = saturation(thumb)
    if float(sat.max()) - float(sat.min()) < 1e-6:
        otsu = 1.0
    else:
        otsu = float(threshold_otsu(sat))
    thr = min(otsu, options.floor)
    mask = sat > thr
    min_size = int(options.min_object_fraction * mask.size)
    if min_size > 1 and mask.any():
        try:
            mask = remove_small_objects(mask, max_size=min_size)
        except TypeError:  # scikit-image < 0.26
            mask = remove_small_objects(mask, min_size=min_size)
    return mask


def tissue_bbox(
    mask: np.ndarray, downsample: tuple[float, float], dimensions: tuple[int, int], margin: float = 0.0
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Bounding box of a thumbnail mask, in level-0 pixels.

    Parameters
    ----------
    mask:
        ``bool`` ``(h, w)`` in thumbnail pixels.
    downsample:
        ``(sx, sy)`` level-0 pixels per thumbnail pixel.
    dimensions:
        ``(width, height)`` of level 0, to clip to.
    margin:
        Added on every side, as a fraction of the box's larger side, on top of one
        thumbnail pixel of slack (edge pixels mixing tissue and glass may be missed).

    Returns
    -------
    tuple or None
        ``((x, y), (width, height))`` in level 0, or None if the mask is empty.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    sx, sy = downsample
    # one thumbnail pixel of slack: an edge pixel half tissue, half glass may fall under the threshold
    x0, x1 = (cols[0] - 1) * sx, (cols[-1] + 2) * sx
    y0, y1 = (rows[0] - 1) * sy, (rows[-1] + 2) * sy
    m = margin * max(x1 - x0, y1 - y0)
    w0, h0 = dimensions
    x0, y0 = max(0, int(np.floor(x0 - m))), max(0, int(np.floor(y0 - m)))
    x1, y1 = min(w0, int(np.ceil(x1 + m))), min(h0, int(np.ceil(y1 + m)))
    return (x0, y0), (x1 - x0, y1 - y0)
