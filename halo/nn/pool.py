"""Max and average pooling over a sharded image, exact against the full image.

Global edges get torch's own padding semantics: -inf for max pooling, zeros counted
(``count_include_pad=True``) or not counted (``False``) for average pooling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from halo.errors import HaloNotSupportedError
from halo.exchange import (
    HaloSpec, adjoint, adjoint_strips, assemble, halo_strips, scatter_window, strip_grads, window,
)
from halo.geometry import conv_output_size
from halo.mesh import SpatialMesh
from halo.nn._window import (
    METHODS, border_bands, check_block, halo_op, is_replicated, mark_replicated, native_padding, pair, split_local,
    window_spec,
)
from halo.nn.module import adopt

__all__ = ["HaloMaxPool2d", "HaloAvgPool2d"]


def _check_ceil_mode(name: str, what: str, kernel, stride, padding, dilation=1) -> None:
    """ceil_mode is exact only where it gives the same sizes as floor mode."""
    for k, s, p, d in zip(pair(kernel), pair(stride), pair(padding), pair(dilation)):
        for n in (s, 2 * s, 7 * s):
            if conv_output_size(n, k, s, p, d, True) != conv_output_size(n, k, s, p, d, False):
                raise HaloNotSupportedError(
                    f"{name} ({what}): ceil_mode=True changes the output size for kernel {k}, stride {s}, "
                    f"padding {p}; use ceil_mode=False"
                )


def _stand_in(like: torch.Tensor, shape) -> torch.Tensor:
    """A zero-stride tensor of ``shape``: pooling backwards read only their input's shape."""
    return like.new_zeros(()).expand(shape)


class _HaloMaxPool2dFn(torch.autograd.Function):
    """Max pooling with halos that saves only the indices of the maxima.

    By bands (where the halo after the block is no wider than before it, as in every
    symmetric same-style pool): pool the block under its own -inf padding, then recompute
    the border bands whose windows reach a neighbour's halo from small windows of the
    extended block. Backward spreads the other outputs' gradient through the block's own
    indices and each band's through its window's; the halo part returns to its owners. The
    one output-sized copy is of the gradient, to zero the bands in it. Otherwise (and with
    ``method="assemble"``) pool the extended block; backward spreads the gradient over a
    stand-in of its shape and returns the halo part (:func:`adjoint`).
    """

    @staticmethod
    def forward(ctx, x, spec: HaloSpec, padding, kernel, stride, dilation, mesh: SpatialMesh,
                method: str = "auto"):  # type: ignore[override]
        kernel, dilation = pair(kernel), pair(dilation)
        native = None if method == "assemble" else native_padding(spec, padding)
        rows, cols, _ = halo_strips(x, spec, mesh)
        if native is None:
            ext = assemble(x, rows, cols, spec)
            out, indices = F.max_pool2d(ext, kernel, stride, padding, dilation, False, True)
            ctx.save_for_backward(indices)
            ctx.ext_shape, bands = ext.shape, []
        else:
            out, indices = F.max_pool2d(x, kernel, stride, native, dilation, False, True)
            # at the image edges too (reading the -inf fill): every rank saves the same indices
            bands = border_bands(x.shape, spec, kernel, stride, dilation, out.shape[-2:])
            found = [indices]
            for (r0, r1), (c0, c1), er, ec in bands:
                part = window(x, rows, cols, spec, er, ec)
                out[..., r0:r1, c0:c1], band_indices = F.max_pool2d(part, kernel, stride, padding, dilation, False, True)
                found.append(band_indices)
            ctx.save_for_backward(*found)
        ctx.shape, ctx.native, ctx.bands = x.shape, native, bands
        ctx.conf = (spec, padding, kernel, stride, dilation, mesh)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None, None
        indices, *band_indices = ctx.saved_tensors
        spec, padding, kernel, stride, dilation, mesh = ctx.conf
        g = g.contiguous()

        def spread(grad, shape, pad, where) -> torch.Tensor:
            return torch.ops.aten.max_pool2d_with_indices_backward(
                grad, _stand_in(g, shape), list(kernel), list(stride), list(pad), list(dilation), False, where)

        if ctx.native is None:
            g_ext = spread(g, ctx.ext_shape, padding, indices)
            return adjoint(g_ext, spec, ctx.shape, mesh), None, None, None, None, None, None, None
        own = g
        if ctx.bands:  # the bands' outputs spread through their windows' indices, not the block's
            own = g.clone()
            for (r0, r1), (c0, c1), _, _ in ctx.bands:
                own[..., r0:r1, c0:c1] = 0
        block = spread(own, ctx.shape, ctx.native, indices)
        g_rows, g_cols = strip_grads(g, spec, ctx.shape, mesh)
        for ((r0, r1), (c0, c1), er, ec), where in zip(ctx.bands, band_indices):
            part = g[..., r0:r1, c0:c1].contiguous()
            shape = (*ctx.shape[:-2], er[1] - er[0], ec[1] - ec[0])
            scatter_window(spread(part, shape, padding, where), g_rows, g_cols, spec, ctx.shape, er, ec, block=block)
        gx = adjoint_strips(g_rows, g_cols, spec, ctx.shape, mesh, lambda: block, g)
        return gx, None, None, None, None, None, None, None


class HaloMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` over a sharded input (halo filled with -inf at global edges)."""

    #: "auto" and "bands" pool the block and recompute its border bands (where the padding
    #: allows), "assemble" pools the halo-extended block (see :class:`_HaloMaxPool2dFn`)
    method: str = "auto"

    @classmethod
    def from_module(cls, module: nn.MaxPool2d, mesh: SpatialMesh, name: str = "pool") -> "HaloMaxPool2d":
        if module.return_indices:
            raise HaloNotSupportedError(f"{name} (MaxPool2d): return_indices=True is not supported")
        stride = module.stride if module.stride is not None else module.kernel_size
        if module.ceil_mode:
            _check_ceil_mode(name, "MaxPool2d", module.kernel_size, stride, module.padding, module.dilation)
        new = adopt(cls, module, mesh, name)
        new.halo_spec = window_spec(
            name, "MaxPool2d", module.kernel_size, stride, module.padding, module.dilation, fill=-math.inf
        )
        new.halo_stride = pair(stride)
        new.halo_exchange, new.halo_padding = split_local(new.halo_spec, mesh)
        return new

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if is_replicated(x):
            return mark_replicated(super().forward(x))
        check_block(x, self.halo_spec, self.halo_stride, self.halo_name, "MaxPool2d")
        if self.method not in METHODS:
            raise ValueError(f"{self.halo_name} (MaxPool2d): method must be one of {METHODS}, got {self.method!r}")
        return _HaloMaxPool2dFn.apply(x, self.halo_exchange, self.halo_padding, self.kernel_size, self.halo_stride,
                                      self.dilation, self.mesh, self.method)


class _HaloAvgPool2dFn(torch.autograd.Function):
    """Average pooling (``count_include_pad`` semantics, padding 0) of the halo-extended block.

    ``avg_pool2d`` would save the extended block for backward, which needs only its shape:
    this saves nothing, and backward spreads the gradient over a stand-in of that shape.
    """

    @staticmethod
    def forward(ctx, x, spec: HaloSpec, kernel, stride, divisor, mesh: SpatialMesh):  # type: ignore[override]
        rows, cols, _ = halo_strips(x, spec, mesh)
        ext = assemble(x, rows, cols, spec)
        ctx.shape, ctx.ext_shape, ctx.conf = x.shape, ext.shape, (spec, kernel, stride, divisor, mesh)
        return F.avg_pool2d(ext, kernel, stride, 0, False, True, divisor)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        spec, kernel, stride, divisor, mesh = ctx.conf
        g_ext = torch.ops.aten.avg_pool2d_backward(
            g.contiguous(), _stand_in(g, ctx.ext_shape), pair(kernel), list(stride), [0, 0], False, True,
            divisor,
        )
        return adjoint(g_ext, spec, ctx.shape, mesh), None, None, None, None, None


class HaloAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` over a sharded input, with torch's ``count_include_pad`` semantics."""

    @classmethod
    def from_module(cls, module: nn.AvgPool2d, mesh: SpatialMesh, name: str = "pool") -> "HaloAvgPool2d":
        stride = module.stride if module.stride is not None else module.kernel_size
        if module.ceil_mode:
            _check_ceil_mode(name, "AvgPool2d", module.kernel_size, stride, module.padding)
        new = adopt(cls, module, mesh, name)
        new.halo_spec = window_spec(name, "AvgPool2d", module.kernel_size, stride, module.padding)
        new.halo_stride = pair(stride)
        return new

    def _valid_counts(self, x: torch.Tensor) -> torch.Tensor:
        """How many in-image pixels each window covers (global padding excluded)."""
        spec: HaloSpec = self.halo_spec
        h, w = x.shape[-2:]
        masks = []
        for axis, n, before, after in (("row", h, spec.top, spec.bottom), ("col", w, spec.left, spec.right)):
            index, size = self.mesh.axis_index(axis), self.mesh.axis_size(axis)
            m = torch.ones(before + n + after, dtype=x.dtype, device=x.device)
            if index == 0 and before > 0:
                m[:before] = 0
            if index == size - 1 and after > 0:
                m[before + n :] = 0
            masks.append(m)
        mask = (masks[0][:, None] * masks[1][None, :])[None, None]
        return F.avg_pool2d(mask, self.kernel_size, self.halo_stride, 0, False, True, 1)

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if is_replicated(x):
            return mark_replicated(super().forward(x))
        check_block(x, self.halo_spec, self.halo_stride, self.halo_name, "AvgPool2d")
        if self.mesh.size == 1:  # the block is the image: torch's own padding and divisors
            return super().forward(x)
        spec = self.halo_spec
        if self.count_include_pad or self.divisor_override is not None or spec.is_empty:
            return _HaloAvgPool2dFn.apply(x, spec, self.kernel_size, self.halo_stride, self.divisor_override, self.mesh)
        sums = _HaloAvgPool2dFn.apply(x, spec, self.kernel_size, self.halo_stride, 1, self.mesh)
        return sums / self._valid_counts(x)
