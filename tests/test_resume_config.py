"""What a new user found silently wrong on resume and warm start: a resume without the data options
trained on another cohort, a warm start with the classes reordered kept the old head, a refused
resume rewrote ``.hydra/config.yaml``, and every resume appended duplicate ``skipped_slides.csv`` rows."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from test_engine import _refused, _rows, _run, _write_cohort

BASE = ["mesh=1x1", "train.progress=false", "train.threads=1", "data.augment.enabled=false", "train.heatmaps=false"]
"""What every run here gives, less the data options (test_engine's ``_run`` gives those)."""


def _run_plain(run_dir: str, cwd: str, overrides: list[str]) -> dict:
    """halo-train with exactly ``overrides`` (no data options added) in ``cwd``: the summary, or the refusal."""
    from hydra import compose, initialize_config_dir

    from halo.errors import InputError
    from halo.train import CONF_DIR, run

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    here = os.getcwd()
    os.chdir(cwd)  # the default synthetic cohort (data/synth) would be generated here, not in the repository
    try:
        return {"summary": run(cfg, run_dir=run_dir, overrides=overrides)}
    except InputError as exc:
        return {"refused": str(exc)}
    finally:
        os.chdir(here)


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run, ``.hydra/`` included."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _cohort(tmp_path: Path) -> Path:
    return _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "val"})


# -- 1. a resume without the data options ---------------------------------------------------------------
@pytest.mark.timeout(300)
def test_a_resume_without_the_data_options_is_refused_naming_them_and_its_advice_resumes(pool1,
                                                                                         tmp_path: Path) -> None:
    cohort, run_dir = _cohort(tmp_path), tmp_path / "run"
    pool1.run(_run, str(cohort), str(run_dir), ["train.schedule=constant", "train.heatmaps=false"])
    before = _files(run_dir)
    out = pool1.run(_run_plain, str(run_dir), str(tmp_path),
                    [*BASE, "train.schedule=constant", "train.epochs=2", "train.resume=true", "data.slides=4"])[0]
    assert "refused" in out, f"resumed on the default synthetic cohort: {out}"
    message = out["refused"]
    assert "data.kind" in message and "csv" in message and "synthetic" in message, message
    assert str(cohort) in message and "data.mpp" in message, message
    assert _files(run_dir) == before  # nothing written ...
    assert not (tmp_path / "data").exists()  # ... nor generated
    # the overrides it names resume the run as it was
    advice = shlex.split(re.search(r"resume it as it was trained, add: (.*?) \(", message).group(1))
    assert "data.kind=csv" in advice and f"data.csv={cohort}" in advice and "data.mpp=1.0" in advice, advice
    out = pool1.run(_run_plain, str(run_dir), str(tmp_path),
                    [*BASE, "train.schedule=constant", "train.epochs=2", "train.resume=true", *advice])[0]
    assert out.get("summary", {}).get("epochs") == 2, out
    assert len(_rows(run_dir / "metrics.csv")) == 2


@pytest.mark.timeout(300)
def test_a_resume_giving_other_classes_or_another_head_is_refused(pool1, tmp_path: Path) -> None:
    cohort, run_dir = _cohort(tmp_path), tmp_path / "run"
    pool1.run(_run, str(cohort), str(run_dir), ["train.schedule=constant", "train.heatmaps=false"])
    before = _files(run_dir)
    message = pool1.run(_refused, str(cohort), str(run_dir), [
        "train.schedule=constant", "train.epochs=2", "train.resume=true", "data.classes=[tumour,normal]",
        "head=mean"])[0]
    assert "data.classes=[normal, tumour] in the checkpoint, [tumour, normal] here" in message, message
    assert "head.name=max in the checkpoint, mean here" in message, message
    assert "head.name=max" in message and "'data.classes=[normal,tumour]'" in message, message
    assert _files(run_dir) == before


