"""timm's SAME-padded, weight-standardised, group-norm and global-pool layers, sharded, against one
process: float64, rel. error < 1e-9 on logits, input gradient, every parameter gradient and buffer.

Each layer runs in a small network (as ``models_zoo.LAYERS``); whole models only at the smallest
image sizes (total stride 32, a final feature map of at least 2 x 4 per image).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from equivalence import assert_exact, check_equivalence

timm = pytest.importorskip("timm")

from timm.layers import (  # noqa: E402
    Conv2dSame, GroupNorm, GroupNorm1, GroupNorm1Act, GroupNormAct, ScaledStdConv2d, ScaledStdConv2dSame,
    SelectAdaptivePool2d, StdConv2d, StdConv2dSame, create_conv2d, create_pool2d,
)
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame  # noqa: E402


def _head(channels: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3)]


def _net(*layers: nn.Module, channels: int = 4) -> nn.Sequential:
    return nn.Sequential(*layers, *_head(channels))


def _pooled(pool_type: str, relu: bool = True) -> nn.Sequential:
    # ReLU zeros tie in the global maximum: one device's first maximum must win on every rank
    feat = 8 if pool_type.endswith("catavgmax") else 4
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *([nn.ReLU()] if relu else []),
                         SelectAdaptivePool2d(pool_type=pool_type, flatten=True), nn.Linear(feat, 3))


LAYERS = {
    # TF "SAME": (before, after) padding of the global image, P = d (k - 1) + 1 - s
    "conv_same_k3s2": lambda: _net(Conv2dSame(3, 4, 3, stride=2)),  # (0, 1)
    "conv_same_k5s2": lambda: _net(Conv2dSame(3, 4, 5, stride=2, bias=False)),  # (1, 2)
    "conv_same_k4s1": lambda: _net(Conv2dSame(3, 4, 4)),  # (1, 2): even kernel
    "conv_same_k3s2_dilated": lambda: _net(Conv2dSame(3, 4, 3, stride=2, dilation=2)),  # (1, 2)
    "conv_same_k1s2": lambda: _net(Conv2dSame(3, 4, 1, stride=2)),  # (0, 0): the last row unread
    "conv_same_k2s2": lambda: _net(Conv2dSame(3, 4, 2, stride=2)),  # (0, 0)
    "conv_same_depthwise_k5s2": lambda: _net(nn.Conv2d(3, 4, 1), create_conv2d(4, 4, 5, stride=2, padding="same",
                                                                                depthwise=True)),
    "conv_same_rect": lambda: _net(Conv2dSame(3, 4, (3, 5), stride=(2, 1))),  # rows (0, 1), columns (2, 2)
    "maxpool_same_k3s2": lambda: _net(nn.Conv2d(3, 4, 1), nn.ReLU(), MaxPool2dSame(3, 2)),
    "maxpool_same_k2s1": lambda: _net(nn.Conv2d(3, 4, 1), MaxPool2dSame(2, 1)),
    "maxpool_same_k3s1": lambda: _net(nn.Conv2d(3, 4, 1), MaxPool2dSame(3, 1)),  # (1, 1): symmetric
    "avgpool_same_k3s2": lambda: _net(nn.Conv2d(3, 4, 1), AvgPool2dSame(3, 2)),
    # timm's avg_down at dilation > 1: counts the padded zeros although count_include_pad=False
    "avgpool_same_k2s1_excl": lambda: _net(nn.Conv2d(3, 4, 1), AvgPool2dSame(2, 1, ceil_mode=True,
                                                                                count_include_pad=False)),
    # weight standardisation
    "stdconv": lambda: _net(StdConv2d(3, 4, 3)),
    "stdconv7x7s2": lambda: _net(StdConv2d(3, 4, 7, stride=2, eps=1e-8)),
    "stdconv_same_k3s2": lambda: _net(StdConv2dSame(3, 4, 3, stride=2)),
    "stdconv_same_k3s1": lambda: _net(StdConv2dSame(3, 4, 3, stride=1, bias=True)),  # static padding 1
    "scaled_stdconv": lambda: _net(ScaledStdConv2d(3, 4, 3, gamma=1.7, gain_init=0.8)),
    "scaled_stdconv_same": lambda: _net(ScaledStdConv2dSame(3, 4, 3, stride=2)),
    # group norm: statistics per (sample, group) over the whole image
    "groupnorm": lambda: _net(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU()),
    "groupnorm_noaffine": lambda: _net(nn.Conv2d(3, 4, 1), nn.GroupNorm(4, 4, affine=False), nn.Conv2d(4, 4, 3, padding=1)),
    "groupnorm_timm": lambda: _net(nn.Conv2d(3, 4, 3, padding=1), GroupNorm(4, num_groups=2)),
    "groupnorm1": lambda: _net(nn.Conv2d(3, 4, 3, padding=1), GroupNorm1(4)),
    "groupnorm_act": lambda: _net(nn.Conv2d(3, 4, 3, padding=1), GroupNormAct(4, num_groups=2)),
    "groupnorm1_act": lambda: _net(nn.Conv2d(3, 4, 3, padding=1), GroupNorm1Act(4, act_layer=nn.SiLU)),
    # BiT's stem: an explicit pad folded into the max pooling that follows it
    "pad_maxpool": lambda: _net(nn.Conv2d(3, 4, 3, padding=1), nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 2)),
    "pad_relu_maxpool": lambda: _net(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                     nn.Sequential(nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 2))),
    "pad_asym_maxpool": lambda: _net(nn.Conv2d(3, 4, 1), nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2)),
    "pad_value_maxpool": lambda: _net(nn.Conv2d(3, 4, 1), nn.ConstantPad2d((2, 0, 1, 1), 0.25), nn.MaxPool2d(3, 1)),
    # global pooling inside SelectAdaptivePool2d, and its flatten
    **{f"select_{p}": functools.partial(_pooled, p)
       for p in ("avg", "max", "avgmax", "catavgmax", "fast", "fastmax", "fastavgmax", "fastcatavgmax")},
    "select_max_no_ties": lambda: _pooled("max", relu=False),
}

# group norm has no running statistics: eval mode must give the same whole-image statistics
BOTH_MODES = {n for n in LAYERS if "groupnorm" in n}
NO_BANDS = {n for n in LAYERS if "select" in n or "groupnorm" in n}


def run_layer(name: str, rows: int, cols: int, train: bool, h: int, w: int, method: str = "auto") -> dict:
    return check_equivalence(LAYERS[name], rows, cols, h, w, train=train, method=method)


@pytest.mark.timeout(300)
def test_layers_two_ranks(pool2) -> None:
    for name in sorted(LAYERS):
        for train in (True, False) if name in BOTH_MODES else (True,):
            for rows, cols in ((1, 2), (2, 1)):
                assert_exact(pool2.run(run_layer, name, rows, cols, train, 16 * rows, 16 * cols))


@pytest.mark.timeout(300)
def test_layers_four_ranks(pool4) -> None:
    """2x2, and 1x2 with two images (group norm's statistics are per sample: the data group
    must stay out of them)."""
    for name in sorted(LAYERS):
        for rows, cols in ((2, 2), (1, 2)):
            assert_exact(pool4.run(run_layer, name, rows, cols, True, 8 * rows, 12 * cols))


@pytest.mark.timeout(300)
def test_layers_on_one_rank(pool1) -> None:
    """A 1x1 mesh in a world of one: the twins' single-rank paths give the one-device numbers."""
    for name in sorted(LAYERS):
        assert_exact(pool1.run(run_layer, name, 1, 1, True, 16, 12))


