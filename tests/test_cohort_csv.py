"""A hospital-style cohort CSV as a new user brings it: headers named otherwise (``Patient ID``,
``Diagnosis``), ``data.columns``, labels in another case, ``;``/tab delimiters, unreadable slides
skipped where that is asked for, one DICOM slide in two files, and one record per skipped slide."""

from __future__ import annotations

import csv
import logging
import shutil
import warnings
from pathlib import Path

import pytest
from data_fixtures import noise_slide_image, write_slide

import halo.data as hd

CLASSES = ["normal", "tumour"]
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "slides"
DICOM = [FIXTURES / "openslide-python_boxes_0.dcm", FIXTURES / "openslide-python_boxes_1.dcm"]
needs_dicom = pytest.mark.skipif(not all(p.is_file() for p in DICOM), reason=f"real fixtures {DICOM} not present")


def _write(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as fh:
        wr = csv.writer(fh, delimiter=delimiter)
        wr.writerow(header)
        wr.writerows(rows)
    return path


def _slides(root: Path, n: int) -> list[str]:
    out = []
    for i in range(n):
        p = root / f"s{i}.tif"
        write_slide(p, noise_slide_image(64, 64, seed=i), mpp=0.5, levels=1)
        out.append(p.name)
    return out


def _ds(path: Path, **kw) -> hd.SlideDataset:
    kw.setdefault("multiple", 16)
    kw.setdefault("mpp", None)
    kw.setdefault("level", 0)
    return hd.SlideDataset(path, classes=kw.pop("classes", CLASSES), **kw)


# -- 1. headers: aliases, data.columns, what is ignored, what a derived split is ---------------------
def _patients_csv(tmp_path: Path, header: list[str]) -> Path:
    """Eight slides of four patients (two each, one class per patient), header as given
    (slide, label, patient, then anything else)."""
    rows = [[f"s{i}.tif", CLASSES[(i // 2) % 2], f"P{i // 2}", f"ACC{i}"] for i in range(8)]
    return _write(tmp_path / "c.csv", header, [r[: len(header)] for r in rows])


@pytest.mark.parametrize("header", [
    ["slide", "label", "Patient ID"], ["Slide Path", "Diagnosis", "patient_id"], ["File", "Class", "PATIENT"],
    [" slide ", " LABEL ", "Case ID"], ["path", "label", "subject"],
])
def test_headers_named_otherwise_are_matched_and_keep_patients_together(tmp_path: Path, header) -> None:
    ds = _ds(_patients_csv(tmp_path, header), validate=False, val_fraction=0.5)
    assert [r.patient for r in ds.all_rows] == [f"P{i // 2}" for i in range(8)], ds.columns
    sides: dict[str, set[str]] = {}
    for r in ds.all_rows:
        sides.setdefault(r.patient, set()).add(r.split)
    assert all(len(s) == 1 for s in sides.values()), sides
    assert ds.columns["patient"] == header[2].strip() and ds.columns["slide"] == header[0].strip(), ds.columns
    assert "patient-level" in ds.split_note, ds.split_note


def test_two_headers_for_one_column_are_refused_naming_both(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.csv", ["slide", "label", "patient", "Patient ID"], [["s0.tif", "normal", "P0", "P0"]])
    with pytest.raises(hd.ManifestError, match=r"'patient'.*'Patient ID'.*data\.columns\.patient"):
        _ds(path, validate=False)


def test_data_columns_maps_a_header_and_a_missing_one_is_an_error_naming_the_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.csv", ["Image", "Dx", "MRN", "Accession"],
                  [[f"s{i}.tif", CLASSES[(i // 2) % 2], f"M{i // 2}", f"A{i}"] for i in range(8)])
    ds = _ds(path, validate=False, columns={"slide": "Image", "label": "Dx", "patient": "MRN"})
    assert [r.patient for r in ds.all_rows] == [f"M{i // 2}" for i in range(8)]
    assert ds.ignored_columns == ["Accession"] and ds.all_rows[0].extra == {"Accession": "A0"}
    with pytest.raises(hd.ManifestError, match=r"data\.columns\.patient='Patient ID'.*\['Image', 'Dx', 'MRN'"):
        _ds(path, validate=False, columns={"slide": "Image", "label": "Dx", "patient": "Patient ID"})
    with pytest.raises(ValueError, match=r"data\.columns.*'patients'"):
        _ds(path, validate=False, columns={"patients": "MRN"})


def test_an_unaliased_header_is_not_guessed(tmp_path: Path) -> None:
    """``Patient name`` or ``MRN`` could be anything: no alias, and the split says it is slide-level."""
    path = _write(tmp_path / "c.csv", ["slide", "label", "Patient name", "MRN"],
                  [[f"s{i}.tif", CLASSES[i % 2], f"P{i // 2}", f"M{i}"] for i in range(4)])
    ds = _ds(path, validate=False)
    assert all(r.patient is None for r in ds.all_rows)
    assert ds.ignored_columns == ["Patient name", "MRN"]
    note = ds.split_note
    assert "slide-level" in note and "both" in note and "data.columns.patient" in note, note


# -- 2. labels in another case -------------------------------------------------------------------------
def test_labels_match_case_insensitively_and_a_refusal_suggests_the_class(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.csv", ["slide", "label"], [["s0.tif", "Tumour"], ["s1.tif", " NORMAL "]])
    assert [r.label for r in _ds(path, validate=False).all_rows] == [1, 0]
    bad = _write(tmp_path / "d.csv", ["slide", "label"], [["s0.tif", "tumor"]])
    with pytest.raises(hd.ManifestError, match=r"label 'tumor' is not one of.*did you mean 'tumour'"):
        _ds(bad, validate=False)
    # an empty label in training: said as missing, with what to do (not "label '' is not one of")
    empty = _write(tmp_path / "g.csv", ["slide", "label"], [["s0.tif", "tumour"], ["s1.tif", ""]])
    with pytest.raises(hd.ManifestError, match=r"line 3, slide 's1' .*: no label; training needs one on every "
                                               r"row: give it, leave the row out, or predict unlabelled slides"):
        _ds(empty, validate=False)
    # classes that differ only by case: exact matches only
    both = _write(tmp_path / "e.csv", ["slide", "label"], [["s0.tif", "A"], ["s1.tif", "a"]])
    assert [r.label for r in _ds(both, validate=False, classes=["a", "A"]).all_rows] == [1, 0]
    other = _write(tmp_path / "f.csv", ["slide", "label"], [["s0.tif", "A"], ["s1.tif", "b"]])
    assert [r.label for r in _ds(other, validate=False, classes=["a", "A", "B"]).all_rows] == [1, 2]


# -- 3. delimiters -------------------------------------------------------------------------------------
@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_a_semicolon_or_tab_delimited_csv_is_read(tmp_path: Path, delimiter: str) -> None:
    names = _slides(tmp_path, 2)
    path = _write(tmp_path / "c.csv", ["Accession", "patient", "slide", "label", "split"],
                  [["A1", "P1", names[0], "normal", "train"], ["A2", "P2", names[1], "Tumour", "val"]],
                  delimiter=delimiter)
    ds = _ds(path)
    assert [(r.slide_id, r.label, r.split, r.patient) for r in ds.all_rows] == [
        ("s0", 0, "train", "P1"), ("s1", 1, "val", "P2")]
    assert ds.delimiter == delimiter


# -- 5. one DICOM slide in two files -------------------------------------------------------------------
@needs_dicom
def test_the_two_files_of_one_dicom_slide_are_one_slide(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.csv", ["slide", "label", "split"],
                  [[str(DICOM[0]), "normal", "train"], [str(DICOM[1]), "tumour", "val"]])
    with pytest.raises(hd.ManifestError) as err:
        _ds(path, multiple=8)
    [problem] = err.value.problems
    assert problem.startswith("line 3") and "the same slide as line 2" in problem and "DICOM" in problem, problem


# -- 6. skipped slides: one record per slide, logged, naming the reader ---------------------------------
def test_a_skipped_slide_is_recorded_once_with_documented_columns_and_logged(tmp_path: Path, caplog) -> None:
    from halo.data import SKIPPED_COLUMNS, SlideReadError

    names = _slides(tmp_path, 2)
    path = _write(tmp_path / "c.csv", ["slide", "label", "split"], [[names[0], "normal", "train"],
                                                                     [names[1], "tumour", "train"]])
    ds = _ds(path, record_dir=tmp_path / "run")
    err = SlideReadError(tmp_path / names[0], 0, (0, 0), (16, 16), "broken tile")
    err.reader = "tifffile"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # logged, not warnings.warn with a source line
        with caplog.at_level(logging.WARNING, logger="halo.data"):
            ds.mark_failed(0, err)
            ds.mark_failed(0, err)
    msgs = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(msgs) == 1 and "tifffile" in msgs[0], msgs
    with open(tmp_path / "run" / "skipped_slides.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and list(rows[0]) == list(SKIPPED_COLUMNS), rows
    assert rows[0]["reader"] == "tifffile" and "pid" not in rows[0] and rows[0]["rank"] == "0", rows


def _corrupt_last_tile(path: Path) -> None:
    """Garbage over the last tile of level 0: the start-up check (first tile) passes, a whole read fails."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        off, n = page.dataoffsets[-1], page.databytecounts[-1]
    with open(path, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\xff" * n)


@pytest.mark.timeout(300)
def test_a_slide_failing_on_two_ranks_is_one_row_logged_once_by_rank_0(pool2, tmp_path: Path) -> None:
    from test_engine import _rows, _run, _write_cohort

    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "val"})
    bad = tmp_path / "slides" / "bad.tif"
    write_slide(bad, noise_slide_image(256, 256, seed=5), mpp=0.5, levels=1, tile=64)
    _corrupt_last_tile(bad)
    with open(cohort, "a") as fh:
        fh.write("slides/bad.tif,tumour,train\n")
    run_dir = tmp_path / "run"
    out = pool2.run(_run, str(cohort), str(run_dir), ["mesh=2x1", "train.heatmaps=false", "train.epochs=2"])
    skipped = _rows(run_dir / "skipped_slides.csv")
    assert [r["slide"] for r in skipped] == ["slides/bad"], skipped
    assert skipped[0]["epoch"] == "1" and skipped[0]["reader"] == "tifffile", skipped
    assert "tifffile" in skipped[0]["error"], skipped
    lines = [[m for m in o["log"] if "skipped" in m and "slides/bad" in m] for o in out]
    assert len(lines[0]) == 1 and lines[1] == [], lines


# -- 4 and 1 through a run: skipping unreadable slides, the split's log line, ignored columns -------------
def _refused(fn_name: str, *args) -> str:
    """A run (``test_engine._run`` or ``_predict``) that must be refused: its message (in the worker,
    so that the pool survives)."""
    import test_engine

    from halo.errors import InputError

    try:
        getattr(test_engine, fn_name)(*args)
    except InputError as exc:
        return str(exc)
    raise AssertionError("the run was not refused")


def _broken_files(root: Path) -> list[str]:
    (root / "slides" / "garbage.svs").write_bytes(b"not a slide at all" * 10)
    return ["slides/garbage.svs", "slides/missing.svs"]


@pytest.fixture(scope="module")
def trained(pool1, tmp_path_factory) -> dict:
    from test_engine import _run, _write_cohort

    root = tmp_path_factory.mktemp("cohort_trained")
    cohort = _write_cohort(root, {"a": "train", "b": "train", "c": "val", "d": "val"})
    pool1.run(_run, str(cohort), str(root / "run"), ["train.heatmaps=false"])
    return {"root": root, "cohort": cohort, "best": str(root / "run" / "checkpoints" / "best.pt")}


@pytest.mark.timeout(300)
def test_predict_skips_unreadable_slides_and_records_them(pool1, trained) -> None:
    from test_engine import _predict, _rows

    root = trained["root"]
    rows = _rows(trained["cohort"])
    broken = _broken_files(root)
    path = _write(root / "predict.csv", ["slide", "label"],
                  [[r["slide"], r["label"]] for r in rows] + [[b, "normal"] for b in broken])
    out = pool1.run(_predict, str(path), str(root / "run"), trained["best"], "1x1")[0]
    assert out["summary"]["slides"] == 4, out["summary"]
    pdir = Path(out["summary"]["run_dir"])
    assert len(_rows(pdir / "predictions.csv")) == 4
    skipped = {r["slide"]: r for r in _rows(pdir / "skipped_slides.csv")}
    assert set(skipped) == {"slides/garbage", "slides/missing"}, skipped
    assert "not found" in skipped["slides/missing"]["error"], skipped
    assert "SlideOpenError" in skipped["slides/garbage"]["error"], skipped
    assert any("2 of 6 slides" in m and "skipped" in m for m in out["log"]), out["log"]


@pytest.mark.timeout(300)
def test_predict_keeps_csv_problems_fatal(pool1, trained) -> None:
    from test_engine import _rows

    root = trained["root"]
    rows = _rows(trained["cohort"])
    path = _write(root / "bad_label.csv", ["slide", "label"],
                  [[r["slide"], r["label"]] for r in rows] + [["slides/garbage.svs", "cat"]])
    _broken_files(root)
    message = pool1.run(_refused, "_predict", str(path), str(root / "run"), trained["best"], "1x1")[0]
    assert "label 'cat'" in message and "nothing was predicted" in message, message


def test_a_derived_split_is_drawn_over_the_readable_slides(tmp_path: Path) -> None:
    """Slides skipped at the start-up check (missing here) take no place in a derived split: it is the
    split of the readable rows alone, and the skipped rows are in no split."""
    from halo.data.dataset import derive_split

    names = _slides(tmp_path, 8)
    labels = [CLASSES[i % 2] for i in range(8)]
    rows = [[n, lab] for n, lab in zip(names, labels)] + [["gone1.tif", "normal"], ["gone2.tif", "normal"]]
    path = _write(tmp_path / "c.csv", ["slide", "label"], rows)
    checked = _ds(path, skip_unreadable=True, val_fraction=0.5)
    assert sorted(checked.unreadable) == [10, 11], checked.unreadable
    ds = _ds(path, validate=False, val_fraction=0.5, skipped_lines=checked.unreadable, split=None)
    by_line = {r.line: r.split for r in ds.all_rows}
    assert by_line[10] is None and by_line[11] is None, by_line
    want = derive_split([i % 2 for i in range(8)], [f"row {line}" for line in range(2, 10)], 0.5, 0)
    assert [by_line[line] for line in range(2, 10)] == want, by_line
    assert len(_ds(path, validate=False, val_fraction=0.5, skipped_lines=checked.unreadable, split="val")) == 4


@pytest.mark.timeout(300)
def test_a_class_without_training_slides_is_said_at_start_up(pool1, tmp_path: Path) -> None:
    """``data.classes=[normal,tumour,other]`` with no slide labelled ``other``: said once at start-up
    (it used to show only as validation's AUC warning), and the run goes on."""
    from test_engine import _run, _write_cohort

    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "val"})
    out = pool1.run(_run, str(cohort), str(tmp_path / "run"),
                    ["train.heatmaps=false", "data.classes=[normal,tumour,other]", "model.num_classes=3"])[0]
    said = [m for m in out["log"] if "no training slide is labelled" in m]
    assert len(said) == 1 and "'other'" in said[0] and "'normal'" not in said[0], out["log"]


@pytest.mark.timeout(300)
def test_training_skips_unreadable_slides_only_when_asked(pool1, tmp_path: Path) -> None:
    from test_engine import _rows, _run, _write_cohort

    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "val"})
    broken = _broken_files(tmp_path)
    with open(cohort, "a") as fh:
        for b in broken:
            fh.write(f"{b},normal,train\n")
    message = pool1.run(_refused, "_run", str(cohort), str(tmp_path / "refused"), ["train.heatmaps=false"])[0]
    assert "nothing was trained" in message and "garbage" in message and "data.skip_unreadable" in message, message
    run_dir = tmp_path / "run"
    out = pool1.run(_run, str(cohort), str(run_dir), ["train.heatmaps=false", "data.skip_unreadable=true"])[0]
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    skipped = _rows(run_dir / "skipped_slides.csv")
    assert sorted(r["slide"] for r in skipped) == ["slides/garbage", "slides/missing"], skipped
    assert {r["epoch"] for r in skipped} == {"0"}, skipped
    assert any("2 of 6 slides" in m for m in out["log"]), out["log"]
    assert {r["key"] for r in _rows(run_dir / "slides.csv")} == {f"slides/{n}" for n in "abcd"}


@pytest.mark.timeout(300)
def test_a_run_says_which_columns_it_ignored_and_what_split_it_derived(pool1, tmp_path: Path) -> None:
    from test_engine import _rows, _run, _write_cohort

    cohort = _write_cohort(tmp_path, {n: "" for n in "abcdefgh"})
    rows = _rows(cohort)
    hospital = _write(tmp_path / "hospital.csv", ["File", "Diagnosis", "MRN", "Accession"],
                      [[r["slide"], r["label"].upper(), f"M{i // 2}", f"A{i}"] for i, r in enumerate(rows)])
    out = pool1.run(_run, str(hospital), str(tmp_path / "run"),
                    ["data.val_fraction=0.5", "data.columns.patient=MRN"])[0]
    assert any("patient-level stratified split" in m for m in out["log"]), out["log"]
    assert sum("Accession" in m and "ignored" in m for m in out["log"]) == 1, out["log"]
    plain = _write(tmp_path / "plain.csv", ["slide", "label"], [[r["slide"], r["label"]] for r in rows])
    out = pool1.run(_run, str(plain), str(tmp_path / "run2"), ["data.val_fraction=0.5"])[0]
    [line] = [m for m in out["log"] if "no split column" in m]
    assert "slide-level" in line and "data.columns.patient" in line, line
