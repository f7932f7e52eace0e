"""``halo-train``: weakly supervised slide classification, sharded spatially, configured by Hydra.

Every ``rows x cols`` ranks (a spatial group) train on one slide at a time, each reading
only its own block; ``world / (rows * cols)`` groups take different slides, and DDP
averages gradients over the whole world, which gives exactly the one-device gradient
of the mean loss. Rank 0 writes the run directory (``hydra.run.dir``, the same on every
rank): ``.hydra/config.yaml``, ``metrics.csv``, ``summary.json``, ``predictions.csv``,
``checkpoints/{last,best}.pt`` and ``heatmaps/*.png``.

:func:`run`, :func:`train` and :func:`predict` are plain functions of a composed config and an
initialised process group; tests call them in-process. Process discovery, the failure guard and
``@hydra.main`` live in :mod:`launch.train` (``halo-train``, ``python -m halo.train``): this package
imports nothing from ``launch``. The parts, each with one owner:

* :mod:`halo.train.config` - the typed config (one dataclass per group, in Hydra's ConfigStore);
* :mod:`halo.train.job` - this rank's device, mesh and sharded model;
* :mod:`halo.train.data` - which slide each image group reads at each step, blocks, ``slides.csv``;
* :mod:`halo.train.loop` - one training epoch, the optimizer and schedule, the trunk modes;
* :mod:`halo.train.evaluate` - streaming evaluation: prediction rows and heatmaps;
* :mod:`halo.train.checkpoint` - save and resume, with every RNG state;
* :mod:`halo.train.rundir` - the run directory: what is written where, refusal to overwrite.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from halo.train.config import check  # also registers the typed schema (halo_schema) with Hydra

__all__ = ["run", "train", "predict", "better", "layout", "check", "run_id", "run_name", "training_run",
           "forget_refused", "CONF_DIR"]

log = logging.getLogger("halo.train")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def _launcher_id() -> str | None:
    """The launcher's id of this launch (torchrun, SLURM, MPI; ``HALO_RUN_ID`` first), or None."""
    for var in ("HALO_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PMI_KVSNAME", "PMIX_NAMESPACE"):
        value = os.environ.get(var)
        if value:
            suffix = os.environ.get("SLURM_ARRAY_TASK_ID") if var == "SLURM_JOB_ID" else None
            return f"{value}_{suffix}" if suffix else value
    return None


def run_id() -> str:
    """An id that every rank of one launch agrees on, for ``predict/<id>/`` and the run directory.

    The launcher's (torchrun, SLURM, MPI) where there is one, else the local date and time,
    ``2026-12-01_17-12-04`` (sortable; :func:`halo.train.rundir.claim` keeps two predictions of one
    second apart).
    """
    return _launcher_id() or time.strftime("%Y-%m-%d_%H-%M-%S")


def run_name() -> str:
    """The last part of the default run directory ``runs/<date>/<name>`` (``${halo_run_name:}``):
    the launcher's id (:func:`run_id`), else the local time, ``17-12-04`` (the date is its folder)."""
    return _launcher_id() or time.strftime("%H-%M-%S")


for _name, _fn in (("halo_run_id", run_id), ("halo_run_name", run_name)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn, use_cache=True)


