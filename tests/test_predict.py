"""``mode=predict`` as a new user meets it: unlabelled slides, the CSV's own split, the model
taken from the checkpoint, and prediction directories that never collide (world 1, gloo)."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import pytest

from test_engine import _rows, _run, _write_cohort


def _predict_cli(csv_path: str, run_dir: str, checkpoint: str, extra: list[str], run_id: str = "p",
                 mesh: str | None = "1x1") -> dict:
    """``halo-train data=csv data.csv=... mode=predict checkpoint=...`` and nothing else (no model, head,
    classes or resolution given): what ``run`` returns, the log, and every heatmap title."""
    import os

    from hydra import compose, initialize_config_dir

    import halo.train.evaluate as evaluate_module
    from halo.train import CONF_DIR, run

    os.environ["HALO_RUN_ID"] = run_id
    overrides = ["data=csv", f"data.csv={csv_path}", *([f"mesh={mesh}"] if mesh else []), "train.progress=false",
                 "train.threads=1", "mode=predict", f"checkpoint={checkpoint}", *extra]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    records: list[str] = []
    titles: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.levelname}: {record.getMessage()}")

    save = evaluate_module.save_heatmap

    def spy(path, plan, score, **kw):
        titles.append(kw.get("title", ""))
        return save(path, plan, score, **kw)

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("halo.train")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    evaluate_module.save_heatmap = spy
    try:
        import inspect

        given = {"overrides": overrides} if "overrides" in inspect.signature(run).parameters else {}
        summary = run(cfg, run_dir=run_dir, **given)
    finally:
        evaluate_module.save_heatmap = save
        logger.removeHandler(handler)
    return {"summary": summary, "log": records, "titles": titles}


def _refused_cli(*args, **kwargs) -> str:
    from halo.errors import InputError

    try:
        _predict_cli(*args, **kwargs)
    except InputError as exc:
        return str(exc)
    raise AssertionError("the prediction was not refused")


def _write(path: Path, columns: list[str], rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    return path


@pytest.fixture(scope="module")
def trained(pool1, tmp_path_factory) -> dict:
    """One small run (head attention, data.canvas=32), trained once for the module's tests."""
    root = tmp_path_factory.mktemp("trained")
    cohort = _write_cohort(root, {"a": "train", "b": "train", "c": "val", "d": "val"})
    run_dir = root / "run"
    pool1.run(_run, str(cohort), str(run_dir), ["train.heatmaps=false", "head=attention", "data.canvas=32"])
    return {"root": root, "cohort": cohort, "run_dir": run_dir, "best": str(run_dir / "checkpoints" / "best.pt"),
            "slides": [r["slide"] for r in _rows(cohort)]}


SAME = ["data.classes=[normal,tumour]", "head=attention", "data.canvas=32"]
"""The trained run's model, classes and canvas, given as before (tests of other behaviours)."""


def _out_dir(out: dict) -> Path:
    return Path(out["summary"]["run_dir"])


