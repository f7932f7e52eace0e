"""halo-train end to end: Hydra composition, a two-rank run, resume, predict, bad manifests."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from halo.train import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    from halo.data.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("cohort"), slides=8, seed=1, size=(512, 512), mpp=0.5, levels=2)


def _overrides(cohort: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "data=csv", f"data.csv={cohort}", "data.classes=[normal,tumour]", "data.mpp=1.0",
        "train.epochs=3", "train.progress=false", "train.threads=1", f"hydra.run.dir={run_dir}", *extra,
    ]


def _train(args: list[str], timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TORCHRUN, "-m", "halo.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def _files(root: Path, skip: str | None = None) -> dict[str, bytes]:
    """Every file under ``root`` (but ``skip/``) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (skip is None or p.relative_to(root).parts[0] != skip)}


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as fh:
        return [float(r["train_loss"]) for r in csv.DictReader(fh)]


def test_overrides_reach_the_config() -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["mesh.rows=2", "mesh.cols=2", "train.lr=3e-4", "train.epochs=3",
                                           "model=resnet18", "head=attention", "dist.timeout_s=30"])
    assert (cfg.mesh.rows, cfg.mesh.cols, cfg.train.lr, cfg.train.epochs) == (2, 2, 3e-4, 3)
    assert (cfg.model.name, cfg.head.name, cfg.dist.timeout_s, cfg.data.kind) == ("resnet18", "attention", 30, "synthetic")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_the_option_lists_are_the_conf_folders() -> None:
    assert {"halo_tiny", "resnet50", "timm_efficientnet_b0"} <= set(_options("model"))
    assert {"synthetic", "csv"} <= set(_options("data")) and {"1x1", "2x2"} <= set(_options("mesh"))


@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "head", "data", "mesh") for o in _options(g)])
def test_every_config_option_composes_and_builds(group: str, option: str) -> None:
    from halo.models import build_classifier

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"{group}={option}"])
    if group in ("model", "head"):
        # conf/model/timm_<name>.yaml is model.name=timm:<name>
        assert cfg[group].name == (f"timm:{option[5:]}" if option.startswith("timm_") else option)
        model = build_classifier(cfg.model.name, cfg.model.num_classes, head=cfg.head.name,
                                 head_options=dict(cfg.head.options))
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    elif group == "data":
        assert cfg.data.kind == option
    else:
        assert f"{cfg.mesh.rows}x{cfg.mesh.cols}" == option


@pytest.mark.timeout(600)
def test_two_rank_run_resume_and_predict(cohort: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    done = _train(_overrides(cohort, full))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):  # torchrun's environment, as launch.env discovers it
        assert f"rank {rank} of 2 (torchrun), local rank {rank}," in done.stdout + done.stderr
    for name in ("metrics.csv", "summary.json", "predictions.csv", "checkpoints/last.pt", "checkpoints/best.pt",
                 ".hydra/config.yaml"):
        assert (full / name).is_file(), name
    assert list((full / "heatmaps").glob("*.png"))
    summary = json.loads((full / "summary.json").read_text())
    assert {"val_auc", "best_epoch", "slides_seen"} <= set(summary)
    assert summary["slides_seen"] == 3 * 6  # 6 training slides, one image group of 2 ranks
    assert "lr: 0.002" in (full / ".hydra/config.yaml").read_text()
    ckpt = torch.load(full / "checkpoints/last.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 3

    # interrupted after the first epoch's checkpoint, then resumed: the same losses
    part = tmp_path / "part"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*TORCHRUN, "-m", "halo.train", *_overrides(cohort, part)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (part / "metrics.csv").is_file():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(_losses(part)) < 3, "the run finished before it could be interrupted"
    resumed = _train(_overrides(cohort, part, "train.resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert _losses(part) == _losses(full)

    # predict with the best checkpoint, into the training run's own directory: probabilities and
    # heatmaps in predict/<id>/, nothing trained, and every file of the training run byte-identical
    before = _files(full)
    out = _train(_overrides(cohort, full, "mode=predict", f"checkpoint={full / 'checkpoints/best.pt'}"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "local rank 0, mode=predict" in out.stdout + out.stderr  # not "resume=False": nothing is resumed
    assert _files(full, skip="predict") == before
    (pred,) = (full / "predict").iterdir()
    with open(pred / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and all(0.0 <= float(r["prob_tumour"]) <= 1.0 for r in rows)
    assert (pred / ".hydra" / "config.yaml").is_file() and list((pred / "heatmaps").glob("*.png"))
    assert not (pred / "checkpoints").exists()

    # without hydra.run.dir, a prediction goes beside its checkpoint's training run, not into a new
    # runs/<date>/<id>/ of the working directory (whose empty folders Hydra made are removed)
    here = tmp_path / "elsewhere"
    here.mkdir()
    beside = subprocess.run(
        [sys.executable, "-m", "halo.train", *[o for o in _overrides(cohort, full) if not o.startswith("hydra.run.dir=")],
         "mesh=1x1", "mode=predict", f"checkpoint={full / 'checkpoints/best.pt'}", "train.heatmaps=false"],
        cwd=here, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=240)
    assert beside.returncode == 0, beside.stderr[-3000:]
    assert len(list((full / "predict").iterdir())) == 2 and list(here.rglob("*")) == []
    assert _files(full, skip="predict") == before

    # training again into it is refused (nothing changes) unless told to resume or overwrite
    again = _train(_overrides(cohort, full))
    assert again.returncode != 0 and "already holds a training run" in again.stderr, again.stderr[-3000:]
    assert "train.resume=true" in again.stderr and "train.overwrite=true" in again.stderr
    assert _files(full, skip="predict") == before

    # a checkpoint from another model is refused by name
    other = _train(_overrides(cohort, tmp_path / "other", "mode=predict", "head=mean",
                              f"checkpoint={full / 'checkpoints/best.pt'}"))
    assert other.returncode != 0 and "from another model: head='max'" in other.stderr


@pytest.mark.timeout(300)
def test_bad_manifest_stops_before_training(cohort: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    rows = cohort.read_text().splitlines()
    rows.append("missing_slide.tif,tumour,train,,0")
    rows.append(rows[1].replace(",tumour,", ",lymphoma,").replace(",normal,", ",lymphoma,"))
    bad.write_text("\n".join(rows) + "\n")
    (tmp_path / "slides").mkdir()
    run_dir = tmp_path / "run"
    out = _train(_overrides(cohort, run_dir, f"data.csv={bad}", f"data.root={cohort.parent}"), timeout=200)
    assert out.returncode != 0
    assert "missing_slide.tif" in out.stderr and "lymphoma" in out.stderr
    assert "line 10" in out.stderr and "line 11" in out.stderr
    assert not (run_dir / "checkpoints").exists()
    # said once, by one rank, without a traceback through halo (torchrun adds its own summary)
    both = out.stdout + out.stderr
    assert both.count("problem(s) in the slide manifest") == 1, both
    assert "halo/train/" not in both and "halo: rank" not in both, both
    assert "exitcode  : 2" in both, both