def _run_dir(cfg: DictConfig) -> Path:
    """Where this run writes: Hydra's output directory, or (``mode=predict`` without
    ``hydra.run.dir``) the training run of its checkpoint; collective when that is so: after every
    rank has reached it (so every rank's Hydra has made its ``runs/<date>/<id>``), rank 0 alone
    removes that folder if it is still empty, and the folders above it that are then empty
    (:func:`halo.train.rundir.forget`)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
    except ValueError:  # not under @hydra.main: tests call run() with a composed config
        return Path(cfg.get("run_dir") or "runs/manual")
    out = Path(hydra.runtime.output_dir)
    given = any(str(o).split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in hydra.overrides.hydra)
    home = training_run(cfg.checkpoint) if cfg.mode == "predict" and not given else None
    if home is None:
        return out
    import torch.distributed as dist

    _barrier()  # every rank's Hydra made the folder before it got here: none makes it again after
    if dist.get_rank() == 0:
        from halo.train.rundir import forget

        forget(out)
    return home


def forget_refused() -> None:
    """After a refusal before any result was written: remove the directory Hydra made for this
    launch if it holds nothing else; each rank for itself, never raises. :func:`run` does it for
    the refusals it raises; launchers call it for a config refused before the process group (see
    :func:`halo.train.rundir.forget_refused`)."""
    from halo.train import rundir

    rundir.forget_refused()


def training_run(checkpoint: str | os.PathLike[str] | None) -> Path | None:
    """The run directory a checkpoint was written in (``<run>/checkpoints/best.pt``), or None.

    ``mode=predict`` without ``hydra.run.dir`` writes into ``predict/<id>/`` there, beside the
    training's own results.
    """
    if not checkpoint:
        return None
    path = Path(checkpoint).resolve()
    run = path.parent.parent
    if path.parent.name == "checkpoints" and ((run / "summary.json").is_file() or (run / ".hydra").is_dir()):
        return run
    return None


def run(cfg: DictConfig, run_dir: str | os.PathLike[str] | None = None, *,
        overrides: list[str] | None = None) -> dict[str, Any]:
    """Train (``mode=train``) or predict (``mode=predict``) as ``cfg`` says; returns the summary.

    Needs an initialised ``torch.distributed`` process group (world 1 works): `launch.train`
    starts one from the launcher's environment. ``run_dir`` is Hydra's output directory when None.
    ``overrides`` are the command line's (``["head=mean", "data.mpp=1.0"]``): what was given
    explicitly, which ``mode=predict`` keeps over the checkpoint's config; None: Hydra's under
    ``@hydra.main``, else none.
    """
    import torch.distributed as dist

    from halo.errors import InputError
    from halo.train import rundir

    check(cfg)  # a value outside its choices stops here, before any file is written
    if not dist.is_initialized():
        raise RuntimeError("halo.train.run needs an initialised torch.distributed process group: start it with "
                           "launch.init_distributed() (halo-train and python -m halo.train do), or "
                           "torch.distributed.init_process_group('gloo', ...) for one process")
    rundir.new_launch()
    try:
        run_dir = Path(run_dir) if run_dir is not None else _run_dir(cfg)
        if cfg.mode == "train":
            return train(cfg, run_dir)
        return predict(cfg, run_dir, overrides=overrides)
    except InputError:  # refused (alike on every rank): no empty run directory is left behind
        rundir.forget_refused()
        raise


def train(cfg: DictConfig, run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Train on the cohort's ``train`` rows, choose ``best.pt`` on ``val``, predict ``test``; collective.

    ``best.pt`` is the epoch of the highest validation AUC; among epochs of equal AUC (a few
    validation slides often give 1.0 in every epoch), the lowest validation loss (the
    cross-entropy of the predicted probabilities), then the later epoch (:func:`better`). Without
    validation slides, or with an undefined AUC (one class), it is the last epoch. The summary's
    ``final`` holds the validation metrics of those weights, the epoch ``final_epoch``
    (= ``best_epoch``), not the last epoch's.

    Needs an initialised process group (world 1 works); returns the summary it writes.
    """
    import math

    import torch.distributed as dist

    from halo.checkpoint import load_checkpoint
    from halo.train import checkpoint, loop
    from halo.train.evaluate import evaluate
    from halo.train.rundir import kept_on_refusal, write_config, write_metrics, write_rows, write_summary

    t, last_pt, resumed = cfg.train, Path(run_dir).resolve() / "checkpoints" / "last.pt", None
    if t.resume and last_pt.is_file():
        # every rank, before anything is built, written or generated: a resume trains the cohort and model
        # it was trained on, or is refused (its schedule is checked once the datasets are known)
        resumed = load_checkpoint(last_pt)
        checkpoint.check_resume(cfg, resumed.get("config") or {}, last_pt)
    with kept_on_refusal(Path(run_dir).resolve(), dist.get_rank() == 0 and resumed is not None):
        begun = _start(cfg, run_dir, resumed)  # a refused resume leaves its run's files as they were
    del resumed
    if isinstance(begun, dict):  # a finished run: nothing to resume
        return begun
    job, source, train_ds, val_ds, test_ds, opt, sched, weights, state = begun
    if job.is_main:
        write_config(job.run_dir)  # a resume's .hydra/, now that it is accepted
    ckpts = job.run_dir / "checkpoints"
    ddp = None
    last = None  # (epoch, metrics, rows) of the last epoch trained here
    for epoch in range(state["epoch"], t.epochs):
        ddp = loop.trunk_mode(job, epoch, ddp)
        started = time.time()
        source.epoch = epoch + 1  # skipped_slides.csv's epoch
        loss, seen = loop.train_epoch(job, source, ddp, opt, sched, train_ds, epoch, weights)
        trained_s = time.time() - started
        state["slides_seen"] += seen
        metrics, rows = evaluate(job, source, val_ds, heatmaps=False)
        epoch_s = time.time() - started
        state["history"].append({
            "epoch": epoch + 1, "train_loss": loss, **{f"val_{k}": v for k, v in metrics.items() if k != "confusion"},
            "lr": sched.get_last_lr()[0], "slides_seen": state["slides_seen"],
            "seconds": round(epoch_s, 2), "train_seconds": round(trained_s, 2)})
        auc, val_loss = metrics.get("auc", math.nan), metrics.get("loss", math.nan)
        improved = len(val_ds) == 0 or better(auc, val_loss, state["best_auc"], state["best_loss"])
        if improved:
            state["best_auc"], state["best_loss"], state["best_epoch"] = auc, val_loss, epoch + 1
        last = (epoch + 1, metrics, rows)
        state["epoch"] = epoch + 1
        # best.pt before last.pt: a job stopped in between resumes from the previous last.pt
        # and redoes this epoch; a last.pt that names a best epoch always has its best.pt
        checkpoint.save(job, [ckpts / "best.pt", ckpts / "last.pt"] if improved else [ckpts / "last.pt"],
                        opt, sched, state)
        source.write_records()
        if job.is_main:
            write_metrics(job.run_dir, state["history"])
            write_rows(job.run_dir, "predictions.csv", rows, job.classes)
            log.info("epoch %d: %d slides, train %.1f s (%.2f slides/s), validation %.1f s, train loss %.4f, "
                     "val auc %.3f, val loss %.4f, balanced acc %.3f%s", epoch + 1, seen, trained_s,
                     seen / max(trained_s, 1e-9), epoch_s - trained_s, loss, auc, val_loss,
                     metrics.get("balanced_accuracy", math.nan), " (best so far)" if improved else "")
    # the end: the best weights predict validation (with heatmaps) and the held-out test rows
    if last is not None and last[0] == state["best_epoch"] and not (t.heatmaps and len(val_ds)):
        metrics, rows = last[1], last[2]  # the model is best.pt: its validation rows are this epoch's
    else:
        if (ckpts / "best.pt").is_file():
            checkpoint.load_model(job, ckpts / "best.pt")
        metrics, rows = evaluate(job, source, val_ds, heatmaps=t.heatmaps)
    test = evaluate(job, source, test_ds, heatmaps=t.heatmaps) if len(test_ds) else None
    source.write_records()
    best_auc = state["best_auc"]
    summary: dict[str, Any] = {
        "val_auc": best_auc if state["best_epoch"] > 0 and not math.isnan(best_auc) else None,
        "best_epoch": state["best_epoch"], "slides_seen": state["slides_seen"], "epochs": state["epoch"],
        # the validation metrics of best.pt's weights (epoch final_epoch), not of the last epoch
        "final": dict(metrics), "final_epoch": state["best_epoch"], "world_size": _world(),
        "mesh": [job.mesh.rows, job.mesh.cols],
        "run_dir": str(job.run_dir),
    }
    if test is not None:
        summary["test"] = {"slides": len(test[1]), **test[0]}
    summary["peak_memory_bytes"] = peak_memory(job)  # a collective: every rank calls it
    if job.is_main:
        write_rows(job.run_dir, "predictions.csv", rows, job.classes)
        if test is not None:
            write_rows(job.run_dir, "test_predictions.csv", test[1], job.classes)
        write_summary(job.run_dir, summary)
    _barrier()
    return summary


