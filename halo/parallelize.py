"""parallelize(model, mesh): the same model, computing on a spatially sharded image.

Walks ``named_children`` and swaps each supported layer for its ``halo.nn`` twin, which
shares the original's parameters and buffers: state-dict keys, parameter names and
loaded weights are unchanged. Layers that act on each pixel alone (activations,
Dropout2d, stochastic depth) stay as they are; layers that act only after global
pooling (Linear, Flatten, Dropout) run on the replicated features. Anything else is
refused with an error naming the module path and type. While the model runs its
forward a :class:`~halo.guard.ShardingGuard` catches functional spatial calls.

Random ops draw the same numbers on every rank of one image as long as every rank of
the image seeds torch the same way (:func:`halo.manual_seed`).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable

import torch
from torch import nn

from halo.errors import HaloNotSupportedError
from halo.guard import ShardingGuard
from halo.mesh import SpatialMesh
from halo.nn.group_norm import HaloGroupNorm
from halo.nn.layer_norm import HaloLayerNorm, HaloRMSNorm
from halo.nn.same import fold_pads
from halo.nn import (
    HaloAdaptiveAvgPool2d,
    HaloAdaptiveMaxPool2d,
    HaloAvgPool2d,
    HaloBatchNorm2d,
    HaloConv1d,
    HaloConv2d,
    HaloMaxPool2d,
)

__all__ = ["parallelize", "SWAPS", "FAMILIES", "default_local_modules", "twins", "manual_seed"]

# Exact torch type -> halo twin (torchvision's and timm's: :func:`twins`). Subclasses are not
# swapped silently: they may override forward.
SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: HaloConv2d,
    nn.Conv1d: HaloConv1d,
    nn.MaxPool2d: HaloMaxPool2d,
    nn.AvgPool2d: HaloAvgPool2d,
    nn.BatchNorm2d: HaloBatchNorm2d,
    nn.SyncBatchNorm: HaloBatchNorm2d,
    nn.AdaptiveAvgPool2d: HaloAdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d: HaloAdaptiveMaxPool2d,
    nn.GroupNorm: HaloGroupNorm,
    nn.LayerNorm: HaloLayerNorm,
    nn.RMSNorm: HaloRMSNorm,
}

#: Layer families halo treats by type. A module of one of these families (subclasses
#: included, whatever children they hold) is swapped for its exact type's twin, left alone
#: where its exact type is point-wise, or refused: it is never walked into as a container.
FAMILIES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.modules.pooling._MaxUnpoolNd,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
    nn.modules.padding._CircularPadNd,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Fold,
    nn.Unfold,
    nn.ChannelShuffle,
    nn.MultiheadAttention,
)


def _loaded(library: str) -> bool:
    """Whether ``library`` is imported: a model holding its layers exists only if it is, so
    halo imports torchvision and timm (seconds each) only for models built from them."""
    return library in sys.modules


def twins() -> dict[type[nn.Module], type[nn.Module]]:
    """Every exact type halo swaps, with its twin: torch's (:data:`SWAPS`), and torchvision's and
    timm's once those libraries are imported."""
    table = dict(SWAPS)
    if _loaded("torchvision"):
        from halo.nn.torchvision_layers import torchvision_twins

        table.update(torchvision_twins())
    if _loaded("timm"):
        from halo.nn.timm_layers import timm_twins

        table.update(timm_twins())
    return table


_ATTENTION = ("attention over all tokens (or over windows of them) is not a halo operation; a rank holds one "
              "block of the image, not the token sequence: ViT, Swin and MaxViT stay refused, use a CNN backbone")


def _refused() -> dict[type[nn.Module], str]:
    """Layers refused up front, with the reason (what they compute needs the whole image)."""
    table: dict[type[nn.Module], str] = {nn.MultiheadAttention: _ATTENTION}
    if _loaded("torchvision"):
        from torchvision.models.maxvit import WindowPartition

        table[WindowPartition] = "partitions the image into windows for attention; " + _ATTENTION
    if not _loaded("timm"):
        return table
    import timm.layers

    table[timm.layers.PatchEmbed] = "patch embedding into tokens, with positions of the global image; " + _ATTENTION
    return table


def default_local_modules() -> tuple[type[nn.Module], ...]:
    """Leaf modules that only act on single pixels, or on replicated features after pooling:
    torch's, and torchvision's and timm's once those libraries are imported.

    The guard still checks the calls they make at run time (e.g. Linear on a block). Members
    of a layer family (BatchNorm1d) are local by their exact type only.
    """
    local: list[type[nn.Module]] = [
        nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
        nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.PReLU, nn.Softplus, nn.Identity,
        nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.Softmax, nn.LogSoftmax,
    ]
    if _loaded("torchvision"):
        from torchvision.ops import FrozenBatchNorm2d, Permute, StochasticDepth

        # per sample; a per-channel affine map; a reordering of dims the guard follows
        local += [StochasticDepth, FrozenBatchNorm2d, Permute]
    if _loaded("timm"):
        from halo.nn.timm_layers import timm_local

        local += timm_local
    return tuple(local)


def _name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def manual_seed(seed: int, mesh: SpatialMesh) -> None:
    """Seed torch so every rank of one image draws the same random numbers.

    Image groups (the ``data`` axis) get different streams, as data-parallel replicas do.
    """
    torch.manual_seed(seed + 1_000_003 * mesh.coords[0])


