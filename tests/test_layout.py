"""Backbones that permute, view and normalise over channels, sharded, against one process.

ConvNeXt (torchvision's and timm's) permutes blocks to channels-last for its layer norm and
MLP; ShuffleNet V2 views channels into groups and transposes them. The guard follows which
dims of a block are its spatial ones: float64, rel. error < 1e-9 on logits, input gradient,
every parameter gradient and buffer, on 1x2, 2x1 and 2x2. Layer norms, linear maps,
softmax, reductions and reshapes that touch a spatial dim are refused, naming the module.

Image sizes: total stride 32; ConvNeXt's 7x7 depthwise convolutions at stride 32 need a
halo of 3, so a block of 4 there (128 pixels per rank); a final map of at least 2 x 4.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

import halo
from equivalence import assert_exact, check_equivalence, expect_refusal
from halo.errors import HaloNotSupportedError

timm = pytest.importorskip("timm")


def small_convnext() -> nn.Module:
    """torchvision's ConvNeXt classes (CNBlock, Permute, LayerNorm, LayerNorm2d, StochasticDepth)
    at a quarter of convnext_tiny's width and one block per stage."""
    setting = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, 128, 1),
               CNBlockConfig(128, None, 1)]
    return ConvNeXt(setting, stochastic_depth_prob=0.5, num_classes=3)


MODELS = {
    # name: (builder, image unit per rank)
    "tv_convnext_small_config": (small_convnext, 128),
    "tv_shufflenet_v2_x0_5": (functools.partial(torchvision.models.shufflenet_v2_x0_5, num_classes=3), 32),
    "timm_convnext_atto": (functools.partial(timm.create_model, "convnext_atto", num_classes=3), 128),
    "timm_convnext_atto_linear_mlp": (
        functools.partial(timm.create_model, "convnext_atto", num_classes=3, conv_mlp=False), 128),
    "timm_convnext_atto_rms": (functools.partial(timm.create_model, "convnext_atto_rms", num_classes=3), 128),
    "timm_convnext_zepto_rms": (functools.partial(timm.create_model, "convnext_zepto_rms", num_classes=3), 128),
}