def _start(cfg: DictConfig, run_dir: str | os.PathLike[str], resumed: dict[str, Any] | None):
    """:func:`train` up to its first epoch: the job, the datasets, the optimizer and schedule and the
    progress (``resumed``: ``checkpoints/last.pt``'s contents, restored), as a tuple; or the summary of a
    finished run that there is nothing to resume of. Collective."""
    import math

    import torch

    from halo.errors import InputError
    from halo.train import checkpoint, loop
    from halo.train.data import SlideSource
    from halo.train.job import start

    job = start(cfg, run_dir)
    if job.is_main:
        log.info("%s", layout(job))
    t, source = cfg.train, SlideSource(job)
    train_ds = source.dataset("train", validate=True)
    val_ds = source.dataset("val", validate=False)
    test_ds = source.dataset("test", validate=False)
    if len(train_ds) == 0:
        raise InputError(f"halo-train: no slides with split 'train' in {train_ds.csv_path}")
    if train_ds.derived_split and job.is_main:
        log.info("%s has no split column: %s (data.val_fraction=%g, data.split_seed=%d) gives %d train and %d "
                 "val slides", train_ds.csv_path, train_ds.split_note or "a stratified split",
                 cfg.data.val_fraction, cfg.data.split_seed, len(train_ds), len(val_ds))
    if len(val_ds) == 0 and job.is_main:
        log.warning("no validation slides in %s (no rows with split 'val'): no AUC is measured, and "
                    "checkpoints/best.pt is the last epoch's weights", train_ds.csv_path)
    steps_per_epoch = math.ceil(len(train_ds) / job.mesh.data)
    opt, sched = loop.optimizer(job, math.ceil(steps_per_epoch / max(1, t.accumulate)))
    weights = (torch.as_tensor(train_ds.class_weights(), dtype=torch.float32, device=job.device)
               if t.class_weights else None)
    state = {"epoch": 0, "best_auc": -math.inf, "best_loss": math.inf, "best_epoch": -1, "slides_seen": 0,
             "history": []}
    ckpts = job.run_dir / "checkpoints"
    if resumed is not None:
        state = checkpoint.restore(job, ckpts / "last.pt", opt, sched, resumed)
        state.setdefault("best_loss", math.inf)  # a checkpoint from before validation losses were kept
        if state["epoch"] >= t.epochs and (job.run_dir / "summary.json").is_file():
            if job.is_main:  # nothing to do: leave every file of the finished run as it is
                log.info("%s finished all %d epochs already: nothing to resume; %s", job.run_dir, t.epochs,
                         checkpoint.train_on_advice(job, ckpts / "last.pt", t.schedule, state["epoch"]))
            _barrier()
            return json.loads((job.run_dir / "summary.json").read_text())
    elif t.resume and job.is_main:  # once, not once per rank
        log.warning("train.resume=true but %s does not exist: starting from scratch", ckpts / "last.pt")
    return job, source, train_ds, val_ds, test_ds, opt, sched, weights, state


