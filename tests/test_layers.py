"""Every sharded layer against the same layer on one process, float64, rel. error < 1e-9."""

from __future__ import annotations

import pytest

from equivalence import assert_exact, check_equivalence
from models_zoo import LAYERS

MESHES2 = [(1, 2), (2, 1)]


def run_layer(name: str, rows: int, cols: int, train: bool, h: int, w: int, overlap: bool = False) -> dict[str, float]:
    return check_equivalence(LAYERS[name], rows, cols, h, w, channels=4 if "group" in name or "depthwise" in name else 3,
                             train=train, overlap=overlap)



@pytest.mark.timeout(300)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_two_ranks(pool2, name: str, train: bool) -> None:
    for rows, cols in MESHES2:
        assert_exact(pool2.run(run_layer, name, rows, cols, train, 16 * rows, 16 * cols))


@pytest.mark.timeout(300)
def test_layers_on_one_rank(pool1) -> None:
    """A 1x1 mesh in a world of one: halo's layers take their single-rank paths (native
    padding, batch norm's fused training backward) and still give the one-device numbers."""
    for name in sorted(LAYERS):
        for train in (True, False):
            assert_exact(pool1.run(run_layer, name, 1, 1, train, 16, 12))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_four_ranks(pool4, name: str) -> None:
    # 2x2; 4x1 (deep, thin blocks); 1x2 with two images (data axis of 2). Random layers are
    # left out of the two-image case: one device draws one mask for the whole batch, while
    # each image group draws its own (as data-parallel replicas do).
    meshes = [(2, 2), (4, 1)] + ([] if "dropout" in name else [(1, 2)])
    for rows, cols in meshes:
        assert_exact(pool4.run(run_layer, name, rows, cols, True, 8 * rows, 12 * cols))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(n for n in LAYERS if n.startswith("conv")))
def test_conv_overlap_is_exact(pool4, name: str) -> None:
    """Inside first, border bands after the halos arrive: still the one-device numbers."""
    for rows, cols in [(2, 2), (4, 1), (1, 2)]:
        assert_exact(pool4.run(run_layer, name, rows, cols, True, 16 * rows, 16 * cols, True))
