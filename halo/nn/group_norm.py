"""HaloGroupNorm: group norm whose statistics are those of the whole image.

Group norm normalises each (sample, group of channels) over the group's channels and every
pixel of the image. A block holds one image's pixels in part, so the statistics are merged
over the ranks that hold that image (``mesh.spatial_group``), never over the data group:
each sample has its own. There are no running statistics, so train and eval mode compute
the same thing.

Forward: local mean and biased variance per (sample, group), one all-gather of them,
combined with Chan's parallel formula (equal counts: every block holds as many pixels).
Backward: with ``xhat`` the normalised input and ``gxhat = dy * weight``,
``dx = invstd * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat))``, the two means over the
(sample, group) of the whole image: one all-gather of the two local sums, summed in rank
order. These collectives have sum-backward semantics, and the weight and bias gradients
stay local, so averaging parameter gradients over ranks gives the one-device gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from halo.errors import HaloShapeError
from halo.mesh import SpatialMesh
from halo.nn._collectives import gather_ranks, sum_over_ranks
from halo.nn._window import check_layout, halo_op, is_replicated, mark_replicated
from halo.nn.module import adopt

__all__ = ["HaloGroupNorm", "group_norm_forward", "sharded_group_norm"]


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.reshape(x.shape[0], groups, -1)


def _channel(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None]


class _GroupNormFn(torch.autograd.Function):
    """Group norm of a block with the statistics of its whole image (see the module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, group: dist.ProcessGroup):  # type: ignore[override]
        xg = _grouped(x, groups)
        var, mean = torch.var_mean(xg, dim=-1, correction=0)
        count = xg.shape[-1]  # every block holds the same number of pixels
        gathered = gather_ranks(torch.stack([mean, var]), group)  # (ranks, 2, N, G)
        means, variances = gathered[:, 0], gathered[:, 1]
        ranks = gathered.shape[0]
        mean = means.sum(0) / ranks
        var = (variances.sum(0) + ((means - mean) ** 2).sum(0)) / ranks
        invstd = torch.rsqrt(var + eps)
        y = ((xg - mean[..., None]) * invstd[..., None]).view_as(x)
        if weight is not None:
            y = y * _channel(weight)
        if bias is not None:
            y = y + _channel(bias)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.groups, ctx.group, ctx.total = groups, group, count * ranks
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        groups = ctx.groups
        xhat = ((_grouped(x, groups) - mean[..., None]) * invstd[..., None]).view_as(x)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gw = (gy * xhat).sum((0, 2, 3)) if weight is not None and need_w else None
        gb = gy.sum((0, 2, 3)) if need_b else None
        gx = None
        if need_x:
            gxhat = gy * _channel(weight) if weight is not None else gy
            local = torch.stack([_grouped(gxhat, groups).sum(-1), _grouped(gxhat * xhat, groups).sum(-1)])
            mean_g, mean_gx = (sum_over_ranks(local, ctx.group) / ctx.total).unbind(0)
            gx = (_grouped(gxhat, groups) - mean_g[..., None] - _grouped(xhat, groups) * mean_gx[..., None])
            gx = (gx * invstd[..., None]).view_as(x)
        return gx, gw, gb, None, None, None


def sharded_group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float, mesh: SpatialMesh, name: str = "norm", what: str = "GroupNorm") -> torch.Tensor:
    """``F.group_norm`` of a sharded block with the statistics of its whole image.

    Under autocast the statistics and output are float32, as torch's autocast runs
    ``group_norm`` in float32; half-precision input outside autocast is normalised in float32
    and returned in its own dtype.
    """
    if is_replicated(x):  # after global pooling every rank holds the whole tensor
        return mark_replicated(F.group_norm(x, groups, weight, bias, eps))
    if mesh.size == 1:  # the block is the image
        return F.group_norm(x, groups, weight, bias, eps)
    if x.dim() != 4:
        raise HaloShapeError(f"{name} ({what}) expects a local (N, C, h, w) block, got shape {tuple(x.shape)}")
    check_layout(x, name, what)
    dev = x.device.type
    out_dtype = x.dtype
    if torch.is_autocast_enabled(dev):
        out_dtype = torch.float32
    compute = torch.promote_types(x.dtype, torch.float32)
    cast = (lambda t: t) if compute == x.dtype else (lambda t: None if t is None else t.to(compute))
    with torch.autocast(dev, enabled=False):
        y = _GroupNormFn.apply(cast(x), cast(weight), cast(bias), groups, eps, mesh.spatial_group)
    return y.to(out_dtype)


def group_norm_forward(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``nn.GroupNorm.forward`` of ``norm`` over the whole image (shared by the timm twins)."""
    return sharded_group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, norm.mesh, norm.halo_name,
                              type(norm).__name__)


class HaloGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with per-(sample, group) statistics over the whole sharded image."""

    @classmethod
    def from_module(cls, module: nn.GroupNorm, mesh: SpatialMesh, name: str = "norm") -> "HaloGroupNorm":
        return adopt(cls, module, mesh, name)

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return group_norm_forward(self, x)
