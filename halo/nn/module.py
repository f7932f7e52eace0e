"""How halo layers are made from their torch twins."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from halo.mesh import SpatialMesh

__all__ = ["adopt"]

M = TypeVar("M", bound=nn.Module)


def adopt(cls: type[M], module: nn.Module, mesh: SpatialMesh, name: str) -> M:
    """An instance of ``cls`` (a subclass of ``type(module)``) sharing ``module``'s state.

    Parameters, buffers, submodules and hooks are the same objects, so state-dict keys,
    optimizer references and loaded weights carry over unchanged.
    """
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new.mesh = mesh
    new.halo_name = name
    return new