def image_size(unit: int, rows: int, cols: int) -> tuple[int, int]:
    """At least 2 x 4 final features per image, a multiple of the unit per rank."""
    return unit * max(rows, -(-64 // unit)), unit * max(cols, -(-128 // unit))


def run_model(name: str, rows: int, cols: int, train: bool = True) -> dict[str, float]:
    build, unit = MODELS[name]
    return check_equivalence(build, rows, cols, *image_size(unit, rows, cols), train=train)


def run_convnext_tiny(rows: int, cols: int) -> dict[str, float]:
    build = functools.partial(torchvision.models.convnext_tiny, num_classes=3)
    return check_equivalence(build, rows, cols, *image_size(128, rows, cols))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mesh", [(1, 2), (2, 1)])
def test_layout_models_two_ranks(pool2, mesh: tuple[int, int]) -> None:
    for name in MODELS:
        assert_exact(pool2.run(run_model, name, *mesh, timeout=500))


@pytest.mark.timeout(600)
def test_layout_models_four_ranks(pool4) -> None:
    for name in ("tv_convnext_small_config", "tv_shufflenet_v2_x0_5", "timm_convnext_atto_linear_mlp"):
        assert_exact(pool4.run(run_model, name, 2, 2, timeout=500))


@pytest.mark.timeout(600)
def test_layout_models_eval_mode(pool2) -> None:
    for name in ("tv_convnext_small_config", "tv_shufflenet_v2_x0_5"):
        assert_exact(pool2.run(run_model, name, 1, 2, False, timeout=500))


@pytest.mark.timeout(600)
def test_torchvision_convnext_tiny(pool2) -> None:
    assert_exact(pool2.run(run_convnext_tiny, 1, 2, timeout=500))


# -- what the guard follows, and what it refuses -------------------------------------------


class ChannelsLast(nn.Module):
    """Permutes to (N, H, W, C) and back, calling ``op`` on the channels-last block."""

    def __init__(self, op) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)
        return self.fc(self.op(self, y))


def _mean_hw(m, y):  # global mean over the spatial dims of a channels-last block: routed
    return y.mean((1, 2))


def _channel_ops(m, y):  # per pixel: exact
    y = F.softmax(m.norm(y), dim=-1) + y.amax(-1, keepdim=True)
    y = torch.cat(y.chunk(2, dim=3), dim=-1).movedim(3, 1).contiguous().view(y.shape[0], 4, *y.shape[1:3])
    return y.transpose(1, 3).transpose(1, 2)[:, :, :, None].squeeze(3).mean((1, 2))


def _timm_norm_act() -> nn.Module:
    """timm's LayerNormAct2d on (N, C, H, W), then LayerNormAct and nn.RMSNorm on channels-last, then
    back; after global pooling timm's LayerNorm2d on the replicated features."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), timm.layers.LayerNormAct2d(4, act_layer="gelu"),
                         torchvision.ops.Permute([0, 2, 3, 1]), timm.layers.LayerNormAct(4, act_layer="relu"),
                         nn.RMSNorm(4),
                         torchvision.ops.Permute([0, 3, 1, 2]), nn.Conv2d(4, 4, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), timm.layers.LayerNorm2d(4), nn.Flatten(), nn.Linear(4, 3))


LAYOUT_NETS = {
    "mean_hw": functools.partial(ChannelsLast, _mean_hw),
    "channel_ops": functools.partial(ChannelsLast, _channel_ops),
    "timm_norm_act": _timm_norm_act,
}


def run_layout_net(name: str, rows: int, cols: int) -> dict[str, float]:
    return check_equivalence(LAYOUT_NETS[name], rows, cols, 8 * rows, 8 * cols)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(LAYOUT_NETS))
def test_channels_last_ops_are_exact(pool2, pool4, name: str) -> None:
    for pool, mesh in ((pool2, (1, 2)), (pool2, (2, 1)), (pool4, (2, 2))):
        assert_exact(pool.run(run_layout_net, name, *mesh))


class LayerNormOverNCHW(nn.Module):
    """nn.LayerNorm over W on an (N, C, H, W) block: normalises over a spatial dim."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).mean((2, 3))


class Shuffle(nn.Module):
    """A view that merges H into the channels, then one that splits W."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.view(y.shape[0], *self.shape).mean(-1)


def refusals() -> list[str]:
    def on_channels_last(op):
        return functools.partial(ChannelsLast, op)

    return [
        expect_refusal(LayerNormOverNCHW, ["norm (torch.nn.modules.normalization.LayerNorm)", "(1, 4, 8, 4)",
                                     "spatial dims are (2, 3)", "over channels only"]),
        expect_refusal(lambda: nn.Sequential(nn.Conv2d(3, 4, 1), timm.layers.LayerNorm(4), nn.AdaptiveAvgPool2d(1)),
                 ["1 (timm.layers.norm.LayerNorm)", "dims (3,)"]),
        expect_refusal(lambda: nn.Sequential(nn.Conv2d(3, 8, 1), torchvision.ops.Permute([0, 2, 3, 1]),
                                       torchvision.models.convnext.LayerNorm2d(8)),
                 ["2 (torchvision.models.convnext.LayerNorm2d)", "dims (1,)", "spatial dims are (1, 2)"]),
        expect_refusal(on_channels_last(lambda m, y: F.layer_norm(y, y.shape[-2:])), ["calls layer_norm", "(1, 2)"]),
        expect_refusal(on_channels_last(lambda m, y: F.softmax(y, dim=2).mean((1, 2))), ["calls softmax"]),
        expect_refusal(on_channels_last(lambda m, y: y.sum(1)), ["calls sum", "reduces over the spatial"]),
        expect_refusal(on_channels_last(lambda m, y: F.linear(y.transpose(2, 3), torch.ones(3, 2))), ["calls linear"]),
        expect_refusal(on_channels_last(lambda m, y: y[:, 1:].mean((1, 2))), ["calls indexing"]),
        expect_refusal(on_channels_last(lambda m, y: torch.cat([y, y], 2).mean((1, 2))), ["calls cat"]),
        expect_refusal(on_channels_last(lambda m, y: y.chunk(2, 1)[0].mean((1, 2))), ["calls chunk"]),
        expect_refusal(on_channels_last(lambda m, y: y.repeat(1, 2, 1, 1).mean((1, 2))), ["calls repeat"]),
        expect_refusal(on_channels_last(lambda m, y: y @ torch.ones(4, 4, 8)), ["calls matmul"]),
        expect_refusal(functools.partial(Shuffle, (32, 4)), ["calls view", "moves or merges"]),
        expect_refusal(functools.partial(Shuffle, (4, 4, 2, 4)), ["calls view"]),
    ]


@pytest.mark.timeout(120)
def test_spatial_ops_on_permuted_blocks_are_refused(pool2) -> None:
    pool2.run(refusals)


def run_shufflenet_one_pixel_blocks() -> dict[str, float]:
    """ShuffleNet's channel shuffle on 1 x 1 blocks (its last stage on 2x2 at 64 x 64): both
    size-1 spatial dims must be followed through the 5-D view and back."""
    import torchvision

    return check_equivalence(lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=3), 2, 2, 64, 64)


@pytest.mark.timeout(300)
def test_channel_shuffle_on_one_pixel_blocks(pool4) -> None:
    assert_exact(pool4.run(run_shufflenet_one_pixel_blocks, timeout=250))
