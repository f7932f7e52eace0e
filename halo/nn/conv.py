"""HaloConv2d: a Conv2d on a sharded image, exact against the full image.

Forward (numbered as in the code): 1. receive halo strips, 2. rebuild the extended block,
3. run the convolution with padding 0, 4. save only the block and the thin strips.
Backward rebuilds the extended block, runs the convolution backward, and returns the halo
part of the input gradient to its owners (:func:`halo.exchange.adjoint`); with ``overlap``
the input gradient comes first and the weight gradient is computed while its halo travels.
The block is the same tensor the previous layer saved, so no second full copy is kept.
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


def _inner(n: int, before: int, k: int, s: int, d: int, n_out: int) -> tuple[int, int]:
    """Outputs ``[lo, hi)`` along one exchanged dim whose windows lie inside the block."""
    lo = -(-before // s)
    hi = min(n_out, (n - 1 - d * (k - 1) + before) // s + 1)
    return lo, max(lo, hi)


def _window(lo: int, hi: int, s: int, d: int, k: int) -> slice:
    """Input rows (from the first window's start) that outputs ``[lo, hi)`` read."""
    return slice(lo * s, (hi - 1) * s + d * (k - 1) + 1)


def _overlapped(x, weight, bias, spec: HaloSpec, padding, stride, dilation, groups, mesh):
    """Convolve the halo-free inside of the block while the row strips travel, then the borders.

    Returns the strips and the output, equal to the convolution of the assembled block.
    """
    (kh, kw), (sh, sw), (dh, dw) = weight.shape[-2:], stride, dilation
    h, w = x.shape[-2:]
    size = (spec.top + h + spec.bottom, spec.left + w + spec.right)
    oh, ow = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(size, padding, dilation, (kh, kw), stride))
    # a dim left to the op's own padding (spec widths 0) is computed whole in every piece
    rows = (0, oh) if spec.top == spec.bottom == 0 else _inner(h, spec.top, kh, sh, dh, oh)
    cols = (0, ow) if spec.left == spec.right == 0 else _inner(w, spec.left, kw, sw, dw, ow)
    if rows[0] == rows[1] or cols[0] == cols[1]:
        return None

    def inside() -> torch.Tensor:
        r = _window(*rows, sh, dh, kh) if spec.top or spec.bottom else slice(None)
        c = _window(*cols, sw, dw, kw) if spec.left or spec.right else slice(None)
        if isinstance(r, slice) and r.start is not None:
            r = slice(r.start - spec.top, r.stop - spec.top)
        if isinstance(c, slice) and c.start is not None:
            c = slice(c.start - spec.left, c.stop - spec.left)
        return F.conv2d(x[..., r, c], weight, bias, stride, padding, dilation, groups)

    strips_rows, strips_cols, inner = halo_strips(x, spec, mesh, during=inside)
    ext = assemble(x, strips_rows, strips_cols, spec)
    y = inner.new_empty(*inner.shape[:-2], oh, ow)
    y[..., rows[0] : rows[1], cols[0] : cols[1]] = inner
    bands = [((0, rows[0]), (0, ow)), ((rows[1], oh), (0, ow)), (rows, (0, cols[0])), (rows, (cols[1], ow))]
    for (r0, r1), (c0, c1) in bands:
        if r0 < r1 and c0 < c1:
            r = _window(r0, r1, sh, dh, kh) if spec.top or spec.bottom else slice(None)
            c = _window(c0, c1, sw, dw, kw) if spec.left or spec.right else slice(None)
            y[..., r0:r1, c0:c1] = F.conv2d(ext[..., r, c], weight, bias, stride, padding, dilation, groups)
    return strips_rows, strips_cols, y


class _HaloConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: HaloSpec, padding, stride, dilation, groups, mesh: SpatialMesh,
                overlap: bool = False):  # type: ignore[override]
        x, weight, bias = _autocast(x, weight, bias)
        done = _overlapped(x, weight, bias, spec, padding, stride, dilation, groups, mesh) if overlap else None
        if done is None:
            (top, bottom), (left, right), _ = halo_strips(x, spec, mesh)  # 1
            ext = assemble(x, (top, bottom), (left, right), spec)  # 2
            y = F.conv2d(ext, weight, bias, stride, padding, dilation, groups)  # 3
        else:  # 1-3, the inside computed while the halos travel
            (top, bottom), (left, right), y = done
        ctx.save_for_backward(x, weight, top, bottom, left, right)  # 4
        ctx.conf = (spec, padding, stride, dilation, groups, mesh, bias is not None)
        ctx.overlap = overlap
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, top, bottom, left, right = ctx.saved_tensors
        spec, padding, stride, dilation, groups, mesh, has_bias = ctx.conf
        ext = assemble(x, (top, bottom), (left, right), spec)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and has_bias
        g = g.contiguous()

        def grads(mask: list[bool]):
            return torch.ops.aten.convolution_backward(
                g, ext, weight, [weight.shape[0]] if has_bias else None,
                list(stride), list(padding), list(dilation), False, [0, 0], groups, mask,
            )

        if need_x and ctx.overlap and (need_w or need_b):
            # input gradient first; its halo part travels back while the weight gradient runs
            gi = grads([True, False, False])[0]
            wb: list = []
            gx = adjoint(gi, spec, x.shape, mesh, during=lambda: wb.extend(grads([False, need_w, need_b])[1:]))
            gw, gb = wb
        else:
            gi, gw, gb = grads([need_x, need_w, need_b])
            ext = None  # free the extended block before the exchange
            gx = adjoint(gi, spec, x.shape, mesh) if need_x else None
        return gx, gw, gb if has_bias else None, None, None, None, None, None, None, None


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
    overlap: bool = False,
) -> torch.Tensor:
    """Convolution of a local block with halo exchange; ``spec`` from :func:`window_spec`.

    ``padding`` is applied by the convolution itself, on dims that are not sharded
    (see :func:`halo.nn._window.split_local`). With ``overlap`` the part of the output that
    needs no halo is computed while the row strips travel, then the border bands.
    """
    if spec.is_empty:
        overlap = False
    return _HaloConv2dFn.apply(x, weight, bias, spec, padding, stride, dilation, groups, mesh, overlap)


class HaloConv2d(nn.Conv2d):
    """``nn.Conv2d`` over a spatially sharded input: same parameters, same state-dict keys.

    Any kernel, stride, dilation and groups (depthwise included) with zero padding that
    keeps blocks equal ("same"-style: output = input / stride).
    """

    mesh: SpatialMesh
    halo_name: str
    #: compute the halo-free inside while the halos travel (see :func:`halo_conv2d`)
    overlap: bool = False

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
        new.overlap = False
        return new

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if is_replicated(x):  # after global pooling: every rank holds the whole tensor
            return mark_replicated(super().forward(x))
        check_block(x, self.halo_spec, self.stride, self.halo_name, "Conv2d")
        return halo_conv2d(
            x, self.weight, self.bias, self.mesh, self.halo_exchange, pair(self.stride), pair(self.dilation),
            self.groups, self.halo_padding, self.overlap,
        )
