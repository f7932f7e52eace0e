"""HaloConv2d: a Conv2d on a sharded image, exact against the full image.

Where the op's zero padding reproduces the extended block's output grid (every symmetric
"same"-style padding), nothing block-sized is copied. Forward (numbered as in the code):
1. receive the halo strips, 2. convolve the block itself with that zero padding,
3. recompute the thin border bands whose windows reach a neighbour's halo from small
windows of the extended block, 4. save only the block and the thin strips. Backward runs
the block's own convolution backward (its input gradient is already the extended block's,
restricted to the block), and corrects it on the border bands: the halo values' share of
the weight gradient, and the halo part of the input gradient, which returns to its owners
(:func:`halo.exchange.adjoint_strips`). With ``overlap`` the block's own convolution runs
while the strips travel, both ways. Deep, thin layers (a block smaller than a few times the
weight) and other paddings (``padding="same"`` with an even kernel) assemble the extended
block instead and convolve it with padding 0 (``method``; see :func:`halo_conv2d`).
The block is the same tensor the previous layer saved, so no second full copy is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from halo.errors import HaloNotSupportedError
from halo.exchange import (
    HaloSpec, adjoint, adjoint_strips, assemble, halo_strips, scatter_window, strip_grads, window,
)
from halo.geometry import conv_output_size
from halo.mesh import SpatialMesh
from halo.nn.module import adopt
from halo.nn._window import (
    METHODS, border_bands, check_block, halo_op, is_replicated, mark_replicated, native_padding, pair, split_local,
    window_spec,
)

__all__ = ["HaloConv2d", "HaloConv1d", "halo_conv2d"]


def _autocast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return x, weight, bias


#: "auto" convolves the block and recomputes its border bands where the block has at least
#: this many elements per band for each weight element: every band costs a weight-sized
#: gradient in backward, assembling three block-sized copies (deep, thin layers assemble).
#: Measured per ResNet-18 stage by ``benchmarks/bench_conv.py``.
BANDS_MIN_RATIO = 1


def _plan(x: torch.Tensor, weight: torch.Tensor, spec: HaloSpec, padding, stride, dilation, mesh: SpatialMesh,
          method: str):
    """``(native padding, bands)`` for the band method, or ``(None, [])`` to assemble."""
    native = None if method == "assemble" else native_padding(spec, padding)
    if native is None:
        return None, []
    out = [conv_output_size(n, k, s, p, d) for n, k, s, p, d in zip(x.shape[-2:], weight.shape[-2:], stride, native,
                                                                      dilation)]
    bands = border_bands(x.shape, spec, weight.shape[-2:], stride, dilation, out, mesh)
    if method == "auto" and x.numel() < BANDS_MIN_RATIO * len(bands) * weight.numel():
        return None, []
    return native, bands


class _HaloConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: HaloSpec, padding, stride, dilation, groups, mesh: SpatialMesh,
                overlap: bool = False, method: str = "auto"):  # type: ignore[override]
        ctx.grad_dtype = weight.dtype
        x, weight, bias = _autocast(x, weight, bias)
        native, bands = _plan(x, weight, spec, padding, stride, dilation, mesh, method)
        if native is None:  # assemble the extended block, convolve it
            (top, bottom), (left, right), _ = halo_strips(x, spec, mesh)
            ext = assemble(x, (top, bottom), (left, right), spec)
            y = F.conv2d(ext, weight, bias, stride, padding, dilation, groups)
        else:
            def own() -> torch.Tensor:  # 2
                return F.conv2d(x, weight, bias, stride, native, dilation, groups)

            (top, bottom), (left, right), y = halo_strips(x, spec, mesh, during=own if overlap else None)  # 1
            y = own() if y is None else y
            for (r0, r1), (c0, c1), er, ec in bands:  # 3
                part = window(x, (top, bottom), (left, right), spec, er, ec)
                y[..., r0:r1, c0:c1] = F.conv2d(part, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight, top, bottom, left, right)  # 4
        ctx.conf = (spec, padding, native, bands, stride, dilation, groups, mesh, bias is not None)
        ctx.overlap = overlap
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, top, bottom, left, right = ctx.saved_tensors
        spec, padding, native, bands, stride, dilation, groups, mesh, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and has_bias
        g = g.contiguous()
        rows, cols = (top, bottom), (left, right)

        def grads(g, x, pad, mask: list[bool], bias: bool = False):
            return torch.ops.aten.convolution_backward(
                g, x, weight, [weight.shape[0]] if bias else None,
                list(stride), list(pad), list(dilation), False, [0, 0], groups, mask,
            )

        if native is None:
            ext = assemble(x, rows, cols, spec)
            if need_x and ctx.overlap and (need_w or need_b):
                # input gradient first; its halo part travels back while the weight gradient runs
                gi = grads(g, ext, padding, [True, False, False])[0]
                wb: list = []
                gx = adjoint(gi, spec, x.shape, mesh,
                             during=lambda: wb.extend(grads(g, ext, padding, [False, need_w, need_b], has_bias)[1:]))
                gw, gb = wb
            else:
                gi, gw, gb = grads(g, ext, padding, [need_x, need_w, need_b], has_bias)
                ext = None  # free the extended block before the exchange
                gx = adjoint(gi, spec, x.shape, mesh) if need_x else None
            return gx, gw, gb, None, None, None, None, None, None, None, None
        # the bands: the halo values' share of the weight gradient, the halo part of the input's
        g_rows, g_cols = strip_grads(g, spec, x.shape, mesh) if need_x else ((None, None), (None, None))
        corrections = []
        for (r0, r1), (c0, c1), er, ec in bands if need_x or need_w else []:
            halo_only = window(x, rows, cols, spec, er, ec, block=False)
            gi, gw, _ = grads(g[..., r0:r1, c0:c1].contiguous(), halo_only, padding, [need_x, need_w, False])
            corrections.append(gw)
            if need_x:
                scatter_window(gi, g_rows, g_cols, spec, x.shape, er, ec)
        found: list = []

        def own() -> torch.Tensor | None:  # the block's own convolution backward
            found.extend(grads(g, x, native, [need_x, need_w, need_b], has_bias))
            return found[0]

        if not need_x:
            own()
            gx = None
        elif ctx.overlap:
            gx = adjoint_strips(g_rows, g_cols, spec, x.shape, mesh, own, g)
        else:
            block = own()
            gx = adjoint_strips(g_rows, g_cols, spec, x.shape, mesh, lambda: block, g)
        _, gw, gb = found
        if need_w and corrections:
            gw = gw.to(ctx.grad_dtype)
            for part in corrections:
                gw.add_(part)
        return gx, gw, gb if has_bias else None, None, None, None, None, None, None, None, None


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
    method: str = "auto",
) -> torch.Tensor:
    """Convolution of a local block with halo exchange; ``spec`` from :func:`window_spec`.

    ``padding`` is applied by the convolution itself, on dims that are not sharded
    (see :func:`halo.nn._window.split_local`). With ``overlap`` the block's own convolution
    runs while the halo strips travel (forward) and while the halo gradients travel back
    (backward); the border bands follow. ``method``: ``"bands"`` convolves the block with
    zero padding and recomputes the border bands (where the padding is symmetric),
    ``"assemble"`` builds the extended block, ``"auto"`` picks per call (:data:`BANDS_MIN_RATIO`).
    All three are exact; ``overlap`` applies to the band method's forward.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if spec.is_empty:
        overlap = False
    return _HaloConv2dFn.apply(x, weight, bias, spec, padding, stride, dilation, groups, mesh, overlap, method)


