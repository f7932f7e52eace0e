"""Every supported torchvision family, sharded, against one process: float64, rel. error < 1e-9."""

from __future__ import annotations

import pytest

from equivalence import assert_exact, check_equivalence
from models_zoo import MODELS

# Image sizes keep every block a multiple of the total stride 32 and the deepest global
# feature map at least 2 x 2 (batch norm needs two values per channel in training).


# EfficientNet and MobileNetV3 have 5x5 convolutions at stride 32: blocks of 2 there.
_DEEP_HALO = {"efficientnet_b0", "mobilenet_v3_small"}


def run_model(name: str, rows: int, cols: int, train: bool, steps: int = 1, lr: float = 0.0,
              overlap: bool = False) -> dict[str, float]:
    unit = 64 if name in _DEEP_HALO else 32
    size = unit * max(2 if unit == 32 else 1, rows), unit * max(2 if unit == 32 else 1, cols)
    return check_equivalence(MODELS[name], rows, cols, *size, train=train, steps=steps, lr=lr, overlap=overlap)



@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_two_ranks(pool2, name: str) -> None:
    for rows, cols in [(1, 2), (2, 1)]:
        assert_exact(pool2.run(run_model, name, rows, cols, True, timeout=500))
    assert_exact(pool2.run(run_model, name, 1, 2, False, timeout=500))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_four_ranks(pool4, name: str) -> None:
    assert_exact(pool4.run(run_model, name, 2, 2, True, timeout=500))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_model_deep_thin_blocks(pool4, name: str) -> None:
    assert_exact(pool4.run(run_model, name, 4, 1, True, timeout=500))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_model_one_rank(pool1, name: str) -> None:
    """A 1x1 mesh in a world of one (halo's single-rank paths) against plain torch, 3 SGD steps."""
    assert_exact(pool1.run(run_model, name, 1, 1, True, 3, 0.1, timeout=500))


@pytest.mark.timeout(600)
def test_optimizer_steps_match(pool4) -> None:
    """Three SGD steps on 2x2 leave the same weights and BN buffers as on one device."""
    assert_exact(pool4.run(run_model, "resnet18", 2, 2, True, 3, 0.1, timeout=500))


def _checkpointed_classifier():
    from halo.models import build_classifier

    return build_classifier("resnet18", 3, head="attention", checkpointing=True)


def run_checkpointed(rows: int, cols: int) -> dict[str, float]:
    return check_equivalence(_checkpointed_classifier, rows, cols, 64 * rows, 64 * cols, train=True)


@pytest.mark.timeout(600)
def test_activation_checkpointing_is_exact(pool4) -> None:
    """Recomputing trunk stages in backward redoes the halo exchanges: still the one-device numbers."""
    assert_exact(pool4.run(run_checkpointed, 2, 2, timeout=500))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_overlapped_convolutions_are_exact(pool4, name: str) -> None:
    assert_exact(pool4.run(run_model, name, 2, 2, True, 1, 0.0, True, timeout=500))
