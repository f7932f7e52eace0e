"""Layer norms over channels: per pixel, so a block computes them alone, once checked.

``nn.LayerNorm`` and ``nn.RMSNorm`` (and timm's ``LayerNorm``, ``LayerNormAct``) normalise over
their input's last dims: on a channels-last ``(N, h, w, C)`` block (ConvNeXt permutes to it)
that is per pixel, and exact on a block; on an ``(N, C, h, w)`` block it would normalise over
a spatial dim. ``LayerNorm2d`` (torchvision's and timm's) normalises dim 1 of an
``(N, C, h, w)`` block, and timm's ``LayerNormAct2d``, ``RmsNorm2d`` and ``SimpleNorm2d`` likewise. Each twin here is its class with the same state-dict keys whose
forward first checks, on the tensor it gets, that the dims it normalises hold no spatial
dim (:func:`halo.guard.spatial_dims`; anything goes on a replicated tensor, after global
pooling), then runs the original forward (whose functional calls the guard checks too).

torchvision and timm are optional: their twins exist where they are installed.
"""

from __future__ import annotations

from typing import Self

import torch
from torch import nn

from halo.errors import HaloNotSupportedError
from halo.guard import spatial_dims
from halo.mesh import SpatialMesh
from halo.nn.module import adopt

__all__ = ["HaloLayerNorm", "HaloRMSNorm", "check_normalised_dims", "torchvision_layer_norm_twins",
           "timm_layer_norm_twins"]


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


class _LastDims(_Twin):
    """A norm over the input's last ``len(normalized_shape)`` dims, checked first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_normalised_dims(self, x, tuple(range(-len(self.normalized_shape), 0)))
        return super().forward(x)


class _Channels(_Twin):
    """A norm over dim 1 of an ``(N, C, H, W)`` input, checked first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_normalised_dims(self, x, (1,))
        return super().forward(x)


class HaloLayerNorm(_LastDims, nn.LayerNorm):
    """``nn.LayerNorm`` over last dims that hold no spatial dim of the block."""


class HaloRMSNorm(_LastDims, nn.RMSNorm):
    """``nn.RMSNorm`` over last dims that hold no spatial dim of the block."""


def torchvision_layer_norm_twins() -> dict[type[nn.Module], type[nn.Module]]:
    """torchvision's ``LayerNorm2d`` -> its twin, where torchvision is installed."""
    return {_TorchvisionLayerNorm2d: HaloTorchvisionLayerNorm2d} if _TorchvisionLayerNorm2d is not None else {}


def timm_layer_norm_twins() -> dict[type[nn.Module], type[nn.Module]]:
    """timm's layer norms -> their twins, where timm is installed."""
    if _timm is None:
        return {}
    return {
        _timm.LayerNorm: HaloTimmLayerNorm,
        _timm.LayerNorm2d: HaloTimmLayerNorm2d,
        _timm.RmsNorm2d: HaloRmsNorm2d,
        _timm.SimpleNorm2d: HaloSimpleNorm2d,
        _timm.LayerNormAct: HaloLayerNormAct,
        _timm.LayerNormAct2d: HaloLayerNormAct2d,
    }


try:
    from torchvision.models.convnext import LayerNorm2d as _TorchvisionLayerNorm2d
except ImportError:  # torchvision is optional
    _TorchvisionLayerNorm2d = None
else:

    class HaloTorchvisionLayerNorm2d(_Channels, _TorchvisionLayerNorm2d):
        """torchvision's ConvNeXt ``LayerNorm2d`` (layer norm over channels, per pixel), checked."""


try:
    import timm.layers as _timm
except ImportError:  # timm is optional
    _timm = None
else:

    class HaloTimmLayerNorm(_LastDims, _timm.LayerNorm):
        """timm's ``LayerNorm`` (its ``fast_norm`` path too), over last dims that hold no spatial dim."""

    class HaloTimmLayerNorm2d(_Channels, _timm.LayerNorm2d):
        """timm's ``LayerNorm2d`` (layer norm over channels, per pixel), checked."""

    class HaloRmsNorm2d(_Channels, _timm.RmsNorm2d):
        """timm's ``RmsNorm2d`` (RMS norm over channels, per pixel), checked."""

    class HaloSimpleNorm2d(_Channels, _timm.SimpleNorm2d):
        """timm's ``SimpleNorm2d`` (variance-only norm over channels, per pixel), checked."""

    class HaloLayerNormAct(_LastDims, _timm.LayerNormAct):
        """timm's ``LayerNormAct`` (layer norm, drop, act; checked by ``parallelize``), over non-spatial dims."""

    class HaloLayerNormAct2d(_Channels, _timm.LayerNormAct2d):
        """timm's ``LayerNormAct2d`` (layer norm over channels, drop, act), checked."""