def better(auc: float, loss: float, best_auc: float, best_loss: float) -> bool:
    """Whether an epoch of validation ``auc`` and ``loss`` replaces the best so far as ``best.pt``.

    A higher AUC wins; an equal AUC wins with a lower or equal loss (ties go to the later epoch,
    which has trained longer); an undefined AUC (NaN: one class) or loss always wins, as
    without validation the last epoch is kept.
    """
    import math

    if math.isnan(auc):
        return True
    if auc != best_auc:
        return auc > best_auc
    return math.isnan(loss) or math.isnan(best_loss) or loss <= best_loss


def layout(job) -> str:
    """How the ranks share the slides: ``"2 image groups of 1x1 (data parallel)"``."""
    mesh = job.mesh
    groups = f"{mesh.data} image group{'' if mesh.data == 1 else 's'} of {mesh.rows}x{mesh.cols}"
    if mesh.size == 1:
        how = "data parallel" if mesh.data > 1 else "one rank"
    elif mesh.data == 1:
        how = f"each slide over {mesh.size} ranks"
    else:
        how = f"data parallel, each slide over {mesh.size} ranks"
    return f"{groups} ({how})"


def predict(cfg: DictConfig, run_dir: str | os.PathLike[str], *, overrides: list[str] | None = None) -> dict[str, Any]:
    """Predict every row of the cohort with ``cfg.checkpoint`` into ``run_dir/predict/<id>/``; collective.

    The model (``model.name``, ``model.num_classes``, ``head``), ``data.classes`` and how slides
    are read (``data.mpp``, ``data.level``, ``data.canvas``, ``data.stain_normalize``,
    ``data.tissue``) come from the checkpoint's config unless ``overrides`` (see :func:`run`) give
    them: a model key given otherwise is refused, a reading key is honoured with a warning
    (:func:`halo.train.checkpoint.adopt`). Rows need no label; metrics are the labelled rows'.
    """
    import torch.distributed as dist

    from halo.checkpoint import load_checkpoint
    from halo.errors import InputError
    from halo.train import checkpoint
    from halo.train.data import SlideSource
    from halo.train.evaluate import evaluate
    from halo.train.job import start
    from halo.train.rundir import command_line, write_rows, write_summary

    if not cfg.checkpoint:
        raise InputError("halo-train: mode=predict needs checkpoint=PATH (a best.pt or last.pt)")
    ckpt = load_checkpoint(cfg.checkpoint)  # every rank: before the model is built from its config
    given = checkpoint.given_keys(command_line() if overrides is None else overrides)
    cfg = checkpoint.adopt(cfg, ckpt.get("config") or {}, given, cfg.checkpoint, dist.get_rank() == 0)
    cfg = _prediction_mesh(cfg, ckpt.get("config") or {}, overrides)
    job = start(cfg, run_dir)
    note = checkpoint.mesh_note(checkpoint.load_model(job, cfg.checkpoint, ckpt), job)
    del ckpt
    if note and job.is_main:
        log.warning(note)
    if job.is_main:
        log.info("%s", layout(job))
        if job.blocks:
            log.info("predicting block by block (blocks=%s) on each rank: whole slides per rank, one block at a time",
                     list(job.blocks))
    source = SlideSource(job)
    ds = source.dataset(None, validate=True)
    metrics, rows = evaluate(job, source, ds, heatmaps=cfg.train.heatmaps)
    source.write_records()
    labelled = sum(r["label"] is not None for r in rows)
    if not labelled and job.is_main:
        log.info("none of the %d slides predicted has a label: no metrics", len(rows))
    summary = {"mode": "predict", "checkpoint": str(cfg.checkpoint), "slides": len(rows), "metrics": dict(metrics),
               "labelled": labelled, "unlabelled": len(rows) - labelled,
               "run_dir": str(job.run_dir), "grid": list(job.grid), "blockwise": job.blocks is not None}
    if job.is_main:
        write_rows(job.run_dir, "predictions.csv", rows, job.classes)
        write_summary(job.run_dir, summary)
    _barrier()
    return summary


