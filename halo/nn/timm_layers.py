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
import timm.layers.adaptive_avgmax_pool as _pools
import torch
import torch.nn.functional as F
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from torch import nn

from halo.mesh import SpatialMesh
from halo.nn._window import halo_op
from halo.nn.module import adopt
from halo.nn.layer_norm import ChannelsNorm, LastDimsNorm
from halo.nn.norm import batch_norm_forward
# twins of timm's SAME-padded, weight-standardised, group-norm and global-pool layers
from halo.errors import HaloNotSupportedError
from halo.nn._window import check_block, is_replicated, mark_replicated, pair, split_local
from halo.nn.conv import HaloConv2d, halo_conv2d
from halo.nn.global_pool import global_avg_pool2d, global_max_pool2d, is_global_size
from halo.nn.group_norm import group_norm_forward
from halo.nn.pool import HaloAvgPool2d, HaloMaxPool2d
from halo.nn.same import SameAvgPool2dTwin, SameConv2dTwin, SameMaxPool2dTwin, _timm_base, conv_same_spec

__all__ = [
    "HaloBatchNormAct2d", "timm_twins", "timm_local",
    "HaloTimmLayerNorm", "HaloTimmLayerNorm2d", "HaloRmsNorm2d", "HaloSimpleNorm2d", "HaloLayerNormAct",
    "HaloLayerNormAct2d",
    "HaloConv2dSame", "HaloMaxPool2dSame", "HaloAvgPool2dSame",
    "HaloStdConv2d", "HaloStdConv2dSame", "HaloScaledStdConv2d", "HaloScaledStdConv2dSame",
    "HaloTimmGroupNorm", "HaloGroupNorm1", "HaloGroupNormAct", "HaloGroupNorm1Act",
    "HaloAdaptiveAvgMaxPool2d", "HaloAdaptiveCatAvgMaxPool2d", "HaloFastAdaptiveAvgPool", "HaloFastAdaptiveMaxPool",
    "HaloFastAdaptiveAvgMaxPool", "HaloFastAdaptiveCatAvgMaxPool",
]


