"""The sharding guard: functional spatial ops inside a sharded model's forward.

Swapping modules cannot see functional calls in a ``forward`` (DenseNet and
MobileNetV2 call ``F.adaptive_avg_pool2d``; timm pools with ``x.mean((2, 3))``). While a
parallelized model runs its forward, a :class:`torch.overrides.TorchFunctionMode`
watches every torch call on a local ``(N, C, h, w)`` block that is not a parameter and
not marked replicated (the output of a global pool), and:

- routes the calls halo can compute exactly: ``adaptive_avg_pool2d`` / ``adaptive_max_pool2d``
  to 1 x 1, and ``mean`` / ``sum`` / ``amax`` over both spatial dims, to the global versions;
- refuses, naming the module path, every other call that mixes pixels across the block
  edge or depends on the block's position (convolutions, pooling, padding, resizing,
  spatial reductions, flattening the block into features, element-wise dropout, and
  training-mode batch norm that no halo layer issued: it would use the block's statistics);
- lets everything else through (point-wise ops, channel ops).

Halo layers mark their own forward (:func:`halo.nn._window.halo_op`) and are not guarded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from halo.errors import HaloNotSupportedError
from halo.mesh import SpatialMesh
from halo.nn._window import in_halo_op, is_replicated, mark_replicated
from halo.nn.global_pool import global_avg_pool2d, global_max_pool2d, global_sum, is_global_size

__all__ = ["ShardingGuard"]

_WINDOW_OPS = {
    "conv1d", "conv2d", "conv3d", "conv_transpose2d", "conv_tbc", "convolution", "_convolution",
    "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "lp_pool2d",
    "fractional_max_pool2d", "fractional_max_pool2d_with_indices", "interpolate", "upsample",
    "upsample_nearest", "upsample_bilinear", "pad", "unfold", "fold", "grid_sample", "affine_grid",
    "pixel_shuffle", "pixel_unshuffle", "group_norm", "instance_norm", "local_response_norm",
    "roll", "flip", "fliplr", "flipud", "rot90", "linear", "bilinear", "layer_norm",
    "max_unpool2d", "channel_shuffle",
}
_RESHAPES = {"flatten", "view", "reshape", "unflatten", "permute", "transpose", "swapaxes", "swapdims",
             "movedim", "moveaxis", "squeeze", "view_as", "reshape_as", "unfold"}
_REDUCTIONS = {"max", "min", "amin", "std", "var", "std_mean", "var_mean", "norm", "logsumexp", "softmax",
               "log_softmax", "softmin", "argmax", "argmin", "cumsum", "cumprod", "median", "nanmedian",
               "topk", "sort", "argsort", "prod", "nansum", "nanmean", "all", "any", "count_nonzero",
               "kthvalue", "mode", "quantile", "nanquantile", "aminmax"}
_ROUTED = {"mean", "sum", "amax"}
_ELEMENTWISE_RANDOM = {"dropout", "alpha_dropout", "feature_alpha_dropout", "bernoulli", "rand_like",
                       "randn_like", "randint_like", "dropout_"}


def _is_block(x: Any) -> bool:
    """A local block of a sharded image: a 4-D tensor that is not a parameter or replicated."""
    return isinstance(x, torch.Tensor) and x.dim() == 4 and not isinstance(x, nn.Parameter) and not is_replicated(x)


def _dims(args: tuple, kwargs: dict, position: int = 1) -> tuple[int, ...] | None:
    dim = kwargs.get("dim", args[position] if len(args) > position else None)
    if dim is None:
        return None
    if isinstance(dim, int):
        dim = (dim,)
    return tuple(d % 4 for d in dim)


class ShardingGuard(TorchFunctionMode):
    """Active during a parallelized model's forward; see the module docstring.

    ``where`` holds the path of the module running now, for error messages.
    """

    def __init__(self, mesh: SpatialMesh, where: list[str] | None = None) -> None:
        super().__init__()
        self.mesh = mesh
        self.where = where if where is not None else []

    def _refuse(self, name: str, x: torch.Tensor, why: str) -> HaloNotSupportedError:
        path = self.where[-1] if self.where else "<model>"
        return HaloNotSupportedError(
            f"{path or '<model>'} calls {name} on a sharded block of shape {tuple(x.shape)}, which {why}. "
            f"halo shards Conv2d, MaxPool2d, AvgPool2d, BatchNorm2d, AdaptiveAvg/MaxPool2d(1) modules, "
            f"point-wise ops, Dropout2d, and global mean/sum/amax over (H, W); replace the call with one of these"
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if in_halo_op():
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        x = args[0] if args else kwargs.get("input")
        if _is_block(x):
            routed = self._route(name, x, args, kwargs)
            if routed is not None:
                return routed
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and isinstance(x, torch.Tensor) and is_replicated(x):
            mark_replicated(out)
        return out

    def _route(self, name: str, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_max_pool2d",
                    "adaptive_max_pool2d_with_indices"):
            size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
            with_indices = kwargs.get("return_indices", args[2] if len(args) > 2 else False)
            if size is None or not is_global_size(size) or with_indices or name.endswith("with_indices"):
                raise self._refuse(name, x, f"pools to {size} (only a global 1 x 1 pool is sharded)")
            if "avg" in name:
                return global_avg_pool2d(x, self.mesh)
            return global_max_pool2d(x, self.mesh)
        if name in _ROUTED or name in _REDUCTIONS:
            dims = _dims(args, kwargs)
            if dims is not None and not {2, 3} & set(dims):
                return None  # a reduction over batch or channels stays local
            if name in _ROUTED and dims is not None and set(dims) == {2, 3}:
                keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
                if name == "mean":
                    out = global_avg_pool2d(x, self.mesh)
                elif name == "sum":
                    out = mark_replicated(global_sum(x.sum((2, 3), keepdim=True), self.mesh))
                else:
                    out = global_max_pool2d(x, self.mesh)
                return out if keepdim else mark_replicated(out.flatten(2).squeeze(-1))
            raise self._refuse(name, x, "reduces over the spatial dims of the block")
        if name == "batch_norm" and self._training_norm(args, kwargs):
            raise self._refuse(name, x, "normalises with the block's own statistics in training mode (one device "
                                        "uses those of the whole image); use nn.BatchNorm2d, which halo swaps")
        if name in _WINDOW_OPS:
            raise self._refuse(name, x, "mixes pixels across block edges or depends on the global size")
        if name in _ELEMENTWISE_RANDOM:
            raise self._refuse(name, x, "draws element-wise random numbers that differ from one device's "
                                        "(use Dropout2d, which draws per channel)")
        if name == "__getitem__" and not self._index_keeps_spatial(args[1] if len(args) > 1 else None):
            raise self._refuse("indexing", x, "selects along the spatial dims of the block (a crop or a pixel "
                                              "differs between the block and the image)")
        if name in _RESHAPES:
            return None if self._keeps_spatial(name, x, args, kwargs) else self._raise_reshape(name, x)
        return None

    @staticmethod
    def _training_norm(args: tuple, kwargs: dict) -> bool:
        """Whether a ``batch_norm`` call uses batch statistics: ``training`` is argument 5 of both
        ``F.batch_norm`` and ``torch.batch_norm``; eval mode is a per-channel affine map (local)."""
        return bool(kwargs.get("training", args[5] if len(args) > 5 else False))

    @staticmethod
    def _index_keeps_spatial(index: Any) -> bool:
        """Whether ``x[index]`` leaves dims 2 and 3 of a 4-D block whole."""
        items = list(index) if isinstance(index, tuple) else [index]
        if any(i is None for i in items):
            return False  # new axes shift the dims
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items = items[:at] + [slice(None)] * (4 - len(items) + 1) + items[at + 1 :]
        items += [slice(None)] * (4 - len(items))
        return all(isinstance(i, slice) and i == slice(None) for i in items[2:4])

    def _keeps_spatial(self, name: str, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        if name in ("flatten", "unflatten"):
            start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0) % 4
            end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1) % 4
            return name == "flatten" and end < 2 or name == "unflatten" and start < 2
        if name == "squeeze":
            dims = _dims(args, kwargs)
            return dims is not None and not {2, 3} & set(dims)
        if name in ("transpose", "swapaxes", "swapdims"):
            return not {2, 3} & {d % 4 for d in args[1:3]}
        if name in ("view", "reshape", "view_as", "reshape_as"):
            shape = args[1:] if name in ("view", "reshape") else (tuple(args[1].shape),)
            if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
                shape = tuple(shape[0])
            return len(shape) == 4 and tuple(shape[2:]) == tuple(x.shape[2:])
        return False

    def _raise_reshape(self, name: str, x: torch.Tensor):
        raise self._refuse(name, x, "moves or merges the spatial dims of the block")
