"""A small, context-managed slide reader, with errors that name the file.

Coordinate frames (used in every docstring of ``halo.data``):

* **level 0**: pixels of the full-resolution scan; a *location* is ``(x, y)``
  in level 0, a *size* is ``(width, height)``.
* **level L**: the stored pixels of pyramid level ``L``, ``level_dimensions[L]``
  of them. Scanners round level sizes (``ceil(w / 4)``), so the level-0 pixels
  per level pixel differ per axis: :meth:`Slide.level_factors` gives
  ``(w0 / wL, h0 / hL)``; OpenSlide's ``level_downsamples[L]`` is their mean and is
  often not a whole number (4.0003, 4.016 ...).
* **target**: pixels at the training resolution chosen by :func:`select_level`:
  either the pixels of an exact level, or level-0 pixels resampled by
  ``downsample`` (level-0 pixels per target pixel, both axes).

Readers (:attr:`Slide.reader`):

* ``"tifffile"``: Aperio SVS and generic tiled TIFF whose levels tifffile decodes as
  OpenSlide does (8-bit RGB, or JPEG YCbCr; uncompressed, LZW, deflate, zstd,
  JPEG, Aperio JPEG 2000 RGB 33005). Each OpenSlide level is mapped to the tiled
  TIFF page of the same dimensions (parsed once per :class:`Slide`) and read
  lazily, at integer level coordinates and without resampling: only the tiles a
  read touches are read (``os.pread``) and decoded by tifffile's decoder of the
  page. Every level is exact.
* ``"openslide"``: everything else (DICOM, MRXS, NDPI, ..., and Aperio JPEG 2000
  YCbCr 33003, which tifffile returns unconverted). ``read_region`` takes level-0
  locations and paints a level at ``x / downsample``, so only levels whose size
  divides level 0 by one whole number (:meth:`Slide.exact_level`) can be read
  in level pixels; :meth:`Slide.read_level` refuses the others, and
  :func:`select_level` resamples from an exact level instead.

Arrays are always ``(height, width, 3)`` ``uint8`` RGB. OpenSlide returns RGBA with
alpha 0 outside the scanned area; :meth:`Slide.read` composites onto a white
background so that padding never looks like tissue. Missing TIFF tiles (byte
count 0) read as background too.

Error semantics: OpenSlide latches a handle after its first ``OpenSlideError``;
:class:`Slide` wraps every reader exception into a :class:`SlideError` subclass
carrying the path (and for reads, level, location and size). The handle cache
(:func:`open_cached`) drops a handle that raised, so the next read reopens it.
A TIFF whose directories or tiles lie past the end of the file (a truncated copy)
raises :class:`SlideDamagedError` on opening or from :meth:`Slide.verify`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

__all__ = [
    "SlideError",
    "SlideOpenError",
    "SlideReadError",
    "SlideDamagedError",
    "SlideResolutionError",
    "SlideTooSmallError",
    "Slide",
    "LevelChoice",
    "open_slide",
    "open_cached",
    "clear_cache",
    "select_level",
    "composite_white",
    "READERS",
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
    reader:
        Which reader failed: ``"openslide"`` (opening, or its reads) or ``"tifffile"`` (decoding
        tiles); None when no reader was involved (a missing file, a check of the file itself).
    """

    reader: str | None = None

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = os.fspath(path)
        self.where: str | None = None
        super().__init__(f"{self.path}: {message}")

    def named(self, where: str) -> SlideError:
        """Name the slide as a manifest row does (``where``: :func:`halo.data.slide_ref`, its CSV
        line, key and path) instead of by its path alone: the message becomes
        ``"<where>: <type>: <what happened>"``. Returns this error (named once)."""
        if getattr(self, "where", None) is None:
            msg = str(self)
            if msg.startswith(f"{self.path}: "):
                msg = msg[len(self.path) + 2:]
            self.where = where
            self.args = (f"{where}: {type(self).__name__}: {msg}",)
        return self


def _by(reader: str, err: SlideError) -> SlideError:
    """``err`` with :attr:`SlideError.reader` set."""
    err.reader = reader
    return err


_QUIET = threading.local()


