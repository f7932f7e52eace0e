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

__all__ = [
    "HaloSpec", "exchange_halo", "halo_strips", "assemble", "window", "ext_size", "adjoint", "adjoint_strips",
    "strip_grads", "scatter_window",
]


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


def _placed(body: torch.Tensor | None, rows: Strips, cols: Strips, spec: HaloSpec, h: int, w: int):
    """``(piece, first row, first column)`` of each part of the extended block, in its coordinates.

    The parts tile it: the block (trimmed), the row strips over the block's columns, and the
    column strips over all rows (corners included). ``body`` None leaves the block out.
    """
    kh, kw = h + min(spec.bottom, 0), w + min(spec.right, 0)
    top, bottom = rows
    left, right = cols
    placed = [] if body is None else [(body.narrow(-2, 0, kh).narrow(-1, 0, kw), spec.top, spec.left)]
    if top is not None:
        placed.append((top.narrow(-1, 0, kw), 0, spec.left))
    if bottom is not None:
        placed.append((bottom.narrow(-1, 0, kw), spec.top + kh, spec.left))
    if left is not None:
        placed.append((left, 0, 0))
    if right is not None:
        placed.append((right, 0, spec.left + kw))
    return placed


def _overlaps(placed, r: tuple[int, int], c: tuple[int, int]):
    """For each piece meeting the window ``rows r x columns c``: (piece part, window part) slices."""
    for piece, r0, c0 in placed:
        a, b = max(r[0], r0), min(r[1], r0 + piece.shape[-2])
        e, f = max(c[0], c0), min(c[1], c0 + piece.shape[-1])
        if a < b and e < f:
            yield piece[..., a - r0 : b - r0, e - c0 : f - c0], (slice(a - r[0], b - r[0]), slice(e - c[0], f - c[0]))


def ext_size(spec: HaloSpec, h: int, w: int) -> tuple[int, int]:
    """Height and width of the extended block of an ``h x w`` block."""
    return spec.top + h + spec.bottom, spec.left + w + spec.right


def window(x: torch.Tensor, rows: Strips, cols: Strips, spec: HaloSpec, r: tuple[int, int] | None = None,
           c: tuple[int, int] | None = None, block: bool = True) -> torch.Tensor:
    """Rows ``r`` and columns ``c`` (default: all) of the halo-extended block, copying only those.

    ``block=False`` leaves the local block's part zero: the window then holds only what the
    halos add to a zero-padded block.
    """
    h, w = x.shape[-2:]
    height, width = ext_size(spec, h, w)
    r, c = r or (0, height), c or (0, width)
    shape = (*x.shape[:-2], r[1] - r[0], c[1] - c[0])
    out = x.new_empty(shape) if block else x.new_zeros(shape)
    for piece, (rs, cs) in _overlaps(_placed(x if block else None, rows, cols, spec, h, w), r, c):
        out[..., rs, cs].copy_(piece)
    return out


def scatter_window(g: torch.Tensor, rows: Strips, cols: Strips, spec: HaloSpec, shape: torch.Size,
                   r: tuple[int, int], c: tuple[int, int], block: torch.Tensor | None = None) -> None:
    """Add the halo part of ``g``, the gradient of the window ``r x c`` of the extended block,
    into the strip gradients ``rows`` and ``cols`` (None where nothing goes back): the
    adjoint of :func:`window` with ``block=False``. With ``block`` (the block's gradient, of
    ``shape``) the block's part is added there too: the adjoint of :func:`window`."""
    for piece, (rs, cs) in _overlaps(_placed(block, rows, cols, spec, *shape[-2:]), r, c):
        piece.add_(g[..., rs, cs])


def assemble(x: torch.Tensor, rows: Strips, cols: Strips, spec: HaloSpec) -> torch.Tensor:
    """The halo-extended block from the local block and its received strips (one copy)."""
    return x if spec.is_empty else window(x, rows, cols, spec)


