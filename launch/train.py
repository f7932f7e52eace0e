"""``halo-train`` (and ``python -m halo.train``): process discovery and job start around `halo.train.run`.

The one start-up path of a training or prediction process, whatever started it (torchrun,
``mpiexec``, ``srun``/``sbatch``, submitit's `launch.submit.TrainJob`, or nothing)::

    check(cfg)                      # a bad value stops here, before any process group or file
                                    # (Hydra's empty run directory is removed: forget_refused)
    resume_if_requeued(cfg)         # a SLURM requeue continues from checkpoints/last.pt
    env = init_distributed(...)     # launch.env: who this process is
    with guard(env):                # launch.failure: a lost rank ends the job, named
        halo.train.run(cfg)

`halo.train` is a library of plain functions and imports nothing from `launch`; `launch`
calls its public entry points only (``run``, ``check``, ``CONF_DIR``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig

from halo.train import CONF_DIR, check, forget_refused, run
from launch.env import init_distributed, shutdown, slurm_restarts
from launch.failure import INPUT_EXIT_CODE, guard

__all__ = ["main", "start", "resume_if_requeued", "result_line", "refuse_config"]

log = logging.getLogger("halo.train")


def resume_if_requeued(cfg: DictConfig) -> DictConfig:
    """Set ``train.resume=true`` when SLURM restarted this job (``SLURM_RESTART_COUNT > 0``).

    A job requeued by ``scontrol requeue``, a node failure or submitit's preemption handler
    runs again from the start of its batch script: it must continue from ``last.pt``, not
    train afresh (which the run directory would refuse anyway). Returns ``cfg``.
    """
    restarts = slurm_restarts()
    if restarts > 0 and cfg.mode == "train" and not cfg.train.resume:
        log.info("SLURM restart %d of this job: resuming from the last checkpoint", restarts)
        cfg.train.resume = True
    return cfg


def result_line(summary: dict[str, Any]) -> dict[str, Any]:
    """What rank 0 prints as its last line, one JSON object: what the run did.

    Training: ``{"run_dir", "val_auc"}``; prediction: ``{"mode": "predict", "run_dir", "slides",
    "labelled"}`` and ``"auc"`` when the labelled rows give one.
    """
    if summary.get("mode") != "predict":
        return {"run_dir": summary.get("run_dir"), "val_auc": summary.get("val_auc")}
    out = {"mode": "predict", "run_dir": summary.get("run_dir"), "slides": summary.get("slides"),
           "labelled": summary.get("labelled")}
    auc = (summary.get("metrics") or {}).get("auc")
    if auc is not None and auc == auc:  # not NaN (one class)
        out["auc"] = auc
    return out


def start(cfg: DictConfig, run_dir: str | None = None, *,
          requeued: Callable[[], bool] = lambda: False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Check ``cfg``, join the job's process group and run it under the failure guard; the summary.

    ``run_dir`` is Hydra's output directory when None. Rank 0 prints a one-line JSON result
    (:func:`result_line`).
    ``requeued`` says whether a ``SystemExit`` during the run is submitit's requeue on
    preemption or time-out (`launch.submit.TrainJob`): the process then leaves with that
    exit code at once (submitit's local executor requeues on it), not as a failure.
    ``overrides``: the command line's, where Hydra's are not this process's (see :func:`halo.train.run`).
    """
    try:
        check(cfg)
    except ValueError as exc:
        if run_dir is None:  # Hydra's output directory, empty: halo writes .hydra/ once it has checked
            forget_refused()
        refuse_config(exc)
    resume_if_requeued(cfg)
    env = init_distributed(backend=cfg.dist.backend, timeout_s=float(cfg.dist.timeout_s))
    log.info("rank %d of %d (%s), local rank %d, %s", env.rank, env.world_size, env.source, env.local_rank,
             f"resume={cfg.train.resume}" if cfg.mode == "train" else f"mode={cfg.mode}")
    with guard(env):  # a failing rank ends the whole job, naming itself; nothing hangs
        try:
            summary = run(cfg, run_dir, overrides=overrides)
        except SystemExit as exc:
            if not requeued():
                raise
            code = exc.code if isinstance(exc.code, int) else 1
            log.info("requeued (preempted or timed out): leaving with exit code %d", code)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(code & 0xFF)
        if env.rank == 0:
            print(json.dumps(result_line(summary)), flush=True)
    shutdown()
    return summary


def refuse_config(exc: ValueError, wait_s: float = 3.0) -> NoReturn:
    """A config refused before any process group: rank 0 (by the launcher's variables) prints
    ``halo-train: <why>`` once, and every rank exits with the bad-input status 2, no traceback.
    The other ranks leave ``wait_s`` later, so that a launcher that stops the job when a rank exits
    (torchrun, srun) does not stop rank 0 before it has said why."""
    if _launcher_rank() == 0:
        print(f"halo-train: {exc}", file=sys.stderr, flush=True)
    else:
        time.sleep(wait_s)
    raise SystemExit(INPUT_EXIT_CODE)


def _launcher_rank() -> int:
    """This process's rank as its launcher's environment gives it, before any process group (0: none)."""
    for var in ("RANK", "SLURM_PROCID", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    start(cfg)


def main() -> None:
    """Console script ``halo-train`` (also ``python -m halo.train`` and ``python -m launch.train``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    _hydra_main()


if __name__ == "__main__":
    main()
