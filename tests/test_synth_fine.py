"""halo-synth --task fine: deterministic, labels follow the foci, foci are small, and their signal is
in fine structure only (separable at 0.5 um/px, not at 8 um/px)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

import halo.data as hd
from halo.data.synth import CLASSES, FINE, main, make_cohort

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fine")
    return make_cohort(out, slides=4, seed=7, size=(1024, 1024), mpp=0.5, levels=3, workers=1, task="fine")


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path) as fh:
        return list(csv.DictReader(fh))


def test_deterministic_by_seed(tmp_path: Path) -> None:
    args = ["--task", "fine", "--slides", "2", "--size", "512", "512"]
    assert main(["--out", str(tmp_path / "a"), *args, "--seed", "4", "--workers", "1"]) == 0
    assert main(["--out", str(tmp_path / "b"), *args, "--seed", "4", "--workers", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert {"labels.csv", "slide_000.tif", "slide_000_mask.png", "slide_000_foci.json"} <= set(names)
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    assert main(["--out", str(tmp_path / "c"), *args, "--seed", "5", "--workers", "1"]) == 0
    assert (tmp_path / "c" / "slide_000.tif").read_bytes() != (tmp_path / "a" / "slide_000.tif").read_bytes()


def test_labels_follow_foci(cohort: Path) -> None:
    rows = _rows(cohort)
    assert sorted(r["label"] for r in rows) == ["normal"] * 2 + ["tumour"] * 2
    for r in rows:
        rec = json.loads((cohort.parent / r["foci_file"]).read_text())
        mask = np.asarray(Image.open(cohort.parent / r["mask"])) > 0
        assert rec["label"] == r["label"] and rec["slide"] == r["slide"] and int(r["foci"]) == len(rec["foci"])
        if r["label"] == "normal":
            assert rec["foci"] == [] and not mask.any() and float(r["tumour_fraction"]) == 0
            continue
        assert 1 <= len(rec["foci"]) <= 3 and mask.any()
        with openslide.OpenSlide(cohort.parent / r["slide"]) as s:
            assert s.level_count == 3 and s.level_dimensions[0] == (1024, 1024)
            for f in rec["foci"]:
                lo, hi = FINE["focus_diameter_um"]
                assert lo / 2 - 1e-6 <= f["radius_um"] <= hi / 2 + 1e-6
                assert f["radius_um"] == pytest.approx(f["radius"] * 0.5, abs=0.01)
                # the centre is in tissue (stained, not glass) and in the foci mask
                px = np.asarray(s.read_region((int(f["x"]) - 4, int(f["y"]) - 4), 0, (8, 8)))[..., :3].astype(float)
                assert px.mean() < 225
                assert mask[int(f["y"]) // 4, int(f["x"]) // 4]


def test_foci_are_a_small_fraction_of_tissue(cohort: Path) -> None:
    for r in _rows(cohort):
        if r["label"] != "tumour":
            continue
        frac = float(r["tumour_fraction"])
        assert 0.01 < frac < 0.12
        with openslide.OpenSlide(cohort.parent / r["slide"]) as s:
            img = np.asarray(s.read_region((0, 0), 2, s.level_dimensions[2]))[..., :3].astype(float)
        tissue = (img.max(-1) - img.min(-1)) / img.max(-1) > 0.1
        mask = np.asarray(Image.open(cohort.parent / r["mask"])) > 0
        assert (mask & ~tissue).mean() < 0.002  # foci lie in tissue
        assert mask.sum() / tissue.sum() == pytest.approx(frac, rel=0.3)


def test_halo_reads_the_fine_cohort(cohort: Path) -> None:
    ds = hd.SlideDataset(cohort, classes=list(CLASSES), grid=(1, 1), multiple=32, mpp=1.0)
    assert len(ds) == 4
    item = ds[0]
    assert item.plan.level == 1 and item.mask is not None and Path(item.mask).exists()
    assert hd.read_full(item.plan).shape[-1] == 3


@pytest.mark.timeout(120)
def test_signal_is_fine_structure_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quick benchmarks/plot_fine_foci.py: texture features separate focus from normal patches at
    0.5 um/px and not once the slides are box-downsampled to 8 um/px (measured: 1.00 and about 0.5)."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("plot_fine_foci", None)
    from plot_fine_foci import measurement_slides, separability

    rows = separability(measurement_slides(3, (1536, 1536), seed=1), patch_um=64.0, mpps=(0.5, 8.0), seed=1)
    auc = {r["mpp"]: r["auc"] for r in rows}
    assert rows[0]["n_focus"] >= 40 and rows[0]["n_normal"] >= 40
    assert auc[0.5] > 0.9, auc
    assert auc[8.0] < 0.65, auc
    # the matched statistics: mean grey within 1.5 levels, within-patch grey std within 10 % at 8 um/px
    low = rows[1]
    assert abs(low["grey_focus"] - low["grey_normal"]) < 1.5
    assert low["sd_focus"] == pytest.approx(low["sd_normal"], rel=0.1)
