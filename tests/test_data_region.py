"""Region planning and block reads on real OpenSlide, slides written by the tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import GLASS, corrupt_tiles, noise_slide_image, write_aperio, write_slide

import halo.data as hd
from halo.data.augment import AugmentSpec
from halo.data.slide import clear_cache

GRIDS = [(1, 1), (1, 2), (2, 1), (2, 2)]


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512x384 level 0 at 0.5 mpp, 3 levels; noise tissue in a box, glass around it."""
    d = tmp_path_factory.mktemp("slides")
    img = noise_slide_image(512, 384, seed=1, tissue=(70, 50, 330, 250))
    return write_slide(d / "noise.tif", img, mpp=0.5, levels=3)


@pytest.fixture(scope="module")
def image(slide_path: Path) -> np.ndarray:
    return noise_slide_image(512, 384, seed=1, tissue=(70, 50, 330, 250))


def _blocks(plan: hd.RegionPlan, augment: AugmentSpec | None = None) -> np.ndarray:
    rows, cols = plan.grid
    return np.concatenate(
        [np.concatenate([hd.read_block(plan, r, c, augment=augment) for c in range(cols)], axis=1) for r in range(rows)],
        axis=0,
    )


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("res", [{"level": 0}, {"mpp": 1.0}, {"mpp": 1.5}, {"mpp": 2.0}])
def test_blocks_tile_full(slide_path: Path, grid: tuple[int, int], res: dict) -> None:
    plan = hd.plan_region(slide_path, grid=grid, multiple=16, **res)
    full = hd.read_full(plan)
    bh, bw = plan.block_shape()
    assert full.dtype == np.uint8 and full.shape == (bh * grid[0], bw * grid[1], 3)
    assert bh % 16 == 0 and bw % 16 == 0 and bh > 0 and bw > 0
    for r in range(grid[0]):
        for c in range(grid[1]):
            blk = hd.read_block(plan, r, c)
            assert blk.shape == (bh, bw, 3) and blk.dtype == np.uint8
            np.testing.assert_array_equal(blk, full[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw])


def test_full_read_is_the_slide(slide_path: Path, image: np.ndarray) -> None:
    plan = hd.plan_region(slide_path, grid=(2, 2), multiple=32, level=0, tissue=hd.TissueOptions(enabled=False))
    full = hd.read_full(plan)
    (cx, cy), (cw, ch) = plan.content
    assert (cw, ch) == (512, 384)
    y, x = cy - plan.origin[1], cx - plan.origin[0]
    np.testing.assert_array_equal(full[y : y + ch, x : x + cw], image)
    pad = np.ones(full.shape[:2], bool)
    pad[y : y + ch, x : x + cw] = False
    assert (full[pad] == 255).all()


def test_level_and_mpp_selection(slide_path: Path) -> None:
    expect = {0.5: (0, 1.0), 1.0: (1, 2.0), 2.0: (2, 4.0), 1.5: (1, 3.0), 3.0: (2, 6.0), 0.505: (0, 1.0)}
    for mpp, (level, ds) in expect.items():
        plan = hd.plan_region(slide_path, grid=(1, 1), multiple=8, mpp=mpp)
        assert (plan.level, plan.downsample) == (level, pytest.approx(ds)), mpp
    plan = hd.plan_region(slide_path, grid=(1, 1), multiple=8, level=1)
    assert (plan.level, plan.downsample, plan.mpp) == (1, 2.0, pytest.approx(1.0))
    with pytest.raises(hd.SlideResolutionError, match="finer than level 0") as ei:
        hd.plan_region(slide_path, mpp=0.25, multiple=8)
    assert str(slide_path) in str(ei.value)
    with pytest.raises(hd.SlideResolutionError, match="out of range"):
        hd.plan_region(slide_path, level=7, multiple=8)


