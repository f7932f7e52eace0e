"""Run directories and what start-up finds: the default layout, the empty folders a refused or
redirected run leaves behind, slide keys of absolute paths, and training slides too small for
batch norm found before training starts."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_engine import _refused, _rows, _run, _write_tiny_slide_cohort

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_VARS = ("HALO_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PMI_KVSNAME", "PMIX_NAMESPACE",
                 "SLURM_ARRAY_TASK_ID")


# -- 1. a training slide of one output cell is found at start-up ------------------------------------
def _run_counting_plans(csv_path: str, run_dir: str, extra: list[str]) -> dict:
    """``_run``, recording which slides were planned (thumbnail + tissue) during the start-up check."""
    import halo.data.dataset as dataset_module
    from halo.train import data as data_module

    planned: list[str] = []
    at_start: list[list[str]] = []
    plan_region, dataset = dataset_module.plan_region, data_module.SlideSource.dataset

    def spy_plan(path, *args, **kwargs):
        planned.append(Path(path).name)
        return plan_region(path, *args, **kwargs)

    def spy_dataset(self, split, validate):
        before = len(planned)
        try:
            return dataset(self, split, validate)
        finally:
            if validate:
                at_start.append(planned[before:])

    dataset_module.plan_region, data_module.SlideSource.dataset = spy_plan, spy_dataset
    try:
        out = _run(csv_path, run_dir, extra)
    finally:
        dataset_module.plan_region, data_module.SlideSource.dataset = plan_region, dataset
    return {**out, "planned_at_start": at_start}


@pytest.mark.timeout(300)
def test_a_training_slide_of_one_cell_is_named_at_start_up_planning_only_small_slides(pool1, tmp_path: Path) -> None:
    cohort = _write_tiny_slide_cohort(tmp_path)  # four 256 x 256 slides and a 32 x 32 one (16 x 16 at mpp 1)
    run_dir = tmp_path / "run"
    out = pool1.run(_run_counting_plans, str(cohort), str(run_dir), ["train.heatmaps=false"])[0]
    log = out["log"]
    early = [i for i, line in enumerate(log) if "tiny" in line and "will be skipped" in line]
    assert len(early) == 1, log
    message = log[early[0]]
    assert "line 6, slide 'slides/tiny'" in message and "16 x 16" in message and "data.canvas=32" in message, message
    first_epoch = next(i for i, line in enumerate(log) if line.startswith("epoch 1:"))
    assert early[0] < first_epoch, log
    # only the slide small enough to be one cell was planned at start-up, not the whole cohort
    assert out["planned_at_start"] == [["tiny.tiff"]], out["planned_at_start"]
    # the mid-run check still skips and records it
    skipped = _rows(run_dir / "skipped_slides.csv")
    assert [Path(r["path"]).name for r in skipped] == ["tiny.tiff"], skipped
    assert (run_dir / "checkpoints" / "best.pt").is_file()


@pytest.mark.timeout(300)
def test_a_training_slide_of_one_cell_with_strict_refuses_the_run_at_start_up(pool1, tmp_path: Path) -> None:
    cohort = _write_tiny_slide_cohort(tmp_path)
    run_dir = tmp_path / "run"
    message = pool1.run(_refused, str(cohort), str(run_dir), ["train.heatmaps=false", "data.strict=true"])[0]
    assert "line 6, slide 'slides/tiny'" in message and "tiny.tiff" in message, message
    assert "16 x 16" in message and "data.canvas=32" in message, message
    assert not (run_dir / "checkpoints").exists()  # nothing trained


# -- 2. a refused config leaves no empty run directory ----------------------------------------------
def _cli(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "halo.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(200)
def test_a_refused_config_leaves_no_run_directory(tmp_path: Path) -> None:
    keep = tmp_path / "runs" / "2000-01-01" / "older"  # another run's folder stays as it is
    keep.mkdir(parents=True)
    (keep / "summary.json").write_text("{}")
    bad = _cli(tmp_path, "mode=bogus")
    assert bad.returncode != 0 and "mode='bogus' is not one of" in bad.stdout + bad.stderr, bad
    # refused after the process group and the run directory's .hydra: a manifest that does not exist
    missing = _cli(tmp_path, "data=csv", f"data.csv={tmp_path / 'nothing.csv'}", "data.classes=[a,b]", "mesh=1x1")
    assert missing.returncode == 2 and "manifest file not found" in missing.stderr, missing
    left = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "runs").rglob("*"))
    assert left == ["runs/2000-01-01", "runs/2000-01-01/older", "runs/2000-01-01/older/summary.json"], left
    # in a folder that had no runs/: nothing at all is left (runs/ went with its last date folder)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert _cli(fresh, "mode=bogus").returncode == 2
    assert list(fresh.iterdir()) == [], list(fresh.rglob("*"))


def test_only_a_directory_holding_what_this_launch_wrote_is_removed(tmp_path: Path) -> None:
    from halo.train.rundir import forget

    date = tmp_path / "runs" / "2026-12-01"
    empty, claimed, older, used = (date / n for n in ("empty", "claimed", "older", "used"))
    for d in (empty, claimed, older, used):
        d.mkdir(parents=True)
    for d in (claimed, older):
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text("a: 1\n")
        (d / ".hydra" / "overrides.yaml").write_text("[]\n")
    (used / ".hydra").mkdir()
    (used / "skipped_slides.csv").write_text("slide\n")
    assert forget(empty) and not empty.exists()
    assert forget(claimed, written=[claimed]) and not claimed.exists()
    assert not forget(older) and (older / ".hydra" / "config.yaml").is_file()  # an earlier launch's .hydra
    assert not forget(used) and (used / "skipped_slides.csv").is_file()
    assert date.is_dir()  # still holds runs
    for d in (older, used):
        for p in sorted(d.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
    assert forget(older) and forget(used) and not date.exists()  # the last one takes its date folder


# -- 3. the default run directory shows the date once -----------------------------------------------
def _default_run_dir(monkeypatch, **env: str) -> str:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from halo.train import CONF_DIR

    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    return str(OmegaConf.select(cfg, "hydra.run.dir"))


def test_the_default_run_directory_is_date_then_time_or_the_launchers_id(monkeypatch) -> None:
    today = time.strftime("%Y-%m-%d")
    local = _default_run_dir(monkeypatch)
    assert re.fullmatch(rf"runs/{today}/\d{{2}}-\d{{2}}-\d{{2}}", local), local
    assert _default_run_dir(monkeypatch, TORCHELASTIC_RUN_ID="abc123") == f"runs/{today}/abc123"
    assert _default_run_dir(monkeypatch, SLURM_JOB_ID="77", SLURM_ARRAY_TASK_ID="3") == f"runs/{today}/77_3"
    from halo.train import run_id

    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}", run_id())  # predict/<id>/ keeps the full form


# -- 4. the empty folder of a prediction beside its checkpoint: removed once, by rank 0 -------------
def _predict_run_dir_late_hydra(tmp: str) -> dict:
    """Each rank as a Hydra launch: its own mkdir of runs/<date>/<id> (rank 1's starts late), then
    ``halo.train._run_dir`` of a prediction beside its checkpoint."""
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import halo.train as train_module

    tmp_path = Path(tmp)
    home = tmp_path / "trained"
    made = tmp_path / "runs" / "2026-12-01" / "job7"
    rank = dist.get_rank()
    with initialize_config_dir(config_dir=train_module.CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["mode=predict", f"checkpoint={home / 'checkpoints' / 'best.pt'}"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(made)
    removed: list[str] = []
    rmdir = Path.rmdir

    def spy(self):
        removed.append(str(self))
        return rmdir(self)

    if rank == 1:
        time.sleep(2.0)  # this rank's Hydra starts after rank 0 has gone on
    made.mkdir(parents=True, exist_ok=True)  # what Hydra does for every rank
    HydraConfig.instance().set_config(cfg)
    Path.rmdir = spy
    try:
        got = train_module._run_dir(cfg)
    finally:
        Path.rmdir = rmdir
        HydraConfig.instance().cfg = None
    dist.barrier()
    return {"run_dir": str(got), "removed": removed, "exists": made.exists(), "date": made.parent.exists()}


@pytest.mark.timeout(120)
def test_the_empty_hydra_folder_of_a_prediction_is_removed_once_by_rank_0(pool2, tmp_path: Path) -> None:
    home = tmp_path / "trained"
    (home / "checkpoints").mkdir(parents=True)
    (home / "checkpoints" / "best.pt").write_bytes(b"")
    (home / "summary.json").write_text("{}")
    out = pool2.run(_predict_run_dir_late_hydra, str(tmp_path), timeout=90)
    assert [o["run_dir"] for o in out] == [str(home.resolve())] * 2, out
    assert out[1]["removed"] == [], out  # one rank removes it, after every rank's Hydra made it
    assert out[0]["removed"] and not out[0]["exists"] and not out[0]["date"], out
    assert not (tmp_path / "runs" / "2026-12-01").exists()


# -- 5. slides given by absolute path get the keys a pathologist expects ----------------------------
def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return path


def _keys(csv_path: Path) -> dict[str, str]:
    from halo.data import SlideDataset

    ds = SlideDataset(csv_path, classes=["a", "b"], validate=False, derive_split=False)
    return {Path(r.path).as_posix(): r.slide_id for r in ds.all_rows}


def test_slides_given_by_absolute_path_are_keyed_by_name_or_by_their_path_below_the_common_folder(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    here = tmp_path / "csvs"
    here.mkdir()
    unique = [data / "x" / "slide1.svs", data / "y" / "slide2.svs"]
    rows = [{"slide": str(p), "label": "a" if i % 2 else "b", "split": "train"} for i, p in enumerate(unique)]
    want = {p.as_posix(): n for p, n in zip(unique, ["slide1", "slide2"])}
    assert _keys(_write_csv(here / "unique.csv", rows)) == want
    same = [data / "site0" / "case" / "s1.svs", data / "site1" / "case" / "s1.svs", data / "site1" / "s2.tiff"]
    rows = [{"slide": str(p), "label": "a", "split": "train"} for p in same]
    assert _keys(_write_csv(here / "same.csv", rows)) == {
        same[0].as_posix(): "site0/case/s1", same[1].as_posix(): "site1/case/s1", same[2].as_posix(): "s2"}
    # relative entries keep their keys
    rows = [{"slide": "slides/a.tif", "label": "a", "split": "train"},
            {"slide": "other/a.tif", "label": "b", "split": "train"}]
    keys = _keys(_write_csv(here / "relative.csv", rows))
    assert sorted(keys.values()) == ["other/a", "slides/a"], keys
