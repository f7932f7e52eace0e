"""What every part of a run needs on this rank: the config, the mesh, the device, the model.

:func:`start` builds it once (threads, device, mesh, the run directory, the model sharded
over the mesh); the other parts (:mod:`.data`, :mod:`.loop`, :mod:`.evaluate`,
:mod:`.checkpoint`, :mod:`.rundir`) take it as their first argument and own nothing of it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import halo
from halo.checkpoint import signature
from halo.errors import InputError
from halo.models import SlideClassifier, build_classifier, total_stride

log = logging.getLogger("halo.train")

__all__ = ["Job", "start", "broadcast", "all_gather"]


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass(eq=False)
class Job:
    """One rank's view of a run.

    Attributes
    ----------
    cfg:
        The composed config (typed: :mod:`halo.train.config`).
    rank, is_main:
        This process's global rank, and whether it is rank 0 (which writes the run directory).
    device:
        CUDA (NCCL) or CPU (gloo).
    mesh:
        The spatial mesh; ``mesh.data`` image groups, this rank in group ``group``.
    classes:
        Class names (``data.classes``).
    run_dir:
        Where this run writes (claimed by :func:`halo.train.rundir.claim`).
    model:
        The slide classifier, sharded over ``mesh`` (``model.trunk``, ``model.head``).
    signature:
        What a checkpoint must match to load into ``model``.
    multiple:
        The trunk's output stride: block sides are multiples of it.
    blocks:
        ``mode=predict blocks=[rows, cols]``: each rank predicts whole slides block by block
        (:func:`halo.predict_blockwise`; ``mesh`` is 1 x 1 and ``model`` is not sharded); else None.
    """

    cfg: DictConfig
    rank: int
    device: torch.device
    mesh: halo.SpatialMesh
    classes: list[str]
    run_dir: Path
    model: SlideClassifier
    signature: dict[str, Any]
    multiple: int
    blocks: tuple[int, int] | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """The blocks a slide is planned in: its padding is a multiple of them (times ``multiple``)."""
        return self.blocks or (self.mesh.rows, self.mesh.cols)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self) -> int:
        """This rank's image group (the mesh's ``data`` index)."""
        return self.mesh.coords[0]

    @property
    def first_in_group(self) -> bool:
        """Whether this rank holds block (0, 0) of its image group's slide."""
        return self.mesh.coords[1:] == (0, 0)

    def autocast(self):
        """bfloat16 autocast on CUDA when ``train.bf16``; a no-op context otherwise."""
        enabled = bool(self.cfg.train.bf16) and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)


def _mesh(cfg: DictConfig) -> halo.SpatialMesh:
    """The mesh ``mesh.rows x mesh.cols``; one that does not divide the world size is bad input (every rank)."""
    rows, cols, world = int(cfg.mesh.rows), int(cfg.mesh.cols), dist.get_world_size()
    if rows < 1 or cols < 1 or world % (rows * cols):
        fits = [f"{r}x{c}" for r, c in ((1, 1), (2, 1), (2, 2)) if world % (r * c) == 0 and r * c <= world]
        raise InputError(
            f"halo-train: mesh.rows x mesh.cols = {rows} x {cols} = {rows * cols} ranks per image does not divide the "
            f"world size {world} (the processes started): use a mesh that divides {world}, e.g. "
            f"{' or '.join(f'mesh={m}' for m in fits)} (or mesh.rows=R mesh.cols=C), or start a multiple of "
            f"{rows * cols} processes, e.g. torchrun --standalone --nproc-per-node {max(rows * cols, 1)} -m halo.train")
    return halo.SpatialMesh(rows, cols)


def start(cfg: DictConfig, run_dir: str | os.PathLike[str]) -> Job:
    """Set threads and device, claim the run directory and build the sharded model; collective.

    Raises
    ------
    halo.errors.InputError
        The run directory may not be written (see :func:`halo.train.rundir.claim`), the model
        cannot be built, ``data.classes`` and ``model.num_classes`` disagree, or the mesh does not
        divide the world size.
    """
    from halo.train.rundir import claim

    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if cfg.train.threads:
        torch.set_num_threads(int(cfg.train.threads))
    elif device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or min(dist.get_world_size(), os.cpu_count() or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    blocks = (int(cfg.blocks[0]), int(cfg.blocks[1])) if cfg.mode == "predict" and cfg.blocks else None
    mesh = halo.SpatialMesh(1, 1) if blocks else _mesh(cfg)
    classes = list(cfg.data.classes)
    if len(classes) != cfg.model.num_classes:
        raise InputError(f"halo-train: data.classes has {len(classes)} names ({', '.join(classes)}) but "
                         f"model.num_classes={cfg.model.num_classes}: set model.num_classes={len(classes)}")
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    try:  # before the run directory is claimed: a model that cannot be built leaves nothing behind
        model = build_classifier(
            cfg.model.name, cfg.model.num_classes, head=cfg.head.name,
            head_options=OmegaConf.to_container(cfg.head.options, resolve=True), weights=cfg.model.weights,
            checkpointing=cfg.train.checkpointing, classes=classes,
        )
    except (ValueError, RuntimeError, NotImplementedError, KeyError, OSError) as exc:
        raise InputError(f"halo-train: model.name={cfg.model.name} head={cfg.head.name}"
                         f"{f' model.weights={cfg.model.weights}' if cfg.model.weights else ''} cannot be built: "
                         f"{type(exc).__name__}: {exc}") from exc
    if model.initialised_from and rank == 0:
        log.info("model.weights: initialised from %s", model.initialised_from)
    if cfg.mode == "train" and cfg.train.trunk == "frozen" and not cfg.model.weights and rank == 0:
        log.warning("train.trunk=frozen without model.weights: the trunk stays at its random initial weights and "
                    "only the head trains on their features; pass model.weights=PATH for frozen-feature MIL")
    out = claim(cfg, Path(broadcast(str(Path(run_dir).resolve()))), rank == 0)
    sig = signature(model, name=cfg.model.name, head=cfg.head.name, num_classes=len(classes))
    multiple = total_stride(model.trunk)
    model = (model if blocks else halo.parallelize(model, mesh)).to(device)
    halo.manual_seed(cfg.train.seed, mesh)  # dropout: the same draws within an image group
    return Job(cfg=cfg, rank=rank, device=device, mesh=mesh, classes=classes, run_dir=out, model=model,
               signature=sig, multiple=multiple, blocks=blocks)
