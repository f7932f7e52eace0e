"""``halo-train``: weakly supervised slide classification, sharded spatially, configured by Hydra.

Every ``rows x cols`` ranks (a spatial group) train on one slide at a time, each reading
only its own block; ``world / (rows * cols)`` groups take different slides, and DDP
averages gradients over the whole world, which gives exactly the one-device gradient
of the mean loss. Rank 0 writes the run directory (``hydra.run.dir``, the same on every
rank): ``.hydra/config.yaml``, ``metrics.csv``, ``summary.json``, ``predictions.csv``,
``checkpoints/{last,best}.pt`` and ``heatmaps/*.png``.

``@hydra.main`` is a thin shell around :func:`run`, which tests call directly.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from halo.config import check  # also registers the typed schema (halo_schema) with Hydra

__all__ = ["run", "main", "run_id"]

log = logging.getLogger("halo.train")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def run_id() -> str:
    """An id that every rank of one launch agrees on, for the default run directory."""
    for var in ("HALO_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PMI_KVSNAME", "PMIX_NAMESPACE"):
        value = os.environ.get(var)
        if value:
            suffix = os.environ.get("SLURM_ARRAY_TASK_ID") if var == "SLURM_JOB_ID" else None
            return f"{value}_{suffix}" if suffix else value
    return time.strftime("%H-%M-%S")


if not OmegaConf.has_resolver("halo_run_id"):
    OmegaConf.register_new_resolver("halo_run_id", run_id, use_cache=True)


def _run_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main: tests call run() with a composed config
        return Path(cfg.get("run_dir") or "runs/manual")


def run(cfg: DictConfig, run_dir: str | os.PathLike[str] | None = None, env=None) -> dict[str, Any]:
    """Train (``mode=train``) or predict (``mode=predict``) as ``cfg`` says; returns the summary.

    Initialises torch.distributed from the environment (torchrun, SLURM, MPI, or a single
    process) unless it already is.
    """
    from launch.env import init_distributed

    from halo.engine import Engine

    check(cfg)  # a value outside its choices stops here, before any process group or file
    env = env or init_distributed(backend=cfg.dist.backend, timeout_s=float(cfg.dist.timeout_s))
    run_dir = Path(run_dir) if run_dir is not None else _run_dir(cfg)
    engine = Engine(cfg, env, run_dir)
    if cfg.mode == "train":
        return engine.train()
    if cfg.mode == "predict":
        return engine.predict()
    raise ValueError(f"mode must be 'train' or 'predict', got {cfg.mode!r}")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from launch.env import init_distributed, shutdown
    from launch.failure import guard

    if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:  # requeued by SLURM: continue, do not restart
        cfg.train.resume = True
    env = init_distributed(backend=cfg.dist.backend, timeout_s=float(cfg.dist.timeout_s))
    with guard(env):  # a failing rank ends the whole job, naming itself; nothing hangs
        summary = run(cfg, env=env)
        if env.rank == 0:
            print(json.dumps({"run_dir": summary.get("run_dir"), "val_auc": summary.get("val_auc")}))
    shutdown()


def main() -> None:
    """Console script ``halo-train`` (also ``python -m halo.train``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    _hydra_main()


if __name__ == "__main__":
    main()