def test_aperio_svs_layout(tmp_path: Path) -> None:
    """SVS: mpp from the ImageDescription, a thumbnail directory between the levels, 4x levels."""
    import openslide

    image = noise_slide_image(512, 384, seed=3, tissue=(40, 30, 400, 300))
    path = write_aperio(tmp_path / "case.svs", image, mpp=0.25, levels=3)
    with hd.open_slide(path) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert slide.mpp == pytest.approx(0.25)
        assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    expect = {0.25: (0, 1.0), 0.5: (0, 0.5), 1.0: (1, 1.0), 2.0: (1, 0.5), 4.0: (2, 1.0)}  # scale: out px per level px
    osr = openslide.OpenSlide(str(path))
    for mpp, (level, scale) in expect.items():
        plan = hd.plan_region(path, grid=(2, 2), multiple=8, mpp=mpp, tissue=hd.TissueOptions(enabled=False))
        assert (plan.level, plan.scale) == (level, pytest.approx(scale)), mpp
        full = hd.read_full(plan)
        np.testing.assert_array_equal(_blocks(plan), full)
        if scale == 1.0:  # no resampling: the content is OpenSlide's own pixels at that level
            (cx, cy), (cw, ch) = plan.content
            ds = osr.level_downsamples[level]
            want = np.asarray(osr.read_region((int(cx * ds), int(cy * ds)), level, (cw, ch)).convert("RGB"))
            y, x = cy - plan.origin[1], cx - plan.origin[0]
            np.testing.assert_array_equal(full[y : y + ch, x : x + cw], want)
    osr.close()


def test_no_mpp_needs_level(tmp_path: Path) -> None:
    p = write_slide(tmp_path / "nompp.tif", noise_slide_image(256, 256, 2), mpp=None, levels=2)
    with hd.open_slide(p) as s:
        assert s.mpp is None and s.level_count == 2
    with pytest.raises(hd.SlideResolutionError, match="no openslide.mpp-x") as ei:
        hd.plan_region(p, mpp=1.0, multiple=8)
    assert str(p) in str(ei.value)
    plan = hd.plan_region(p, mpp=1.0, level=1, multiple=8)  # level decides when mpp cannot
    assert plan.level == 1 and plan.mpp is None
    assert hd.plan_region(p, multiple=8).level == 0


def test_resampling_is_a_box_filter(tmp_path: Path) -> None:
    img = noise_slide_image(256, 128, 3)
    p = write_slide(tmp_path / "flat.tif", img, mpp=0.25, levels=1)  # no pyramid: resample level 0
    plan = hd.plan_region(p, mpp=1.0, multiple=8, tissue=hd.TissueOptions(enabled=False))
    assert (plan.level, plan.downsample) == (0, 4.0)
    full = hd.read_full(plan)
    want = img.reshape(32, 4, 64, 4, 3).mean(axis=(1, 3))
    y, x = plan.content[0][1] - plan.origin[1], plan.content[0][0] - plan.origin[0]
    got = full[y : y + 32, x : x + 64].astype(float)
    assert np.abs(got - want).max() <= 0.5 + 1e-9


def test_tissue_crop_keeps_tissue(tmp_path: Path) -> None:
    img = np.full((600, 800, 3), GLASS, np.uint8)
    img[100:300, 120:320] = (120, 40, 140)  # dark, saturated tissue
    img[250:420, 400:650] = (238, 226, 236)  # pale stroma: saturation ~0.05, above the floor
    img[550:553, 20:23] = (90, 20, 90)  # a speck: removed as a small object
    p = write_slide(tmp_path / "tissue.tif", img, mpp=0.5, levels=3)
    plan = hd.plan_region(p, grid=(2, 1), multiple=16, mpp=0.5,
                          tissue=hd.TissueOptions(thumb_size=200, margin=0.0, min_object_fraction=1e-3))
    (x, y), (w, h) = plan.tissue_box
    assert x <= 120 and y <= 100 and x + w >= 650 and y + h >= 420  # all tissue kept
    assert x >= 100 and y >= 80 and x + w <= 680 and y + h <= 450  # glass (and the speck) out
    assert plan.thumb_mask is not None and plan.thumb_mask.any()
    full = hd.read_full(plan)
    assert full.shape[0] % 32 == 0 and full.shape[1] % 16 == 0
    assert (full == (120, 40, 140)).all(axis=-1).sum() == 200 * 200
    assert (full == (238, 226, 236)).all(axis=-1).sum() == 170 * 250


def test_outside_slide_is_white(slide_path: Path) -> None:
    with hd.open_slide(slide_path) as s:
        out = s.read((480, 360), 0, (64, 48))
    assert (out[24:, :] == 255).all() and (out[:, 32:] == 255).all()
    assert (out[:24, :32] == GLASS).all()


