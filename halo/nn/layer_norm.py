"""Layer norms over channels: per pixel, so a block computes them alone, once checked.

``nn.LayerNorm`` and ``nn.RMSNorm`` (and timm's ``LayerNorm``, ``LayerNormAct``) normalise over
their input's last dims: on a channels-last ``(N, h, w, C)`` block (ConvNeXt permutes to it)
that is per pixel, and exact on a block; on an ``(N, C, h, w)`` block it would normalise over
a spatial dim. ``LayerNorm2d`` (torchvision's and timm's) normalises dim 1 of an
``(N, C, h, w)`` block, and timm's ``LayerNormAct2d``, ``RmsNorm2d`` and ``SimpleNorm2d`` likewise. Each twin here is its class with the same state-dict keys whose
forward first checks, on the tensor it gets, that the dims it normalises hold no spatial
dim (:func:`halo.guard.spatial_dims`; anything goes on a replicated tensor, after global
pooling), then runs the original forward (whose functional calls the guard checks too).

The twins of torchvision's and timm's classes live with their library's other twins
(:mod:`halo.nn.torchvision_layers`, :mod:`halo.nn.timm_layers`), imported only once a model
of that library exists: importing halo imports neither.
"""

from __future__ import annotations

from typing import Self

import torch
from torch import nn

from halo.errors import HaloNotSupportedError
from halo.guard import spatial_dims
from halo.mesh import SpatialMesh
from halo.nn.module import adopt

__all__ = ["HaloLayerNorm", "HaloRMSNorm", "check_normalised_dims", "LastDimsNorm", "ChannelsNorm"]


def check_normalised_dims(module: nn.Module, x: torch.Tensor, dims: tuple[int, ...]) -> None:
    """Refuse ``module`` normalising ``dims`` of ``x`` where one of them is a spatial dim of a block.

    Raises
    ------
    HaloNotSupportedError
        Naming the module path, its type, the shape and the dims, and what works.
    """
    spatial = spatial_dims(x)
    if not set(spatial) & {d % x.dim() for d in dims}:
        return
    kind = next(c for c in type(module).__mro__ if not c.__module__.startswith("halo."))
    raise HaloNotSupportedError(
        f"{getattr(module, 'halo_name', '<module>')} ({kind.__module__}.{kind.__qualname__}) normalises dims "
        f"{tuple(d % x.dim() for d in dims)} of a sharded block of shape {tuple(x.shape)} whose spatial dims are "
        f"{spatial}: one device normalises over the whole image there. halo shards layer norms over channels "
        f"only: nn.LayerNorm over the last dim of a channels-last (N, H, W, C) block, LayerNorm2d over dim 1 "
        f"of an (N, C, H, W) block, or any layer norm after global pooling"
    )


class _Twin:
    """``from_module`` of the twins: the same object's state in the twin class."""

    @classmethod
    def from_module(cls, module: nn.Module, mesh: SpatialMesh, name: str = "norm") -> Self:
        return adopt(cls, module, mesh, name)


class LastDimsNorm(_Twin):
    """A norm over the input's last ``len(normalized_shape)`` dims, checked first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_normalised_dims(self, x, tuple(range(-len(self.normalized_shape), 0)))
        return super().forward(x)


class ChannelsNorm(_Twin):
    """A norm over dim 1 of an ``(N, C, H, W)`` input, checked first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_normalised_dims(self, x, (1,))
        return super().forward(x)


class HaloLayerNorm(LastDimsNorm, nn.LayerNorm):
    """``nn.LayerNorm`` over last dims that hold no spatial dim of the block."""


class HaloRMSNorm(LastDimsNorm, nn.RMSNorm):
    """``nn.RMSNorm`` over last dims that hold no spatial dim of the block."""
