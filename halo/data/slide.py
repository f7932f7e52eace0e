"""A small, context-managed reader over OpenSlide, with errors that name the file.

Coordinate frames (used in every docstring of ``halo.data``):

* **level 0**: pixels of the full-resolution scan; a *location* is ``(x, y)``
  in level 0, a *size* is ``(width, height)``.
* **level L**: pixels of pyramid level ``L``, ``level_downsamples[L]`` level-0
  pixels per level pixel.
* **target**: pixels at the training resolution chosen by :func:`select_level`;
  ``downsample`` level-0 pixels per target pixel.

Arrays are always ``(height, width, 3)`` ``uint8`` RGB. OpenSlide returns RGBA with
alpha 0 outside the scanned area; :meth:`Slide.read` composites onto a white
background so that padding never looks like tissue.

Error semantics: OpenSlide latches a handle after its first ``OpenSlideError``;
:class:`Slide` wraps every OpenSlide exception into a :class:`SlideError` subclass
carrying the path (and for reads, level, location and size). The handle cache
(:func:`open_cached`) drops a handle that raised, so the next read reopens it.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from types import TracebackType
import numpy as np

__all__ = [
    "SlideError",
    "SlideOpenError",
    "SlideReadError",
    "SlideResolutionError",
    "SlideTooSmallError",
    "Slide",
    "LevelChoice",
    "open_slide",
    "open_cached",
    "clear_cache",
    "select_level",
    "composite_white",
]

IntPair = tuple[int, int]
"""``(x, y)`` or ``(width, height)``, in the frame the docstring names."""

MPP_TOLERANCE = 0.02
"""Relative tolerance under which a pyramid level counts as matching a requested mpp."""


class SlideError(Exception):
    """Base class: a slide could not be opened, read or planned. Always names the file.

    Attributes
    ----------
    path:
        The slide's path.
    """

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")


class SlideOpenError(SlideError, OSError):
    """The file is missing, not a format OpenSlide reads, or its header is broken."""


class SlideReadError(SlideError, OSError):
    """A region read failed (a corrupt tile, a truncated file).

    Attributes
    ----------
    level, location, size:
        The failed read: pyramid level, ``(x, y)`` in level 0, ``(width, height)`` in level.
    """

    def __init__(
        self, path: str | os.PathLike[str], level: int, location: IntPair, size: IntPair, cause: str
    ) -> None:
        self.level, self.location, self.size = level, tuple(location), tuple(size)
        super().__init__(
            path,
            f"read failed at level {level}, (x, y)={tuple(location)} in level 0, "
            f"(width, height)={tuple(size)}: {cause}",
        )


class SlideResolutionError(SlideError, ValueError):
    """Neither a requested mpp nor a level can decide the resolution to read at."""


class SlideTooSmallError(SlideError, ValueError):
    """The slide at the target resolution is smaller than the grid needs."""


def composite_white(rgba: np.ndarray, background: int = 255) -> np.ndarray:
    """Composite non-premultiplied RGBA ``(h, w, 4)`` onto a flat background.

    Integer arithmetic, pixel by pixel, so that any sub-array gives the same numbers.

    Parameters
    ----------
    rgba:
        ``uint8`` array ``(h, w, 4)`` as OpenSlide returns (alpha 0 outside the slide).
    background:
        Grey level of the background, 255 (white) by default.

    Returns
    -------
    numpy.ndarray
        ``uint8`` ``(h, w, 3)``.
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    out = (rgb.astype(np.uint32) * a + np.uint32(background) * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class Slide:
    """An open whole-slide image (any format OpenSlide reads); a context manager.

    Parameters
    ----------
    path:
        Path of the slide file (or DICOM directory).

    Raises
    ------
    SlideOpenError
        The file is missing or OpenSlide cannot open it; the message names the path.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise SlideOpenError(self.path, "no such file")
        import openslide  # lazily: importing halo.data must stay cheap

        self._openslide = openslide
        try:
            fmt = openslide.OpenSlide.detect_format(self.path)
        except Exception as exc:  # noqa: BLE001 - any OpenSlide failure names the file
            raise SlideOpenError(self.path, f"cannot detect format: {exc}") from exc
        if fmt is None:
            raise SlideOpenError(self.path, "not a slide format OpenSlide reads")
        try:
            self._osr = openslide.OpenSlide(self.path)
        except Exception as exc:  # noqa: BLE001
            raise SlideOpenError(self.path, f"OpenSlide cannot open it ({fmt}): {exc}") from exc
        self.format: str = fmt
        self.failed = False

    # -- metadata -----------------------------------------------------------------
    @property
    def dimensions(self) -> IntPair:
        """``(width, height)`` of level 0."""
        return tuple(self._osr.dimensions)  # type: ignore[return-value]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return int(self._osr.level_count)

    @property
    def level_dimensions(self) -> tuple[IntPair, ...]:
        """``(width, height)`` of each level, in that level's pixels."""
        return tuple(tuple(d) for d in self._osr.level_dimensions)  # type: ignore[misc]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 pixels per level pixel, for each level."""
        return tuple(float(d) for d in self._osr.level_downsamples)

    @property
    def properties(self) -> dict[str, str]:
        """OpenSlide's property map (vendor keys and ``openslide.*``)."""
        return dict(self._osr.properties)

    @property
    def mpp(self) -> float | None:
        """Microns per level-0 pixel from ``openslide.mpp-x``, or None when unknown."""
        props = self._osr.properties
        try:
            mx = float(props["openslide.mpp-x"])
        except (KeyError, ValueError):
            return None
        if not math.isfinite(mx) or mx <= 0:
            return None
        my = props.get("openslide.mpp-y")
        try:
            if my is not None and abs(float(my) - mx) > MPP_TOLERANCE * mx:
                warnings.warn(f"{self.path}: mpp-x {mx} != mpp-y {my}; using mpp-x", stacklevel=2)
        except ValueError:
            pass
        return mx

    # -- reading ------------------------------------------------------------------
    def read(self, location: IntPair, level: int, size: IntPair, background: int = 255) -> np.ndarray:
        """Read a region as RGB, with pixels outside the slide filled by ``background``.

        Parameters
        ----------
        location:
            ``(x, y)`` of the top-left pixel, in level-0 coordinates.
        level:
            Pyramid level to read.
        size:
            ``(width, height)`` in pixels of ``level``.
        background:
            Grey level for pixels outside the scanned area (alpha 0).

        Returns
        -------
        numpy.ndarray
            ``uint8`` ``(height, width, 3)``.

        Raises
        ------
        SlideReadError
            OpenSlide failed; the message gives path, level, (x, y) and (width, height).
        """
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0), 3), background, np.uint8)
        try:
            img = self._osr.read_region((x, y), int(level), (w, h))
            rgba = np.asarray(img)
        except Exception as exc:  # noqa: BLE001 - OpenSlideError and ctypes failures
            self.failed = True
            raise SlideReadError(self.path, level, (x, y), (w, h), str(exc) or type(exc).__name__) from exc
        return composite_white(rgba, background)

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, tuple[float, float]]:
        """A low-resolution RGB image of the whole slide.

        Parameters
        ----------
        max_size:
            Longest side wanted; the result is between ``max_size`` and about twice
            that (or the coarsest level, if smaller).

        Returns
        -------
        thumb:
            ``uint8`` ``(h, w, 3)``, background white.
        downsample:
            ``(sx, sy)``: level-0 pixels per thumbnail pixel along x and y.
        """
        w0, h0 = self.dimensions
        want = max(w0, h0) / max(1, int(max_size))
        level = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= want * (1 + 1e-6):
                level = i
        lw, lh = self.level_dimensions[level]
        img = self.read((0, 0), level, (lw, lh))
        factor = max(1, int(max(lw, lh) // max(1, int(max_size))))
        if factor > 1:
            th, tw = lh // factor, lw // factor
            img = img[: th * factor, : tw * factor].reshape(th, factor, tw, factor, 3).mean(axis=(1, 3))
            img = np.rint(img).astype(np.uint8)
        th, tw = img.shape[:2]
        return img, (w0 / tw, h0 / th)

    def close(self) -> None:
        """Close the OpenSlide handle."""
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.path!r})"