@pytest.mark.parametrize("grid", [(1, 2), (2, 1), (2, 2)])
def test_augmented_blocks_equal_augmented_full(slide_path: Path, grid: tuple[int, int]) -> None:
    plan = hd.plan_region(slide_path, grid=grid, multiple=16, mpp=1.0)
    specs = [AugmentSpec(flip=f, rot=k, hed_scale=(1.05, 0.95, 1.0), hed_shift=(0.01, -0.01, 0.0),
                         brightness=0.03, contrast=1.1) for f in (False, True) for k in range(4)]
    specs += [hd.Augment().draw(seed) for seed in range(3)]
    base = hd.read_full(plan)
    for spec in specs:
        full = hd.read_full(plan, augment=spec)
        np.testing.assert_array_equal(full, spec(base))
        assert full.shape[:2] == plan.shape(spec)
        np.testing.assert_array_equal(_blocks(plan, spec), full, err_msg=str(spec))


def test_augment_draw_is_deterministic() -> None:
    a = hd.Augment()
    assert a.draw(7) == a.draw(7)
    assert len({(s.flip, s.rot) for s in map(a.draw, range(64))}) == 8
    assert hd.Augment(flips=False, rot90=False, hed_sigma=0, hed_bias=0, brightness=0, contrast=0).draw(3) == hd.IDENTITY


def test_source_rect_matches_bruteforce() -> None:
    h, w = 6, 10
    idx = np.arange(h * w).reshape(h, w)
    for flip in (False, True):
        for rot in range(4):
            spec = AugmentSpec(flip=flip, rot=rot)
            aug = spec.apply_geometry(idx)
            for rect in [(0, 2, 0, 3), (1, 5, 2, 4), (0, aug.shape[0], 0, aug.shape[1])]:
                y0, y1, x0, x1 = spec.source_rect(rect, h, w)
                np.testing.assert_array_equal(spec.apply_geometry(idx[y0:y1, x0:x1]),
                                              aug[rect[0]:rect[1], rect[2]:rect[3]])


def test_stain_normalisation_per_block(tmp_path: Path) -> None:
    from halo.data.synth import render_tissue

    img, _, _ = render_tissue(np.random.default_rng(0), (384, 256), tumour=True)
    p = write_slide(tmp_path / "he.tif", img, mpp=0.5, levels=2)
    plan = hd.plan_region(p, grid=(2, 2), multiple=16, mpp=0.5, stain_normalize=True)
    assert plan.stain is not None
    full = hd.read_full(plan)
    np.testing.assert_array_equal(_blocks(plan), full)
    raw = hd.read_full(hd.plan_region(p, grid=(2, 2), multiple=16, mpp=0.5))
    assert not np.array_equal(full, raw)


def test_plan_pickles_and_rot90_padding(slide_path: Path) -> None:
    plan = hd.plan_region(slide_path, grid=(2, 1), multiple=16, mpp=1.0)
    back = pickle.loads(pickle.dumps(plan))
    np.testing.assert_array_equal(hd.read_full(back), hd.read_full(plan))
    w, h = plan.padded_size
    assert w % 32 == 0 and h % 32 == 0  # tiles the 2x1 grid in both orientations
    plain = hd.plan_region(slide_path, grid=(2, 1), multiple=16, mpp=1.0, rot90=False)
    assert plain.padded_size[0] % 16 == 0 and plain.padded_size[1] % 32 == 0
    with pytest.raises(IndexError):
        hd.read_block(plan, 2, 0)


def test_a_canvas_pads_the_same_on_every_grid_it_fits(slide_path: Path) -> None:
    """Without a canvas, 1x1 and 2x2 pad a slide to multiples of 16 and 32 pixels: another padded
    size and origin. With ``canvas=64`` every grid whose unit divides 64 reads the same region."""
    plain = {g: hd.plan_region(slide_path, grid=g, multiple=16, mpp=1.0) for g in [(1, 1), (2, 2)]}
    assert plain[(1, 1)].padded_size != plain[(2, 2)].padded_size  # this slide: the premise of the test
    plans = {g: hd.plan_region(slide_path, grid=g, multiple=16, mpp=1.0, canvas=64)
             for g in [(1, 1), (1, 2), (2, 1), (2, 2), (4, 4)]}
    first = plans[(1, 1)]
    assert first.padded_size[0] % 64 == 0 and first.padded_size[1] % 64 == 0
    for g, plan in plans.items():
        assert (plan.padded_size, plan.origin) == (first.padded_size, first.origin), g
        np.testing.assert_array_equal(hd.read_full(plan), hd.read_full(first))
    assert hd.plan_region(slide_path, grid=(3, 1), multiple=16, mpp=1.0, canvas=64).padded_size[1] % 192 == 0
    with pytest.raises(ValueError, match="canvas"):
        hd.plan_region(slide_path, grid=(1, 1), multiple=16, mpp=1.0, canvas=0)