class _QuietTifffile(logging.Filter):
    """Drops tifffile's own log lines while halo reads a file (:func:`_quiet_tifffile`): halo
    reports what went wrong itself, once, naming the slide; elsewhere tifffile logs as usual."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_QUIET, "depth", 0)


logging.getLogger("tifffile").addFilter(_QuietTifffile())


@contextlib.contextmanager
def _quiet_tifffile():
    _QUIET.depth = getattr(_QUIET, "depth", 0) + 1
    try:
        yield
    finally:
        _QUIET.depth -= 1


class SlideOpenError(SlideError, OSError):
    """The file is missing, not a format OpenSlide reads, or its header is broken."""


class SlideReadError(SlideError, OSError):
    """A region read failed (a corrupt tile, a truncated file).

    Attributes
    ----------
    level, location, size:
        The failed read: pyramid level, ``(x, y)`` in ``frame``, ``(width, height)`` in level.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        level: int,
        location: IntPair,
        size: IntPair,
        cause: str,
        frame: str = "level 0",
    ) -> None:
        self.level, self.location, self.size = level, tuple(location), tuple(size)
        super().__init__(
            path,
            f"read failed at level {level}, (x, y)={tuple(location)} in {frame}, "
            f"size {size[1]} x {size[0]} (H x W): {cause}",
        )


class SlideDamagedError(SlideOpenError, SlideReadError):
    """The file ends early or is damaged: TIFF directories or tiles lie past its end.

    Raised on opening (then it is a :class:`SlideOpenError`) and by
    :meth:`Slide.verify` (both are :class:`SlideReadError` too).

    Attributes
    ----------
    level:
        The pyramid level found damaged, or None (the file as a whole).
    location, size:
        Always None.
    """

    def __init__(self, path: str | os.PathLike[str], detail: str, level: int | None = None) -> None:
        self.level, self.location, self.size = level, None, None  # type: ignore[assignment]
        SlideError.__init__(self, path, f"file ends early / damaged: {detail}")


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


READERS: tuple[str, str] = ("tifffile", "openslide")
"""Values of :attr:`Slide.reader`."""

_TIFFFILE_FORMATS = ("aperio", "generic-tiff")
"""OpenSlide formats whose levels are plain TIFF pages (no overlaps, no stitching)."""

_TIFFFILE_COMPRESSIONS = {1: "none", 5: "LZW", 7: "JPEG", 8: "deflate", 32946: "deflate", 33005: "JPEG 2000 RGB",
                          50000: "zstd"}
"""TIFF compressions tifffile decodes bit-identically to OpenSlide (33003, YCbCr JPEG 2000, it does not convert)."""


def _tiff_header(path: str) -> tuple[str, bool, int] | None:
    """``(byteorder, bigtiff, first IFD offset)`` of a TIFF file, or None when it is not one."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 8 or head[:2] not in (b"II", b"MM"):
        return None
    bo = "<" if head[:2] == b"II" else ">"
    version = struct.unpack(bo + "H", head[2:4])[0]
    if version == 42:
        return bo, False, struct.unpack(bo + "I", head[4:8])[0]
    if version == 43 and len(head) == 16:
        return bo, True, struct.unpack(bo + "Q", head[8:16])[0]
    return None


def _page_damage(page: Any, size: int, what: str) -> str | None:
    """Why ``page``'s tiles or strips do not fit in a file of ``size`` bytes, or None."""
    off = np.asarray(page.dataoffsets, np.int64)
    cnt = np.asarray(page.databytecounts, np.int64)
    if off.size == 0:
        return None
    end = off + cnt
    bad = (cnt > 0) & (end > size)
    if not bad.any():
        return None
    kind = "tiles" if page.is_tiled else "strips"
    return (
        f"{what} (TIFF directory {page.index}, {page.imagelength} x {page.imagewidth} (H x W)): {int(bad.sum())} of "
        f"{off.size} {kind} end past the end of the file (data up to byte {int(end.max())}, "
        f"the file has {size} bytes)"
    )


