"""Slide-level heads: a sharded feature map in, the same logits on every rank of the image out.

Each head takes the local block ``(N, C, h, w)`` of a feature map and returns logits
``(N, num_classes)``, replicated over the ranks of the image and equal to what the same
head computes on the full feature map on one device. With ``mesh=None`` a head is an
ordinary one-device module, so the same class is its own reference;
:func:`halo.parallelize` attaches the mesh (``attach_mesh``) and swaps the 1 x 1
convolutions inside for :class:`~halo.nn.HaloConv2d` (no halo, no traffic).

Cross-rank reductions follow the sum-backward convention of ``global_sum``: every
collective's backward is its exact adjoint, so averaging parameter gradients over ranks
gives the one-device gradient, and each rank's input gradient is the world size times
the one-device one.

Per-position maps for heatmaps (class scores or attention weights, detached) are left in
``head.last_map`` as the local block; :func:`halo.gather` assembles the full map.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from halo.errors import HaloShapeError
from halo.mesh import SpatialMesh
from halo.nn._window import halo_op, is_replicated, mark_replicated
from halo.nn.global_pool import global_avg_pool2d, global_max_pool2d, global_sum

__all__ = ["SlideHead", "MeanHead", "MaxHead", "GatedAttentionHead", "TopKHead", "all_gather_cat"]


def _gather_stack(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)


class _AllGather(torch.autograd.Function):
    """All-gather over a group, stacked on a new leading dim; backward is its adjoint.

    The adjoint of "every rank receives every rank's block" is "every rank gets back the
    sum, over ranks, of the gradients of its own slot": an all-reduce sum followed by this
    rank's slice (a reduce-scatter). With a replicated loss that gives the group size
    times the one-device gradient, exactly as :func:`global_sum` does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        return _gather_stack(x, group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank], None


def all_gather_cat(x: torch.Tensor, mesh: SpatialMesh) -> torch.Tensor:
    """Differentiable all-gather over the ranks of one image, concatenated on the last dim.

    Parameters
    ----------
    x:
        ``(..., m)``, the same shape on every rank of the image.
    mesh:
        The spatial mesh; rank order is the spatial group's (row-major blocks).

    Returns
    -------
    torch.Tensor
        ``(..., mesh.size * m)``: rank 0's ``m`` entries, then rank 1's, and so on.
    """
    if mesh.size == 1:
        return x
    if x.requires_grad:
        stacked = _AllGather.apply(x, mesh.spatial_group)
    else:  # positions, or values under no_grad
        stacked = _gather_stack(x, mesh.spatial_group)
    return stacked.movedim(0, -2).flatten(-2)