def _local_part(kept: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """``kept`` grown back to length ``n`` along ``dim``: trimmed rows get zero gradient."""
    missing = n - kept.shape[dim]
    if missing == 0:
        return kept
    return F.pad(kept, (0, missing) if dim == -1 else (0, 0, 0, missing))


def strip_grads(like: torch.Tensor, spec: HaloSpec, shape: torch.Size, mesh: SpatialMesh) -> tuple[Strips, Strips]:
    """Zero gradients for the halo strips that came from a neighbour (None at image edges
    and where the width is 0), to be sent back by :func:`adjoint_strips`. Row strips span
    the block's ``w`` columns, column strips every row of the extended block."""
    h, w = shape[-2:]
    height = ext_size(spec, h, w)[0]

    def zeros(dim: int, width: int, first: bool) -> torch.Tensor | None:
        _, index, size = _axis(mesh, dim)
        if width <= 0 or index == (0 if first else size - 1):
            return None
        return like.new_zeros(*shape[:-2], *((width, w) if dim == -2 else (height, width)))

    return (zeros(-2, spec.top, True), zeros(-2, spec.bottom, False)), (zeros(-1, spec.left, True),
                                                                         zeros(-1, spec.right, False))


def _return_ops(strips: Strips, dim: int, before: int, after: int, recv_shape: Callable[[int], list[int]],
                like: torch.Tensor, mesh: SpatialMesh) -> tuple[Strips, list[dist.P2POp]]:
    """Ops that send strip gradients back to the ranks the strips came from, and receive what
    the neighbours' halos of our trailing ``before`` and leading ``after`` rows (along
    ``dim``) got; run them before reading. Returns (from the next rank, from the previous)."""
    group, index, size = _axis(mesh, dim)
    ops: list[dist.P2POp] = []
    for strip, peer in zip(strips, (index - 1, index + 1)):
        if strip is not None:
            ops.append(dist.P2POp(dist.isend, strip.contiguous(), group=group, group_peer=peer))
    received: list[torch.Tensor | None] = []
    for width, peer in ((before, index + 1), (after, index - 1)):
        buf = None
        if width > 0 and 0 <= peer < size:
            buf = like.new_empty(recv_shape(width))
            ops.append(dist.P2POp(dist.irecv, buf, group=group, group_peer=peer))
        received.append(buf)
    return (received[0], received[1]), ops


def adjoint_strips(rows: Strips, cols: Strips, spec: HaloSpec, shape: torch.Size, mesh: SpatialMesh,
                   block: Callable[[], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the local block, from the strip gradients (:func:`strip_grads`) and
    ``block()``, the gradient of the block's own part (a tensor of ``shape`` this function
    owns and adds into). ``block`` runs while the first phase with messages travels.

    Column strips go back first; what arrives for the rows of our own row strips (the
    corners) travels on with them in the row phase, as in the forward exchange.
    """
    h, w = shape[-2:]
    height, kh = ext_size(spec, h, w)[0], h + min(spec.bottom, 0)
    lead = list(shape[:-2])
    during = _During(block)
    received, ops = _return_ops(cols, -1, spec.left, spec.right, lambda n: lead + [height, n], like, mesh)
    during.run(ops)
    top, bottom = rows
    for strip, start in zip(received, (w - spec.left, 0)):
        if strip is None:
            continue
        parts = ((top, 0, spec.top), (during.finish(), spec.top, kh), (bottom, spec.top + kh, spec.bottom))
        for target, first, n in parts:
            if target is not None and n > 0:
                target.narrow(-2, 0, n).narrow(-1, start, strip.shape[-1]).add_(strip.narrow(-2, first, n))
    received, ops = _return_ops(rows, -2, spec.top, spec.bottom, lambda n: lead + [n, w], like, mesh)
    during.run(ops)
    out = during.finish()
    from_next, from_prev = received
    if from_next is not None:
        out.narrow(-2, h - spec.top, spec.top).add_(from_next)
    if from_prev is not None:
        out.narrow(-2, 0, spec.bottom).add_(from_prev)
    return out


def adjoint(g: torch.Tensor, spec: HaloSpec, shape: torch.Size, mesh: SpatialMesh,
            during: Callable[[], object] | None = None) -> torch.Tensor:
    """Gradient w.r.t. the local block from the gradient w.r.t. the halo-extended block.

    ``g`` may be modified in place (callers pass a gradient they own); one copy of the
    block's part is made. ``during`` (e.g. the weight gradient of a convolution) runs while
    the first phase with messages travels; callers keep its result themselves.
    """
    if spec.is_empty:
        if during is not None:
            during()
        return g
    h, w = shape[-2:]
    height, width = ext_size(spec, h, w)
    rows, cols = strip_grads(g, spec, shape, mesh)
    scatter_window(g, rows, cols, spec, shape, (0, height), (0, width))

    def block() -> torch.Tensor:
        if during is not None:
            during()
        own = g.narrow(-2, spec.top, h + min(spec.bottom, 0)).narrow(-1, spec.left, w + min(spec.right, 0))
        return _local_part(_local_part(own, -1, w), -2, h).contiguous()

    return adjoint_strips(rows, cols, spec, shape, mesh, block, g)


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
