"""The sharding guard: functional spatial ops inside a sharded model's forward.

Swapping modules cannot see functional calls in a ``forward`` (DenseNet and
MobileNetV2 call ``F.adaptive_avg_pool2d``; timm pools with ``x.mean((2, 3))``; ConvNeXt
permutes to channels-last and back). While a parallelized model runs its forward, a
:class:`torch.overrides.TorchFunctionMode` watches every torch call on a *block*: a tensor
that holds part of a sharded image, i.e. one that is not a parameter and not marked
replicated (the output of a global pool). The guard knows which dims of a block are its
spatial ones (:func:`spatial_dims`): ``(2, 3)`` of a plain ``(N, C, h, w)`` tensor, and
whatever permutes, views, reductions and indexing make of them, marked on every output
(:data:`SPATIAL_ATTR`). Where the guard cannot follow, it marks every dim spatial. It:

- routes the calls halo can compute exactly: ``adaptive_avg_pool2d`` / ``adaptive_max_pool2d``
  to 1 x 1, and ``mean`` / ``sum`` / ``amax`` over both spatial dims, to the global versions;
- refuses, naming the module path, every call that mixes values along a spatial dim or
  depends on the block's position (convolutions, pooling, padding, resizing, reductions,
  ``linear`` / ``layer_norm`` / ``softmax`` / concatenation / splitting along a spatial dim,
  merging a spatial dim with another, crops, element-wise dropout, and training-mode batch
  norm that no halo layer issued: it would use the block's statistics);
- lets everything else through (point-wise ops; ops along batch or channel dims, in either
  layout; permutes and views that keep each spatial dim whole).

Halo layers mark their own forward (:func:`halo.nn._window.halo_op`) and are not guarded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from halo.errors import HaloNotSupportedError
from halo.mesh import SpatialMesh
from halo.nn._window import SPATIAL_ATTR, in_halo_op, is_replicated, mark_replicated
from halo.nn.global_pool import global_avg_pool2d, global_max_pool2d, global_sum, is_global_size

__all__ = ["ShardingGuard", "SPATIAL_ATTR", "WINDOW_OPS", "spatial_dims", "mark_spatial"]

# SPATIAL_ATTR (imported): the dims of a block that hold its spatial extent (default ``(2, 3)`` on 4-D)

Dims = tuple[int, ...]
_UNKNOWN: Dims = (-1,)  # an index the guard cannot follow (several advanced indices)

WINDOW_OPS = frozenset({
    "conv1d", "conv2d", "conv3d", "conv_transpose2d", "conv_tbc", "convolution", "_convolution",
    "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "lp_pool2d",
    "fractional_max_pool2d", "fractional_max_pool2d_with_indices", "interpolate", "upsample",
    "upsample_nearest", "upsample_bilinear", "pad", "unfold", "fold", "grid_sample", "affine_grid",
    "pixel_shuffle", "pixel_unshuffle", "group_norm", "instance_norm", "local_response_norm",
    "roll", "flip", "fliplr", "flipud", "rot90", "bilinear", "max_unpool2d",
})
"""Functional ops that mix pixels across a block edge or depend on the image size: refused on a block
(a module halo swaps, e.g. ``nn.Conv2d``, runs its own exchange instead)."""
# output shape known: each spatial dim must reappear whole (same size, same elements before it)
_RESHAPES = {"flatten", "view", "reshape", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
# dims reordered: followed exactly by running the op on a probe whose dim sizes are distinct primes
_PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "adjoint", "__get__",
             "transpose_", "swapaxes_", "swapdims_", "t_"}
_INPLACE_RESHAPES = {"squeeze_", "unsqueeze_", "resize_", "resize_as_", "as_strided", "as_strided_", "set_"}
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29)
_REDUCTIONS = {"max", "min", "amin", "std", "var", "std_mean", "var_mean", "norm", "logsumexp", "softmax",
               "log_softmax", "softmin", "argmax", "argmin", "cumsum", "cumprod", "median", "nanmedian",
               "topk", "sort", "argsort", "prod", "nansum", "nanmean", "all", "any", "count_nonzero",
               "kthvalue", "mode", "quantile", "nanquantile", "aminmax", "cummax", "cummin", "logcumsumexp",
               "normalize", "cosine_similarity", "glu"}
_ROUTED = {"mean", "sum", "amax"}
# (argument position of dim, its default) where not (1, all dims)
_DIM_AT = {"norm": (2, None), "quantile": (2, None), "nanquantile": (2, None), "kthvalue": (2, -1), "topk": (2, -1),
           "sort": (1, -1), "argsort": (1, -1), "mode": (1, -1), "glu": (1, -1), "normalize": (2, 1),
           "cosine_similarity": (2, 1)}
# ops along one dim (argument position): refused along a spatial dim
_ALONG = {"chunk": 2, "split": 2, "tensor_split": 2, "split_with_sizes": 2, "unbind": 1, "narrow": 1,
          "select": 1, "index_select": 1, "gather": 1, "take_along_dim": 2, "scatter": 1, "scatter_add": 1,
          "index_add": 1, "index_copy": 1, "index_fill": 1, "cumulative_trapezoid": 2, "diff": 2}
_FIXED_DIM = {"hsplit": 1, "vsplit": 0, "dsplit": 2}
_CATS = {"cat": None, "concat": None, "concatenate": None, "stack": None, "hstack": 1, "vstack": 0, "dstack": 2}
_MATMULS = {"matmul", "mm", "bmm", "einsum", "tensordot", "inner", "outer", "kron", "cdist", "baddbmm", "addmm",
            "addbmm", "addmv", "mv", "dot", "vdot", "chain_matmul", "__matmul__", "__rmatmul__", "ger"}
_ELEMENTWISE_RANDOM = {"dropout", "alpha_dropout", "feature_alpha_dropout", "bernoulli", "rand_like",
                       "randn_like", "randint_like", "dropout_"}
_CHANNEL_DROPOUT = {"dropout1d", "dropout2d", "dropout3d", "feature_dropout"}
_FRESH = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "new_empty_strided"}


def spatial_dims(x: Any) -> Dims:
    """The dims of ``x`` that hold a spatial extent of the sharded image; ``()`` if ``x`` is no block.

    Parameters and replicated tensors (global-pool outputs) are no blocks. A tensor the
    guard has marked carries its dims in :data:`SPATIAL_ATTR`; any other 4-D tensor is taken
    as an ``(N, C, h, w)`` block.
    """
    if not isinstance(x, torch.Tensor) or isinstance(x, nn.Parameter) or is_replicated(x):
        return ()
    dims = getattr(x, SPATIAL_ATTR, None)
    if dims is not None:
        return dims
    return (2, 3) if x.dim() == 4 else ()


def mark_spatial(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Record ``dims`` as the spatial dims of ``x`` (see :func:`spatial_dims`); returns ``x``."""
    setattr(x, SPATIAL_ATTR, tuple(sorted(d % max(x.dim(), 1) for d in dims)))
    return x


