"""Layer families are swapped or refused by family, whatever the class: never run on a block.

A subclass of a layer halo treats by type (here batch norm, as timm's ``BatchNormAct2d``
is) must not be walked into as a container, and a batch norm called functionally inside
a module's forward must not normalise a block with the block's own statistics.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import halo
from equivalence import assert_exact, check_equivalence, expect_refusal
from halo.errors import HaloNotSupportedError


class BatchNormWithChildren(nn.BatchNorm2d):
    """A batch-norm subclass holding child modules, whose forward halo does not know."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class FunctionalBatchNorm(nn.Module):
    """A container that normalises with ``F.batch_norm`` in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.weight = nn.Parameter(torch.ones(4))
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(self.conv(x), None, None, self.weight, self.bias, training=True)
        return y.mean((2, 3))


class ConvSubclass(nn.Conv2d):
    """A convolution subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def refusals() -> list[str]:
    return [
        expect_refusal(lambda: nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormWithChildren(4)),
                 ["1 (", "BatchNormWithChildren", "BatchNorm2d"], run=False),
        expect_refusal(lambda: nn.Sequential(ConvSubclass(3, 4, 3, padding=1)), ["0 (", "ConvSubclass", "Conv2d"], run=False),
        expect_refusal(FunctionalBatchNorm, ["<model> calls batch_norm", "training"], run=True),
    ]


@pytest.mark.timeout(120)
def test_family_subclasses_and_functional_batch_norm_are_refused(pool2) -> None:
    pool2.run(refusals)


class EvalBatchNorm(nn.Module):
    """``F.batch_norm`` with running statistics in eval mode: per-channel affine, local."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(self.conv(x), self.mean, self.var, training=False)
        return self.fc(y.mean((2, 3)))


def run_eval_batch_norm(rows: int, cols: int) -> dict[str, float]:
    return check_equivalence(EvalBatchNorm, rows, cols, 8 * rows, 8 * cols)


@pytest.mark.timeout(120)
def test_eval_mode_functional_batch_norm_is_local_and_exact(pool2) -> None:
    assert_exact(pool2.run(run_eval_batch_norm, 1, 2))


def _pooled_batch_norm() -> nn.Module:
    """Batch norm on globally pooled features (SE gates in rexnet, SK attention): a replicated
    (N, C, 1, 1) tensor, whose statistics are over the images only, each counted once."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4, 3))


def run_pooled_batch_norm(rows: int, cols: int) -> dict[str, float]:
    return check_equivalence(_pooled_batch_norm, rows, cols, 8 * rows, 8 * cols, batch=2)


@pytest.mark.timeout(120)
def test_batch_norm_on_pooled_features(pool2, pool4) -> None:
    assert_exact(pool2.run(run_pooled_batch_norm, 1, 2))
    assert_exact(pool4.run(run_pooled_batch_norm, 1, 2))  # two image groups


def channels_last_refused() -> str:
    from halo.errors import HaloShapeError

    mesh = halo.SpatialMesh(1, 2)

    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.late = nn.Conv2d(4, 4, 1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x).permute(0, 2, 3, 1)  # (1, 8, 4, 4): spatial dims (1, 2)
            return self.bn(y).mean((1, 2))

    model = halo.parallelize(Bad(), mesh)
    try:
        model(torch.randn(1, 3, 8, 8))
    except (HaloShapeError, HaloNotSupportedError) as e:
        assert "spatial" in str(e) and "bn" in str(e), str(e)
        return str(e)
    raise AssertionError("batch norm on a channels-last block ran")


@pytest.mark.timeout(120)
def test_channels_last_block_into_a_channels_first_layer_is_refused(pool2) -> None:
    pool2.run(channels_last_refused)


class GateFirst(nn.Module):
    """A squeeze-and-excite gate written ``gate * x``: the replicated gate comes first, and the
    product is a block (the next convolution must exchange halos)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 4, 1)
        self.late = nn.Conv2d(4, 4, 3, padding=1)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        gate = torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        return self.out(self.late(gate * x).mean((2, 3)))


def run_gate_first(rows: int, cols: int) -> dict[str, float]:
    return check_equivalence(GateFirst, rows, cols, 8 * rows, 8 * cols)


@pytest.mark.timeout(120)
def test_replicated_gate_times_block_is_a_block(pool2) -> None:
    assert_exact(pool2.run(run_gate_first, 1, 2))
