"""Twins of torchvision's layers that are not torch's: ConvNeXt's ``LayerNorm2d``.

Imported by :func:`halo.parallelize.twins` only once torchvision is (a model of it exists).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.convnext import LayerNorm2d

from halo.nn.layer_norm import ChannelsNorm

__all__ = ["HaloTorchvisionLayerNorm2d", "torchvision_twins"]


class HaloTorchvisionLayerNorm2d(ChannelsNorm, LayerNorm2d):
    """torchvision's ConvNeXt ``LayerNorm2d`` (layer norm over channels, per pixel), checked."""


def torchvision_twins() -> dict[type[nn.Module], type[nn.Module]]:
    """Exact torchvision type -> halo twin."""
    return {LayerNorm2d: HaloTorchvisionLayerNorm2d}