def test_resume_keys_compare_paths_by_the_file_and_ignore_the_mesh(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from halo.train.checkpoint import resume_differences

    (tmp_path / "c.csv").write_text("x\n")
    trained = {"data": {"kind": "csv", "csv": str(tmp_path / "c.csv"), "root": None, "classes": ["a", "b"],
                        "slides": 40, "seed": 0, "mpp": 1.0},
               "mesh": {"rows": 2, "cols": 1}, "model": {"name": "halo_tiny", "num_classes": 2}}
    now = OmegaConf.create({**trained, "data": {**trained["data"], "csv": "./c.csv", "slides": 8},
                            "mesh": {"rows": 1, "cols": 1}})
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert resume_differences(now, trained) == []  # one file; data.slides is synthetic only; mesh may differ
    finally:
        os.chdir(here)
    now.data.kind = "synthetic"
    assert [key for key, _, _ in resume_differences(now, trained)] == ["data.kind", "data.csv"]
    # which slides the run reads: skipping unreadable ones (a resume that does not would stop at the first)
    now = OmegaConf.create({**trained, "data": {**trained["data"], "skip_unreadable": True}})
    assert [key for key, _, _ in resume_differences(now, {**trained, "data": {**trained["data"],
                                                                               "skip_unreadable": False}})] == [
        "data.skip_unreadable"]


# -- 2. a warm start with the classes in another order ----------------------------------------------------
@pytest.mark.timeout(300)
def test_a_warm_start_with_the_classes_reordered_loads_the_trunk_only(pool1, tmp_path: Path) -> None:
    import torch

    from halo.checkpoint import load_checkpoint
    from test_outcomes import _run_spying

    cohort = _cohort(tmp_path)
    pool1.run(_run, str(cohort), str(tmp_path / "run"), ["train.heatmaps=false"])
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    want = load_checkpoint(best)["model_state"]
    out = pool1.run(_run_spying, str(cohort), str(tmp_path / "warm"),
                    [f"model.weights={best}", "data.classes=[tumour,normal]", "train.heatmaps=false"])[0]
    note = [line for line in out["log"] if "initialised from" in line]
    assert note and "trunk only" in note[0], out["log"]
    assert "the classes differ: [normal, tumour] in the checkpoint, [tumour, normal] here" in note[0], note
    for name, value in out["start"].items():
        if name.startswith("trunk."):
            assert torch.equal(value, want[name]), name
    assert not all(torch.equal(v, want[k]) for k, v in out["start"].items() if k.startswith("head.")), \
        "the head of another class order was loaded"


# -- 3. a refused resume leaves every file as it was -----------------------------------------------------
@pytest.mark.timeout(300)
def test_a_refused_resume_leaves_the_run_directory_byte_identical(pool1, tmp_path: Path) -> None:
    cohort, run_dir = _cohort(tmp_path), tmp_path / "run"
    pool1.run(_run, str(cohort), str(run_dir), ["train.heatmaps=false"])  # one-cycle, one epoch
    before = _files(run_dir)
    message = pool1.run(_refused, str(cohort), str(run_dir), ["train.epochs=3", "train.resume=true"])[0]
    assert "onecycle" in message, message
    assert _files(run_dir) == before  # .hydra/config.yaml included
    assert "resume: false" in (run_dir / ".hydra" / "config.yaml").read_text()


# -- 4. skipped_slides.csv: written once -------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_resumes_refused_or_not_add_no_duplicate_skipped_rows(pool1, tmp_path: Path) -> None:
    cohort, run_dir = _cohort(tmp_path), tmp_path / "run"
    with open(cohort, "a") as fh:
        fh.write("slides/gone.tiff,normal,train\n")
    extra = ["data.skip_unreadable=true", "train.schedule=constant", "train.heatmaps=false"]
    pool1.run(_run, str(cohort), str(run_dir), extra)
    skipped = (run_dir / "skipped_slides.csv").read_bytes()
    assert [(Path(r["path"]).name, r["epoch"]) for r in _rows(run_dir / "skipped_slides.csv")] == [("gone.tiff", "0")]
    for _ in range(2):  # refused after the start-up check: another schedule
        message = pool1.run(_refused, str(cohort), str(run_dir),
                            [*extra, "train.schedule=cosine", "train.epochs=2", "train.resume=true"])[0]
        assert "train.schedule=constant" in message, message
        assert (run_dir / "skipped_slides.csv").read_bytes() == skipped
    out = pool1.run(_run, str(cohort), str(run_dir), [*extra, "train.epochs=2", "train.resume=true"])[0]
    assert out["summary"]["epochs"] == 2
    assert (run_dir / "skipped_slides.csv").read_bytes() == skipped


def test_write_skipped_appends_only_rows_not_already_there(tmp_path: Path) -> None:
    from halo.data.dataset import write_skipped

    row = {"slide": "a", "path": "/x/a.tiff", "csv_line": 2, "split": "train", "epoch": 0, "rank": 0, "reader": "",
           "error": "missing"}
    write_skipped(tmp_path, [row])
    write_skipped(tmp_path, [row, {**row, "rank": 1}])  # the same slide and epoch: already recorded
    write_skipped(tmp_path, [{**row, "epoch": 2}, {**row, "path": "/x/b.tiff"}, {**row, "path": "/x/b.tiff"}])
    got = [(r["path"], r["epoch"]) for r in _rows(tmp_path / "skipped_slides.csv")]
    assert got == [("/x/a.tiff", "0"), ("/x/a.tiff", "2"), ("/x/b.tiff", "0")], got
