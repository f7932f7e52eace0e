"""Real cohorts in a CSV: slide keys, duplicate rows, the split (given or derived by patient),
and per-slide resolution (a row's ``mpp`` or ``level`` column, implausible mpp metadata)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import noise_slide_image, write_csv, write_slide

import halo.data as hd

CLASSES = ["normal", "tumour"]
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "slides"
BOXES = FIXTURES / "openslide-python_boxes.tiff"  # generic-tiff, 300 x 250, 4 levels, "352.8 mpp" (72 dpi)
needs_boxes = pytest.mark.skipif(not BOXES.is_file(), reason=f"real fixture {BOXES} not present")


def _slide(path: Path, seed: int = 0, mpp: float | None = 0.5, levels: int = 2, size=(128, 96)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    return write_slide(path, noise_slide_image(w, h, seed, (8, 8, w - 16, h - 16)), mpp=mpp, levels=levels)


def _ds(csv_path: Path, **kw) -> hd.SlideDataset:
    kw.setdefault("multiple", 16)
    kw.setdefault("mpp", 1.0)
    return hd.SlideDataset(csv_path, classes=CLASSES, **kw)


# -- slide keys -----------------------------------------------------------------------
def test_same_file_name_in_two_folders_gives_two_keys(tmp_path: Path) -> None:
    _slide(tmp_path / "siteA" / "slide_001.tif", seed=1)
    _slide(tmp_path / "siteB" / "slide_001.tif", seed=2)
    csv_path = write_csv(tmp_path / "m.csv", [
        {"slide": "siteA/slide_001.tif", "label": "normal", "split": "train"},
        {"slide": "siteB/slide_001.tif", "label": "tumour", "split": "train"},
    ])
    ds = _ds(csv_path)
    assert [r.slide_id for r in ds.rows] == ["siteA/slide_001", "siteB/slide_001"]
    assert [ds[i].slide_id for i in range(2)] == ["siteA/slide_001", "siteB/slide_001"]
    assert ds[0].path != ds[1].path
    from halo.data.dataset import slide_file_name

    names = [slide_file_name(r.slide_id) for r in ds.rows]
    assert len(set(names)) == 2 and all("/" not in n and "\\" not in n for n in names)
    assert slide_file_name("s1") == "s1"  # plain keys keep their name
    # an explicit slide_id column wins
    csv_ids = write_csv(tmp_path / "ids.csv", [
        {"slide": "siteA/slide_001.tif", "label": "normal", "split": "train", "slide_id": "A-001"},
        {"slide": "siteB/slide_001.tif", "label": "tumour", "split": "train", "slide_id": ""},
    ], columns=("slide", "label", "split", "slide_id"))
    assert [r.slide_id for r in _ds(csv_ids).rows] == ["A-001", "siteB/slide_001"]


def test_duplicate_rows_and_keys_are_reported(tmp_path: Path) -> None:
    _slide(tmp_path / "a.tif")
    _slide(tmp_path / "siteA" / "x.tif")
    _slide(tmp_path / "siteB" / "x.tif")
    csv_path = write_csv(tmp_path / "m.csv", [
        {"slide": "a.tif", "label": "normal", "split": "train"},  # line 2
        {"slide": "./a.tif", "label": "normal", "split": "train"},  # line 3: the same file again
        {"slide": "siteA/x.tif", "label": "tumour", "split": "train", "slide_id": "x"},  # line 4
        {"slide": "siteB/x.tif", "label": "tumour", "split": "val", "slide_id": "x"},  # line 5: same key
    ], columns=("slide", "label", "split", "slide_id"))
    with pytest.raises(hd.ManifestError) as ei:
        _ds(csv_path)
    probs = ei.value.problems
    assert len(probs) == 2, probs
    assert probs[0].startswith("line 3, slide ") and "a.tif" in probs[0] and "line 2" in probs[0]
    assert probs[1].startswith("line 5, slide 'x'") and "'x'" in probs[1] and "line 4" in probs[1]
    assert "siteB" in probs[1]


# -- the split ----------------------------------------------------------------------------
def _patient_cohort(tmp_path: Path, with_split: bool = False) -> Path:
    """12 patients, 2 slides each (24 slides); patients 0-6 normal, 7-11 tumour; patient 3 has
    one tumour slide."""
    rows = []
    for p in range(12):
        for k in range(2):
            name = f"p{p:02d}_{k}.tif"
            _slide(tmp_path / name, seed=2 * p + k)
            label = "tumour" if p >= 7 or (p == 3 and k == 1) else "normal"
            rows.append({"slide": name, "label": label, "patient": f"P{p:02d}"})
    return write_csv(tmp_path / "m.csv", rows, columns=("slide", "label", "patient"))


def test_derived_split_is_by_patient_stratified_and_deterministic(tmp_path: Path) -> None:
    csv_path = _patient_cohort(tmp_path)
    train = _ds(csv_path, split="train")  # today: "no rows with split='train'"
    assert train.derived_split
    full = _ds(csv_path)
    assert {r.split for r in full.rows} == {"train", "val"}
    sides: dict[str, set[str]] = defaultdict(set)
    for r in full.rows:
        sides[r.patient].add(r.split)
    assert all(len(s) == 1 for s in sides.values()), sides  # no patient on both sides
    val = _ds(csv_path, split="val", validate=False)
    assert {r.slide_id for r in train.rows} | {r.slide_id for r in val.rows} == {r.slide_id for r in full.rows}
    assert not {r.slide_id for r in train.rows} & {r.slide_id for r in val.rows}
    assert [r.slide_id for r in val.rows] == [r.slide_id for r in full.rows if r.split == "val"]
    val_patients = {r.patient for r in val.rows}
    assert len(val_patients) == 3  # 25% of 12 patients: round(0.25 * 7) = 2 normal, round(0.25 * 5) = 1 tumour
    assert set(val.labels.tolist()) == {0, 1}  # stratified: both classes in val
    again = _ds(csv_path, validate=False)
    assert [r.split for r in again.rows] == [r.split for r in full.rows]  # deterministic
    other = [[r.split for r in _ds(csv_path, validate=False, seed=s).rows] for s in range(1, 6)]
    assert any(o != [r.split for r in full.rows] for o in other)  # the seed is used
    assert [r.split for r in _ds(csv_path, validate=False, seed=4).rows] == other[3]
    assert all(r.split == "train" for r in _ds(csv_path, validate=False, val_fraction=0.0).rows)


def test_derived_split_on_tiny_cohorts(tmp_path: Path) -> None:
    for i in range(3):
        _slide(tmp_path / f"s{i}.tif", seed=i)
    one = write_csv(tmp_path / "one.csv", [{"slide": "s0.tif", "label": "tumour"}], columns=("slide", "label"))
    assert [r.split for r in _ds(one).rows] == ["train"]
    empty_val = _ds(one, split="val")  # a cohort without val rows still loads
    assert len(empty_val) == 0 and empty_val.derived_split
    three = write_csv(tmp_path / "three.csv", [
        {"slide": "s0.tif", "label": "normal", "split": ""},
        {"slide": "s1.tif", "label": "normal", "split": ""},
        {"slide": "s2.tif", "label": "tumour", "split": ""},
    ])  # an all-empty split column counts as absent
    splits = [r.split for r in _ds(three).rows]
    assert sorted(splits[:2]) == ["train", "val"] and splits[2] == "train"  # one-member class: train


def test_given_split_with_a_leaking_patient_is_reported(tmp_path: Path) -> None:
    for i in range(4):
        _slide(tmp_path / f"s{i}.tif", seed=i)
    csv_path = write_csv(tmp_path / "m.csv", [
        {"slide": "s0.tif", "label": "normal", "split": "train", "patient": "P1"},  # line 2
        {"slide": "s1.tif", "label": "normal", "split": "train", "patient": "P2"},
        {"slide": "s2.tif", "label": "tumour", "split": "val", "patient": "P1"},  # line 4: leaks
        {"slide": "s3.tif", "label": "tumour", "split": "val", "patient": "P3"},
    ], columns=("slide", "label", "split", "patient"))
    with pytest.raises(hd.ManifestError) as ei:
        _ds(csv_path, split="train")
    probs = ei.value.problems
    assert len(probs) == 1, probs
    assert "'P1'" in probs[0] and "line 2" in probs[0] and "line 4" in probs[0]
    assert "train" in probs[0] and "val" in probs[0]


def test_bad_split_values_are_reported(tmp_path: Path) -> None:
    for i in range(3):
        _slide(tmp_path / f"s{i}.tif", seed=i)
    csv_path = write_csv(tmp_path / "m.csv", [
        {"slide": "s0.tif", "label": "normal", "split": "train"},
        {"slide": "s1.tif", "label": "normal", "split": "validation"},  # line 3
        {"slide": "s2.tif", "label": "tumour", "split": ""},  # line 4: empty while others are given
    ])
    with pytest.raises(hd.ManifestError) as ei:
        _ds(csv_path)
    probs = ei.value.problems
    assert len(probs) == 2, probs
    assert probs[0].startswith("line 3, slide 's1'") and "'validation'" in probs[0] and "s1.tif" in probs[0]
    assert probs[1].startswith("line 4, slide 's2'") and "s2.tif" in probs[1] and "empty" in probs[1]


# -- per-slide resolution -------------------------------------------------------------------
def test_mixed_cohort_each_slide_at_its_own_level(tmp_path: Path) -> None:
    size = (256, 192)
    _slide(tmp_path / "meta.tif", 0, mpp=0.5, levels=3, size=size)  # mpp=1.0 decides: level 1
    _slide(tmp_path / "nompp.tif", 1, mpp=None, levels=3, size=size)  # no mpp: data.level=2
    _slide(tmp_path / "col_mpp.tif", 2, mpp=None, levels=3, size=size)  # mpp column 0.5: level 1
    _slide(tmp_path / "col_level.tif", 3, mpp=0.5, levels=2, size=size)  # level column 0 beats mpp
    _slide(tmp_path / "fine.tif", 4, mpp=0.25, levels=2, size=size)  # 2 levels, so data.level=2 is out of range
    csv_path = write_csv(tmp_path / "m.csv", [
        {"slide": "meta.tif", "label": "normal", "split": "train"},
        {"slide": "nompp.tif", "label": "tumour", "split": "train"},
        {"slide": "col_mpp.tif", "label": "normal", "split": "train", "mpp": "0.5"},
        {"slide": "col_level.tif", "label": "tumour", "split": "train", "level": "0"},
        {"slide": "fine.tif", "label": "tumour", "split": "train"},
    ], columns=("slide", "label", "split", "mpp", "level"))
    ds = _ds(csv_path, mpp=1.0, level=2)
    got = [(ds.plan(i).level, round(ds.plan(i).downsample, 6), ds.plan(i).mpp) for i in range(len(ds))]
    assert got == [(1, 2.0, 1.0), (2, 4.0, None), (1, 2.0, 1.0), (0, 1.0, 0.5), (1, 4.0, 1.0)]
    assert ds.rows[2].mpp == 0.5 and ds.rows[3].level == 0 and ds.rows[0].mpp is None
    for i in range(len(ds)):
        blk = hd.read_block(ds[i].plan, 0, 0)
        assert blk.shape == (*ds[i].plan.block_shape(), 3)
    # read at another resolution than the rest: named once each, before training
    mixed = ds.resolution_warnings()
    assert len(mixed) == 2, mixed
    assert mixed[0].startswith("line 3, slide 'nompp'") and "no known mpp" in mixed[0], mixed
    assert mixed[1].startswith("line 5, slide 'col_level'") and "0.5 um per pixel" in mixed[1] and "2x" in mixed[1]


def test_slide_without_mpp_and_no_override_names_the_fixes(tmp_path: Path) -> None:
    _slide(tmp_path / "nompp.tif", mpp=None)
    _slide(tmp_path / "ok.tif", mpp=0.5)
    _slide(tmp_path / "ok2.tif", mpp=0.5)
    csv_path = write_csv(tmp_path / "m.csv", [
        {"slide": "ok.tif", "label": "normal", "split": "train", "level": "7"},  # line 2: out of range
        {"slide": "nompp.tif", "label": "tumour", "split": "train"},  # line 3
        {"slide": "ok2.tif", "label": "tumour", "split": "val", "mpp": "abc"},  # line 4
    ], columns=("slide", "label", "split", "mpp", "level"))
    with pytest.raises(hd.ManifestError) as ei:
        _ds(csv_path)
    probs = ei.value.problems
    assert [p.split(",", 1)[0] for p in probs] == ["line 2", "line 3", "line 4"], probs
    assert "level 7" in probs[0] and "ok.tif" in probs[0]
    assert "nompp.tif" in probs[1] and "mpp column" in probs[1] and "level column" in probs[1]
    assert "data.level" in probs[1]
    assert "'abc'" in probs[2] and "ok2.tif" in probs[2] and "mpp" in probs[2]


@needs_boxes
def test_implausible_mpp_is_reported_with_the_override(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "m.csv", [{"slide": str(BOXES), "label": "normal", "split": "train"}])
    with pytest.raises(hd.ManifestError) as ei:
        _ds(csv_path, mpp=1.0)
    (prob,) = ei.value.problems
    assert prob.startswith("line 2, slide ") and BOXES.name in prob
    assert "352.8" in prob and "implausible" in prob
    assert "mpp column" in prob and "level column" in prob
    # the dataset's level is used instead of the untrusted mpp
    ds = _ds(csv_path, mpp=1.0, level=1)
    assert (ds.plan(0).level, ds.plan(0).mpp) == (1, None)


@needs_boxes
@pytest.mark.parametrize(("col_mpp", "level", "downsample"), [
    ("0.5", 1, 2.0),  # 1.0 / 0.5: level 1 read as is
    ("0.25", 2, 4.016129),  # 4.0 is within 2% of level 2's 4.016
    ("0.3", 1, 3.333333),  # no level at 3.33: level 1 resampled
])
def test_row_mpp_override_makes_boxes_load(tmp_path: Path, col_mpp: str, level: int, downsample: float) -> None:
    csv_path = write_csv(tmp_path / "m.csv", [{"slide": str(BOXES), "label": "normal", "split": "train",
                                               "mpp": col_mpp}], columns=("slide", "label", "split", "mpp"))
    ds = _ds(csv_path, mpp=1.0)
    plan = ds[0].plan
    assert plan.level == level and plan.downsample == pytest.approx(downsample, rel=1e-5)
    assert plan.mpp == pytest.approx(float(col_mpp) * plan.downsample)
    blk = hd.read_block(plan, 0, 0)
    assert blk.shape == (*plan.block_shape(), 3) and blk.dtype == np.uint8


def test_an_mpp_column_resamples_a_slide_without_mpp_metadata(tmp_path: Path) -> None:
    """The row's mpp is the slide's level-0 resolution: 1.0 / 0.3 matches no level, so the finer
    level is box-filtered, exactly as for a slide whose metadata says 0.3."""
    _slide(tmp_path / "nompp.tif", mpp=None, levels=2, size=(256, 192))
    _slide(tmp_path / "meta.tif", mpp=0.3, levels=2, size=(256, 192))
    csv_path = write_csv(tmp_path / "m.csv", [
        {"slide": "nompp.tif", "label": "normal", "split": "train", "mpp": "0.3"},
        {"slide": "meta.tif", "label": "tumour", "split": "train", "mpp": ""},
    ], columns=("slide", "label", "split", "mpp"))
    ds = _ds(csv_path, mpp=1.0)
    column, meta = ds[0].plan, ds[1].plan
    assert (column.level, column.mpp) == (meta.level, meta.mpp) == (1, 1.0)  # level 1 (0.6 um) box-filtered
    assert column.downsample == pytest.approx(1.0 / 0.3) and column.padded_size == meta.padded_size
    assert ds.choices[2].mpp == 1.0 and not ds.choices[2].exact
    ok = write_csv(tmp_path / "ok.csv", [
        {"slide": "nompp.tif", "label": "normal", "split": "train", "mpp": "0.5"},  # 1.0 / 0.5: level 1
    ], columns=("slide", "label", "split", "mpp"))
    plan = _ds(ok, mpp=1.0)[0].plan
    assert (plan.level, plan.downsample, plan.mpp) == (1, 2.0, 1.0)


CMU = FIXTURES / "cmu-1-small-region.svs"
UNREADABLE = FIXTURES / "openslide-python_unreadable.svs"


@pytest.mark.skipif(not (CMU.is_file() and UNREADABLE.is_file()), reason=f"real fixtures in {FIXTURES} not present")
def test_damaged_and_unreadable_slides_are_found_before_training(tmp_path: Path) -> None:
    """A truncated SVS and one whose tiles do not decode (it opens) are reported at start-up,
    each naming its CSV line and file; a good slide beside them is not."""
    cut = tmp_path / "cut.svs"
    data = CMU.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    good = _slide(tmp_path / "good.tif", seed=5)
    csv_path = write_csv(tmp_path / "m.csv", [
        {"slide": str(good), "label": "normal", "split": "train"},
        {"slide": str(cut), "label": "tumour", "split": "train"},
        {"slide": str(UNREADABLE), "label": "tumour", "split": "train"},
    ])
    with pytest.raises(hd.ManifestError) as err:
        _ds(csv_path, mpp=None, level=0)
    problems = err.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("line 3, slide ") and "cut.svs" in problems[0] and "ends early" in problems[0], problems
    assert problems[1].startswith("line 4, slide ") and "unreadable.svs" in problems[1], problems