def test_errors_name_the_file(tmp_path: Path, slide_path: Path) -> None:
    missing = tmp_path / "nope.svs"
    with pytest.raises(hd.SlideOpenError, match="no such file") as ei:
        hd.plan_region(missing)
    assert str(missing) in str(ei.value)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a slide")
    with pytest.raises(hd.SlideOpenError) as ei:
        hd.plan_region(junk)
    assert str(junk) in str(ei.value)
    with pytest.raises(hd.SlideTooSmallError, match=r"grid of 4 x 4 \(rows x cols\)") as ei:
        hd.plan_region(slide_path, grid=(4, 4), multiple=32, mpp=2.0)
    assert str(slide_path) in str(ei.value)
    with pytest.raises(ValueError, match="grid"):
        hd.plan_region(slide_path, grid=(0, 1))


def test_corrupt_tiles_raise_read_error(tmp_path: Path) -> None:
    p = write_slide(tmp_path / "bad.tif", noise_slide_image(256, 192, 4), mpp=0.5, levels=2)
    plan = hd.plan_region(p, grid=(1, 1), multiple=16, level=0, tissue=hd.TissueOptions(enabled=False))
    clear_cache()
    corrupt_tiles(p)
    with pytest.raises(hd.SlideReadError) as ei:
        hd.read_block(plan, 0, 0)
    err = ei.value
    assert str(p) in str(err) and "level 0" in str(err) and "(x, y)" in str(err) and "(H x W)" in str(err)
    assert err.level == 0
    clear_cache()


@pytest.mark.parametrize("res", [{"level": 0}, {"mpp": 1.5}])
def test_any_window_of_the_region_is_the_crop_of_the_full_read(slide_path: Path, res: dict) -> None:
    """read_rect: any window (a block with margins, one past the region's edge, all padding)."""
    plan = hd.plan_region(slide_path, grid=(2, 2), multiple=16, **res)
    full = hd.read_full(plan)
    h, w = plan.shape()
    (cx, cy), (cw, ch) = plan.content
    ox, oy = plan.origin
    rng = np.random.default_rng(0)
    windows = [(0, h, 0, w), (3, 40, 5, 77), (h - 9, h, w - 30, w)]
    windows += [tuple(int(v) for v in (*np.sort(rng.integers(0, h + 1, 2)), *np.sort(rng.integers(0, w + 1, 2))))
                for _ in range(8)]
    for y0, y1, x0, x1 in windows:
        if y1 <= y0 or x1 <= x0:
            continue
        np.testing.assert_array_equal(hd.read_rect(plan, (y0, y1, x0, x1)), full[y0:y1, x0:x1])
        window = hd.content_window(plan, (y0, y1, x0, x1))
        inside = (max(y0, cy - oy) < min(y1, cy - oy + ch)) and (max(x0, cx - ox) < min(x1, cx - ox + cw))
        assert (window is not None) == inside
        if window is not None:  # the slices hold the slide's pixels; all else is background
            (ty0, ty1, tx0, tx1), (rows, cols) = window
            assert (rows.stop - rows.start, cols.stop - cols.start) == (ty1 - ty0, tx1 - tx0)
            assert (ty0, tx0) == (y0 + oy + rows.start, x0 + ox + cols.start)
    pad = (0, max(1, cy - oy), 0, w)  # rows above the content box: all padding
    if cy - oy > 0:
        assert hd.content_window(plan, pad) is None
        assert (hd.read_rect(plan, pad) == plan.background).all()


def test_a_window_is_stain_normalised_as_its_block(tmp_path: Path) -> None:
    from halo.data.synth import render_tissue

    img, _, _ = render_tissue(np.random.default_rng(0), (384, 256), tumour=True)
    p = write_slide(tmp_path / "he.tif", img, mpp=0.5, levels=2)
    plan = hd.plan_region(p, grid=(2, 2), multiple=16, mpp=0.5, stain_normalize=True)
    assert plan.stain is not None
    bh, bw = plan.block_shape()
    np.testing.assert_array_equal(hd.read_rect(plan, (bh, 2 * bh, 0, bw)), hd.read_block(plan, 1, 0))
    np.testing.assert_array_equal(hd.read_rect(plan, (5, 70, 9, 100)), hd.read_full(plan)[5:70, 9:100])
