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

from collections.abc import Callable
from dataclasses import dataclass

from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

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


T = TypeVar("T")

# (strip before, strip after) along one dim; None where the strip has zero width.
Strips = tuple[torch.Tensor | None, torch.Tensor | None]


def _start(ops: list[dist.P2POp]) -> list:
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _axis(mesh: SpatialMesh, dim: int) -> tuple[dist.ProcessGroup, int, int]:
    axis = "row" if dim == -2 else "col"
    return mesh.axis_group(axis), mesh.axis_index(axis), mesh.axis_size(axis)


def _strip_shape(x: torch.Tensor, dim: int, width: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] = width
    return shape


def _exchange_dim(
    take: Callable[[int, int], torch.Tensor], shape: list[int], dim: int, before: int, after: int,
    fill: float, mesh: SpatialMesh, like: torch.Tensor,
) -> tuple[Strips, list[dist.P2POp]]:
    """The strips one dim needs (``before`` rows from the previous rank, ``after`` from the
    next) and the P2P ops that fill them: run the ops before reading the strips.

    ``take(start, width)`` gives rows ``[start, start + width)`` of the (virtual) tensor of
    ``shape`` along ``dim``, so the column phase sends only thin strips of the row-extended
    block without building it.
    """
    group, index, size = _axis(mesh, dim)
    n = shape[dim]
    ops: list[dist.P2POp] = []
    lo = hi = None
    if before > 0:
        lo_shape = list(shape)
        lo_shape[dim] = before
        if index > 0:
            lo = torch.empty(lo_shape, dtype=like.dtype, device=like.device)
            ops.append(dist.P2POp(dist.irecv, lo, group=group, group_peer=index - 1))
        else:
            lo = torch.full(lo_shape, fill, dtype=like.dtype, device=like.device)
        if index < size - 1:
            ops.append(dist.P2POp(dist.isend, take(n - before, before).contiguous(), group=group, group_peer=index + 1))
    if after > 0:
        hi_shape = list(shape)
        hi_shape[dim] = after
        if index < size - 1:
            hi = torch.empty(hi_shape, dtype=like.dtype, device=like.device)
            ops.append(dist.P2POp(dist.irecv, hi, group=group, group_peer=index + 1))
        else:
            hi = torch.full(hi_shape, fill, dtype=like.dtype, device=like.device)
        if index > 0:
            ops.append(dist.P2POp(dist.isend, take(0, after).contiguous(), group=group, group_peer=index - 1))
    return (lo, hi), ops