@pytest.mark.timeout(300)
def test_window_methods_and_thin_blocks(pool2) -> None:
    """Both ways of convolving and max pooling a block (its own op corrected on the border
    bands, or the assembled extended block), on blocks as narrow as the widest halo."""
    for name in sorted(n for n in LAYERS if n not in NO_BANDS):
        for method in ("bands", "assemble"):
            assert_exact(pool2.run(run_layer, name, 1, 2, True, 8, 8, method))
    for name in ("conv_same_k5s2", "conv_same_k4s1", "maxpool_same_k3s2", "pad_maxpool", "conv_same_k3s2_dilated"):
        assert_exact(pool2.run(run_layer, name, 2, 1, True, 4, 8))  # blocks of 2 rows


def test_create_conv2d_same_picks_static_padding_where_it_can() -> None:
    """timm's ``padding="same"`` is an nn.Conv2d with symmetric padding at stride 1 and even
    reach (a twin halo already has), Conv2dSame otherwise."""
    static = create_conv2d(3, 4, 3, padding="same")
    assert type(static) is nn.Conv2d and static.padding == (1, 1)
    assert type(create_conv2d(3, 4, 5, stride=1, dilation=2, padding="same")) is nn.Conv2d
    for kwargs in ({"stride": 2}, {"kernel_size": 4}):
        conv = create_conv2d(3, 4, **{"kernel_size": 3, **kwargs}, padding="same")
        assert type(conv) is Conv2dSame, conv
    assert type(create_pool2d("max", 3, 2, padding="same")) is MaxPool2dSame
    assert type(create_pool2d("avg", 3, 2, padding="same")) is AvgPool2dSame
    assert type(create_pool2d("max", 3, 1, padding="same")) is nn.MaxPool2d


def _refusal(build, *needles: str) -> str:
    from distributed import shared_mesh

    import halo
    from halo.errors import HaloNotSupportedError

    try:
        halo.parallelize(build(), shared_mesh(1, 2))
    except HaloNotSupportedError as err:
        msg = str(err)
        missing = [n for n in needles if n not in msg]
        assert not missing, f"message lacks {missing}: {msg}"
        return msg
    raise AssertionError(f"{needles}: nothing refused")


def _reflect(conv: nn.Conv2d) -> nn.Conv2d:
    conv.padding_mode = "reflect"  # timm's Conv2dSame takes no padding_mode argument
    return conv


