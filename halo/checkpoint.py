"""Checkpoints that resume exactly, load with ``weights_only=True``, and refuse other models.

A checkpoint is a dict of tensors and plain Python values: the model state dict (keys of
the one-device model), the optimizer and scheduler state, the epoch, each rank's torch RNG
state, and a ``signature`` naming the model (backbone, head, classes, parameter shapes).
It is written by rank 0 to a temporary file and renamed, so a crash never leaves a torn file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from halo.errors import InputError

__all__ = ["CheckpointError", "signature", "save_atomic", "load_checkpoint", "check_signature"]

FORMAT = "halo-checkpoint-v1"


class CheckpointError(InputError):
    """A checkpoint that is missing, corrupt, or from another model (bad input: reported once, exit 2)."""


def signature(model: nn.Module, *, name: str, head: str, num_classes: int) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into ``model``."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"model": name, "head": head, "num_classes": int(num_classes), "shapes": shapes}


def save_atomic(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path.tmp``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a halo checkpoint on CPU with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a halo checkpoint (no format {FORMAT!r})")
    return state


def check_signature(state: dict[str, Any], expected: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError` naming what differs between a checkpoint and the model."""
    got = state.get("signature", {})
    for key in ("model", "head", "num_classes"):
        if got.get(key) != expected[key]:
            raise CheckpointError(
                f"checkpoint {path} is from another model: {key}={got.get(key)!r}, this run has {expected[key]!r}"
            )
    theirs, ours = got.get("shapes", {}), expected["shapes"]
    if theirs != ours:
        diff = sorted(set(theirs) ^ set(ours)) or [k for k in ours if theirs.get(k) != ours[k]]
        raise CheckpointError(f"checkpoint {path} does not fit this model: parameters differ at {diff[:5]}")