def _swap(module: nn.Module, mesh: SpatialMesh, prefix: str, local: tuple[type[nn.Module], ...],
          table: dict[type[nn.Module], type[nn.Module]]) -> None:
    halo_types = tuple(set(table.values()))
    for child_name, child in module.named_children():
        path = f"{prefix}.{child_name}" if prefix else child_name
        kind = type(child)
        if hasattr(child, "attach_mesh"):  # slide heads: cross-rank reductions over the mesh
            child.attach_mesh(mesh)
        if isinstance(child, halo_types):
            continue
        refused = next((why for t, why in _refused().items() if isinstance(child, t)), None)
        if refused is not None:
            raise HaloNotSupportedError(f"{path} ({_name(kind)}): {refused}")
        if kind in table:
            new = table[kind].from_module(child, mesh, path)
            setattr(module, child_name, new)
            _swap(new, mesh, path, local, table)  # a twin's own children (timm's act and drop layers)
        elif kind in local or (isinstance(child, local) and not isinstance(child, FAMILIES)):
            continue
        elif isinstance(child, FAMILIES):
            base = next(c for c in kind.__mro__ if c.__module__.startswith("torch.nn") and not c.__name__.startswith("_"))
            raise HaloNotSupportedError(
                f"{path} ({_name(kind)}) is a layer of kind {base.__name__} that halo has no exact twin for (a "
                f"subclass may compute something else in its own forward); halo swaps "
                f"{', '.join(sorted(t.__name__ for t in table))}; build the model from those classes, or pass "
                f"local_modules=({kind.__name__},) if it acts on each pixel alone"
            )
        elif len(child._modules) == 0:
            has_state = any(True for _ in child.parameters(recurse=False)) or any(
                b is not None for b in child._buffers.values()
            )
            if has_state or not _is_plain_container(child):
                raise HaloNotSupportedError(
                    f"{path} ({_name(kind)}) cannot be sharded exactly: halo shards "
                    f"{', '.join(sorted(t.__name__ for t in table))} (output_size 1 for adaptive pools) and leaves "
                    f"point-wise layers local; pass local_modules=({kind.__name__},) if it acts on each pixel alone"
                )
        else:
            _swap(child, mesh, path, local, table)


def _is_plain_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def parallelize(
    model: nn.Module,
    mesh: SpatialMesh,
    *,
    local_modules: Iterable[type[nn.Module]] = (),
    overlap: bool = False,
) -> nn.Module:
    """Shard ``model`` spatially over ``mesh``; returns the same object, modified in place.

    Parameters
    ----------
    model:
        An ordinary image model (torchvision ResNet, ResNeXt, Wide ResNet, MobileNet V2/V3,
        EfficientNet, RegNet, DenseNet, or any model built from supported layers).
    mesh:
        The :class:`~halo.mesh.SpatialMesh` whose ``row`` x ``col`` ranks hold one image.
    local_modules:
        Extra leaf module types that act on each pixel alone (or on pooled features).
    overlap:
        Convolutions that convolve their block with zero padding (the default wherever the
        block outweighs the weight) do so while the halo strips travel, and run their
        convolution backward while the halo gradients travel back; others run the weight
        gradient while the input gradient's halo travels (same numbers; see
        :func:`halo.nn.halo_conv2d`).

    Raises
    ------
    HaloNotSupportedError
        Naming the module path and type of the first layer that cannot be sharded exactly.
    """
    local = default_local_modules() + tuple(local_modules)
    table = twins()
    if type(model) in table or isinstance(model, FAMILIES):
        raise HaloNotSupportedError(f"parallelize expects a model, got a bare {type(model).__name__}")
    fold_pads(model, mesh)  # ConstantPad2d + MaxPool2d pairs (BiT's stem): one padded max pooling
    _swap(model, mesh, "", local, table)
    for m in model.modules():
        if isinstance(m, HaloConv2d):
            m.overlap = overlap
    if getattr(model, "_halo_mesh", None) is None:
        _install_guard(model, mesh)
    return model


def _install_guard(model: nn.Module, mesh: SpatialMesh) -> None:
    """Run ``model``'s forward under a :class:`ShardingGuard` that knows the running module's path.

    The model's class becomes a subclass of its own whose ``forward`` enters the guard, so
    ``copy.deepcopy`` and DDP keep the guard; state-dict keys do not change. A submodule
    that runs outside the model's forward (activation checkpointing recomputes its stages
    in backward) enters the guard itself: a recompute routes and refuses exactly as the
    forward did, instead of running functional spatial ops on the block alone.
    """
    where: list[str] = []
    paths = {m: name for name, m in model.named_modules()}
    state = threading.local()  # per thread: CUDA runs backward (and so recomputes) on its own

    def enter(module: nn.Module, _args) -> None:
        where.append(paths.get(module, type(module).__name__))
        if not getattr(state, "active", False):
            state.guard, state.depth, state.active = ShardingGuard(mesh, where), len(where), True
            state.guard.__enter__()

    def leave(module: nn.Module, _args, _out) -> None:
        if getattr(state, "guard", None) is not None and state.depth == len(where):
            guard, state.guard, state.active = state.guard, None, False
            guard.__exit__(None, None, None)
        if where:
            where.pop()

    for m in model.modules():
        if m is not model:
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave, always_call=True)  # also when forward raises
    base = type(model)

    def forward(self, *args, **kwargs):
        where.clear()
        outer = getattr(state, "active", False)
        state.active = True
        try:
            with ShardingGuard(self._halo_mesh, where):
                return base.forward(self, *args, **kwargs)
        finally:
            state.active = outer

    model.__class__ = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__,
                                                    "__doc__": base.__doc__})
    model._halo_mesh = mesh
