"""TensorFlow-style "SAME" padding on a sharded image, and explicit pads folded into max pooling.

timm's ``Conv2dSame``, ``MaxPool2dSame`` and ``AvgPool2dSame`` (what ``create_conv2d`` /
``create_pool2d`` build for ``padding="same"`` where a symmetric padding cannot do it: a
stride above 1, or an even reach) pad their input by ``P = max((ceil(n / s) - 1) s + d (k - 1)
+ 1 - n, 0)``, ``floor(P / 2)`` before and ``ceil(P / 2)`` after, computed from the size ``n``
of the tensor they see. On a block that would be the block's size, and every rank would pad
its block as if it were the image. The exact padding is the global image's: halo's blocks are
multiples of the stride, so the image is too, and then ``P = d (k - 1) + 1 - s`` (at least 0)
whatever the image size. That is a fixed asymmetric ``(before, after)`` halo: the rows come
from the neighbours, and only at the global image edges is the strip filled, with zeros
(convolution, average pooling) or -inf (max pooling), as timm's ``pad_same`` fills it.

BiT's stem pads explicitly, ``nn.ConstantPad2d(1, 0.)`` then ``nn.MaxPool2d(3, 2)``: a pad
alone changes the size of the edge blocks only, so it cannot be sharded by itself, but the
pair is one max pooling whose padding is filled with the pad's value. :func:`fold_pads`
swaps such pairs for :class:`HaloPaddedMaxPool2d` (the pad becomes :class:`FoldedPad`, an
identity; neither holds state, so state-dict keys do not change).

This module does not import timm: the twins themselves, subclasses of timm's classes, are
in :mod:`halo.nn.timm_layers` and take their ``from_module`` (and forward) from the mixins here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from halo.errors import HaloNotSupportedError
from halo.exchange import HaloSpec
from halo.geometry import HaloWidths, conv_output_size, is_same_style
from halo.mesh import SpatialMesh
from halo.nn._window import check_block, halo_op, is_replicated, mark_replicated, pair, split_local, window_spec
from halo.nn.module import adopt
from halo.nn.pool import HaloMaxPool2d, _HaloAvgPool2dFn, _HaloMaxPool2dFn

__all__ = [
    "padded_widths",
    "same_padding",
    "same_spec",
    "conv_same_spec",
    "SameConv2dTwin",
    "SameMaxPool2dTwin",
    "SameAvgPool2dTwin",
    "HaloPaddedMaxPool2d",
    "FoldedPad",
    "fold_pads",
]


def padded_widths(name: str, what: str, kernel: int, stride: int, dilation: int, before: int,
                  after: int) -> HaloWidths:
    """Halo widths along one dim of a window op on an input padded by ``(before, after)``.

    An input of ``n * stride`` gives ``n`` outputs exactly when
    ``d (k - 1) + 1 - s <= before + after <= d (k - 1)``; then a block needs ``before`` rows
    of its previous neighbour and ``d (k - 1) - before - s + 1`` of its next (negative: its
    last rows are never read). Padding after the block beyond that is never read either.
    """
    reach = dilation * (kernel - 1)
    if before < 0 or after < 0 or not reach + 1 - stride <= before + after <= reach:
        raise HaloNotSupportedError(
            f"{name} ({what}): padding ({before}, {after}) with kernel {kernel}, stride {stride}, dilation "
            f"{dilation} does not map an input of n*{stride} to n outputs, so equal blocks cannot stay equal; "
            f"halo supports paddings whose sum is between {max(reach + 1 - stride, 0)} and {reach}"
        )
    return HaloWidths(before=before, after=reach - before - stride + 1)


def same_padding(kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "SAME" ``(before, after)`` padding along one dim of an input that is a multiple of
    ``stride`` (timm's ``get_same_padding``; its ``ceil(n / s)`` is exact there)."""
    total = max(dilation * (kernel - 1) + 1 - stride, 0)
    return total // 2, total - total // 2


def same_spec(name: str, what: str, kernel, stride, dilation, fill: float = 0.0) -> HaloSpec:
    """The halo spec of a window op with TF "SAME" padding from the global image size."""
    widths = [padded_widths(name, what, k, s, d, *same_padding(k, s, d))
              for k, s, d in zip(pair(kernel), pair(stride), pair(dilation))]
    return HaloSpec(top=widths[0].before, bottom=widths[0].after, left=widths[1].before, right=widths[1].after,
                    fill=fill)


def _check_ceil_mode(name: str, what: str, kernel, stride, dilation) -> None:
    """ceil_mode on the padded input is exact only where it gives the floor mode's sizes."""
    for k, s, d in zip(pair(kernel), pair(stride), pair(dilation)):
        total = sum(same_padding(k, s, d))
        for n in (s, 2 * s, 7 * s):
            if conv_output_size(n + total, k, s, 0, d, True) != conv_output_size(n + total, k, s, 0, d, False):
                raise HaloNotSupportedError(
                    f"{name} ({what}): ceil_mode=True changes the output size for kernel {k}, stride {s}; "
                    f"use ceil_mode=False"
                )


