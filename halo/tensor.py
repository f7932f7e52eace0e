"""Cut a full image tensor into this rank's block, and put blocks back together.

Shapes: a *global* tensor is ``(N, C, H, W)`` for one image group; a *local* block is
``(N, C, H / rows, W / cols)``. ``scatter`` and ``gather`` are exact inverses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from halo.geometry import block_bounds
from halo.mesh import SpatialMesh

__all__ = ["scatter", "gather"]


def _check_4d(x: torch.Tensor, what: str) -> None:
    if x.dim() < 2:
        raise ValueError(f"{what} needs a tensor with at least 2 dims (..., H, W), got shape {tuple(x.shape)}")


def scatter(tensor: torch.Tensor, mesh: SpatialMesh) -> torch.Tensor:
    """This rank's block of a global ``(..., H, W)`` tensor held on every rank of the image.

    Raises
    ------
    ValueError
        If H is not a multiple of ``mesh.rows`` or W of ``mesh.cols``.
    """
    _check_4d(tensor, "scatter")
    _, r, c = mesh.coords
    h, w = tensor.shape[-2:]
    if h % mesh.rows or w % mesh.cols:
        raise ValueError(
            f"cannot scatter an image of H x W = {h} x {w} over a {mesh.rows} x {mesh.cols} mesh: "
            f"H must be a multiple of {mesh.rows} and W of {mesh.cols}"
        )
    r0, r1 = block_bounds(h, mesh.rows, r)
    c0, c1 = block_bounds(w, mesh.cols, c)
    return tensor[..., r0:r1, c0:c1].contiguous()


def gather(tensor: torch.Tensor, mesh: SpatialMesh) -> torch.Tensor:
    """The global tensor of an image from its local blocks, returned on every rank of the image.

    Not differentiable; for checks, heatmaps and evaluation.
    """
    _check_4d(tensor, "gather")
    block = tensor.detach().contiguous()
    parts = [torch.empty_like(block) for _ in range(mesh.size)]
    dist.all_gather(parts, block, group=mesh.spatial_group)
    rows = [torch.cat(parts[r * mesh.cols : (r + 1) * mesh.cols], dim=-1) for r in range(mesh.rows)]
    return torch.cat(rows, dim=-2)
