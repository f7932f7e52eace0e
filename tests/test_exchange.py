"""Halo exchange and scatter/gather on real gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import halo
from distributed import shared_mesh
from halo.exchange import HaloSpec, adjoint, halo_strips
from halo.geometry import block_bounds

SPECS = [
    HaloSpec(top=1, bottom=1, left=1, right=1),
    HaloSpec(top=3, bottom=2, left=0, right=-1, fill=-5.0),
    HaloSpec(top=0, bottom=-1, left=2, right=4),
    HaloSpec(top=4, bottom=4, left=4, right=4),  # as wide as the block
]


def exchange_matches_padding(rows: int, cols: int) -> None:
    mesh = shared_mesh(rows, cols)
    _, r, c = mesh.coords
    h, w = 4 * rows, 4 * cols
    full = torch.randn(2, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(halo.gather(halo.scatter(full, mesh), mesh), full)
    for spec in SPECS:
        x = halo.scatter(full, mesh).requires_grad_(True)
        ext = halo.exchange_halo(x, mesh, spec)
        pads = (spec.left, max(spec.right, 0), spec.top, max(spec.bottom, 0))
        padded = F.pad(full, pads, value=spec.fill)
        r0, r1 = block_bounds(h, rows, r)
        c0, c1 = block_bounds(w, cols, c)
        expected = padded[..., r0 : r1 + spec.top + spec.bottom, c0 : c1 + spec.left + spec.right]
        assert torch.equal(ext, expected), spec
        # adjoint: <exchange(x), g> summed over ranks equals <x, exchange^T(g)> summed over ranks
        g = torch.randn(ext.shape, dtype=torch.float64)
        (ext * g).sum().backward()
        lhs = (ext.detach() * g).sum() - (ext.detach() == spec.fill).double().mul(g).mul(spec.fill).sum()
        rhs = (x.detach() * x.grad).sum()
        both = torch.stack([lhs, rhs])
        dist.all_reduce(both)
        assert torch.allclose(both[0], both[1], rtol=1e-12, atol=1e-12), (spec, both)
        # work overlapped with the messages runs once, and changes nothing that travels
        calls: list[int] = []
        plain = halo_strips(x.detach(), spec, mesh)
        rows_, cols_, result = halo_strips(x.detach(), spec, mesh, during=lambda: calls.append(1) or "done")
        assert result == "done" and calls == [1], spec
        for a, b in zip((*plain[0], *plain[1]), (*rows_, *cols_)):
            assert (a is None and b is None) or torch.equal(a, b), spec
        expected_grad = adjoint(g.clone(), spec, x.shape, mesh)
        assert torch.equal(adjoint(g.clone(), spec, x.shape, mesh, during=lambda: calls.append(2)), expected_grad)
        assert calls == [1, 2], spec


@pytest.mark.timeout(120)
@pytest.mark.parametrize("grid", [(1, 2), (2, 1)])
def test_exchange_two_ranks(pool2, grid) -> None:
    pool2.run(exchange_matches_padding, *grid)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("grid", [(2, 2), (4, 1), (1, 4)])
def test_exchange_four_ranks(pool4, grid) -> None:
    pool4.run(exchange_matches_padding, *grid)