def conv_same_spec(module: nn.Conv2d, name: str, what: str, dynamic: bool) -> HaloSpec:
    """The halo spec of a convolution that pads "SAME" from the input size (``dynamic``), or
    by its own ``padding`` (timm's ``StdConv2dSame`` where a symmetric padding does it)."""
    if module.padding_mode != "zeros":
        raise HaloNotSupportedError(
            f"{name} ({what}): padding_mode={module.padding_mode!r} is not supported; halo supports 'zeros'"
        )
    if dynamic:
        return same_spec(name, what, module.kernel_size, module.stride, module.dilation)
    return window_spec(name, what, module.kernel_size, module.stride, module.padding, module.dilation)


def _timm_base(cls: type) -> type:
    """The timm class a twin subclasses (the first class from timm in its MRO)."""
    return next(c for c in cls.__mro__ if c.__module__.startswith("timm."))


class SameConv2dTwin:
    """Mixin of the twin of timm's ``Conv2dSame`` (TF "SAME" convolution): the twin subclasses
    ``(SameConv2dTwin, HaloConv2d, timm.layers.Conv2dSame)`` (see ``halo.nn.timm_layers``).

    The asymmetric padding is the global image's, exchanged as a halo (see the module doc);
    the convolution is :class:`~halo.nn.HaloConv2d`'s (``method``, ``overlap``), whose forward
    runs timm's own on a replicated input (its ``super()`` is timm's class).
    """

    @classmethod
    def from_module(cls, module: nn.Conv2d, mesh: SpatialMesh, name: str = "conv"):
        base = _timm_base(cls)
        if type(module) is not base and not isinstance(module, cls):
            raise HaloNotSupportedError(f"{name} ({type(module).__name__}) is not a timm {base.__name__}")
        new = adopt(cls, module, mesh, name)
        new.halo_spec = conv_same_spec(module, name, base.__name__, dynamic=True)
        new.halo_exchange, new.halo_padding = split_local(new.halo_spec, mesh)
        new.overlap = False
        return new


class SameMaxPool2dTwin:
    """Mixin of the twin of timm's ``MaxPool2dSame``, ``(SameMaxPool2dTwin, HaloMaxPool2d,
    MaxPool2dSame)``: the "SAME" padding is -inf, as timm's; the pooling is
    :class:`~halo.nn.HaloMaxPool2d`'s (``method``)."""

    @classmethod
    def from_module(cls, module: nn.MaxPool2d, mesh: SpatialMesh, name: str = "pool"):
        what = _timm_base(cls).__name__
        if module.return_indices:
            raise HaloNotSupportedError(f"{name} ({what}): return_indices=True is not supported")
        stride = module.stride if module.stride is not None else module.kernel_size
        spec = same_spec(name, what, module.kernel_size, stride, module.dilation, fill=-math.inf)
        if module.ceil_mode:
            _check_ceil_mode(name, what, module.kernel_size, stride, module.dilation)
        new = adopt(cls, module, mesh, name)
        new.halo_spec, new.halo_stride = spec, pair(stride)
        # unsharded dims with a symmetric padding pool under max_pool2d's own -inf padding
        new.halo_exchange, new.halo_padding = split_local(spec, mesh)
        return new


class SameAvgPool2dTwin:
    """Mixin of the twin of timm's ``AvgPool2dSame``, ``(SameAvgPool2dTwin, HaloAvgPool2d,
    AvgPool2dSame)``.

    timm pads explicitly with zeros and then pools with padding 0, so the padded zeros are
    always counted: every window divides by ``k_h * k_w``, whatever ``count_include_pad`` says.
    """

    @classmethod
    def from_module(cls, module: nn.AvgPool2d, mesh: SpatialMesh, name: str = "pool"):
        what = _timm_base(cls).__name__
        stride = module.stride if module.stride is not None else module.kernel_size
        if module.divisor_override is not None:
            raise HaloNotSupportedError(f"{name} ({what}): divisor_override is not supported")
        spec = same_spec(name, what, module.kernel_size, stride, 1)
        if module.ceil_mode:
            _check_ceil_mode(name, what, module.kernel_size, stride, 1)
        new = adopt(cls, module, mesh, name)
        new.halo_spec, new.halo_stride = spec, pair(stride)
        return new

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        timm_forward = _timm_base(type(self)).forward
        if is_replicated(x):
            return mark_replicated(timm_forward(self, x))
        check_block(x, self.halo_spec, self.halo_stride, self.halo_name, _timm_base(type(self)).__name__)
        if self.mesh.size == 1:  # the block is the image: timm's own padding
            return timm_forward(self, x)
        return _HaloAvgPool2dFn.apply(x, self.halo_spec, self.kernel_size, self.halo_stride, None, self.mesh)