def refusals() -> list[str]:
    from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool

    conv = functools.partial(nn.Conv2d, 3, 4, 3, padding=1)
    return [
        _refusal(lambda: nn.Sequential(conv(), SelectAdaptivePool2d(output_size=2, pool_type="avgmax")),
                 "1.pool (timm.layers.adaptive_avgmax_pool.AdaptiveAvgMaxPool2d)", "output_size=2",
                 "output_size=1"),
        _refusal(lambda: nn.Sequential(conv(), SelectAdaptivePool2d(output_size=2, pool_type="catavgmax")),
                 "1.pool", "AdaptiveCatAvgMaxPool2d", "output_size=2"),
        _refusal(lambda: nn.Sequential(conv(), SelectAdaptivePool2d(output_size=3, pool_type="avg")),
                 "1.pool (AdaptiveAvgPool2d)", "output_size=3"),
        _refusal(lambda: nn.Sequential(conv(), FastAdaptiveAvgPool(input_fmt="NHWC")), "1 (", "NHWC"),
        _refusal(lambda: nn.Sequential(conv(), nn.ConstantPad2d(1, 0.0), nn.Conv2d(4, 4, 3)),
                 "1 (torch.nn.modules.padding.ConstantPad2d)", "MaxPool2d with padding=0", "got Conv2d"),
        _refusal(lambda: nn.Sequential(conv(), nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 2, 1)),
                 "1 + 2 (ConstantPad2d + MaxPool2d)", "padding=1"),
        _refusal(lambda: nn.Sequential(conv(), nn.ConstantPad2d(2, 0.0), nn.MaxPool2d(3, 2)),
                 "1 + 2 (ConstantPad2d + MaxPool2d)", "padding (2, 2)", "does not map"),
        _refusal(lambda: nn.Sequential(conv(), nn.ReflectionPad2d(1), nn.MaxPool2d(3, 2)),
                 "1 (torch.nn.modules.padding.ReflectionPad2d)"),
        _refusal(lambda: nn.Sequential(conv(), nn.InstanceNorm2d(4)), "1 (torch.nn.modules.instancenorm.InstanceNorm2d)"),
        _refusal(lambda: nn.Sequential(_reflect(Conv2dSame(3, 4, 3, 2))), "0 (Conv2dSame)", "padding_mode='reflect'"),
    ]


@pytest.mark.timeout(120)
def test_what_is_refused_is_named(pool2) -> None:
    pool2.run(refusals)


# ----------------------------------------------------------------------------- whole models

# name: (create_model kwargs, image unit per rank); the tf_ models' 5x5 stride-2 convs at
# stride 16 pad (1, 2) and need 2 rows of halo: 64 per rank. The tf_ models are built of
# Conv2dSame (stride 2) and nn.Conv2d (stride 1, which "same" pads symmetrically); BiT of
# StdConv2d, GroupNormAct and the ConstantPad2d + MaxPool2d stem.
MODELS: dict[str, tuple[dict, int]] = {
    "tf_efficientnet_lite0": ({}, 64),
    "tf_efficientnet_b0": ({}, 64),
    "tf_mobilenetv3_small_100": ({}, 64),
    "resnetv2_50x1_bit": ({}, 32),
}


def build_model(name: str) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=3, **MODELS[name][0])


def image_size(name: str, rows: int, cols: int) -> tuple[int, int]:
    """At least 2 x 4 final features per image, a multiple of the unit per rank."""
    unit = MODELS[name][1]
    return unit * max(rows, -(-64 // unit)), unit * max(cols, -(-128 // unit))


def run_model(name: str, rows: int, cols: int) -> dict[str, float]:
    h, w = image_size(name, rows, cols)
    return check_equivalence(functools.partial(build_model, name), rows, cols, h, w)


def swapped_model(name: str) -> tuple[bool, list[str]]:
    """Whether parallelize keeps every state-dict key, and which twin types it put in."""
    from distributed import shared_mesh

    import halo

    model = build_model(name)
    keys = list(model.state_dict())
    halo.parallelize(model, shared_mesh(1, 2))
    return list(model.state_dict()) == keys, sorted({type(m).__name__ for m in model.modules()
                                                    if type(m).__module__.startswith("halo")})


@pytest.mark.timeout(120)
def test_models_keep_state_dict_keys(pool2) -> None:
    same, kinds = pool2.run(swapped_model, "resnetv2_50x1_bit")[0]
    assert same and {"HaloStdConv2d", "HaloGroupNormAct", "HaloPaddedMaxPool2d", "FoldedPad"} <= set(kinds), kinds
    same, kinds = pool2.run(swapped_model, "tf_efficientnet_b0")[0]
    assert same and {"HaloConv2dSame", "HaloConv2d", "HaloBatchNormAct2d"} <= set(kinds), kinds


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_two_ranks(pool2, name: str) -> None:
    for rows, cols in ((1, 2), (2, 1)):
        assert_exact(pool2.run(run_model, name, rows, cols, timeout=500))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_four_ranks(pool4, name: str) -> None:
    assert_exact(pool4.run(run_model, name, 2, 2, timeout=500))
