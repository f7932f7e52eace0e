"""Augmentation that stays consistent across the ranks of one image.

Every rank of one image calls :meth:`Augment.draw` with the same seed and gets the
same frozen :class:`AugmentSpec`. Geometry (a left-right flip then ``rot``
counter-clockwise quarter turns, i.e. the 8 symmetries of a rectangle) acts on
*global* coordinates: :meth:`AugmentSpec.source_rect` maps a block of the
augmented image back to the rectangle of the un-augmented region that a rank has
to read, and :meth:`AugmentSpec.apply_geometry` turns that rectangle into the
block. Colour operations (HED stain jitter, brightness, contrast, Macenko stain
normalisation) are pointwise and written as explicit per-pixel arithmetic, so a
block gives bit-for-bit the pixels of the full image.

Frames: arrays are ``(height, width, 3)``; rectangles are ``(y0, y1, x0, x1)``
half-open, in pixels of the array they index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Augment", "AugmentSpec", "MacenkoNormalizer", "IDENTITY"]

Rect = tuple[int, int, int, int]
"""``(y0, y1, x0, x1)``, half-open, in array pixels."""

# Ruifrok & Johnston stain vectors (rows: H, E, DAB) as scikit-image uses them.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def _od(rgb: np.ndarray) -> list[np.ndarray]:
    """Optical density per channel, ``-log((I + 1) / 256)``, as three float64 planes."""
    x = rgb.astype(np.float64)
    return [-np.log((x[..., c] + 1.0) / 256.0) for c in range(3)]


def _from_od(od: list[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`_od`, rounded and clipped to ``uint8`` ``(h, w, 3)``."""
    out = np.stack([256.0 * np.exp(-p) - 1.0 for p in od], axis=-1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _matvec(m: np.ndarray, planes: list[np.ndarray]) -> list[np.ndarray]:
    """``out[j] = sum_i planes[i] * m[i, j]``, summed in a fixed order (bitwise per pixel)."""
    out = []
    for j in range(m.shape[1]):
        acc = planes[0] * m[0, j]
        for i in range(1, m.shape[0]):
            acc = acc + planes[i] * m[i, j]
        out.append(acc)
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class AugmentSpec:
    """One drawn augmentation; the same on every rank of one image.

    Attributes
    ----------
    flip:
        Mirror left-right first.
    rot:
        Then this many counter-clockwise quarter turns (0-3), as ``numpy.rot90``.
    hed_scale, hed_shift:
        Per stain (H, E, DAB): concentration ``c -> c * scale + shift``.
    brightness:
        Added to every channel, as a fraction of 255.
    contrast:
        Multiplies the distance from mid-grey (128).
    """

    flip: bool = False
    rot: int = 0
    hed_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hed_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    brightness: float = 0.0
    contrast: float = 1.0

    def __post_init__(self) -> None:
        if self.rot not in (0, 1, 2, 3):
            raise ValueError(f"AugmentSpec.rot must be 0, 1, 2 or 3, got {self.rot}")

    @property
    def swaps_axes(self) -> bool:
        """True when the augmented image is the transpose shape (odd quarter turns)."""
        return self.rot % 2 == 1

    @property
    def has_colour(self) -> bool:
        """True when any colour operation is not the identity."""
        return (
            self.hed_scale != (1.0, 1.0, 1.0)
            or self.hed_shift != (0.0, 0.0, 0.0)
            or self.brightness != 0.0
            or self.contrast != 1.0
        )

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` of the augmented image of a ``(height, width)`` image."""
        return (width, height) if self.swaps_axes else (height, width)

    def source_rect(self, rect: Rect, height: int, width: int) -> Rect:
        """The rectangle of the un-augmented image that becomes ``rect`` of the augmented one.

        Parameters
        ----------
        rect:
            ``(y0, y1, x0, x1)`` in the augmented image.
        height, width:
            Shape of the un-augmented image.

        Returns
        -------
        Rect
            ``(y0, y1, x0, x1)`` in the un-augmented image.
        """
        y0, y1, x0, x1 = rect
        corners = [self._inverse_point(y0, x0, height, width), self._inverse_point(y1 - 1, x1 - 1, height, width)]
        ys = [c[0] for c in corners]
        xs = [c[1] for c in corners]
        return min(ys), max(ys) + 1, min(xs), max(xs) + 1

    def _inverse_point(self, i: int, j: int, height: int, width: int) -> tuple[int, int]:
        h, w = self.output_shape(height, width)
        for _ in range(self.rot):  # undo one CCW quarter turn: shape (h, w) <- (w, h)
            i, j = j, h - 1 - i
            h, w = w, h
        if self.flip:
            j = w - 1 - j
        return i, j

    def apply_geometry(self, image: np.ndarray) -> np.ndarray:
        """Flip then rotate ``image`` ``(h, w, ...)``; contiguous result."""
        out = image[:, ::-1] if self.flip else image
        if self.rot:
            out = np.rot90(out, self.rot, axes=(0, 1))
        return np.ascontiguousarray(out)

    def apply_colour(self, image: np.ndarray) -> np.ndarray:
        """HED jitter, then brightness and contrast; pointwise on ``uint8`` ``(h, w, 3)``."""
        if not self.has_colour:
            return image
        if self.hed_scale != (1.0, 1.0, 1.0) or self.hed_shift != (0.0, 0.0, 0.0):
            conc = _matvec(_HED_FROM_RGB, _od(image))
            conc = [c * s + b for c, s, b in zip(conc, self.hed_scale, self.hed_shift)]
            image = _from_od(_matvec(_RGB_FROM_HED, conc))
        if self.brightness != 0.0 or self.contrast != 1.0:
            x = image.astype(np.float64)
            x = (x - 128.0) * self.contrast + (128.0 + 255.0 * self.brightness)
            image = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return image

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Augment a whole image: colour, then geometry."""
        return self.apply_geometry(self.apply_colour(image))


IDENTITY = AugmentSpec()
"""The augmentation that changes nothing."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Augment:
    """Distribution of augmentations; :meth:`draw` is deterministic in its seed.

    Attributes
    ----------
    flips:
        Draw a left-right flip with probability 1/2.
    rot90:
        Draw 0-3 quarter turns uniformly. The region plan must allow it
        (``plan_region(..., rot90=True)``, the default) when the grid is not square.
    hed_sigma:
        Stain scale drawn from ``U(1 - hed_sigma, 1 + hed_sigma)`` per stain.
    hed_bias:
        Stain shift drawn from ``U(-hed_bias, hed_bias)`` per stain.
    brightness:
        Brightness drawn from ``U(-brightness, brightness)`` (fraction of 255).
    contrast:
        Contrast drawn from ``U(1 - contrast, 1 + contrast)``.
    """

    flips: bool = True
    rot90: bool = True
    hed_sigma: float = 0.05
    hed_bias: float = 0.01
    brightness: float = 0.05
    contrast: float = 0.1

    def draw(self, seed: int | np.random.SeedSequence) -> AugmentSpec:
        """Draw one :class:`AugmentSpec`; every rank passing the same seed gets the same one."""
        rng = np.random.default_rng(seed)
        u = rng.random(12)  # always consume the same numbers, whatever is enabled
        scale = tuple(float(1 + self.hed_sigma * (2 * v - 1)) for v in u[2:5])
        shift = tuple(float(self.hed_bias * (2 * v - 1)) for v in u[5:8])
        return AugmentSpec(
            flip=bool(self.flips and u[0] < 0.5),
            rot=int(u[1] * 4) % 4 if self.rot90 else 0,
            hed_scale=scale if self.hed_sigma else (1.0, 1.0, 1.0),  # type: ignore[arg-type]
            hed_shift=shift if self.hed_bias else (0.0, 0.0, 0.0),  # type: ignore[arg-type]
            brightness=float(self.brightness * (2 * u[8] - 1)),
            contrast=float(1 + self.contrast * (2 * u[9] - 1)),
        )


# Macenko reference (H and E columns) and 99th-percentile concentrations, as commonly used.
_REF_HE = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
_REF_MAX = (1.9705, 1.0308)


@dataclass(frozen=True, kw_only=True, slots=True)
class MacenkoNormalizer:
    """Macenko stain normalisation, fitted once (on the thumbnail) and applied per block.

    Attributes
    ----------
    stain:
        ``(3, 2)`` stain matrix (H column, E column) of the source slide, in OD space.
    max_conc:
        99th-percentile H and E concentrations of the source slide.
    ref_stain, ref_max:
        The target (reference) stain matrix and concentrations.
    """

    stain: tuple[tuple[float, float], ...]
    max_conc: tuple[float, float]
    ref_stain: tuple[tuple[float, float], ...] = _REF_HE
    ref_max: tuple[float, float] = _REF_MAX

    @classmethod
    def fit(cls, rgb: np.ndarray, mask: np.ndarray | None = None, beta: float = 0.15, alpha: float = 1.0
            ) -> MacenkoNormalizer:
        """Estimate the stain matrix from RGB pixels (e.g. a thumbnail's tissue).

        Parameters
        ----------
        rgb:
            ``uint8`` ``(..., 3)``.
        mask:
            Optional ``bool`` mask of the pixels to use (tissue).
        beta:
            Pixels with optical density below ``beta`` in any channel are ignored.
        alpha:
            Percentile of the extreme angles (robust min/max).

        Raises
        ------
        ValueError
            Fewer than 16 stained pixels to fit on.
        """
        px = rgb[mask] if mask is not None else rgb.reshape(-1, 3)
        od = -np.log((px.astype(np.float64) + 1.0) / 256.0)
        od = od[np.all(od > beta, axis=1)]
        if od.shape[0] < 16:
            raise ValueError(f"Macenko fit needs at least 16 stained pixels, got {od.shape[0]}")
        _, vecs = np.linalg.eigh(np.cov(od.T))
        plane = vecs[:, 1:3]
        proj = od @ plane
        phi = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
        v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
        v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
        he = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
        he = he * np.sign(he.sum(axis=0, keepdims=True) + 1e-12)  # OD vectors are positive
        conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
        mx = np.percentile(conc, 99, axis=1)
        return cls(
            stain=tuple((float(a), float(b)) for a, b in he),
            max_conc=(float(max(mx[0], 1e-6)), float(max(mx[1], 1e-6))),
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Normalise ``uint8`` ``(h, w, 3)`` pixel by pixel (bitwise equal on any sub-block)."""
        pinv = np.linalg.pinv(np.array(self.stain))  # (2, 3)
        conc = _matvec(pinv.T, _od(image))
        conc = [c * (r / m) for c, r, m in zip(conc, self.ref_max, self.max_conc)]
        return _from_od(_matvec(np.array(self.ref_stain).T, conc))
