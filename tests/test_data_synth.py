"""halo-synth: the synthetic cohort opens in OpenSlide with the right levels and mpp."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

import halo.data as hd
from halo.data.synth import CLASSES, main, make_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    return make_cohort(out, slides=6, seed=3, size=(640, 480), mpp=0.5, levels=3, workers=1)


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path) as fh:
        return list(csv.DictReader(fh))


def test_slides_open_with_levels_and_mpp(cohort: Path) -> None:
    rows = _rows(cohort)
    assert len(rows) == 6 and set(rows[0]) >= {"slide", "label", "split", "mask"}
    for r in rows:
        with openslide.OpenSlide(cohort.parent / r["slide"]) as s:
            assert s.properties["openslide.vendor"] == "generic-tiff"
            assert s.level_count == 3
            assert s.level_dimensions == ((640, 480), (320, 240), (160, 120))
            assert s.level_downsamples == (1.0, 2.0, 4.0)
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        mask = np.asarray(Image.open(cohort.parent / r["mask"]))
        assert mask.shape == (120, 160)
        frac = float(r["tumour_fraction"])
        if r["label"] == "tumour":
            assert 0.01 < frac < 0.08 and mask.any()
        else:
            assert frac == 0 and not mask.any()


def test_labels_balanced_and_split_stratified(cohort: Path) -> None:
    rows = _rows(cohort)
    assert sorted(r["label"] for r in rows) == ["normal"] * 3 + ["tumour"] * 3
    for c in CLASSES:
        splits = {r["split"] for r in rows if r["label"] == c}
        assert splits == {"train", "val"}


def test_tumour_is_darker_at_training_resolution(cohort: Path) -> None:
    rows = [r for r in _rows(cohort) if r["label"] == "tumour"]
    for r in rows:
        with openslide.OpenSlide(cohort.parent / r["slide"]) as s:
            img = np.asarray(s.read_region((0, 0), 2, s.level_dimensions[2]))[..., :3].astype(float)
        mask = np.asarray(Image.open(cohort.parent / r["mask"])) > 0
        tissue = (img.max(-1) - img.min(-1)) / img.max(-1) > 0.1
        assert img[mask].mean() < img[tissue & ~mask].mean() - 25


def test_deterministic_and_cli(tmp_path: Path) -> None:
    args = ["--slides", "2", "--seed", "5", "--size", "256", "192", "--workers", "1"]
    assert main(["--out", str(tmp_path / "a"), *args]) == 0
    assert main(["--out", str(tmp_path / "b"), *args]) == 0
    a, b = _rows(tmp_path / "a" / "labels.csv"), _rows(tmp_path / "b" / "labels.csv")
    assert a == b
    for r in a:
        pa = hd.plan_region(tmp_path / "a" / r["slide"], mpp=1.0, multiple=8)
        pb = hd.plan_region(tmp_path / "b" / r["slide"], mpp=1.0, multiple=8)
        np.testing.assert_array_equal(hd.read_full(pa), hd.read_full(pb))


def test_dataset_reads_the_cohort(cohort: Path) -> None:
    ds = hd.SlideDataset(cohort, classes=list(CLASSES), grid=(2, 1), multiple=32, mpp=2.0, split="train")
    assert len(ds) == 4
    item = ds[0]
    assert item.plan.level == 2 and item.mask is not None and Path(item.mask).exists()
    blocks = [hd.read_block(item.plan, r, 0) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(blocks, 0), hd.read_full(item.plan))


def test_cli_size_is_height_then_width(tmp_path: Path, capsys) -> None:
    """--size HEIGHT WIDTH, as halo-plan --image: --size 64 128 writes slides 64 high and 128 wide."""
    assert main(["--out", str(tmp_path), "--slides", "1", "--size", "64", "128", "--levels", "1",
                 "--workers", "1"]) == 0
    [r] = _rows(tmp_path / "labels.csv")
    with openslide.OpenSlide(tmp_path / r["slide"]) as s:
        assert s.dimensions == (128, 64)  # OpenSlide's (width, height)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--size HEIGHT WIDTH" in text and "halo-plan --image" in text, text
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--slides", "1", "--size", "8", "128", "--levels", "1"])
    assert "8 x 128 (H x W)" in capsys.readouterr().err