class FoldedPad(nn.Identity):
    """Where an explicit pad stood before the max pooling it was folded into (:func:`fold_pads`)."""

    def __init__(self, pad: nn.modules.padding._ConstantPadNd) -> None:
        super().__init__()
        self.folded_padding, self.folded_value = tuple(pad.padding), float(pad.value)

    def extra_repr(self) -> str:
        return f"folded into the next pooling: padding={self.folded_padding}, value={self.folded_value}"


class HaloPaddedMaxPool2d(HaloMaxPool2d):
    """``ConstantPad2d(padding, value)`` then ``MaxPool2d(padding=0)``, as one max pooling over a
    sharded input whose padding, at the global image edges only, is filled with ``value``.

    The halo-extended block is exactly a window of the padded global image, so windows,
    maxima and ties (the first maximum in scan order) are one device's; the gradient of the
    fill is dropped, as the pad's is. Every dim exchanges (none is left to ``max_pool2d``'s
    own -inf padding): the fill is the pad's value, not -inf.
    """

    @classmethod
    def from_pair(cls, pad: nn.modules.padding._ConstantPadNd, pool: nn.MaxPool2d, mesh: SpatialMesh,
                  name: str) -> "HaloPaddedMaxPool2d":
        what = f"{type(pad).__name__} + MaxPool2d"
        if pool.return_indices or pool.ceil_mode or pair(pool.padding) != (0, 0):
            raise HaloNotSupportedError(
                f"{name} ({what}): halo folds a pad into a following MaxPool2d with padding=0, ceil_mode=False and "
                f"return_indices=False; got padding={pool.padding}, ceil_mode={pool.ceil_mode}, "
                f"return_indices={pool.return_indices}"
            )
        left, right, top, bottom = pad.padding
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        (kh, kw), (sh, sw), (dh, dw) = pair(pool.kernel_size), pair(stride), pair(pool.dilation)
        rows = padded_widths(name, what, kh, sh, dh, top, bottom)
        cols = padded_widths(name, what, kw, sw, dw, left, right)
        new = adopt(cls, pool, mesh, name)
        new.halo_spec = HaloSpec(top=rows.before, bottom=rows.after, left=cols.before, right=cols.after,
                                 fill=float(pad.value))
        new.halo_stride = (sh, sw)
        new.halo_exchange, new.halo_padding = new.halo_spec, (0, 0)
        new.folded_pad = (left, right, top, bottom), float(pad.value)
        # pooling the block under a symmetric padding of ``before`` (and recomputing its border
        # bands) keeps the output grid only where that padding is same-style; else assemble
        new.folded_bands = all(is_same_style(k, s, p, d) for k, s, p, d in
                               ((kh, sh, rows.before, dh), (kw, sw, cols.before, dw)))
        return new

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        padding, value = self.folded_pad
        if is_replicated(x):
            return mark_replicated(F.max_pool2d(F.pad(x, padding, value=value), self.kernel_size, self.stride, 0,
                                                self.dilation))
        check_block(x, self.halo_spec, self.halo_stride, self.halo_name, "ConstantPad2d + MaxPool2d")
        return _HaloMaxPool2dFn.apply(x, self.halo_exchange, self.halo_padding, self.kernel_size, self.halo_stride,
                                      self.dilation, self.mesh, self.method if self.folded_bands else "assemble")


_PADS = (nn.ConstantPad2d, nn.ZeroPad2d)


def fold_pads(model: nn.Module, mesh: SpatialMesh) -> None:
    """Swap each ``ConstantPad2d`` / ``ZeroPad2d`` that a ``MaxPool2d`` directly follows in an
    ``nn.Sequential`` for :class:`FoldedPad`, and the pooling for :class:`HaloPaddedMaxPool2d`.

    A pad anywhere else is left for :func:`halo.parallelize` to refuse (it changes the size
    of the edge blocks only); one followed by anything but a plain max pooling is refused here.
    """
    paths = {m: n for n, m in model.named_modules()}
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for here, after in zip(names, names[1:] + [None]):
            pad = seq._modules[here]
            if type(pad) not in _PADS:
                continue
            prefix = paths.get(seq, "")
            path = f"{prefix}.{here}" if prefix else here
            pool = seq._modules[after] if after is not None else None
            if type(pool) is not nn.MaxPool2d:
                raise HaloNotSupportedError(
                    f"{path} ({type(pad).__module__}.{type(pad).__qualname__}) pads the image edges only, which "
                    f"changes the edge blocks' size; halo shards a ConstantPad2d or ZeroPad2d only when an "
                    f"nn.MaxPool2d with padding=0 follows it in the same Sequential (folded into one pooling), "
                    f"got {type(pool).__name__ if pool is not None else 'nothing'} after it"
                )
            pool_path = f"{prefix}.{after}" if prefix else after
            seq._modules[after] = HaloPaddedMaxPool2d.from_pair(pad, pool, mesh, f"{path} + {pool_path}")
            seq._modules[here] = FoldedPad(pad)
