"""Global average and max pooling over the whole image, reduced across the spatial group.

The result, ``(N, C, 1, 1)``, is the same on every rank of an image ("replicated"); what
follows (the classifier head, squeeze-and-excitation gates) runs locally on it. The
collectives are differentiable with sum-backward semantics (the adjoint of an all-reduce
sum is an all-reduce sum), which is what makes averaged parameter gradients exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from halo.errors import HaloNotSupportedError
from halo.mesh import SpatialMesh
from halo.nn._collectives import gather_ranks, sum_over_ranks
from halo.nn._window import halo_op, is_replicated, mark_replicated
from halo.nn.module import adopt

__all__ = [
    "global_sum",
    "global_avg_pool2d",
    "global_max_pool2d",
    "HaloAdaptiveAvgPool2d",
    "HaloAdaptiveMaxPool2d",
    "is_global_size",
]


def is_global_size(output_size) -> bool:
    """Whether an adaptive pool's ``output_size`` is 1 x 1 (the only size halo shards)."""
    if isinstance(output_size, int):
        return output_size == 1
    return tuple(output_size) in ((1, 1), (1,))


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks (its adjoint).

    Both directions gather and sum in rank order (:func:`sum_over_ranks`): for these
    ``(N, C)``-sized tensors one all-gather is faster than an all-reduce on gloo.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return sum_over_ranks(x, group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return sum_over_ranks(g, ctx.group), None


def global_sum(x: torch.Tensor, mesh: SpatialMesh) -> torch.Tensor:
    """Differentiable all-reduce sum over the ranks of one image."""
    if mesh.size == 1:
        return x
    return _AllReduceSum.apply(x, mesh.spatial_group)


def global_avg_pool2d(x: torch.Tensor, mesh: SpatialMesh) -> torch.Tensor:
    """Mean over all H x W positions of the global image: ``(N, C, 1, 1)``, replicated."""
    if is_replicated(x):
        return mark_replicated(x.mean((-2, -1), keepdim=True))
    h, w = x.shape[-2:]
    total = x.sum((-2, -1), keepdim=True)
    return mark_replicated(global_sum(total, mesh) / (h * w * mesh.size))


def global_max_pool2d(x: torch.Tensor, mesh: SpatialMesh) -> torch.Tensor:
    """Max over the global image: ``(N, C, 1, 1)``, replicated.

    Ties are broken as one device breaks them (the first position in row-major order of
    the global image), so exactly one pixel receives the gradient.
    """
    local, idx = F.adaptive_max_pool2d(x, 1, return_indices=True)
    if is_replicated(x) or mesh.size == 1:
        return mark_replicated(local)
    h, w = x.shape[-2:]
    _, row, col = mesh.coords
    position = (row * h + idx // w) * (w * mesh.cols) + col * w + idx % w
    values = gather_ranks(local.detach(), mesh.spatial_group)  # (ranks, N, C, 1, 1)
    peak = values.amax(0)
    first = torch.where(values == peak, gather_ranks(position, mesh.spatial_group), torch.iinfo(position.dtype).max)
    first = first.amin(0)
    is_peak = local.detach() == peak
    mine = is_peak & (first == position)
    return mark_replicated(global_sum(torch.where(mine, local, torch.zeros_like(local)), mesh))


class HaloAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(1)`` over the whole sharded image."""

    @classmethod
    def from_module(cls, module: nn.AdaptiveAvgPool2d, mesh: SpatialMesh, name: str = "avgpool"):
        if not is_global_size(module.output_size):
            raise HaloNotSupportedError(
                f"{name} (AdaptiveAvgPool2d): output_size={module.output_size} depends on the global image "
                f"size and is not sharded; halo supports output_size=1 (global average pooling)"
            )
        return adopt(cls, module, mesh, name)

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return global_avg_pool2d(x, self.mesh)


class HaloAdaptiveMaxPool2d(nn.AdaptiveMaxPool2d):
    """``nn.AdaptiveMaxPool2d(1)`` over the whole sharded image."""

    @classmethod
    def from_module(cls, module: nn.AdaptiveMaxPool2d, mesh: SpatialMesh, name: str = "maxpool"):
        if not is_global_size(module.output_size) or module.return_indices:
            raise HaloNotSupportedError(
                f"{name} (AdaptiveMaxPool2d): output_size={module.output_size}, return_indices="
                f"{module.return_indices} is not sharded; halo supports output_size=1 without indices"
            )
        return adopt(cls, module, mesh, name)

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return global_max_pool2d(x, self.mesh)
