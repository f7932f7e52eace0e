"""Drop-in layers for spatially sharded images: each subclasses its torch twin."""

from halo.nn.conv import HaloConv1d, HaloConv2d, halo_conv2d
from halo.nn.global_pool import (
    HaloAdaptiveAvgPool2d,
    HaloAdaptiveMaxPool2d,
    global_avg_pool2d,
    global_max_pool2d,
    global_sum,
)
from halo.nn.heads import GatedAttentionHead, MaxHead, MeanHead, SlideHead, TopKHead
from halo.nn.norm import HaloBatchNorm2d
from halo.nn.pool import HaloAvgPool2d, HaloMaxPool2d

__all__ = [
    "HaloConv2d",
    "HaloConv1d",
    "HaloMaxPool2d",
    "HaloAvgPool2d",
    "HaloBatchNorm2d",
    "HaloAdaptiveAvgPool2d",
    "HaloAdaptiveMaxPool2d",
    "halo_conv2d",
    "global_avg_pool2d",
    "global_max_pool2d",
    "global_sum",
    "SlideHead",
    "MeanHead",
    "MaxHead",
    "GatedAttentionHead",
    "TopKHead",
]
