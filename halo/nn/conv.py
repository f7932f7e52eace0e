"""HaloConv2d: a Conv2d on a sharded image, exact against the full image.

Forward (numbered as in the code): 1. receive halo strips, 2. rebuild the extended block,
3. run the convolution with padding 0, 4. save only the block and the thin strips.
Backward rebuilds the extended block, runs the convolution backward, and returns the halo
part of the input gradient to its owners (:func:`halo.exchange.adjoint`). The block is the
same tensor the previous layer saved, so no second full copy is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from halo.errors import HaloNotSupportedError
from halo.exchange import HaloSpec, adjoint, assemble, halo_strips
from halo.mesh import SpatialMesh
from halo.nn.module import adopt
from halo.nn._window import check_block, halo_op, is_replicated, mark_replicated, pair, split_local, window_spec

__all__ = ["HaloConv2d", "halo_conv2d"]


def _autocast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return x, weight, bias


class _HaloConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: HaloSpec, padding, stride, dilation, groups, mesh: SpatialMesh):  # type: ignore[override]
        x, weight, bias = _autocast(x, weight, bias)
        (top, bottom), (left, right) = halo_strips(x, spec, mesh)  # 1
        ext = assemble(x, (top, bottom), (left, right), spec)  # 2
        y = F.conv2d(ext, weight, bias, stride, padding, dilation, groups)  # 3
        ctx.save_for_backward(x, weight, top, bottom, left, right)  # 4
        ctx.conf = (spec, padding, stride, dilation, groups, mesh, bias is not None)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, top, bottom, left, right = ctx.saved_tensors
        spec, padding, stride, dilation, groups, mesh, has_bias = ctx.conf
        ext = assemble(x, (top, bottom), (left, right), spec)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gi, gw, gb = torch.ops.aten.convolution_backward(
            g.contiguous(), ext, weight, [weight.shape[0]] if has_bias else None,
            list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [need_x, need_w, need_b and has_bias],
        )
        del ext
        gx = adjoint(gi, spec, x.shape, mesh) if need_x else None
        return gx, gw, gb if has_bias else None, None, None, None, None, None, None


def halo_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mesh: SpatialMesh,
    spec: HaloSpec,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    padding: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Convolution of a local block with halo exchange; ``spec`` from :func:`window_spec`.

    ``padding`` is applied by the convolution itself, on dims that are not sharded
    (see :func:`halo.nn._window.split_local`).
    """
    return _HaloConv2dFn.apply(x, weight, bias, spec, padding, stride, dilation, groups, mesh)


class HaloConv2d(nn.Conv2d):
    """``nn.Conv2d`` over a spatially sharded input: same parameters, same state-dict keys.

    Any kernel, stride, dilation and groups (depthwise included) with zero padding that
    keeps blocks equal ("same"-style: output = input / stride).
    """

    mesh: SpatialMesh
    halo_name: str

    @classmethod
    def from_module(cls, module: nn.Conv2d, mesh: SpatialMesh, name: str = "conv") -> "HaloConv2d":
        if type(module) is not nn.Conv2d and not isinstance(module, HaloConv2d):
            raise HaloNotSupportedError(f"{name} ({type(module).__name__}) is not a plain nn.Conv2d")
        if module.padding_mode != "zeros":
            raise HaloNotSupportedError(
                f"{name} (Conv2d): padding_mode={module.padding_mode!r} is not supported; "
                f"halo supports padding_mode='zeros'"
            )
        new = adopt(cls, module, mesh, name)
        new.halo_spec = window_spec(name, "Conv2d", module.kernel_size, module.stride, module.padding, module.dilation)
        new.halo_exchange, new.halo_padding = split_local(new.halo_spec, mesh)
        return new

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if is_replicated(x):  # after global pooling: every rank holds the whole tensor
            return mark_replicated(super().forward(x))
        check_block(x, self.halo_spec, self.stride, self.halo_name, "Conv2d")
        return halo_conv2d(
            x, self.weight, self.bias, self.mesh, self.halo_exchange, pair(self.stride), pair(self.dilation),
            self.groups, self.halo_padding,
        )