def _prediction_mesh(cfg: DictConfig, theirs: dict, overrides: list[str] | None) -> DictConfig:
    """A prediction given no mesh (``mesh=`` or ``mesh.*`` on the command line) whose default mesh
    does not divide the world size: the checkpoint's mesh where it does, else 1 x 1 (a checkpoint
    predicts the same on any mesh), said once; a mesh given is kept (and checked by the job)."""
    import torch.distributed as dist

    from halo.train.rundir import command_line

    given = command_line() if overrides is None else overrides
    if cfg.blocks or any(str(o).lstrip("+~").split("=", 1)[0].split(".")[0].strip() == "mesh" for o in given):
        return cfg
    world, rows, cols = dist.get_world_size(), int(cfg.mesh.rows), int(cfg.mesh.cols)
    if world % (rows * cols) == 0:
        return cfg
    mesh = theirs.get("mesh") or {}
    r, c, whose = int(mesh.get("rows", 1)), int(mesh.get("cols", 1)), "the checkpoint's"
    if world % (r * c):
        r, c, whose = 1, 1, "a"
    if dist.get_rank() == 0:
        log.info("mesh.rows x mesh.cols = %d x %d (the default) does not divide the world size %d: predicting on "
                 "%s %d x %d mesh (give mesh=RxC to choose)", rows, cols, world, whose, r, c)
    import copy

    cfg = copy.deepcopy(cfg)  # not the caller's
    cfg.mesh.rows, cfg.mesh.cols = r, c
    return cfg


def peak_memory(job) -> dict[str, Any]:
    """Every rank's peak memory so far, gathered on every rank; collective.

    ``{"kind": "cuda_allocated", "per_rank": [...]}`` (``torch.cuda.max_memory_allocated`` of the
    rank's device) on CUDA, else ``{"kind": "cpu_rss", ...}`` (the process's peak resident set,
    ``getrusage(RUSAGE_SELF).ru_maxrss``); bytes, in rank order.
    """
    import torch

    from halo.train.job import all_gather

    if job.device.type == "cuda":
        kind, mine = "cuda_allocated", int(torch.cuda.max_memory_allocated(job.device))
    else:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        kind, mine = "cpu_rss", int(rss if sys.platform == "darwin" else rss * 1024)
    return {"kind": kind, "per_rank": [int(b) for b in all_gather(mine)]}


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()