@pytest.mark.timeout(300)
def test_slides_without_a_label_column_are_predicted(pool1, trained) -> None:
    """A hospital's CSV lists slides only: predict needed a label column and refused it."""
    csv_path = _write(trained["root"] / "unlabelled.csv", ["slide"], [{"slide": s} for s in trained["slides"]])
    out = pool1.run(_predict_cli, str(csv_path), str(trained["run_dir"]), trained["best"],
                    [*SAME, "train.heatmaps=true"], "nolabel")[0]
    rows = _rows(_out_dir(out) / "predictions.csv")
    assert len(rows) == 4 and all(r["label"] == "" for r in rows), rows
    assert all(r["prediction"] in ("normal", "tumour") and 0 <= float(r["prob_tumour"]) <= 1 for r in rows), rows
    assert all(r["split"] in ("", "predict") for r in rows), rows
    summary = json.loads((_out_dir(out) / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert summary["metrics"] == {} and summary["labelled"] == 0 and summary["unlabelled"] == 4, summary
    assert len(out["titles"]) == 4 and not any("None" in t for t in out["titles"]), out["titles"]
    for r in rows:  # each heatmap's title gives its slide's predicted probability
        assert any(t.startswith(r["slide"]) and f"P(tumour) = {float(r['prob_tumour']):.3f}" in t
                   for t in out["titles"]), (r, out["titles"])
    records = _rows(_out_dir(out) / "slides.csv")
    assert len(records) == 4 and all(r["label"] == "" for r in records), records


@pytest.mark.timeout(300)
def test_metrics_count_only_the_labelled_rows_and_split_is_the_csvs_own(pool1, trained) -> None:
    """Rows with an empty label are predicted and left out of the metrics; each row keeps the
    split its CSV gives (empty where it gives none), never a derived train/val."""
    labels = ["normal", "", "normal", "tumour"]
    splits = ["test", "", "", "val"]
    rows = [{"slide": s, "label": lab, "split": sp} for s, lab, sp in zip(trained["slides"], labels, splits)]
    csv_path = _write(trained["root"] / "mixed.csv", ["slide", "label", "split"], rows)
    out = pool1.run(_predict_cli, str(csv_path), str(trained["run_dir"]), trained["best"], SAME, "mixed")[0]
    got = {r["slide"]: r for r in _rows(_out_dir(out) / "predictions.csv")}
    for s, lab, sp in zip(trained["slides"], labels, splits):
        key = s.removesuffix(".tif")
        assert got[key]["label"] == lab and got[key]["split"] == sp, got[key]
    summary = out["summary"]
    assert summary["labelled"] == 3 and summary["unlabelled"] == 1, summary
    assert summary["metrics"]["n"] == 3, summary
    records = {r["key"]: r["split"] for r in _rows(_out_dir(out) / "slides.csv")}
    assert records == {s.removesuffix(".tif"): sp for s, sp in zip(trained["slides"], splits)}, records


@pytest.mark.timeout(300)
def test_without_a_mesh_given_a_prediction_fits_the_world(pool1, trained) -> None:
    """halo-train's default mesh (2x1) does not divide a world of one process: a prediction given no
    mesh takes the checkpoint's (1x1 here) instead of refusing; a mesh given is still checked."""
    rows = [{"slide": s, "label": "", "split": ""} for s in trained["slides"]]
    csv_path = _write(trained["root"] / "nomesh.csv", ["slide", "label", "split"], rows)
    out = pool1.run(_predict_cli, str(csv_path), str(trained["run_dir"]), trained["best"], [], "nomesh", None)[0]
    assert out["summary"]["grid"] == [1, 1], out["summary"]
    assert any("does not divide the world size 1: predicting on the checkpoint's 1 x 1 mesh" in r
               for r in out["log"]), out["log"]
    message = pool1.run(_refused_cli, str(csv_path), str(trained["run_dir"]), trained["best"], [], "m2", "2x1")[0]
    assert "does not divide the world size" in message, message


@pytest.mark.timeout(300)
def test_a_labelled_csv_without_split_is_predicted_with_no_split(pool1, trained) -> None:
    """predictions.csv said split=train for every row (a derived split, meaningless here)."""
    rows = [{"slide": s, "label": "normal" if i % 2 == 0 else "tumour"} for i, s in enumerate(trained["slides"])]
    csv_path = _write(trained["root"] / "nosplit.csv", ["slide", "label"], rows)
    out = pool1.run(_predict_cli, str(csv_path), str(trained["run_dir"]), trained["best"], SAME, "nosplit")[0]
    preds = _rows(_out_dir(out) / "predictions.csv")
    assert len(preds) == 4 and all(r["split"] in ("", "predict") for r in preds), preds
    assert all(r["split"] in ("", "predict") for r in _rows(_out_dir(out) / "slides.csv"))
    assert out["summary"]["labelled"] == 4 and "auc" in out["summary"]["metrics"]


@pytest.mark.timeout(300)
def test_a_label_outside_the_classes_is_still_refused_and_training_needs_labels(pool1, trained) -> None:
    rows = [{"slide": s, "label": lab} for s, lab in zip(trained["slides"], ["normal", "lymphoma", "", "tumour"])]
    csv_path = _write(trained["root"] / "bad.csv", ["slide", "label"], rows)
    message = pool1.run(_refused_cli, str(csv_path), str(trained["run_dir"]), trained["best"], SAME, "bad")[0]
    assert "lymphoma" in message and "line 3" in message and "line 4" not in message, message
    # training: an empty label and a missing label column are refused as before
    from test_engine import _refused

    train_rows = [{"slide": s, "label": lab, "split": sp} for s, lab, sp in
                  zip(trained["slides"], ["normal", "", "normal", "tumour"], ["train", "train", "val", "val"])]
    empty = _write(trained["root"] / "empty_label.csv", ["slide", "label", "split"], train_rows)
    message = pool1.run(_refused, str(empty), str(trained["root"] / "t1"), [])[0]
    assert "line 3" in message and "no label; training needs one" in message, message
    nocol = _write(trained["root"] / "no_label.csv", ["slide", "split"], train_rows)
    message = pool1.run(_refused, str(nocol), str(trained["root"] / "t2"), [])[0]
    assert "missing column" in message and "label" in message, message


@pytest.mark.timeout(300)
def test_the_model_classes_and_resolution_come_from_the_checkpoint(pool1, trained) -> None:
    """Predict needed model.name, head.name, model.num_classes and data.classes repeated, and
    read at its own data.canvas: now it takes them from the checkpoint and says so."""
    out = pool1.run(_predict_cli, str(trained["cohort"]), str(trained["run_dir"]), trained["best"], [], "adopt")[0]
    taken = [line for line in out["log"] if "from the checkpoint" in line]
    assert len(taken) == 1, out["log"]
    for part in ("head.name=attention", "data.classes=[normal, tumour]", "data.canvas=32", "data.mpp=1.0"):
        assert part in taken[0], taken[0]
    records = _rows(_out_dir(out) / "slides.csv")
    assert all(int(r["padded_height"]) % 32 == 0 and int(r["padded_width"]) % 32 == 0 for r in records), records
    assert all(float(r["mpp"]) == pytest.approx(1.0) for r in records), records
    assert len(_rows(_out_dir(out) / "predictions.csv")) == 4


@pytest.mark.timeout(300)
def test_a_model_given_unlike_the_checkpoints_is_refused_naming_both(pool1, trained) -> None:
    message = pool1.run(_refused_cli, str(trained["cohort"]), str(trained["run_dir"]), trained["best"],
                        ["head=mean"], "mean")[0]
    assert "'attention'" in message and "'mean'" in message and "another model" in message, message
    message = pool1.run(_refused_cli, str(trained["cohort"]), str(trained["run_dir"]), trained["best"],
                        ["data.classes=[benign,malignant]"], "classes")[0]
    assert "normal" in message and "benign" in message, message


@pytest.mark.timeout(300)
def test_a_resolution_given_unlike_the_checkpoints_is_honoured_with_one_warning(pool1, trained) -> None:
    out = pool1.run(_predict_cli, str(trained["cohort"]), str(trained["run_dir"]), trained["best"],
                    ["data.mpp=2.0", "head=attention"], "mpp")[0]
    warned = [line for line in out["log"] if "data.mpp=2.0" in line and "trained at 1.0" in line]
    assert len(warned) == 1 and warned[0].startswith("WARNING"), out["log"]
    records = _rows(_out_dir(out) / "slides.csv")
    assert all(float(r["mpp"]) == pytest.approx(2.0) for r in records), records


def _run_id_without_launcher() -> str:
    import os

    from halo.train import run_id

    for var in ("HALO_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PMI_KVSNAME", "PMIX_NAMESPACE"):
        os.environ.pop(var, None)
    return run_id()


def test_the_fallback_run_id_is_a_sortable_date_and_time(pool1) -> None:
    """It was %H-%M-%S: predict/17-12-04 of two days collided."""
    value = pool1.run(_run_id_without_launcher)[0]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}", value), value


@pytest.mark.timeout(300)
def test_two_predictions_with_one_run_id_go_to_two_directories(pool1, trained) -> None:
    """Two predictions started in one second got one id: the second was refused."""
    first = pool1.run(_predict_cli, str(trained["cohort"]), str(trained["run_dir"]), trained["best"], SAME, "same")[0]
    before = (_out_dir(first) / "predictions.csv").read_bytes()
    second = pool1.run(_predict_cli, str(trained["cohort"]), str(trained["run_dir"]), trained["best"], SAME, "same")[0]
    assert _out_dir(first) != _out_dir(second) and _out_dir(second).parent == _out_dir(first).parent
    assert (_out_dir(first) / "predictions.csv").read_bytes() == before
    assert (_out_dir(second) / "predictions.csv").is_file()