def _row_extended_cols(x: torch.Tensor, rows: Strips, bottom: int, start: int, width: int) -> torch.Tensor:
    """Columns ``[start, start + width)`` of the row-extended block, without building it."""
    top_strip, bottom_strip = rows
    kept = x.shape[-2] + min(bottom, 0)
    parts = [t.narrow(-1, start, width) for t in (top_strip, x.narrow(-2, 0, kept), bottom_strip) if t is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def _adjoint_dim(g: torch.Tensor, dim: int, before: int, after: int, n: int, mesh: SpatialMesh):
    """The ops that send the halo strips of ``g`` back to their owners (run them before reading).

    Returns the view of ``g`` over the local rows (length ``n + min(after, 0)``), the buffers
    for the gradients of this block's last ``before`` and first ``after`` rows, and the ops.
    """
    group, index, size = _axis(mesh, dim)
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
    return g.narrow(dim, before, n + min(after, 0)), (from_next, from_prev), ops


class _During:
    """Runs ``fn`` once, in the first exchange phase that has messages in flight (or at the end)."""

    def __init__(self, fn: Callable[[], T] | None) -> None:
        self.fn, self.result, self.pending = fn, None, fn is not None

    def run(self, ops: list[dist.P2POp]) -> None:
        """Post ``ops``; if they are the first real traffic, run ``fn`` while they travel; wait."""
        works = _start(ops)
        if self.pending and ops:
            self.finish()
        _wait(works)

    def finish(self):
        if self.pending:
            self.pending = False
            self.result = self.fn()  # type: ignore[misc]
        return self.result


def _add_received(out: torch.Tensor, dim: int, n: int, before: int, after: int, received: Strips) -> None:
    from_next, from_prev = received
    if from_next is not None:
        out.narrow(dim, n - before, before).add_(from_next)
    if from_prev is not None:
        out.narrow(dim, 0, after).add_(from_prev)


def halo_strips(
    x: torch.Tensor, spec: HaloSpec, mesh: SpatialMesh, during: Callable[[], T] | None = None
) -> tuple[Strips, Strips, T | None]:
    """Receive the row strips of ``x``, then the column strips of the row-extended block.

    Returns ``((top, bottom), (left, right), during())``; the column strips already include
    the corner pixels. ``during`` (e.g. the part of a convolution that needs no halo) runs
    while the first phase with messages travels: the row strips, or the column strips where
    the rows exchange nothing (a ``1 x C`` mesh). Not differentiable: see :func:`exchange_halo`.
    """
    during_ = _During(during)
    shape = list(x.shape)
    rows, ops = _exchange_dim(lambda a, b: x.narrow(-2, a, b), shape, -2, spec.top, spec.bottom, spec.fill, mesh, x)
    during_.run(ops)
    shape[-2] = spec.top + x.shape[-2] + spec.bottom
    cols, ops = _exchange_dim(lambda a, b: _row_extended_cols(x, rows, spec.bottom, a, b), shape, -1,
                              spec.left, spec.right, spec.fill, mesh, x)
    during_.run(ops)
    return rows, cols, during_.finish()


def assemble(x: torch.Tensor, rows: Strips, cols: Strips, spec: HaloSpec) -> torch.Tensor:
    """The halo-extended block from the local block and its received strips (one copy)."""
    if spec.is_empty:
        return x
    h, w = x.shape[-2:]
    kh, kw = h + min(spec.bottom, 0), w + min(spec.right, 0)
    height = spec.top + kh + max(spec.bottom, 0)
    out = x.new_empty(*x.shape[:-2], height, spec.left + kw + max(spec.right, 0))
    body = out.narrow(-1, spec.left, kw)
    body.narrow(-2, spec.top, kh).copy_(x.narrow(-2, 0, kh).narrow(-1, 0, kw))
    top, bottom = rows
    if top is not None:
        body.narrow(-2, 0, spec.top).copy_(top.narrow(-1, 0, kw))
    if bottom is not None:
        body.narrow(-2, spec.top + kh, spec.bottom).copy_(bottom.narrow(-1, 0, kw))
    left, right = cols
    if left is not None:
        out.narrow(-1, 0, spec.left).copy_(left)
    if right is not None:
        out.narrow(-1, spec.left + kw, spec.right).copy_(right)
    return out


def _local_part(kept: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """``kept`` grown back to length ``n`` along ``dim``: trimmed rows get zero gradient."""
    missing = n - kept.shape[dim]
    if missing == 0:
        return kept
    return F.pad(kept, (0, missing) if dim == -1 else (0, 0, 0, missing))


def adjoint(g: torch.Tensor, spec: HaloSpec, shape: torch.Size, mesh: SpatialMesh,
            during: Callable[[], object] | None = None) -> torch.Tensor:
    """Gradient w.r.t. the local block from the gradient w.r.t. the halo-extended block.

    ``g`` may be modified in place (callers pass a gradient they own); one full copy is made.
    ``during`` (e.g. the weight gradient of a convolution) runs while the first phase with
    messages travels; callers keep its result themselves.
    """
    if spec.is_empty:
        if during is not None:
            during()
        return g
    during_ = _During(during)
    h, w = shape[-2:]
    kept, received, ops = _adjoint_dim(g, -1, spec.left, spec.right, w, mesh)
    during_.run(ops)
    g_rows = _local_part(kept, -1, w)  # (..., rows of the extended block, w)
    _add_received(g_rows, -1, w, spec.left, spec.right, received)
    kept, received, ops = _adjoint_dim(g_rows, -2, spec.top, spec.bottom, h, mesh)
    during_.run(ops)
    out = _local_part(kept, -2, h).contiguous()
    _add_received(out, -2, h, spec.top, spec.bottom, received)
    during_.finish()
    return out


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: HaloSpec, mesh: SpatialMesh) -> torch.Tensor:  # type: ignore[override]
        ctx.spec, ctx.mesh, ctx.shape = spec, mesh, x.shape
        rows, cols, _ = halo_strips(x, spec, mesh)
        return assemble(x, rows, cols, spec)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        # adjoint() adds into g in place: take a copy, autograd may share g with other nodes
        return adjoint(g.clone(memory_format=torch.contiguous_format), ctx.spec, ctx.shape, ctx.mesh), None, None


def exchange_halo(x: torch.Tensor, mesh: SpatialMesh, spec: HaloSpec) -> torch.Tensor:
    """The local block ``(N, C, h, w)`` extended by its halos: ``(N, C, h + top + bottom, w + left + right)``.

    Differentiable: the backward pass returns halo gradients to their owners.
    """
    if spec.is_empty:
        return x
    return _HaloExchange.apply(x, spec, mesh)