def open_slide(path: str | os.PathLike[str]) -> Slide:
    """Open a slide (SVS, NDPI, MRXS, generic tiled TIFF, DICOM, ...) with OpenSlide.

    Parameters
    ----------
    path:
        Path of the slide.

    Returns
    -------
    Slide
        Use it as a context manager.
    """
    return Slide(path)


_CACHE: OrderedDict[tuple[str, int], Slide] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 8


def open_cached(path: str | os.PathLike[str]) -> Slide:
    """A per-process cache of open slides (LRU, 8 handles), keyed by path and pid.

    OpenSlide handles are safe to share across threads. A handle that raised is
    dropped, so the next call reopens the file.
    """
    key = (os.fspath(path), os.getpid())
    with _CACHE_LOCK:
        slide = _CACHE.get(key)
        if slide is not None and not slide.failed:
            _CACHE.move_to_end(key)
            return slide
        if slide is not None:
            _CACHE.pop(key)
    slide = Slide(path)
    with _CACHE_LOCK:
        _CACHE[key] = slide
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return slide


def clear_cache() -> None:
    """Forget every cached handle (they are closed when garbage-collected)."""
    with _CACHE_LOCK:
        _CACHE.clear()


@dataclass(frozen=True, kw_only=True, slots=True)
class LevelChoice:
    """Where to read from to get a target resolution.

    Attributes
    ----------
    level:
        Pyramid level read.
    level_downsample:
        Level-0 pixels per pixel of ``level``.
    downsample:
        Level-0 pixels per target pixel (``>= level_downsample``).
    mpp:
        Microns per target pixel, or None when the slide has no mpp.
    """

    level: int
    level_downsample: float
    downsample: float
    mpp: float | None

    @property
    def scale(self) -> float:
        """Target pixels per level pixel: 1.0 reads the level as is, < 1 resamples."""
        return self.level_downsample / self.downsample


