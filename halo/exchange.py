"""Halo exchange between neighbouring blocks, and its adjoint.

Rows are exchanged first (tensor dim -2 along mesh axis ``row``), then columns (dim -1
along axis ``col``) of the row-extended tensor, so corner pixels arrive without any
diagonal send. "Before" means toward index 0 of an axis, "after" toward the last index.
At the global image edges nothing is received: the strip is filled with the op's own
padding value (0 for convolution, -inf for max pooling). A negative ``after`` width
trims that many trailing rows instead (strided ops whose last input rows are unused).

The backward pass is the exact adjoint: each halo strip's gradient travels back to the
rank that owns those rows and is added there; gradients of the edge fill are dropped.
All sends and receives of one phase are posted at once with ``batch_isend_irecv`` on
contiguous buffers; nothing synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from halo.mesh import SpatialMesh

__all__ = ["HaloSpec", "exchange_halo", "halo_strips", "assemble", "adjoint"]


@dataclass(frozen=True, kw_only=True, slots=True)
class HaloSpec:
    """Halo widths of one op on a 2-D block (rows: top/bottom, columns: left/right).

    ``bottom`` and ``right`` may be negative: that many trailing rows/columns are trimmed.
    ``fill`` is the value outside the global image.
    """

    top: int = 0
    bottom: int = 0
    left: int = 0
    right: int = 0
    fill: float = 0.0

    def __post_init__(self) -> None:
        if self.top < 0 or self.left < 0:
            raise ValueError(f"top and left halo widths must be >= 0, got {self.top}, {self.left}")

    @property
    def is_empty(self) -> bool:
        return self.top == self.bottom == self.left == self.right == 0


# (strip before, strip after) along one dim; None where the strip has zero width.
Strips = tuple[torch.Tensor | None, torch.Tensor | None]


def _run(ops: list[dist.P2POp]) -> None:
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _axis(mesh: SpatialMesh, dim: int) -> tuple[dist.ProcessGroup, int, int]:
    axis = "row" if dim == -2 else "col"
    return mesh.axis_group(axis), mesh.axis_index(axis), mesh.axis_size(axis)


def _strip_shape(x: torch.Tensor, dim: int, width: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] = width
    return shape


def _exchange_dim(x: torch.Tensor, dim: int, before: int, after: int, fill: float, mesh: SpatialMesh) -> Strips:
    """Receive the strips one dim needs: ``before`` rows from the previous rank, ``after`` from the next."""
    group, index, size = _axis(mesh, dim)
    n = x.shape[dim]
    ops: list[dist.P2POp] = []
    lo = hi = None
    if before > 0:
        if index > 0:
            lo = torch.empty(_strip_shape(x, dim, before), dtype=x.dtype, device=x.device)
            ops.append(dist.P2POp(dist.irecv, lo, group=group, group_peer=index - 1))
        else:
            lo = torch.full(_strip_shape(x, dim, before), fill, dtype=x.dtype, device=x.device)
        if index < size - 1:
            ops.append(dist.P2POp(dist.isend, x.narrow(dim, n - before, before).contiguous(), group=group, group_peer=index + 1))
    if after > 0:
        if index < size - 1:
            hi = torch.empty(_strip_shape(x, dim, after), dtype=x.dtype, device=x.device)
            ops.append(dist.P2POp(dist.irecv, hi, group=group, group_peer=index + 1))
        else:
            hi = torch.full(_strip_shape(x, dim, after), fill, dtype=x.dtype, device=x.device)
        if index > 0:
            ops.append(dist.P2POp(dist.isend, x.narrow(dim, 0, after).contiguous(), group=group, group_peer=index - 1))
    _run(ops)
    return lo, hi


def _assemble_dim(x: torch.Tensor, dim: int, strips: Strips, after: int) -> torch.Tensor:
    lo, hi = strips
    if after < 0:
        x = x.narrow(dim, 0, x.shape[dim] + after)
    parts = [t for t in (lo, x, hi) if t is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _adjoint_dim(g: torch.Tensor, dim: int, before: int, after: int, n: int, mesh: SpatialMesh) -> torch.Tensor:
    """Adjoint of :func:`_exchange_dim` followed by :func:`_assemble_dim`: length back to ``n``."""
    group, index, size = _axis(mesh, dim)
    kept = n + min(after, 0)
    out = torch.zeros(_strip_shape(g, dim, n), dtype=g.dtype, device=g.device)
    out.narrow(dim, 0, kept).copy_(g.narrow(dim, before, kept))
    ops: list[dist.P2POp] = []
    from_next = from_prev = None
    if before > 0:
        if index > 0:  # our leading strip is the previous rank's trailing rows
            ops.append(dist.P2POp(dist.isend, g.narrow(dim, 0, before).contiguous(), group=group, group_peer=index - 1))
        if index < size - 1:
            from_next = torch.empty(_strip_shape(g, dim, before), dtype=g.dtype, device=g.device)
            ops.append(dist.P2POp(dist.irecv, from_next, group=group, group_peer=index + 1))
    if after > 0:
        if index < size - 1:
            ops.append(dist.P2POp(dist.isend, g.narrow(dim, before + n, after).contiguous(), group=group, group_peer=index + 1))
        if index > 0:
            from_prev = torch.empty(_strip_shape(g, dim, after), dtype=g.dtype, device=g.device)
            ops.append(dist.P2POp(dist.irecv, from_prev, group=group, group_peer=index - 1))
    _run(ops)
    if from_next is not None:
        out.narrow(dim, n - before, before).add_(from_next)
    if from_prev is not None:
        out.narrow(dim, 0, after).add_(from_prev)
    return out


def halo_strips(x: torch.Tensor, spec: HaloSpec, mesh: SpatialMesh) -> tuple[Strips, Strips]:
    """Receive the row strips of ``x``, then the column strips of the row-extended block.

    Returns ``((top, bottom), (left, right))``; the column strips already include the
    corner pixels. Not differentiable: see :func:`exchange_halo`.
    """
    rows = _exchange_dim(x, -2, spec.top, spec.bottom, spec.fill, mesh)
    xr = _assemble_dim(x, -2, rows, spec.bottom)
    cols = _exchange_dim(xr, -1, spec.left, spec.right, spec.fill, mesh)
    return rows, cols


def assemble(x: torch.Tensor, rows: Strips, cols: Strips, spec: HaloSpec) -> torch.Tensor:
    """The halo-extended block from the local block and its received strips."""
    return _assemble_dim(_assemble_dim(x, -2, rows, spec.bottom), -1, cols, spec.right)


def adjoint(g: torch.Tensor, spec: HaloSpec, shape: torch.Size, mesh: SpatialMesh) -> torch.Tensor:
    """Gradient w.r.t. the local block from the gradient w.r.t. the halo-extended block."""
    h, w = shape[-2:]
    g = _adjoint_dim(g, -1, spec.left, spec.right, w, mesh)
    return _adjoint_dim(g, -2, spec.top, spec.bottom, h, mesh)


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: HaloSpec, mesh: SpatialMesh) -> torch.Tensor:  # type: ignore[override]
        ctx.spec, ctx.mesh, ctx.shape = spec, mesh, x.shape
        rows, cols = halo_strips(x, spec, mesh)
        return assemble(x, rows, cols, spec)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return adjoint(g.contiguous(), ctx.spec, ctx.shape, ctx.mesh), None, None


def exchange_halo(x: torch.Tensor, mesh: SpatialMesh, spec: HaloSpec) -> torch.Tensor:
    """The local block ``(N, C, h, w)`` extended by its halos: ``(N, C, h + top + bottom, w + left + right)``.

    Differentiable: the backward pass returns halo gradients to their owners.
    """
    if spec.is_empty:
        return x
    return _HaloExchange.apply(x, spec, mesh)