def _order(values: torch.Tensor, k: int, largest: bool, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Indices along the last dim of the ``k`` largest (or smallest) values, best first.

    Ties go to the lowest position (the entry's index, or ``positions`` where given): a
    total order, so the sharded and the one-device selection pick the same entries
    (``torch.topk`` breaks ties arbitrarily).
    """
    with torch.no_grad():
        v = values.detach()
        by_pos = None
        if positions is not None:
            by_pos = positions.argsort(dim=-1)  # positions are distinct
            v = v.gather(-1, by_pos)
        idx = v.sort(dim=-1, descending=largest, stable=True).indices[..., :k]
        return idx if by_pos is None else by_pos.gather(-1, idx)


def _position_scores(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    """``fc`` applied at every position of ``x``: ``(N, classes, h, w)``, detached."""
    with torch.no_grad():
        out = torch.einsum("nchw,kc->nkhw", x, fc.weight)
        if fc.bias is not None:
            out = out + fc.bias.view(1, -1, 1, 1)
    return out.detach()


class SlideHead(nn.Module):
    """Base of the slide-level heads: the mesh, the input check and ``last_map``.

    Parameters
    ----------
    mesh:
        The spatial mesh, or ``None`` for a one-device module (``parallelize`` attaches
        the mesh later through :meth:`attach_mesh`).
    """

    def __init__(self, mesh: SpatialMesh | None = None) -> None:
        super().__init__()
        self.mesh = mesh
        self.last_map: torch.Tensor | None = None

    def attach_mesh(self, mesh: SpatialMesh | None) -> None:
        """Reduce over ``mesh`` from now on (called by :func:`halo.parallelize`)."""
        self.mesh = mesh

    def _spatial_mesh(self, x: torch.Tensor) -> SpatialMesh | None:
        """The mesh to reduce over, or ``None`` when ``x`` is the whole map (no collectives)."""
        if x.dim() != 4:
            raise HaloShapeError(
                f"{type(self).__name__} expects a feature map block (N, C, h, w), got shape {tuple(x.shape)}"
            )
        # A head passed to parallelize as the whole model gets the mesh of its guard.
        mesh = self.mesh if self.mesh is not None else getattr(self, "_halo_mesh", None)
        if mesh is None or mesh.size == 1 or is_replicated(x):
            return None
        return mesh


class _PooledHead(SlideHead):
    """Global pooling (``_pool``), dropout, then a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, mesh: SpatialMesh | None = None, *,
                 dropout: float = 0.0, keep_maps: bool = False) -> None:
        super().__init__(mesh)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        self.keep_maps = keep_maps

    def _pool(self, x: torch.Tensor, mesh: SpatialMesh | None) -> torch.Tensor:
        raise NotImplementedError

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` from the block ``x`` ``(N, C, h, w)``."""
        pooled = self._pool(x, self._spatial_mesh(x)).flatten(1)
        if self.keep_maps:
            self.last_map = _position_scores(x, self.fc)
        return mark_replicated(self.fc(self.dropout(pooled)))


class MeanHead(_PooledHead):
    """Global average pooling, (dropout), then a linear classifier.

    Parameters
    ----------
    in_channels, num_classes:
        Feature channels in, logits out.
    mesh:
        See :class:`SlideHead`.
    dropout:
        Dropout probability on the pooled features (drawn alike on every rank of an image).
    keep_maps:
        Keep the classifier applied at every position (a class-activation map whose mean
        over the slide is the logits, dropout aside) in ``last_map``: ``(N, num_classes, h, w)``.
    """

    def _pool(self, x: torch.Tensor, mesh: SpatialMesh | None) -> torch.Tensor:
        return x.mean((2, 3)) if mesh is None else global_avg_pool2d(x, mesh)


class MaxHead(_PooledHead):
    """Global max pooling, then a linear classifier.

    Ties go to the first position of the slide in row-major order, as on one device.
    Parameters and ``last_map`` as in :class:`MeanHead`.
    """

    def _pool(self, x: torch.Tensor, mesh: SpatialMesh | None) -> torch.Tensor:
        return F.adaptive_max_pool2d(x, 1) if mesh is None else global_max_pool2d(x, mesh)


class GatedAttentionHead(SlideHead):
    """Gated attention pooling over every position of the slide (Ilse et al. 2018).

    ``a_i = w^T (tanh(V h_i) * sigmoid(U h_i))``, ``z = sum_i softmax(a)_i h_i`` over all
    positions of the slide, logits ``= fc(dropout(z))``. The softmax subtracts the global
    maximum (detached; softmax is shift invariant, so this changes no value or gradient)
    and its denominator and ``z`` come from one differentiable all-reduce sum.

    Parameters
    ----------
    in_channels, num_classes, mesh:
        See :class:`MeanHead`.
    hidden:
        Width ``D`` of the attention network.
    dropout:
        Dropout probability on ``z``.
    keep_maps:
        Keep the attention weights ``(N, 1, h, w)`` (summing to 1 over the slide) in ``last_map``.
    """

    def __init__(self, in_channels: int, num_classes: int, mesh: SpatialMesh | None = None, *,
                 hidden: int = 128, dropout: float = 0.0, keep_maps: bool = True) -> None:
        super().__init__(mesh)
        self.attention_v = nn.Conv2d(in_channels, hidden, 1)
        self.attention_u = nn.Conv2d(in_channels, hidden, 1)
        # No bias: a constant added to every score cancels in the softmax.
        self.attention_w = nn.Conv2d(hidden, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        self.keep_maps = keep_maps

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` from the block ``x`` ``(N, C, h, w)``."""
        mesh = self._spatial_mesh(x)
        scores = self.attention_w(torch.tanh(self.attention_v(x)) * torch.sigmoid(self.attention_u(x)))
        with torch.no_grad():
            peak = scores.amax((2, 3), keepdim=True)
            if mesh is not None:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=mesh.spatial_group)
        e = torch.exp(scores - peak)  # (N, 1, h, w), the same shift on every rank
        sums = torch.cat([(e * x).sum((2, 3)), e.sum((2, 3))], dim=1)  # (N, C + 1)
        if mesh is not None:
            sums = global_sum(sums, mesh)
        weighted, denom = sums[:, :-1], sums[:, -1:]
        if self.keep_maps:
            self.last_map = (e / denom.view(-1, 1, 1, 1)).detach()
        return mark_replicated(self.fc(self.dropout(weighted / denom)))


class TopKHead(SlideHead):
    """Max-min instance pooling (WELDON, Durand et al. 2016; CHOWDER, Courtiol et al. 2018).

    Instance scores ``s = conv1x1(h)`` ``(N, num_classes, h, w)``; per class the ``k``
    highest (and with ``min_max`` the ``k`` lowest) scores over all positions of the slide,
    sorted descending, ``[top_1 .. top_k, bottom_k .. bottom_1]``; then per class either
    their mean or a small network on them (shared by the classes).

    Across ranks, each rank sends its own best ``min(k, h*w)`` candidates with their
    global positions (a differentiable all-gather) and every rank selects from those.
    Ties are broken by the lowest position in the slide's row-major order, on one device
    too, so the same positions receive the gradient (``torch.topk`` breaks ties
    arbitrarily: compare against this head with ``mesh=None``, not against ``topk``).

    Parameters
    ----------
    in_channels, num_classes, mesh:
        See :class:`MeanHead`.
    k:
        How many top (and bottom) scores per class; at most the number of positions.
    min_max:
        Also take the ``k`` lowest scores (max-min pooling); top-``k`` only otherwise.
    mlp_hidden:
        ``None``: ``Linear(m, 1)`` on the ``m`` sorted scores (``m = 2k`` or ``k``);
        ``0``: their mean (no parameters); ``> 0``: ``Linear(m, mlp_hidden)``, sigmoid,
        ``Linear(mlp_hidden, 1)`` as in CHOWDER.
    keep_maps:
        Keep the instance scores ``(N, num_classes, h, w)`` in ``last_map``.
    """

    def __init__(self, in_channels: int, num_classes: int, mesh: SpatialMesh | None = None, *,
                 k: int = 5, min_max: bool = True, mlp_hidden: int | None = None,
                 keep_maps: bool = True) -> None:
        super().__init__(mesh)
        if k < 1:
            raise ValueError(f"TopKHead: k must be at least 1, got {k}")
        if mlp_hidden is not None and mlp_hidden < 0:
            raise ValueError(f"TopKHead: mlp_hidden must be None, 0 or positive, got {mlp_hidden}")
        self.k = k
        self.min_max = min_max
        self.keep_maps = keep_maps
        self.score = nn.Conv2d(in_channels, num_classes, 1)
        m = 2 * k if min_max else k
        self.mlp: nn.Module | None
        if mlp_hidden is None:
            self.mlp = nn.Linear(m, 1)
        elif mlp_hidden == 0:
            self.mlp = None
        else:
            self.mlp = nn.Sequential(nn.Linear(m, mlp_hidden), nn.Sigmoid(), nn.Linear(mlp_hidden, 1))

    @halo_op
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` from the block ``x`` ``(N, C, h, w)``."""
        mesh = self._spatial_mesh(x)
        s = self.score(x)
        if self.keep_maps:
            self.last_map = s.detach()
        h, w = s.shape[-2:]
        total = h * w * (1 if mesh is None else mesh.size)
        if self.k > total:
            raise HaloShapeError(
                f"TopKHead: k={self.k} is more than the {total} positions of the feature map; "
                f"use a smaller k or a larger image"
            )
        flat = s.flatten(2)  # (N, classes, h*w)
        if mesh is None:
            top = flat.gather(-1, _order(flat, self.k, True))
            bottom = flat.gather(-1, _order(flat, self.k, False)) if self.min_max else None
        else:
            top, bottom = self._global_extremes(flat, h, w, mesh)
        values = top if bottom is None else torch.cat([top, bottom.flip(-1)], dim=-1)
        logits = values.mean(-1) if self.mlp is None else self.mlp(values).squeeze(-1)
        return mark_replicated(logits)

    def _global_extremes(self, flat: torch.Tensor, h: int, w: int,
                         mesh: SpatialMesh) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Top-k (and bottom-k) scores of the whole slide from each rank's block."""
        _, row, col = mesh.coords
        rows = torch.arange(h, device=flat.device) + row * h
        cols = torch.arange(w, device=flat.device) + col * w
        position = (rows[:, None] * (w * mesh.cols) + cols).flatten()  # global row-major index
        local = min(self.k, h * w)
        parts = [_order(flat, local, True)] + ([_order(flat, local, False)] if self.min_max else [])
        idx = torch.cat(parts, dim=-1)  # (N, classes, local or 2 * local)
        # Candidates of every rank, laid out [rank][top..., bottom...] on the last dim.
        values = all_gather_cat(flat.gather(-1, idx), mesh)
        positions = all_gather_cat(position[idx], mesh)
        width = idx.shape[-1]

        def pick(offset: int, largest: bool) -> torch.Tensor:
            slot = torch.arange(offset, values.shape[-1], width, device=flat.device)
            slot = (slot[:, None] + torch.arange(local, device=flat.device)).flatten()
            v, p = values[..., slot], positions[..., slot]
            return v.gather(-1, _order(v, self.k, largest, p))

        return pick(0, True), pick(local, False) if self.min_max else None
