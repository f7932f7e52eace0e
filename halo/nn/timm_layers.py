"""timm's layers, as halo shards them: twins that keep timm's state-dict keys, and point-wise layers.

timm builds its CNNs from its own layer classes, many of them subclasses of torch's
(``BatchNormAct2d`` is an ``nn.BatchNorm2d`` that also holds its activation and drop
layers). :func:`timm_twins` maps each timm class halo computes exactly to its twin;
:data:`timm_local` lists timm's point-wise layers (activations, stochastic depth). Any
other subclass of a layer family is refused by :func:`halo.parallelize`.

timm is imported only when this module is, by :func:`halo.parallelize`.
"""

from __future__ import annotations

import functools

import timm.layers
import timm.layers.activations as _acts
import timm.layers.activations_me as _acts_me
import torch
from torch import nn

from halo.mesh import SpatialMesh
from halo.nn._window import halo_op
from halo.nn.module import adopt
from halo.nn.norm import batch_norm_forward

__all__ = ["HaloBatchNormAct2d", "timm_twins", "timm_local"]


class HaloBatchNormAct2d(timm.layers.BatchNormAct2d):
    """timm's ``BatchNormAct2d`` (batch norm, then drop, then activation) with statistics over
    the whole sharded batch; its ``drop`` and ``act`` children are checked by ``parallelize``."""

    @classmethod
    def from_module(cls, module: timm.layers.BatchNormAct2d, mesh: SpatialMesh,
                    name: str = "bn") -> "HaloBatchNormAct2d":
        return adopt(cls, module, mesh, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.act(self.drop(halo_op(batch_norm_forward)(self, x)))


@functools.cache
def timm_twins() -> dict[type[nn.Module], type[nn.Module]]:
    """Exact timm type -> halo twin (``twin.from_module(module, mesh, path)``)."""
    return {
        timm.layers.BatchNormAct2d: HaloBatchNormAct2d,
    }


def _module_classes(*modules) -> tuple[type[nn.Module], ...]:
    return tuple(
        v for m in modules for v in vars(m).values()
        if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == m.__name__
    )


#: timm's point-wise layers: every activation class (they do not subclass torch's) and
#: stochastic depth, which draws one number per sample (the same on every rank of an image).
timm_local: tuple[type[nn.Module], ...] = _module_classes(_acts, _acts_me) + (timm.layers.DropPath,)