def _tiff_damage(path: str) -> str | None:
    """Why a TIFF file is truncated or damaged (directories or data past its end), or None.

    None also when the file is not a TIFF or tifffile cannot parse it.
    """
    try:
        head = _tiff_header(path)
        size = os.path.getsize(path)
    except OSError:
        return None
    if head is None:
        return None
    bo, big, first = head
    if first == 0 or first >= size:
        return f"its first TIFF directory is at byte {first}, the file has {size} bytes"
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            pages = list(tf.pages)
            for page in pages:
                why = _page_damage(page, size, "an image")
                if why is not None:
                    return why
            if pages:  # the chain of directories: tifffile stops quietly at a link past the end
                with open(path, "rb") as fh:
                    fh.seek(pages[-1].offset)
                    cfmt, tsize, ofmt = ("Q", 20, "Q") if big else ("H", 12, "I")
                    ntags = struct.unpack(bo + cfmt, fh.read(struct.calcsize(cfmt)))[0]
                    fh.seek(ntags * tsize, 1)
                    raw = fh.read(struct.calcsize(ofmt))
                nxt = struct.unpack(bo + ofmt, raw)[0] if len(raw) == struct.calcsize(ofmt) else size
                if nxt >= size:
                    return (f"TIFF directory {len(pages)} is at byte {nxt}, the file has {size} bytes "
                            f"({len(pages)} directories read)")
    except Exception:  # noqa: BLE001 - not parseable: let the caller's own message stand
        return None
    return None


def _map_pages(tf: Any, dims: tuple[IntPair, ...]) -> list[Any]:
    """For each OpenSlide level ``(width, height)``, the first unused tiled TIFF page of those dimensions (or None)."""
    pages = [p for p in tf.pages if getattr(p, "is_tiled", False)]
    used: set[int] = set()
    out: list[Any] = []
    for w, h in dims:
        hit = next((p for p in pages if p.index not in used and (p.imagewidth, p.imagelength) == (w, h)), None)
        if hit is not None:
            used.add(hit.index)
        out.append(hit)
    return out


def _tifffile_refusal(page: Any) -> str | None:
    """Why tifffile cannot stand in for OpenSlide on this page, or None when it can."""
    comp, photo = int(page.compression), int(page.photometric)
    if comp not in _TIFFFILE_COMPRESSIONS:
        return f"TIFF compression {comp}"
    if not (photo == 2 or (photo == 6 and comp == 7)):
        return f"photometric {photo} with compression {comp}"
    if page.samplesperpixel != 3 or page.bitspersample != 8 or int(page.planarconfig) != 1:
        spp, bits, planar = page.samplesperpixel, page.bitspersample, int(page.planarconfig)
        return f"{spp} samples of {bits} bits, planar configuration {planar}"
    if page.shape != (page.imagelength, page.imagewidth, 3) or np.dtype(page.dtype) != np.uint8:
        return f"shape {page.shape} {page.dtype}"
    return None


