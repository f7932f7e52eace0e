"""timm backbones, sharded, against one process: float64, rel. error < 1e-9, or refused.

Image sizes keep every block a multiple of the total stride 32 and the final feature map
at least 2 x 4 per image (train-mode batch norm over fewer values amplifies rounding).
"""

from __future__ import annotations

import pytest

from equivalence import assert_exact, check_equivalence

timm = pytest.importorskip("timm")

# name: (create_model kwargs, image unit per rank): deep 5x5 convs at stride 32 need 64
TIMM_MODELS: dict[str, tuple[dict, int]] = {
    "resnet18": ({}, 32),
    "resnet18d": ({}, 32),
    "efficientnet_b0": ({}, 64),
    "mobilenetv3_small_100": ({}, 64),
    "regnetx_002": ({}, 32),
    "cspresnet50": ({}, 32),
    "densenet121": ({}, 32),
}


def build_timm(name: str):
    kwargs = TIMM_MODELS[name][0]
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)


def image_size(name: str, rows: int, cols: int) -> tuple[int, int]:
    """At least 2 x 4 final features per image, a multiple of the unit per rank."""
    unit = TIMM_MODELS[name][1]
    least_h, least_w = 64, 128
    return unit * max(rows, -(-least_h // unit)), unit * max(cols, -(-least_w // unit))


def run_timm(name: str, rows: int, cols: int, train: bool = True) -> dict[str, float]:
    import functools

    h, w = image_size(name, rows, cols)
    return check_equivalence(functools.partial(build_timm, name), rows, cols, h, w, train=train)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
@pytest.mark.parametrize("mesh", ["1x2", "2x1"])
def test_timm_two_ranks(pool2, name: str, mesh: str) -> None:
    rows, cols = map(int, mesh.split("x"))
    assert_exact(pool2.run(run_timm, name, rows, cols, timeout=800))
