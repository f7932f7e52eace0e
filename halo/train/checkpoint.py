"""Training checkpoints: atomic save and exact resume, with every rank's RNG states.

The file format, its signature check and atomic writes are :mod:`halo.checkpoint`'s; this
module decides what a training checkpoint holds: the model, optimizer and scheduler states,
the run's progress, the config, and every rank's torch (CPU and CUDA), numpy and Python
generator states.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from halo.checkpoint import FORMAT, check_signature, load_checkpoint, save_atomic
from halo.train.job import Job, all_gather

__all__ = ["rng_state", "set_rng_state", "save", "restore", "load_model"]

log = logging.getLogger("halo.train")


def rng_state() -> dict[str, Any]:
    """Every random generator this process draws from: torch (CPU and CUDA), numpy, Python."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any] | torch.Tensor) -> None:
    """Restore :func:`rng_state` (or a bare torch state, from checkpoints before it existed)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def save(job: Job, paths: list[Path], opt, sched, state: dict[str, Any]) -> None:
    """Write one checkpoint to each of ``paths`` in order (on rank 0), then wait for all ranks; collective."""
    rng = all_gather(rng_state())
    if job.is_main:
        ckpt = {
            "format": FORMAT, "signature": job.signature, "model_state": job.model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng,
            "state": dict(state), "config": OmegaConf.to_container(job.cfg, resolve=True),
        }
        for path in paths:
            save_atomic(ckpt, path)
    dist.barrier()


def restore(job: Job, path: Path, opt, sched) -> dict[str, Any]:
    """Load ``path`` into the model, optimizer, scheduler and this rank's generators; the run's progress."""
    ckpt = load_checkpoint(path)
    check_signature(ckpt, job.signature, path)
    job.model.load_state_dict(ckpt["model_state"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if len(ckpt["rng"]) == dist.get_world_size():
        set_rng_state(ckpt["rng"][job.rank])
    elif job.is_main:
        log.warning("%s was written by %d ranks, this run has %d: random streams (dropout, and any "
                    "augmentation drawn from torch) are re-seeded, not continued", path, len(ckpt["rng"]),
                    dist.get_world_size())
    log.info("resumed from %s at epoch %d", path, ckpt["state"]["epoch"])
    return dict(ckpt["state"])


def load_model(job: Job, path: str | Path) -> None:
    """Load the model of a checkpoint written on any mesh and world size (its signature must match)."""
    ckpt = load_checkpoint(path)
    check_signature(ckpt, job.signature, path)
    job.model.load_state_dict(ckpt["model_state"])