class HaloConv2d(nn.Conv2d):
    """``nn.Conv2d`` over a spatially sharded input: same parameters, same state-dict keys.

    Any kernel, stride, dilation and groups (depthwise included) with zero padding that
    keeps blocks equal ("same"-style: output = input / stride).
    """

    mesh: SpatialMesh
    halo_name: str
    #: convolve the block while the halos travel (see :func:`halo_conv2d`)
    overlap: bool = False
    #: "auto", "bands" or "assemble" (see :func:`halo_conv2d`)
    method: str = "auto"

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
            self.groups, self.halo_padding, self.overlap, self.method,
        )


class HaloConv1d(nn.Conv1d):
    """``nn.Conv1d`` on replicated features only (ECA's gate convolves the pooled channels).

    After global pooling every rank holds the whole ``(N, 1, C)`` tensor, so the convolution
    runs locally; on anything else (a sharded block) it is refused.
    """

    mesh: SpatialMesh
    halo_name: str

    @classmethod
    def from_module(cls, module: nn.Conv1d, mesh: SpatialMesh, name: str = "conv") -> "HaloConv1d":
        return adopt(cls, module, mesh, name)

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not is_replicated(x):
            raise HaloNotSupportedError(
                f"{self.halo_name} (Conv1d) got a tensor of shape {tuple(x.shape)} that is not the output of a "
                f"global pool; halo runs Conv1d only on pooled, replicated features (ECA gates), and Conv2d on blocks"
            )
        return mark_replicated(super().forward(x))
