"""Bad input gets a clear error on every rank, before anything hangs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import halo
from halo.errors import HaloNotSupportedError, HaloShapeError


def _expect(fn, exc: type[BaseException], *needles: str) -> str:
    try:
        fn()
    except exc as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        if missing:
            raise AssertionError(f"message lacks {missing}: {msg}") from e
        return msg
    raise AssertionError(f"no {exc.__name__} raised")


class Resize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=2)


class FlattenBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


class SpatialMax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).max(dim=3).values


class Crop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y[:, :2, ...][..., 1:-1, :].mean((2, 3))


class ElementDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.dropout(self.conv(x), 0.5, training=True).mean((2, 3))


def errors_on_ranks() -> list[str]:
    mesh = halo.SpatialMesh(1, 2)
    messages = []
    # block not a multiple of a layer's stride: names the layer, the size and the multiple
    model = halo.parallelize(nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1)), mesh)
    messages.append(_expect(lambda: model(torch.randn(1, 3, 8, 6)), HaloShapeError, "1 (Conv2d)", "W = 3", "stride 2"))
    # halo wider than the block
    wide = halo.parallelize(nn.Sequential(nn.Conv2d(3, 4, 7, padding=3)), mesh)
    messages.append(_expect(lambda: wide(torch.randn(1, 3, 8, 2)), HaloShapeError, "0 (Conv2d)", "halo of 3", "only 2"))
    # unsupported modules, at parallelize time
    for bad, needle in [
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.Upsample(scale_factor=2)), "1 (torch.nn.modules.upsampling.Upsample)"),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4)), "1 (torch.nn.modules.instancenorm.InstanceNorm2d)"),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(7)), "output_size=7"),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=0)), "does not map an input"),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), "padding_mode='reflect'"),
        (nn.Sequential(nn.MaxPool2d(3, 2, 1, ceil_mode=True)), "ceil_mode=True"),
    ]:
        messages.append(_expect(lambda: halo.parallelize(bad, mesh), HaloNotSupportedError, needle))
    # functional ops that the module swap cannot see
    for bad, needle in [
        (Resize(), "<model> calls interpolate"),
        (FlattenBlock(), "calls flatten"),
        (SpatialMax(), "calls max"),
        (ElementDropout(), "calls dropout"),
        (Crop(), "calls indexing"),
    ]:
        model = halo.parallelize(bad, mesh)
        messages.append(_expect(lambda: model(torch.randn(1, 3, 8, 4)), HaloNotSupportedError, needle))
    return messages


def mesh_not_dividing_world() -> str:
    return _expect(lambda: halo.SpatialMesh(3, 1), ValueError, "3 x 1 = 3 does not divide the world size 4")


@pytest.mark.timeout(120)
def test_bad_input_is_refused_clearly(pool2) -> None:
    messages = pool2.run(errors_on_ranks)
    assert len(messages[0]) == 13  # every refusal above was raised, with its needles (see _expect)
    assert messages[0] == messages[1]  # both ranks refuse alike: neither goes on into a collective


@pytest.mark.timeout(120)
def test_mesh_must_divide_world(pool4) -> None:
    pool4.run(mesh_not_dividing_world)


def test_mesh_needs_distributed() -> None:
    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        halo.SpatialMesh(1, 2)
