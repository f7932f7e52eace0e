"""HaloBatchNorm2d: batch norm whose training statistics are those of the whole batch.

Statistics are reduced over every rank of the mesh (all blocks of all images in the
data group), exactly as one device computes them over the full ``(N, C, H, W)`` batch.
Forward: local mean and variance, one all-gather of ``(count, mean, var)`` per layer,
combined with Chan's parallel formula (no catastrophic cancellation). Backward: one
all-gather of ``(sum dy, sum dy * xhat)``, summed locally in rank order (on gloo an
all-gather is one round trip where an all-reduce takes several; see ``_collectives``).
The element-wise work runs in torch's fused batch-norm kernels. Parameter gradients stay
local, so averaging them over ranks gives the one-device gradient. Eval mode, and
training in a world of one rank, are plain ``nn.BatchNorm2d``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from halo.mesh import SpatialMesh
from halo.nn._collectives import gather_ranks, sum_over_ranks
from halo.nn._window import check_layout, halo_op, is_replicated, mark_replicated
from halo.nn.module import adopt

__all__ = ["HaloBatchNorm2d", "batch_norm_forward", "sync_batch_stats"]


def _view(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None]


def _local_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of the local block, fused, at least in float32.

    For bfloat16/float16 blocks (autocast, or a half-precision model) torch's kernel
    accumulates in float32 and returns float32 only when given running buffers; they are
    throw-away here (momentum 0 leaves them as they are).
    """
    if x.dtype not in (torch.float16, torch.bfloat16):
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    channels = x.shape[1]
    scratch = torch.zeros(2, channels, dtype=torch.float32, device=x.device)
    return torch.batch_norm_update_stats(x, scratch[0], scratch[1], 0.0)


def sync_batch_stats(x: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance and element count per channel over all ranks of ``group``.

    Float32 for bfloat16/float16 input (the statistics of half-precision activations are
    accumulated and reduced in float32, as torch's own batch norm does), else ``x.dtype``.
    """
    channels = x.shape[1]
    mean, var = _local_stats(x)
    count = torch.full((1,), x.numel() // channels, dtype=mean.dtype, device=x.device)
    gathered = gather_ranks(torch.cat([count, mean, var]), group)
    counts, means, variances = gathered[:, :1], gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    m2 = (counts * variances).sum(0) + (counts * (means - mean) ** 2).sum(0)
    return mean, m2 / total, total


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch norm with global statistics, on torch's fused eval-mode kernels.

    Forward normalises with the global (mean, var) through ``torch.batch_norm`` in eval
    mode (one fused pass). Backward gets ``dx_eval = w * invstd * dy``, ``sum(dy * xhat)`` and
    ``sum(dy)`` from one fused ``native_batch_norm_backward`` pass, sums the two over ranks,
    and adds the training-mode terms as one affine map of ``x`` per channel:
    ``dx = dx_eval - w * invstd * (mean(dy) + xhat * mean(dy * xhat))``.

    The running statistics are updated here, before anything is saved for backward, as
    torch's own kernel does: a checkpointed stage that ends in a batch norm stops its
    recompute once the last saved tensor is back, and must then have updated them as many
    times as the one-device network (see ``torch.utils.checkpoint``'s early stop).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group, running_mean, running_var,
                factor: float):  # type: ignore[override]
        mean, var, total = sync_batch_stats(x, group)
        if running_mean is not None:
            unbiased = var * (total / (total - 1).clamp(min=1))
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
            running_var.lerp_(unbiased.to(running_var.dtype), factor)
        # torch's kernels take statistics in the parameters' dtype: float32 under autocast
        # (mixed precision), the input's own dtype in an all-half-precision model
        dtype = weight.dtype if weight is not None else x.dtype
        mean, var = mean.to(dtype), var.to(dtype)
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.total, ctx.group, ctx.eps = total, group, eps
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, mean, var = ctx.saved_tensors
        w = weight if weight is not None else torch.ones_like(mean)
        gx, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            gy.contiguous(), x, w, mean, var, None, None, False, ctx.eps, [True, True, True]
        )
        gw = sum_dy_xhat.clone() if weight is not None and ctx.needs_input_grad[1] else None
        gb = sum_dy.clone() if ctx.needs_input_grad[2] else None
        if not ctx.needs_input_grad[0]:
            return None, gw, gb, None, None, None, None, None
        sums = sum_over_ranks(torch.cat([sum_dy, sum_dy_xhat]), ctx.group)
        mean_dy, mean_dy_xhat = (sums / ctx.total).chunk(2)
        invstd = torch.rsqrt(var + ctx.eps)
        scale = w * invstd  # dx = dx_eval + slope * x + offset, per channel
        slope = -scale * invstd * mean_dy_xhat
        offset = scale * (invstd * mean * mean_dy_xhat - mean_dy)
        return gx.addcmul_(x, _view(slope)).add_(_view(offset)), gw, gb, None, None, None, None, None


def batch_norm_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``nn.BatchNorm2d.forward`` of ``bn`` with the statistics of the whole sharded batch.

    Shared by every batch-norm twin (timm's ``BatchNormAct2d`` adds drop and activation after it).
    """
    bn._check_input_dim(x)
    check_layout(x, getattr(bn, "halo_name", "bn"), type(bn).__name__)
    use_batch_stats = bn.training or bn.running_mean is None
    replicated = is_replicated(x)  # pooled features: every rank of an image holds the same copy
    if not use_batch_stats or dist.get_world_size() == 1 or replicated and bn.mesh.data == 1:
        y = nn.BatchNorm2d.forward(bn, x)  # eval, or the whole batch is here (once)
        return mark_replicated(y) if replicated else y
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        factor = 1.0 / float(bn.num_batches_tracked) if bn.num_batches_tracked is not None else 0.0
    else:
        factor = bn.momentum
    track = bn.training and bn.running_mean is not None
    # a replicated tensor's statistics are over the images only, each counted once
    group = bn.mesh.data_group if replicated else None
    y = _SyncBatchNormFn.apply(x, bn.weight, bn.bias, bn.eps, group, bn.running_mean if track else None,
                               bn.running_var if track else None, factor)
    return mark_replicated(y) if replicated else y


class HaloBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with statistics over the whole sharded batch; same state-dict keys."""

    @classmethod
    def from_module(cls, module: nn.BatchNorm2d, mesh: SpatialMesh, name: str = "bn") -> "HaloBatchNorm2d":
        return adopt(cls, module, mesh, name)

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return batch_norm_forward(self, x)
