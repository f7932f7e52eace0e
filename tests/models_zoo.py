"""Small networks for the equivalence tests: one per layer kind, plus torchvision families."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def head(channels: int, classes: int = 3) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]


LAYERS = {
    # name: builder of a small network around the layer under test
    "conv3x3": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), *head(4)),
    "conv_nobias": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), *head(4)),
    "conv7x7s2": lambda: nn.Sequential(nn.Conv2d(3, 4, 7, stride=2, padding=3), *head(4)),
    "conv1x1s2": lambda: nn.Sequential(nn.Conv2d(3, 4, 1, stride=2), *head(4)),
    "conv5x5s4": lambda: nn.Sequential(nn.Conv2d(3, 4, 5, stride=4, padding=2), *head(4)),
    "conv_dilated": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2), *head(4)),
    "conv_grouped": lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), *head(6)),
    "conv_depthwise": lambda: nn.Sequential(nn.Conv2d(4, 4, 5, stride=2, padding=2, groups=4), *head(4)),
    "conv_rect": lambda: nn.Sequential(nn.Conv2d(3, 4, (3, 5), stride=(1, 2), padding=(1, 2)), *head(4)),
    "conv_same": lambda: nn.Sequential(nn.Conv2d(3, 4, 4, padding="same"), *head(4)),
    "conv_stride2_pad0_k2": lambda: nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), *head(4)),
    "maxpool3s2": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(3, 2, 1), *head(4)),
    # ReLU zeros tie inside windows: the first maximum in scan order must win on every rank
    "maxpool_relu": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), *head(4)),
    "maxpool2": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(2), *head(4)),
    "maxpool_dilated": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(3, 4, 1, dilation=2), *head(4)),
    "avgpool3s1_incl": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.AvgPool2d(3, 1, 1), *head(4)),
    "avgpool3s2_excl": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.AvgPool2d(3, 2, 1, count_include_pad=False), *head(4)),
    "avgpool2": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.AvgPool2d(2), *head(4)),
    "batchnorm": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), *head(4)),
    "batchnorm_cma": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None), nn.ReLU(), *head(4)),
    "batchnorm_noaffine": lambda: nn.Sequential(nn.BatchNorm2d(3, affine=False), nn.ReLU(), nn.Conv2d(3, 4, 1), *head(4)),
    "global_max": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
    "dropout2d": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Dropout2d(0.5), *head(4)),
    "pointwise": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU(), nn.Hardswish(), nn.GELU(), nn.PReLU(4), *head(4)),
}


class SqueezeExcite(nn.Module):
    """Global pooling inside the network, with a functional call."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Conv2d(c, c, 1)
        self.out = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        s = torch.sigmoid(self.fc(nn.functional.adaptive_avg_pool2d(x, 1)))
        x = torch.relu(x * s)
        return self.out(x.mean((2, 3)))


LAYERS["squeeze_excite_functional"] = lambda: SqueezeExcite(4)


def _tv(name: str, **kwargs):
    return lambda: getattr(torchvision.models, name)(num_classes=3, **kwargs)


MODELS = {
    "resnet18": _tv("resnet18"),
    "resnet50": _tv("resnet50"),
    "resnext50_32x4d": _tv("resnext50_32x4d"),
    "wide_resnet50_2": _tv("wide_resnet50_2"),
    "mobilenet_v2": _tv("mobilenet_v2", width_mult=0.25),
    "mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "efficientnet_b0": _tv("efficientnet_b0"),
    "regnet_y_400mf": _tv("regnet_y_400mf"),
    "densenet121": _tv("densenet121"),
    "shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),  # channel shuffle: views and transposes of channels
}
