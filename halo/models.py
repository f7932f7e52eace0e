"""Slide classifiers: a torchvision backbone trunk and a head over the sharded feature map.

``build_classifier(name, num_classes, head=..., weights=None)`` returns a
:class:`SlideClassifier`, an ordinary one-device model that :func:`halo.parallelize`
shards. The trunk is the backbone without its pooling and classifier, as an
``nn.Sequential`` of stages (the unit of activation checkpointing); the head pools the
whole slide (mean, max, gated attention, top-k instances) and classifies.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["SlideClassifier", "build_trunk", "build_classifier", "tiny_backbone", "HEADS", "total_stride"]


def tiny_backbone(width: int = 16, num_classes: int = 1000) -> nn.Module:
    """A small ResNet-like CNN (stride 16) for CPU runs: ``halo_tiny`` in configs."""

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )

    features = nn.Sequential(
        block(3, width, 2), block(width, 2 * width, 2), block(2 * width, 4 * width, 2), block(4 * width, 4 * width, 2)
    )
    model = nn.Sequential()
    model.features = features
    model.classifier = nn.Linear(4 * width, num_classes)
    return model


def _classifier_input(model: nn.Module) -> int:
    """Channels the backbone's classifier takes: its first Linear after the trunk."""
    for attr in ("fc", "classifier", "head", "heads"):
        part = getattr(model, attr, None)
        if isinstance(part, nn.Module):
            linears = [m for m in part.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[0].in_features
    raise ValueError(f"{type(model).__name__} has no Linear classifier to take the feature width from")


def build_trunk(model: nn.Module) -> tuple[nn.Sequential, int]:
    """The convolutional trunk of a torchvision classifier as stages, and its output channels."""
    channels = _classifier_input(model)
    if isinstance(model, torchvision.models.ResNet):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return nn.Sequential(stem, model.layer1, model.layer2, model.layer3, model.layer4), channels
    if isinstance(model, torchvision.models.RegNet):
        return nn.Sequential(model.stem, *model.trunk_output), channels
    if isinstance(model, torchvision.models.DenseNet):
        return nn.Sequential(*model.features, nn.ReLU()), channels
    if hasattr(model, "features") and isinstance(model.features, nn.Sequential):
        return nn.Sequential(*model.features), channels
    raise ValueError(
        f"do not know where the trunk of {type(model).__name__} ends; supported: ResNet/ResNeXt/Wide ResNet, "
        f"RegNet, DenseNet, MobileNet V2/V3, EfficientNet, VGG and models with a `features` Sequential"
    )


def total_stride(trunk: nn.Module) -> int:
    """Product of the strides of the trunk's convolutions and poolings along H."""
    stride = 1
    for m in trunk.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            s = m.stride if m.stride is not None else m.kernel_size
            stride *= s[0] if isinstance(s, tuple) else s
    return stride


class SlideClassifier(nn.Module):
    """Trunk stages, then a slide-level head.

    Parameters
    ----------
    trunk:
        Stages mapping ``(N, 3, H, W)`` to ``(N, C, H / s, W / s)``.
    head:
        Pools the feature map of the whole slide and returns ``(N, num_classes)``.
    checkpointing:
        Recompute each trunk stage in backward instead of keeping its activations.
    """

    def __init__(self, trunk: nn.Sequential, head: nn.Module, checkpointing: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.checkpointing = checkpointing

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.trunk:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _heads() -> dict[str, Callable[..., nn.Module]]:
    from halo.nn import heads

    return {
        "mean": heads.MeanHead,
        "max": heads.MaxHead,
        "attention": heads.GatedAttentionHead,
        "topk": heads.TopKHead,
    }


HEADS = ("mean", "max", "attention", "topk")


def _backbone(name: str) -> nn.Module:
    if name == "halo_tiny":
        return tiny_backbone()
    if name.startswith("halo_tiny"):
        return tiny_backbone(width=int(name.rsplit("_", 1)[1]))
    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError as e:
        raise ValueError(
            f"unknown model.name={name!r}: use a torchvision classification model name "
            f"(resnet18, resnet50, efficientnet_b0, ...) or halo_tiny[_WIDTH]"
        ) from e


def build_classifier(
    name: str,
    num_classes: int,
    *,
    head: str = "attention",
    head_options: dict | None = None,
    weights: str | os.PathLike[str] | None = None,
    checkpointing: bool = False,
) -> SlideClassifier:
    """A one-device slide classifier: ``name``'s trunk (with ``weights`` loaded) and a head.

    ``weights`` is a path to a state dict of the full torchvision model (e.g. ImageNet
    weights saved with ``torch.save(model.state_dict())``); nothing is downloaded.
    """
    backbone = _backbone(name)
    if weights:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.weights={path!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        trunk_missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
        if trunk_missing or unexpected:
            raise ValueError(
                f"model.weights={path!r} does not fit {name}: missing {trunk_missing[:5]}, unexpected {unexpected[:5]}"
            )
    trunk, channels = build_trunk(backbone)
    heads = _heads()
    if head not in heads:
        raise ValueError(f"unknown head.name={head!r}; choose one of {sorted(heads)}")
    return SlideClassifier(trunk, heads[head](channels, num_classes, **(head_options or {})), checkpointing)