def select_level(
    slide: Slide, mpp: float | None = None, level: int | None = None, tolerance: float = MPP_TOLERANCE
) -> LevelChoice:
    """Choose the pyramid level (and resampling) for a requested resolution.

    A level whose mpp is within ``tolerance`` (relative) of ``mpp`` is read as is;
    otherwise the nearest finer level is read and resampled. ``level`` is used when
    ``mpp`` is None, or when the slide has no mpp metadata. With neither, level 0.

    Parameters
    ----------
    slide:
        An open slide.
    mpp:
        Microns per pixel wanted, or None.
    level:
        Pyramid level to read at when no mpp decides, or None.
    tolerance:
        Relative mpp difference under which a level matches.

    Raises
    ------
    SlideResolutionError
        ``mpp`` requested but the slide has no ``openslide.mpp-x`` and no ``level``
        is given; ``mpp`` finer than level 0; ``level`` out of range.
    """
    ds = slide.level_downsamples
    base = slide.mpp
    if level is not None and not 0 <= int(level) < len(ds):
        raise SlideResolutionError(slide.path, f"level {level} out of range: the slide has {len(ds)} levels")
    if mpp is not None and base is not None:
        if mpp <= 0:
            raise SlideResolutionError(slide.path, f"mpp must be positive, got {mpp}")
        want = mpp / base  # level-0 pixels per target pixel
        if want < 1 - tolerance:
            raise SlideResolutionError(
                slide.path, f"requested mpp {mpp} is finer than level 0 ({base} mpp); upsampling is refused"
            )
        for i, d in enumerate(ds):
            if abs(d - want) <= tolerance * want:
                return LevelChoice(level=i, level_downsample=d, downsample=d, mpp=base * d)
        finer = max(i for i, d in enumerate(ds) if d <= want)
        return LevelChoice(level=finer, level_downsample=ds[finer], downsample=want, mpp=float(mpp))
    if mpp is not None and level is None:
        raise SlideResolutionError(
            slide.path,
            f"mpp={mpp} requested but the slide has no openslide.mpp-x; pass level= to read it",
        )
    lv = 0 if level is None else int(level)
    return LevelChoice(
        level=lv, level_downsample=ds[lv], downsample=ds[lv], mpp=None if base is None else base * ds[lv]
    )

