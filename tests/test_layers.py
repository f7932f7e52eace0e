"""Every sharded layer against the same layer on one process, float64, rel. error < 1e-9."""

from __future__ import annotations

import pytest

from equivalence import assert_exact, check_equivalence
from models_zoo import LAYERS

MESHES2 = [(1, 2), (2, 1)]


def run_layer(name: str, rows: int, cols: int, train: bool, h: int, w: int, overlap: bool = False,
              method: str = "auto") -> dict[str, float]:
    return check_equivalence(LAYERS[name], rows, cols, h, w, channels=4 if "group" in name or "depthwise" in name else 3,
                             train=train, overlap=overlap, method=method)



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
@pytest.mark.parametrize("method", ["bands", "assemble"])
@pytest.mark.parametrize("name", sorted(n for n in LAYERS if n.startswith("conv")))
def test_conv_methods_and_overlap_are_exact(pool4, name: str, method: str) -> None:
    """Both ways of convolving a block (its own convolution corrected on the border bands,
    or the assembled extended block), each with and without overlap: the one-device numbers."""
    for rows, cols in [(2, 2), (4, 1), (1, 2)]:
        for overlap in (False, True):
            assert_exact(pool4.run(run_layer, name, rows, cols, True, 16 * rows, 16 * cols, overlap, method))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["bands", "assemble"])
def test_max_pool_methods_are_exact(pool4, method: str) -> None:
    """Max pooling of the block with its border bands recomputed, or of the assembled
    extended block: the one-device numbers, ties between ReLU zeros included."""
    for name in sorted(n for n in LAYERS if n.startswith("maxpool")):
        for rows, cols in [(2, 2), (4, 1), (1, 2)]:
            assert_exact(pool4.run(run_layer, name, rows, cols, True, 16 * rows, 16 * cols, False, method))


# The thinnest block each window op accepts along the sharded dim (a multiple of the
# stride, at least its widest halo): windows there reach past the block on both sides.
THINNEST = {"conv3x3": 1, "conv7x7s2": 4, "conv_dilated": 2, "conv5x5s4": 4, "conv_depthwise": 2,
            "maxpool3s2": 2, "maxpool_relu": 2, "maxpool_dilated": 4}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(THINNEST))
def test_window_op_on_blocks_narrower_than_its_window(pool2, name: str) -> None:
    """Border bands meet or cross in the middle of the block: still the one-device numbers,
    with the block convolved before and while the halos travel (pooling has no overlap)."""
    thin = THINNEST[name]
    for rows, cols in MESHES2:
        for overlap in (False, True) if name.startswith("conv") else (False,):
            h, w = (rows * thin, 8) if rows > 1 else (8, cols * thin)
            assert_exact(pool2.run(run_layer, name, rows, cols, True, h, w, overlap, "bands"))


def conv_plans() -> dict[str, object]:
    import torch

    from distributed import shared_mesh
    from halo.nn.conv import _plan, halo_conv2d
    from halo.nn._window import split_local, window_spec

    mesh = shared_mesh(1, 2)
    spec, padding = split_local(window_spec("c", "Conv2d", 3, 1, 1), mesh)
    same_spec, same_pad = split_local(window_spec("c", "Conv2d", 4, 1, "same"), mesh)
    wide = torch.zeros(1, 3, 16, 8), torch.zeros(4, 3, 3, 3)  # many block elements per weight
    deep = torch.zeros(1, 512, 4, 2), torch.zeros(512, 512, 3, 3)  # a weight larger than the block
    plans = {
        "wide auto": _plan(*wide, spec, padding, (1, 1), (1, 1), mesh, "auto"),
        "deep auto": _plan(*deep, spec, padding, (1, 1), (1, 1), mesh, "auto"),
        "deep bands": _plan(*deep, spec, padding, (1, 1), (1, 1), mesh, "bands"),
        "wide assemble": _plan(*wide, spec, padding, (1, 1), (1, 1), mesh, "assemble"),
        "same bands": _plan(wide[0], torch.zeros(4, 3, 4, 4), same_spec, same_pad, (1, 1), (1, 1), mesh, "bands"),
    }
    try:
        halo_conv2d(*wide, None, mesh, spec, (1, 1), (1, 1), 1, padding, method="fast")
    except ValueError as err:
        plans["error"] = str(err)
    return plans


@pytest.mark.timeout(120)
def test_conv_method_choice(pool2) -> None:
    """"auto" convolves the block itself where the block outweighs the weight, assembles the
    extended block on deep, thin layers; asymmetric padding always assembles."""
    for rank, plans in enumerate(pool2.run(conv_plans)):
        # the one output column next to the neighbour, and the three extended-block columns it reads
        band = ((0, 16), (7, 8), (0, 16), (7, 10)) if rank == 0 else ((0, 16), (0, 1), (0, 16), (0, 3))
        assert plans["wide auto"] == ((1, 1), [band]), plans
        assert plans["deep auto"] == (None, []), plans
        assert plans["deep bands"][0] == (1, 1) and len(plans["deep bands"][1]) == 1, plans
        assert plans["wide assemble"] == (None, []) and plans["same bands"] == (None, []), plans
        assert "method must be one of" in plans["error"] and "'fast'" in plans["error"], plans


def pool_windows(method: str) -> list[tuple[int, int]] | str:
    """Heights and widths of every piece of the extended block a 1x2-sharded max pooling
    (kernel 3, stride 2, padding 1) copies in forward, or the error for an unknown method."""
    import torch

    import halo
    from distributed import shared_mesh
    from halo.nn import pool

    mesh = shared_mesh(1, 2)
    layer = halo.nn.HaloMaxPool2d.from_module(torch.nn.MaxPool2d(3, 2, 1), mesh)
    layer.method = method
    copied: list[tuple[int, int]] = []
    real = {name: getattr(pool, name) for name in ("window", "assemble")}

    def recording(fn):
        def record(*args, **kwargs):
            out = fn(*args, **kwargs)
            copied.append(tuple(out.shape[-2:]))
            return out
        return record

    for name, fn in real.items():
        setattr(pool, name, recording(fn))
    try:
        x = torch.randn(1, 2, 16, 8, requires_grad=True)
        layer(x).sum().backward()
    except ValueError as err:
        return str(err)
    finally:
        for name, fn in real.items():
            setattr(pool, name, fn)
    return copied


@pytest.mark.timeout(120)
def test_max_pool_by_bands_copies_no_block(pool2) -> None:
    """By bands, max pooling copies only the window of its one border column with a halo
    (also at the image edge, where it reads the -inf fill, so every rank saves the same);
    assembling copies the whole extended block."""
    bands, assembled = pool2.run(pool_windows, "bands"), pool2.run(pool_windows, "assemble")
    # no right halo (kernel 3, stride 2: the last window ends inside the block)
    assert bands == [[(16, 3)], [(16, 3)]], bands
    assert assembled == [[(16, 9)], [(16, 9)]], assembled  # rank 0's left column: the -inf edge
    for error in pool2.run(pool_windows, "fast"):
        assert "method must be one of" in error and "'fast'" in error, error