class Slide:
    """An open whole-slide image (any format OpenSlide reads); a context manager.

    OpenSlide always provides the metadata (levels, properties, mpp); pixels come
    from :attr:`reader` (see the module docstring).

    Parameters
    ----------
    path:
        Path of the slide file (or DICOM directory).
    reader:
        ``None`` (default) chooses: ``"tifffile"`` for Aperio and generic TIFF whose
        levels tifffile decodes as OpenSlide does, else ``"openslide"``.
        ``"openslide"`` forces OpenSlide.

    Attributes
    ----------
    format:
        OpenSlide's format name (``"aperio"``, ``"generic-tiff"``, ``"dicom"`` ...).
    vendor:
        ``openslide.vendor`` (the format when absent).
    reader:
        ``"tifffile"`` or ``"openslide"``: which library reads pixels.
    reader_note:
        Why OpenSlide reads this slide's pixels ("" with tifffile).
    failed:
        True once a read raised (the cache reopens the file).

    Raises
    ------
    SlideDamagedError
        The file is a TIFF whose directories or tiles lie past its end (truncated).
    SlideOpenError
        The file is missing or OpenSlide cannot open it; the message names the path.
    """

    def __init__(self, path: str | os.PathLike[str], reader: str | None = None) -> None:
        self.path = os.fspath(path)
        self._tf: Any = None
        self._osr: Any = None
        if reader not in (None, "openslide"):
            raise ValueError(f"reader must be None (choose) or 'openslide', got {reader!r}")
        if not os.path.exists(self.path):
            raise SlideOpenError(self.path, "no such file")
        import openslide  # lazily: importing halo.data must stay cheap

        self._openslide = openslide
        try:
            fmt = openslide.OpenSlide.detect_format(self.path)
        except Exception as exc:  # noqa: BLE001 - any OpenSlide failure names the file
            raise _by("openslide", SlideOpenError(self.path, f"cannot detect format: {exc}")) from exc
        if fmt is None:
            with _quiet_tifffile():
                why = _tiff_damage(self.path) if os.path.isfile(self.path) else None
            if why is not None:
                raise SlideDamagedError(self.path, why)
            raise _by("openslide", SlideOpenError(self.path, "not a slide format OpenSlide reads"))
        try:
            self._osr = openslide.OpenSlide(self.path)
        except Exception as exc:  # noqa: BLE001
            with _quiet_tifffile():
                why = _tiff_damage(self.path) if os.path.isfile(self.path) else None
            if why is not None:
                raise _by("openslide", SlideDamagedError(self.path, f"{why} (OpenSlide: {exc})")) from exc
            raise _by("openslide", SlideOpenError(self.path, f"OpenSlide cannot open it ({fmt}): {exc}")) from exc
        self.format: str = fmt
        self.vendor: str = str(self._osr.properties.get("openslide.vendor", fmt))
        self.failed = False
        self._dims: tuple[IntPair, ...] = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)
        self._pages: list[Any] = [None] * len(self._dims)
        self._fh: Any = None
        self._lock = threading.Lock()
        self.reader: str = "openslide"
        self.reader_note: str = "forced" if reader == "openslide" else f"format {fmt} is read by OpenSlide"
        if reader is None and fmt in _TIFFFILE_FORMATS:
            with _quiet_tifffile():
                self._try_tifffile()

    def _try_tifffile(self) -> None:
        """Use tifffile when every level maps to a page it decodes as OpenSlide does."""
        try:
            import tifffile

            tf = tifffile.TiffFile(self.path)
        except Exception as exc:  # noqa: BLE001 - OpenSlide reads it; keep OpenSlide
            self.reader_note = f"tifffile cannot parse it: {exc}"
            return
        try:
            pages = _map_pages(tf, self._dims)
            for lv, page in enumerate(pages):
                why = "no TIFF page of its dimensions" if page is None else _tifffile_refusal(page)
                if why is not None:
                    self.reader_note = f"level {lv}: {why} is left to OpenSlide"
                    tf.close()
                    return
        except Exception as exc:  # noqa: BLE001
            self.reader_note = f"tifffile cannot map its levels: {exc}"
            tf.close()
            return
        self._tf, self._pages = tf, pages
        self.reader, self.reader_note = "tifffile", ""

    # -- metadata -----------------------------------------------------------------
    @property
    def dimensions(self) -> IntPair:
        """``(width, height)`` of level 0."""
        return self._dims[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self._dims)

    @property
    def level_dimensions(self) -> tuple[IntPair, ...]:
        """``(width, height)`` of each level, in that level's pixels."""
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """OpenSlide's level-0 pixels per level pixel (mean of the two axes), for each level."""
        return tuple(float(d) for d in self._osr.level_downsamples)

    def level_factors(self, level: int) -> tuple[float, float]:
        """``(w0 / wL, h0 / hL)``: level-0 pixels per pixel of ``level`` along x and y."""
        (w0, h0), (w, h) = self._dims[0], self._dims[int(level)]
        return w0 / w, h0 / h

    def exact_level(self, level: int) -> bool:
        """Whether :meth:`read_level` reads ``level``'s stored pixels without resampling.

        Always with the tifffile reader; with OpenSlide only when the level's size
        divides level 0 by one whole number ``k`` on both axes (``read_region`` at
        ``k * x`` is then exact).
        """
        if self.reader == "tifffile":
            return True
        (w0, h0), (w, h) = self._dims[0], self._dims[int(level)]
        return w0 % w == 0 and h0 % h == 0 and w0 // w == h0 // h

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
        """Read a region through OpenSlide's ``read_region`` (level-0 location), as RGB.

        At a level whose downsample is not a whole number OpenSlide resamples by the
        fraction ``x / downsample``: use :meth:`read_level` for exact pixels.

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
            raise _by("openslide", SlideReadError(self.path, level, (x, y), (w, h),
                                                  f"OpenSlide: {str(exc) or type(exc).__name__}")) from exc
        return composite_white(rgba, background)

    def tile_rows(self, level: int) -> int | None:
        """Rows per tile of ``level`` where this slide decodes tiles itself (the tifffile reader); else None.

        A read whose row range starts and ends on tile rows decodes each tile once.
        """
        page = self._pages[level] if self.reader == "tifffile" and level < len(self._pages) else None
        return int(page.tilelength) if page is not None and page.is_tiled else None

    def read_level(self, level: int, location: IntPair, size: IntPair, background: int = 255) -> np.ndarray:
        """Read the stored pixels of ``level`` at integer level coordinates, without resampling.

        Parameters
        ----------
        level:
            Pyramid level; must be :meth:`exact_level`.
        location:
            ``(x, y)`` of the top-left pixel, in pixels of ``level`` (may be negative).
        size:
            ``(width, height)`` in pixels of ``level``.
        background:
            Grey level of pixels outside the level and of missing tiles.

        Returns
        -------
        numpy.ndarray
            ``uint8`` ``(height, width, 3)``: pixel ``(i, j)`` is level pixel ``(x + j, y + i)``.

        Raises
        ------
        SlideResolutionError
            The OpenSlide reader and a level whose downsample is not a whole number.
        SlideReadError
            Decoding failed; the message gives path, level, (x, y) in that level and (width, height).
        """
        level = int(level)
        if not 0 <= level < len(self._dims):
            raise SlideResolutionError(self.path, f"level {level} out of range: the slide has {len(self._dims)} levels")
        x, y, w, h = int(location[0]), int(location[1]), int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0), 3), background, np.uint8)
        if self.reader != "tifffile":
            if not self.exact_level(level):
                fx, fy = self.level_factors(level)
                raise SlideResolutionError(
                    self.path,
                    f"level {level} ({self._dims[level][1]} x {self._dims[level][0]} (H x W)) is {fy:.6g} x {fx:.6g} "
                    f"(H x W) level-0 pixels per pixel, not a whole number: OpenSlide ({self.reader_note}) cannot "
                    f"read it exactly",
                )
            k = self._dims[0][0] // self._dims[level][0]
            return self.read((x * k, y * k), level, (w, h), background)
        out = np.full((h, w, 3), background, np.uint8)
        lw, lh = self._dims[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            with _quiet_tifffile():
                self._read_tiles(level, x0, y0, x1, y1, out[y0 - y : y1 - y, x0 - x : x1 - x])
        except Exception as exc:  # noqa: BLE001 - decoder and I/O failures of any kind
            self.failed = True
            raise _by("tifffile", SlideReadError(self.path, level, (x, y), (w, h),
                                                 f"tifffile: {type(exc).__name__}: {exc}",
                                                 frame=f"level {level}")) from exc
        return out

    def _read_tiles(self, level: int, x0: int, y0: int, x1: int, y1: int, dst: np.ndarray) -> None:
        """Decode the tiles of ``level`` that ``[x0, x1) x [y0, y1)`` touches into ``dst`` (inside the level).

        Tiles are read with ``os.pread`` (no shared file position: safe across
        threads) and decoded by tifffile's own decoder of the page (the one its zarr
        store uses, without the store's per-chunk overhead). A tile with no data
        (byte count 0) keeps ``dst``'s background, as OpenSlide paints it transparent.
        """
        page = self._pages[level]
        if self._fh is None:
            with self._lock:
                if self._fh is None:
                    self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close() or GC
        fd = self._fh.fileno()
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        offsets, counts = page.dataoffsets, page.databytecounts
        decode = page.decode
        kw: dict[str, Any] = {"_fullsize": True}
        if page.jpegtables is not None:
            kw["jpegtables"] = page.jpegtables
        if getattr(page, "jpegheader", None) is not None:
            kw["jpegheader"] = page.jpegheader
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            ay0, ay1 = max(y0, ty * th), min(y1, (ty + 1) * th)
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                i = ty * across + tx
                n = int(counts[i])
                if n == 0:
                    continue
                data = os.pread(fd, n, int(offsets[i]))
                if len(data) != n:
                    raise OSError(f"tile {i} needs bytes {offsets[i]}..{offsets[i] + n}: the file ends early")
                tile = decode(data, i, **kw)[0]
                tile = np.asarray(tile).reshape(th, tw, 3)
                ax0, ax1 = max(x0, tx * tw), min(x1, (tx + 1) * tw)
                dst[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = tile[ay0 - ty * th : ay1 - ty * th,
                                                                     ax0 - tx * tw : ax1 - tx * tw]

    def thumbnail_level(self, max_size: int = 1024) -> int:
        """The level :meth:`thumbnail` reads: the coarsest whose downsample is at most ``longest side / max_size``."""
        w0, h0 = self.dimensions
        want = max(w0, h0) / max(1, int(max_size))
        level = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= want * (1 + 1e-6):
                level = i
        return level

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
        level = self.thumbnail_level(max_size)
        lw, lh = self.level_dimensions[level]
        if self.reader == "tifffile":
            img = self.read_level(level, (0, 0), (lw, lh))
        else:  # a whole level from (0, 0): no fractional offset
            img = self.read((0, 0), level, (lw, lh))
        factor = max(1, int(max(lw, lh) // max(1, int(max_size))))
        if factor > 1:
            th, tw = lh // factor, lw // factor
            img = img[: th * factor, : tw * factor].reshape(th, factor, tw, factor, 3).mean(axis=(1, 3))
            img = np.rint(img).astype(np.uint8)
        th, tw = img.shape[:2]
        return img, (w0 / tw, h0 / th)

    # -- integrity ----------------------------------------------------------------
    def verify(self, level: int) -> None:
        """Check that ``level`` (and the thumbnail's level) can be read: cheap, for start-up validation.

        (a) For TIFF files, every tile or strip of the pages backing ``level`` and
        :meth:`thumbnail_level` must lie inside the file; (b) one tile of ``level``
        is read and decoded.

        Parameters
        ----------
        level:
            Pyramid level that training will read.

        Raises
        ------
        SlideResolutionError
            ``level`` out of range.
        SlideDamagedError
            Tiles lie past the end of the file ("file ends early / damaged", with the byte figures).
        SlideReadError
            The tile read failed (a corrupt tile).
        """
        level = int(level)
        if not 0 <= level < len(self._dims):
            raise SlideResolutionError(self.path, f"level {level} out of range: the slide has {len(self._dims)} levels")
        levels = sorted({level, self.thumbnail_level()})
        tile: IntPair = (min(256, self._dims[level][0]), min(256, self._dims[level][1]))
        origin: IntPair = (0, 0)
        try:
            is_tiff = os.path.isfile(self.path) and _tiff_header(self.path) is not None
        except OSError as exc:
            raise SlideDamagedError(self.path, f"cannot read it: {exc}", level=level) from exc
        if is_tiff:
            size = os.path.getsize(self.path)
            pages = self._pages
            tf = None
            try:
                if self._tf is None:
                    import tifffile

                    try:
                        with _quiet_tifffile():
                            tf = tifffile.TiffFile(self.path)
                            pages = _map_pages(tf, self._dims)
                    except Exception:  # noqa: BLE001 - OpenSlide reads it; check by reading below
                        pages = [None] * len(self._dims)
                for lv in levels:
                    page = pages[lv]
                    if page is None:
                        continue
                    why = _page_damage(page, size, f"level {lv}")
                    if why is not None:
                        self.failed = True
                        raise SlideDamagedError(self.path, why, level=lv)
                page = pages[level]
                if page is not None and page.is_tiled:  # the first tile with data
                    cnt = np.asarray(page.databytecounts)
                    nz = np.flatnonzero(cnt > 0)
                    if nz.size:
                        across = -(-page.imagewidth // page.tilewidth)
                        ty, tx = divmod(int(nz[0]), across)
                        origin = (tx * page.tilewidth, ty * page.tilelength)
                        tile = (min(page.tilewidth, self._dims[level][0] - origin[0]),
                                min(page.tilelength, self._dims[level][1] - origin[1]))
            finally:
                if tf is not None:
                    tf.close()
        if self.exact_level(level):
            self.read_level(level, origin, tile)
        else:
            k = self.level_downsamples[level]
            self.read((int(origin[0] * k), int(origin[1] * k)), level, tile)

    def close(self) -> None:
        """Close the OpenSlide handle and the TIFF file."""
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None
        tf = getattr(self, "_tf", None)
        if tf is not None:
            tf.close()
            self._tf = None
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()
            self._fh = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.path!r}, vendor={getattr(self, 'vendor', '?')!r}, reader={getattr(self, 'reader', '?')!r})"


def open_slide(path: str | os.PathLike[str]) -> Slide:
    """Open a slide (SVS, NDPI, MRXS, generic tiled TIFF, DICOM, ...); see :class:`Slide` for the reader.

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

    Handles are safe to share across threads (OpenSlide's, and the tifffile
    reader's ``os.pread`` tile reads). A handle that raised is dropped, so the next call reopens the file.
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
        OpenSlide's level-0 pixels per pixel of ``level`` (the mean of the two axes).
    downsample:
        Level-0 pixels per target pixel (``>= level_downsample``); when
        ``exact`` it is ``level_downsample`` (nominal: the axes are ``level_factors``).
    mpp:
        Microns per target pixel, or None when the slide has no mpp.
    exact:
        True: the target pixels are the stored pixels of ``level``; False: level
        pixels are box-filtered to ``downsample`` level-0 pixels per target pixel.
    level_factors:
        ``(w0 / wL, h0 / hL)`` of ``level``.
    target_size:
        ``(width, height)`` of the whole slide in target pixels: the level's size
        when ``exact``, else ``floor(w0 / downsample), floor(h0 / downsample)``.
    """

    level: int
    level_downsample: float
    downsample: float
    mpp: float | None
    exact: bool = True
    level_factors: tuple[float, float] = (1.0, 1.0)
    target_size: IntPair = (0, 0)

    @property
    def scale(self) -> float:
        """Target pixels per level pixel: 1.0 reads the level as is, < 1 resamples."""
        return self.level_downsample / self.downsample

    @property
    def level_scale(self) -> tuple[float, float]:
        """``(sx, sy)``: level pixels per target pixel along x and y (``(1.0, 1.0)`` when ``exact``)."""
        if self.exact:
            return 1.0, 1.0
        fx, fy = self.level_factors
        return self.downsample / fx, self.downsample / fy


METADATA = object()
"""``base_mpp`` default: the slide's level-0 mpp is what its metadata says (``Slide.mpp``)."""


def select_level(
    slide: Slide, mpp: float | None = None, level: int | None = None, tolerance: float = MPP_TOLERANCE,
    *, base_mpp: Any = METADATA,
) -> LevelChoice:
    """Choose the pyramid level (and resampling) for a requested resolution.

    A level whose mpp is within ``tolerance`` (relative) of ``mpp`` is read as is;
    otherwise the nearest finer level is read and resampled. ``level`` is used when
    ``mpp`` is None, or when the slide has no mpp metadata. With neither, level 0.

    A level that the slide's reader cannot read exactly (OpenSlide at a downsample
    that is not a whole number, see :meth:`Slide.exact_level`) is never read: the
    nearest finer exact level (level 0 at worst) is resampled to its downsample.

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
    base_mpp:
        The slide's level-0 microns per pixel, overriding its metadata (a cohort CSV's
        ``mpp`` column); None: treat the slide as having no mpp (untrusted metadata).

    Raises
    ------
    SlideResolutionError
        ``mpp`` requested but the slide has no ``openslide.mpp-x`` and no ``level``
        is given; ``mpp`` finer than level 0; ``level`` out of range.
    """
    ds = slide.level_downsamples
    base = slide.mpp if base_mpp is METADATA else base_mpp
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
                return _choice(slide, i, d, base * d, exact=True)
        finer = max(i for i, d in enumerate(ds) if d <= want)
        return _choice(slide, finer, want, float(mpp), exact=False)
    if mpp is not None and level is None:
        raise SlideResolutionError(
            slide.path,
            f"mpp={mpp} requested but the slide has no openslide.mpp-x; pass level= to read it",
        )
    lv = 0 if level is None else int(level)
    return _choice(slide, lv, ds[lv], None if base is None else base * ds[lv], exact=True)


def _choice(slide: Slide, level: int, downsample: float, mpp: float | None, exact: bool) -> LevelChoice:
    """The choice for ``level`` at ``downsample``, moved to a finer exact level when ``level`` is not exact."""
    ds = slide.level_downsamples
    if not slide.exact_level(level):  # resample from the nearest finer level the reader reads exactly
        level = max(i for i in range(level + 1) if slide.exact_level(i) and ds[i] <= downsample * (1 + 1e-9))
        exact = False
    if exact:
        downsample = ds[level]
        size = slide.level_dimensions[level]
    else:
        w0, h0 = slide.dimensions
        size = (int(math.floor(w0 / downsample + 1e-9)), int(math.floor(h0 / downsample + 1e-9)))
    return LevelChoice(level=level, level_downsample=ds[level], downsample=float(downsample), mpp=mpp,
                       exact=exact, level_factors=slide.level_factors(level), target_size=size)