class HaloBatchNormAct2d(timm.layers.BatchNormAct2d):
    """timm's ``BatchNormAct2d`` (batch norm, then drop, then activation) with statistics over
    the whole sharded batch; its ``drop`` and ``act`` children are checked by ``parallelize``."""

    @classmethod
    def from_module(cls, module: timm.layers.BatchNormAct2d, mesh: SpatialMesh,
                    name: str = "bn") -> "HaloBatchNormAct2d":
        return adopt(cls, module, mesh, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.act(self.drop(halo_op(batch_norm_forward)(self, x)))


class HaloTimmLayerNorm(LastDimsNorm, timm.layers.LayerNorm):
    """timm's ``LayerNorm`` (its ``fast_norm`` path too), over last dims that hold no spatial dim."""


class HaloTimmLayerNorm2d(ChannelsNorm, timm.layers.LayerNorm2d):
    """timm's ``LayerNorm2d`` (layer norm over channels, per pixel), checked."""


class HaloRmsNorm2d(ChannelsNorm, timm.layers.RmsNorm2d):
    """timm's ``RmsNorm2d`` (RMS norm over channels, per pixel), checked."""


class HaloSimpleNorm2d(ChannelsNorm, timm.layers.SimpleNorm2d):
    """timm's ``SimpleNorm2d`` (variance-only norm over channels, per pixel), checked."""


class HaloLayerNormAct(LastDimsNorm, timm.layers.LayerNormAct):
    """timm's ``LayerNormAct`` (layer norm, drop, act; checked by ``parallelize``), over non-spatial dims."""


class HaloLayerNormAct2d(ChannelsNorm, timm.layers.LayerNormAct2d):
    """timm's ``LayerNormAct2d`` (layer norm over channels, drop, act), checked."""


@functools.cache
def timm_twins() -> dict[type[nn.Module], type[nn.Module]]:
    """Exact timm type -> halo twin (``twin.from_module(module, mesh, path)``)."""
    return {
        timm.layers.BatchNormAct2d: HaloBatchNormAct2d,
        timm.layers.LayerNorm: HaloTimmLayerNorm,
        timm.layers.LayerNorm2d: HaloTimmLayerNorm2d,
        timm.layers.RmsNorm2d: HaloRmsNorm2d,
        timm.layers.SimpleNorm2d: HaloSimpleNorm2d,
        timm.layers.LayerNormAct: HaloLayerNormAct,
        timm.layers.LayerNormAct2d: HaloLayerNormAct2d,
        timm.layers.Conv2dSame: HaloConv2dSame,
        MaxPool2dSame: HaloMaxPool2dSame,
        AvgPool2dSame: HaloAvgPool2dSame,
        timm.layers.StdConv2d: HaloStdConv2d,
        timm.layers.StdConv2dSame: HaloStdConv2dSame,
        timm.layers.ScaledStdConv2d: HaloScaledStdConv2d,
        timm.layers.ScaledStdConv2dSame: HaloScaledStdConv2dSame,
        timm.layers.GroupNorm: HaloTimmGroupNorm,
        timm.layers.GroupNorm1: HaloGroupNorm1,
        timm.layers.GroupNormAct: HaloGroupNormAct,
        timm.layers.GroupNorm1Act: HaloGroupNorm1Act,
        _pools.AdaptiveAvgMaxPool2d: HaloAdaptiveAvgMaxPool2d,
        _pools.AdaptiveCatAvgMaxPool2d: HaloAdaptiveCatAvgMaxPool2d,
        _pools.FastAdaptiveAvgPool: HaloFastAdaptiveAvgPool,
        _pools.FastAdaptiveMaxPool: HaloFastAdaptiveMaxPool,
        _pools.FastAdaptiveAvgMaxPool: HaloFastAdaptiveAvgMaxPool,
        _pools.FastAdaptiveCatAvgMaxPool: HaloFastAdaptiveCatAvgMaxPool,
    }


def _module_classes(*modules) -> tuple[type[nn.Module], ...]:
    return tuple(
        v for m in modules for v in vars(m).values()
        if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == m.__name__
    )


#: timm's point-wise layers: every activation class (they do not subclass torch's),
#: stochastic depth, which draws one number per sample (the same on every rank of an image),
#: and layers that only ever see pooled features.
timm_local: tuple[type[nn.Module], ...] = _module_classes(_acts, _acts_me) + (
    timm.layers.DropPath,
    # split attention's softmax over radix groups: on pooled, replicated features; on a block
    # the guard refuses its view, which merges the spatial dims
    timm.layers.split_attn.RadixSoftmax,
)


# --- TF "SAME" padding from the global image size (halo.nn.same) ------------------------------


class HaloConv2dSame(SameConv2dTwin, HaloConv2d, timm.layers.Conv2dSame):
    """timm's ``Conv2dSame`` over a sharded input, padded "SAME" as the global image; same keys."""


class HaloMaxPool2dSame(SameMaxPool2dTwin, HaloMaxPool2d, MaxPool2dSame):
    """timm's ``MaxPool2dSame`` over a sharded input (-inf "SAME" padding of the global image)."""


class HaloAvgPool2dSame(SameAvgPool2dTwin, HaloAvgPool2d, AvgPool2dSame):
    """timm's ``AvgPool2dSame`` over a sharded input (zero "SAME" padding, always counted)."""


# --- weight-standardised convolutions (BiT's StdConv2d, NFNet's ScaledStdConv2d) -------------


def _standardized_weight(conv: nn.Conv2d) -> torch.Tensor:
    """timm's own expression for the standardised weight (``gain`` and ``scale`` for the scaled
    convs), op for op, so the numbers are timm's; autograd runs through it."""
    gain = getattr(conv, "gain", None)
    return F.batch_norm(
        conv.weight.reshape(1, conv.out_channels, -1), None, None,
        weight=None if gain is None else (gain * conv.scale).view(-1),
        training=True, momentum=0.0, eps=conv.eps,
    ).reshape_as(conv.weight)


class _StdConvTwin:
    """Weight standardisation is a function of the weight alone, the same on every rank: the
    twin standardises the weight, then convolves the block with :func:`halo.nn.halo_conv2d`.
    Each rank's weight gradient flows back through the standardisation; the map from the
    convolution's weight gradient to the parameter's is linear, so averaging over ranks
    still gives the one-device gradient."""

    @classmethod
    def from_module(cls, module, mesh: SpatialMesh, name: str = "conv"):
        base = _timm_base(cls)
        if type(module) is not base and not isinstance(module, cls):
            raise HaloNotSupportedError(f"{name} ({type(module).__name__}) is not a timm {base.__name__}")
        new = adopt(cls, module, mesh, name)
        # the *Same variants pad "SAME" from the input size where no symmetric padding does it
        new.halo_spec = conv_same_spec(module, name, base.__name__, dynamic=bool(getattr(module, "same_pad", False)))
        new.halo_exchange, new.halo_padding = split_local(new.halo_spec, mesh)
        new.overlap = False
        return new

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if is_replicated(x):  # after global pooling: timm's own forward on the whole tensor
            return mark_replicated(super(HaloConv2d, self).forward(x))
        check_block(x, self.halo_spec, self.stride, self.halo_name, _timm_base(type(self)).__name__)
        return halo_conv2d(
            x, _standardized_weight(self), self.bias, self.mesh, self.halo_exchange, pair(self.stride),
            pair(self.dilation), self.groups, self.halo_padding, self.overlap, self.method,
        )


class HaloStdConv2d(_StdConvTwin, HaloConv2d, timm.layers.StdConv2d):
    """timm's ``StdConv2d`` over a sharded input; same state-dict keys."""


class HaloStdConv2dSame(_StdConvTwin, HaloConv2d, timm.layers.StdConv2dSame):
    """timm's ``StdConv2dSame`` (TF "SAME" padding of the global image) over a sharded input."""


class HaloScaledStdConv2d(_StdConvTwin, HaloConv2d, timm.layers.ScaledStdConv2d):
    """timm's ``ScaledStdConv2d`` (standardised weight times ``gain * scale``) over a sharded input."""


class HaloScaledStdConv2dSame(_StdConvTwin, HaloConv2d, timm.layers.ScaledStdConv2dSame):
    """timm's ``ScaledStdConv2dSame`` over a sharded input."""


# --- group norm (BiT ResNetV2, and timm's GroupNorm / GroupNorm1 layers) ----------------------


def _adopt_norm(cls, module, mesh: SpatialMesh, name: str):
    return adopt(cls, module, mesh, name)


class HaloTimmGroupNorm(timm.layers.GroupNorm):
    """timm's ``GroupNorm`` with per-(sample, group) statistics over the whole sharded image
    (:mod:`halo.nn.group_norm`; timm's ``fast_norm`` autocast shortcut is not taken)."""

    from_module = classmethod(_adopt_norm)

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return group_norm_forward(self, x)


class HaloGroupNorm1(timm.layers.GroupNorm1):
    """timm's ``GroupNorm1`` (one group: every channel and pixel of a sample) over the whole image."""

    from_module = classmethod(_adopt_norm)

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return group_norm_forward(self, x)


class HaloGroupNormAct(timm.layers.GroupNormAct):
    """timm's ``GroupNormAct`` (group norm over the whole image, then drop, then activation); its
    ``drop`` and ``act`` children are checked by ``parallelize``."""

    from_module = classmethod(_adopt_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.act(self.drop(halo_op(group_norm_forward)(self, x)))


class HaloGroupNorm1Act(timm.layers.GroupNorm1Act):
    """timm's ``GroupNorm1Act`` over the whole image, then drop, then activation."""

    from_module = classmethod(_adopt_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.act(self.drop(halo_op(group_norm_forward)(self, x)))


# --- global pools inside SelectAdaptivePool2d (avg, max, avgmax, catavgmax; "fast" variants) ---


class _GlobalPoolTwin:
    """The avg and max parts are :func:`~halo.nn.global_avg_pool2d` and
    :func:`~halo.nn.global_max_pool2d` over the whole image (ties as one device breaks them),
    combined as timm combines them; the result is replicated, so ``SelectAdaptivePool2d``'s
    flatten and the classifier run on every rank alike."""

    #: how the (N, C, 1, 1) average and maximum combine: "avg", "max", "avgmax", "catavgmax"
    combine: str

    @classmethod
    def from_module(cls, module, mesh: SpatialMesh, name: str = "pool"):
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        size = getattr(module, "output_size", 1)
        if not is_global_size(size):
            raise HaloNotSupportedError(
                f"{name} ({kind}): output_size={size} depends on the global image size and is not sharded; "
                f"halo supports output_size=1 (global pooling)"
            )
        dims = getattr(module, "dim", getattr(module, "dim_reduce", (2, 3)))
        if tuple(dims) != (2, 3):
            raise HaloNotSupportedError(
                f"{name} ({kind}) pools over dims {dims} (input_fmt NHWC); halo shards NCHW blocks only"
            )
        return adopt(cls, module, mesh, name)

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        pooled = []
        if self.combine != "max":
            pooled.append(global_avg_pool2d(x, self.mesh))
        if self.combine != "avg":
            pooled.append(global_max_pool2d(x, self.mesh))
        if self.combine == "avgmax":  # timm: 0.5 * (avg + max), or 0.5 * avg + 0.5 * max ("fast")
            avg, peak = pooled
            out = 0.5 * avg + 0.5 * peak if getattr(self, "fast", False) else 0.5 * (avg + peak)
        elif self.combine == "catavgmax":
            out = torch.cat(pooled, 1)
        else:
            out = pooled[0]
        if getattr(self, "flatten", False) is True:  # the "fast" pools flatten themselves
            out = out.flatten(1)
        return mark_replicated(out)


class HaloAdaptiveAvgMaxPool2d(_GlobalPoolTwin, _pools.AdaptiveAvgMaxPool2d):
    """timm's ``AdaptiveAvgMaxPool2d(1)``: half the global average plus half the global maximum."""

    combine = "avgmax"


class HaloAdaptiveCatAvgMaxPool2d(_GlobalPoolTwin, _pools.AdaptiveCatAvgMaxPool2d):
    """timm's ``AdaptiveCatAvgMaxPool2d(1)``: global average and maximum, concatenated on channels."""

    combine = "catavgmax"


class HaloFastAdaptiveAvgPool(_GlobalPoolTwin, _pools.FastAdaptiveAvgPool):
    """timm's ``FastAdaptiveAvgPool``: the global mean."""

    combine, fast = "avg", True


class HaloFastAdaptiveMaxPool(_GlobalPoolTwin, _pools.FastAdaptiveMaxPool):
    """timm's ``FastAdaptiveMaxPool``: the global maximum."""

    combine, fast = "max", True


class HaloFastAdaptiveAvgMaxPool(_GlobalPoolTwin, _pools.FastAdaptiveAvgMaxPool):
    """timm's ``FastAdaptiveAvgMaxPool``: ``0.5 * mean + 0.5 * max``."""

    combine, fast = "avgmax", True


class HaloFastAdaptiveCatAvgMaxPool(_GlobalPoolTwin, _pools.FastAdaptiveCatAvgMaxPool):
    """timm's ``FastAdaptiveCatAvgMaxPool``: mean and max concatenated on channels."""

    combine, fast = "catavgmax", True
