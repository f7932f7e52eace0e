"""A trunk's output stride is the ratio of input to output size, not the product of every stride.

Residual shortcuts repeat the main path's stride (a ResNet has 8 strided convolutions and a
stride-2 pool on its way to stride 32), so multiplying them pads each slide 8-16x too much.
"""

from __future__ import annotations

import pytest

from halo.models import build_classifier, total_stride


@pytest.mark.parametrize("name, stride", [
    ("resnet18", 32), ("resnet50", 32), ("regnet_y_400mf", 32), ("efficientnet_b0", 32), ("densenet121", 32),
    ("mnasnet0_5", 32), ("shufflenet_v2_x0_5", 32), ("halo_tiny", 16), ("timm:efficientnet_b0", 32),
    ("timm:resnetv2_50x1_bit", 32),
])
def test_total_stride_is_the_output_stride(name: str, stride: int) -> None:
    model = build_classifier(name, 2, head="mean")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert total_stride(model.trunk) == stride
    after = model.state_dict()  # the probe leaves weights and running statistics alone
    assert all((before[k] == after[k]).all() for k in before)