def _lost(t: torch.Tensor) -> Dims:
    """Where the guard cannot follow the spatial dims: every dim may hold one."""
    return tuple(range(t.dim()))


def _tensors(*items: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``items``, inside lists, tuples and dicts too."""
    for a in items:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(*a)
        elif isinstance(a, dict):
            yield from _tensors(*a.values())


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


def _dims(name: str, args: tuple, kwargs: dict, nd: int) -> Dims | None:
    """The dims a reduction reduces over (normalised), or None for all of them."""
    position, default = _DIM_AT.get(name, (1, None))
    dim = kwargs.get("dim", args[position] if len(args) > position else default)
    if dim is None or isinstance(dim, (bool, str, torch.Tensor)) or dim == ():
        return None
    if isinstance(dim, int):
        dim = (dim,)
    return tuple(d % nd for d in dim)


def _without(dims: Dims, removed: Sequence[int]) -> Dims:
    """Spatial ``dims`` after the dims ``removed`` are dropped (none of them spatial)."""
    return tuple(d - sum(r < d for r in removed) for d in dims)


def _reshaped(old: Sequence[int], dims: Dims, new: Sequence[int]) -> Dims | None:
    """Where each spatial dim of shape ``old`` lands in the (row-major) reshape to ``new``.

    A dim stays whole iff some new dim has its size and the same number of elements
    before it; None if a spatial dim is split or merged. The dims keep their order, so a
    spatial dim of size 1 (a 1 x 1 block of a deep layer) lands after the one before it,
    not on the same new dim.
    """
    found: list[int] = []
    for d in sorted(dims):
        before = math.prod(old[:d])
        start = found[-1] + 1 if found else 0
        at = next((e for e in range(start, len(new)) if new[e] == old[d] and math.prod(new[:e]) == before), None)
        if at is None:
            return None
        found.append(at)
    return tuple(found)


def _permuted(func, x: torch.Tensor, dims: Dims, args: tuple, kwargs: dict) -> Dims | None:
    """Where ``func`` moves the spatial ``dims`` of ``x``: run it on a meta tensor of prime sizes."""
    if x.dim() > len(_PRIMES):
        return None
    probe = torch.empty(_PRIMES[: x.dim()], device="meta")
    try:
        moved = func(probe, *args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - an op the probe cannot stand in for: lose track
        return None
    if not isinstance(moved, torch.Tensor) or sorted(moved.shape) != sorted(probe.shape):
        return None
    return tuple(list(moved.shape).index(_PRIMES[d]) for d in dims)


def _index_dims(index: Any, x: torch.Tensor, dims: Dims) -> Dims | None:
    """Spatial dims of ``x[index]``; None if the index cuts into a spatial dim (a crop or a pixel
    of the block is not the same of the image). Several or multi-dim advanced indices: ``_UNKNOWN``."""
    items = list(index) if isinstance(index, tuple) else [index]

    def consumes(i: Any) -> int:
        if i is None or i is Ellipsis:
            return 0
        return max(i.dim(), 1) if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1

    at = next((k for k, i in enumerate(items) if i is Ellipsis), None)
    if at is not None:
        fill = x.dim() - sum(consumes(i) for i in items)
        items = items[:at] + [slice(None)] * fill + items[at + 1 :]
    items += [slice(None)] * (x.dim() - sum(consumes(i) for i in items))
    source, target, found, advanced = 0, 0, [], []
    for i in items:
        k = consumes(i)
        if i is None:
            target += 1
            continue
        spatial = set(range(source, source + k)) & set(dims)
        if isinstance(i, slice):
            if spatial:
                if i != slice(None):
                    return None
                found.append(target)
            target += 1
        elif isinstance(i, int) or isinstance(i, torch.Tensor) and i.dim() == 0 and i.dtype != torch.bool:
            if spatial:
                return None
        else:  # a tensor or list of indices (advanced indexing)
            if spatial:
                return None
            advanced.append(i)
            target += 1
        source += k
    simple = len(advanced) <= 1 and all(torch.as_tensor(a).dim() <= 1 for a in advanced)
    return tuple(found) if simple else _UNKNOWN


class ShardingGuard(TorchFunctionMode):
    """Active during a parallelized model's forward; see the module docstring.

    ``where`` holds the path of the module running now, for error messages. A subclass that
    follows blocks the same way but answers otherwise (:mod:`halo.blockwise`) overrides two
    hooks: :meth:`refusal` (the error a refused call raises) and :meth:`global_reduce` (what a
    mean, sum or amax over both spatial dims of a block returns).
    """

    def __init__(self, mesh: SpatialMesh, where: list[str] | None = None) -> None:
        super().__init__()
        self.mesh = mesh
        self.where = where if where is not None else []

    def refusal(self, name: str, x: torch.Tensor, why: str) -> HaloNotSupportedError:
        """The error refusing ``name`` on block ``x`` ``why``: the module's path, the shape, what would work."""
        path = self.where[-1] if self.where else "<model>"
        return HaloNotSupportedError(
            f"{path or '<model>'} calls {name} on a sharded block of shape {tuple(x.shape)} (spatial dims "
            f"{spatial_dims(x)}), which {why}. halo shards Conv2d, MaxPool2d, AvgPool2d, BatchNorm2d, "
            f"AdaptiveAvg/MaxPool2d(1) modules, point-wise ops, ops along batch or channel dims (layer norm, "
            f"linear, softmax over channels, also channels-last after a permute), Dropout2d, and global "
            f"mean/sum/amax over (H, W); replace the call with one of these"
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if in_halo_op():
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        tensors = list(_tensors(args, kwargs))
        blocks = [t for t in tensors if spatial_dims(t)]
        if not blocks:  # nothing of the image in: nothing of the image out
            out = func(*args, **kwargs)
            if not tensors or name in _FRESH:  # made from nothing: taken as a block where 4-D, as the input is
                return out
            replicated = any(is_replicated(t) for t in tensors)
            for t in _outputs(out):
                if replicated:
                    mark_replicated(t)
                else:
                    mark_spatial(t, ())
            return out
        x = args[0] if args else kwargs.get("input")
        dims = spatial_dims(x)
        if dims:
            routed = self._route(name, x, dims, args, kwargs)
            if routed is not None:
                return routed
        self._check_others(name, blocks, args, kwargs)
        out = func(*args, **kwargs)
        if name in _FRESH:
            return out
        for t in _outputs(out):
            mark_spatial(t, self._out_dims(func, name, t, x, dims, blocks, args, kwargs))
        return out

    def _check_others(self, name: str, blocks: list[torch.Tensor], args: tuple, kwargs: dict) -> None:
        """Calls whose block is not (only) their first argument: concatenation and matrix products."""
        if name in _CATS:
            first = blocks[0]
            dim = _CATS[name]
            dim = dim if dim is not None else kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if name != "stack" and any(dim % t.dim() in spatial_dims(t) for t in blocks):
                raise self.refusal(name, first, f"joins blocks along spatial dim {dim}")
        elif name in _MATMULS:
            x = args[0] if args else None
            weight = args[1] if len(args) > 1 else None
            plain = name in ("matmul", "mm", "__matmul__") and len(blocks) == 1 and blocks[0] is x
            plain = plain and isinstance(weight, torch.Tensor)
            if not (plain and weight.dim() <= 2 and (x.dim() - 1) not in spatial_dims(x)):
                raise self.refusal(name, blocks[0], "contracts a spatial dim or multiplies two blocks (halo "
                                                    "shards x @ weight over a non-spatial last dim)")

    def _out_dims(self, func, name: str, t: torch.Tensor, x: Any, dims: Dims, blocks: list[torch.Tensor],
                  args: tuple, kwargs: dict) -> Dims:
        """The spatial dims of output ``t`` of a call let through (refusing one that resizes them)."""
        if name == "stack":
            at = kwargs.get("dim", args[1] if len(args) > 1 else 0) % t.dim()
            return tuple(d + (d >= at) for d in spatial_dims(blocks[0]))
        if dims:
            nd = x.dim()
            if name in _RESHAPES:
                found = _reshaped(x.shape, dims, t.shape)
                if found is None:
                    raise self.refusal(name, x, f"moves or merges the spatial dims of the block (to shape "
                                                f"{tuple(t.shape)})")
                return found
            if name in _PERMUTES:
                found = _permuted(func, x, dims, args, kwargs)
                return _lost(t) if found is None else found
            if name == "__getitem__":
                found = _index_dims(args[1], x, dims)
                return _lost(t) if found is None or found == _UNKNOWN else found
            removed: Dims = ()
            if name in _ROUTED or name in _REDUCTIONS:
                removed = _dims(name, args, kwargs, nd) or ()
            elif name in ("unbind", "select"):
                removed = (kwargs.get("dim", args[1] if len(args) > 1 else 0) % nd,)
            if removed and t.dim() == nd - len(removed):
                return _without(dims, removed)
        found: set[int] = set()
        for b in blocks:
            shift = t.dim() - b.dim()
            if shift < 0:
                return _lost(t)
            for d in spatial_dims(b):
                if t.shape[d + shift] != b.shape[d] and b.shape[d] != 1:  # size 1: broadcast (a per-sample draw)
                    raise self.refusal(name, b, f"changes the size of spatial dim {d} (to shape {tuple(t.shape)}): "
                                                f"a repeat, expand or crop of the block is not one of the image")
                found.add(d + shift)
        return tuple(found)

    def _route(self, name: str, x: torch.Tensor, dims: Dims, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Refuse ``name`` on block ``x`` with spatial ``dims``, or compute it globally, or None: let through."""
        nd = x.dim()
        if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_max_pool2d",
                    "adaptive_max_pool2d_with_indices"):
            size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
            with_indices = kwargs.get("return_indices", args[2] if len(args) > 2 else False)
            if size is None or not is_global_size(size) or with_indices or name.endswith("with_indices"):
                raise self.refusal(name, x, f"pools to {size} (only a global 1 x 1 pool is sharded)")
            if dims != (nd - 2, nd - 1):
                raise self.refusal(name, x, "pools over dims that are not the spatial ones")
            if "avg" in name:
                return global_avg_pool2d(x, self.mesh)
            return global_max_pool2d(x, self.mesh)
        if name in _ROUTED or name in _REDUCTIONS:
            if any(isinstance(a, torch.Tensor) for a in (*args[1:2], kwargs.get("other"))) and name != "cosine_similarity":
                return None  # max(a, b), min(a, b): element-wise
            reduced = _dims(name, args, kwargs, nd)
            if reduced is not None and not set(dims) & set(reduced):
                return None  # a reduction over batch or channels stays local
            if name in _ROUTED and reduced is not None and set(reduced) == set(dims) and len(dims) == 2 and nd == 4:
                return self.global_reduce(name, x, dims, kwargs.get("keepdim", args[2] if len(args) > 2 else False))
            raise self.refusal(name, x, "reduces over the spatial dims of the block")
        if name in ("layer_norm", "rms_norm"):
            shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else ())
            count = 1 if isinstance(shape, int) else len(shape)
            if set(range(nd - count, nd)) & set(dims):
                raise self.refusal(name, x, f"normalises over its last {count} dim(s), which include a spatial dim "
                                            f"(one device normalises over the whole image there)")
            return None
        if name == "linear" and nd - 1 in dims:
            raise self.refusal(name, x, "maps its last dim, a spatial one, to features")
        if name == "channel_shuffle" and 1 in dims:
            raise self.refusal(name, x, "shuffles dim 1, a spatial one")
        if name == "batch_norm" and self._training_norm(args, kwargs):
            raise self.refusal(name, x, "normalises with the block's own statistics in training mode (one device "
                                        "uses those of the whole image); use nn.BatchNorm2d, which halo swaps")
        if name in _INPLACE_RESHAPES:
            raise self.refusal(name, x, "reshapes the block in place (use the out-of-place op)")
        if name in WINDOW_OPS:
            raise self.refusal(name, x, "mixes pixels across block edges or depends on the global size")
        if name in _ELEMENTWISE_RANDOM and self._random(name, args, kwargs):
            raise self.refusal(name, x, "draws element-wise random numbers that differ from one device's "
                                        "(use Dropout2d, which draws per channel)")
        if name in _CHANNEL_DROPOUT and self._random(name, args, kwargs) and {0, 1} & set(dims):
            raise self.refusal(name, x, "drops whole channels of a block whose dim 0 or 1 is spatial")
        if name in ("__getitem__", "__setitem__") and _index_dims(args[1] if len(args) > 1 else None, x, dims) is None:
            raise self.refusal("indexing", x, "selects along the spatial dims of the block (a crop or a pixel "
                                              "differs between the block and the image)")
        along = _FIXED_DIM.get(name, _ALONG.get(name))
        if along is not None:
            dim = along if name in _FIXED_DIM else kwargs.get("dim", args[along] if len(args) > along else 0)
            if dim is None or not isinstance(dim, int) or dim % nd in dims:
                raise self.refusal(name, x, f"works along dim {dim}, a spatial one (or the flattened block)")
        return None

    def global_reduce(self, name: str, x: torch.Tensor, dims: Dims, keepdim: bool) -> torch.Tensor:
        """``mean`` / ``sum`` / ``amax`` over both spatial dims of a 4-D block, over the whole image."""
        order = [d for d in range(4) if d not in dims] + list(dims)
        y = x.permute(order)
        if name == "mean":
            out = global_avg_pool2d(y, self.mesh)
        elif name == "sum":
            out = mark_replicated(global_sum(y.sum((2, 3), keepdim=True), self.mesh))
        else:
            out = global_max_pool2d(y, self.mesh)
        if not keepdim:
            return mark_replicated(out.flatten(2).squeeze(-1))
        return mark_replicated(out.permute([order.index(d) for d in range(4)]))

    @staticmethod
    def _random(name: str, args: tuple, kwargs: dict) -> bool:
        """Whether a dropout call draws anything: ``p > 0`` in training (``F.dropout(x, p, training)``;
        ``bernoulli`` and the ``*_like`` draws always do)."""
        if "dropout" not in name:
            return True
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
        return bool(training) and p > 0

    @staticmethod
    def _training_norm(args: tuple, kwargs: dict) -> bool:
        """Whether a ``batch_norm`` call uses batch statistics: ``training`` is argument 5 of both
        ``F.batch_norm`` and ``torch.batch_norm``; eval mode is a per-channel affine map (local)."""
        return bool(kwargs.get("training", args[5] if len(args) > 5 else False))
