"""SlideDataset: manifest validation (every problem at once), items, skipping, prefetch."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import noise_slide_image, write_csv, write_slide

import halo.data as hd
from halo.data.slide import clear_cache

CLASSES = ["normal", "tumour"]


@pytest.fixture()
def cohort(tmp_path: Path) -> Path:
    """Four good slides (3 normal, 1 tumour; one listed by id) and their CSV."""
    for i in range(4):
        write_slide(tmp_path / f"s{i}.tif", noise_slide_image(256, 192, i, (30, 20, 180, 140)), mpp=0.5, levels=2)
    rows = [
        {"slide": "s0.tif", "label": "normal", "split": "train"},
        {"slide": "s1", "label": "normal", "split": "train"},  # an id: resolved to s1.tif
        {"slide": str(tmp_path / "s2.tif"), "label": "1", "split": "val"},  # absolute path, label index
        {"slide": "s3.tif", "label": "normal", "split": "val"},
    ]
    return write_csv(tmp_path / "labels.csv", rows)


def test_items_weights_and_splits(cohort: Path) -> None:
    ds = hd.SlideDataset(cohort, classes=CLASSES, grid=(2, 1), multiple=16, mpp=1.0)
    assert len(ds) == 4
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 0])
    np.testing.assert_allclose(ds.class_weights(), [4 / (2 * 3), 4 / (2 * 1)])
    item = ds[1]
    assert item.slide_id == "s1" and item.path.endswith("s1.tif") and item.label == 0
    blk = hd.read_block(item.plan, 1, 0)
    assert blk.shape == (*item.plan.block_shape(), 3)
    assert ds[1].plan is item.plan  # planned once
    val = hd.SlideDataset(cohort, classes=CLASSES, grid=(2, 1), multiple=16, mpp=1.0, split="val")
    assert [r.slide_id for r in val.rows] == ["s2", "s3"]
    np.testing.assert_allclose(val.class_weights(), [1.0, 1.0])


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    write_slide(tmp_path / "good.tif", noise_slide_image(256, 192, 0), mpp=0.5, levels=2)
    write_slide(tmp_path / "good2.tif", noise_slide_image(256, 192, 3), mpp=0.5, levels=2)
    write_slide(tmp_path / "tiny.tif", noise_slide_image(40, 40, 1), mpp=0.5, levels=1)
    write_slide(tmp_path / "nompp.tif", noise_slide_image(256, 192, 2), mpp=None, levels=1)
    (tmp_path / "broken.svs").write_bytes(b"not a slide at all")
    rows = [
        {"slide": "good.tif", "label": "normal"},  # line 2: fine
        {"slide": "missing.tif", "label": "normal"},  # line 3
        {"slide": "broken.svs", "label": "tumour"},  # line 4
        {"slide": "good2.tif", "label": "cancer"},  # line 5
        {"slide": "tiny.tif", "label": "normal"},  # line 6
        {"slide": "nompp.tif", "label": "tumour"},  # line 7
    ]
    csv_path = write_csv(tmp_path / "bad.csv", rows, columns=("slide", "label"))
    with pytest.raises(hd.ManifestError) as ei:
        hd.SlideDataset(csv_path, classes=CLASSES, grid=(2, 2), multiple=32, mpp=0.5)
    text = str(ei.value)
    assert str(csv_path) in text
    probs = ei.value.problems
    assert len(probs) == 5, probs
    assert "line 3" in probs[0] and "missing.tif" in probs[0] and "not found" in probs[0]
    assert "line 4" in probs[1] and "broken.svs" in probs[1] and "SlideOpenError" in probs[1]
    assert "line 5" in probs[2] and "'cancer'" in probs[2] and "good2.tif" in probs[2]
    assert "line 6" in probs[3] and "tiny.tif" in probs[3] and "too small" in probs[3]
    assert "read it at a finer resolution" in probs[3] and "use a smaller mesh" in probs[3], probs[3]
    assert "line 7" in probs[4] and "nompp.tif" in probs[4] and "mpp" in probs[4]


def test_manifest_structure_errors(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("image,dx\nx.tif,normal\n")  # (path,class are aliases of slide,label: tests/test_cohort_csv.py)
    with pytest.raises(hd.ManifestError, match=r"missing column.*data\.columns\.slide"):
        hd.SlideDataset(p, classes=CLASSES)
    with pytest.raises(hd.ManifestError, match="manifest file not found"):
        hd.SlideDataset(tmp_path / "none.csv", classes=CLASSES)
    p.write_text("slide,label,split\n,normal,train\n")
    with pytest.raises(hd.ManifestError, match="line 2: empty"):
        hd.SlideDataset(p, classes=CLASSES)


def test_split_without_rows(cohort: Path, tmp_path: Path) -> None:
    test = hd.SlideDataset(cohort, classes=CLASSES, multiple=16, mpp=1.0, split="test")  # empty, still loads
    assert len(test) == 0 and len(test.all_rows) == 4 and not test.derived_split
    only_val = write_csv(tmp_path / "val.csv", [{"slide": "s0.tif", "label": "normal", "split": "val"}])
    assert len(hd.SlideDataset(only_val, classes=CLASSES, multiple=16, mpp=1.0, split="val")) == 1
    with pytest.raises(hd.ManifestError, match="no rows with split='train'"):
        hd.SlideDataset(only_val, classes=CLASSES, multiple=16, mpp=1.0, split="train")
    with pytest.raises(ValueError, match="split must be one of"):
        hd.SlideDataset(cohort, classes=CLASSES, split="validation")


def test_slide_unreadable_mid_run_is_skipped_and_recorded(cohort: Path, tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    ds = hd.SlideDataset(cohort, classes=CLASSES, grid=(1, 2), multiple=16, mpp=1.0, record_dir=run)
    assert ds.read_block_safe(0, 0, 1) is not None
    clear_cache()
    (tmp_path / "s3.tif").write_bytes(b"\0" * 100)  # s3 breaks after validation
    with caplog.at_level("WARNING", logger="halo.data"):  # logged (halo.data), not warnings.warn
        assert ds.read_block_safe(3, 0, 0) is None
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage() and "s3" in r.getMessage()]
    assert ds.read_block_safe(3, 0, 1) is None  # stays skipped, recorded once
    assert ds.read_block_safe(2, 0, 0) is not None  # nothing else is lost
    with open(run / "skipped_slides.csv") as fh:
        rec = list(csv.DictReader(fh))
    assert len(rec) == 1 and rec[0]["slide"] == "s3" and rec[0]["csv_line"] == "5"
    assert "SlideOpenError" in rec[0]["error"]
    strict = hd.SlideDataset(cohort, classes=CLASSES, multiple=16, mpp=1.0, strict=True, validate=False)
    with pytest.raises(hd.SlideError, match="s3.tif"):
        strict.read_block_safe(3, 0, 0)
    clear_cache()


def test_prefetcher_order_and_errors() -> None:
    seen: list[str] = []

    def work(i: int) -> int:
        seen.append(threading.current_thread().name)
        if i == 3:
            raise ValueError("boom 3")
        return i * 10

    with hd.Prefetcher(work, range(3), depth=2) as pf:
        assert list(pf) == [(0, 0), (1, 10), (2, 20)]
    assert all(n.startswith("halo-prefetch") for n in seen)
    with hd.Prefetcher(work, range(5)) as pf:
        assert next(pf) == (0, 0)
        with pytest.raises(ValueError, match="boom 3"):
            for _ in pf:
                pass


def test_prefetcher_reads_blocks(cohort: Path) -> None:
    ds = hd.SlideDataset(cohort, classes=CLASSES, grid=(2, 2), multiple=16, mpp=1.0)
    aug = hd.Augment()
    with hd.Prefetcher(lambda i: ds.read_block_safe(i, 1, 1, augment=aug.draw(i)), range(len(ds))) as pf:
        got = dict(pf)
    for i, blk in got.items():
        np.testing.assert_array_equal(blk, hd.read_block(ds[i].plan, 1, 1, augment=aug.draw(i)))
