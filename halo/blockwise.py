"""Blockwise prediction: the sharded model's eval-mode output on as few devices as one.

With batch norm in eval mode every layer of a convolutional trunk is local: an output
position depends only on the input pixels within its receptive field. So the trunk's
feature map of a whole slide can be computed block by block: each block is read together
with a *margin* of real neighbouring pixels (its receptive-field reach, rounded up to the
trunk's total stride so that crops stay on the output grid), the trunk runs on that
extended block alone, the margin's outputs are cropped away and the rest is written into
the stitched feature map. At the true image border there is no margin beyond the image,
so the trunk pads exactly where the full-image forward pads. The head then runs once on
the stitched map (``(N, C, H / T, W / T)``: small beside the slide). The result equals the
full-image forward, and so the prediction of the model sharded by :func:`halo.parallelize`,
while memory holds one extended block of the image (plus the feature map) at a time.

::

    model.eval()
    out = halo.predict_blockwise(model, image, grid=(4, 4))           # an (N, C, H, W) tensor
    out = halo.predict_blockwise(model, halo.blockwise.region_reader(plan, transform), grid=(8, 8))
    out.logits, out.features, out.head_map

The margins come from the model itself (:func:`trunk_margins`): the trunk runs once on a
small probe image under a :class:`torch.overrides.TorchFunctionMode` that records every
window op it calls (convolution, max / average / power pooling, explicit padding: module
or functional) with its kernel, stride, padding and dilation, and the grid it runs on
(input pixels per row and column of its input). A window op with halo widths ``before``
/ ``after`` (:func:`halo.geometry.halo_widths`, as :func:`halo.parallelize` computes them)
on a grid of ``S`` input pixels lets the zero padding at a block's cut edge reach at most
``before * S`` (``after * S``) input pixels further into the block; summed over every window
op the trunk calls (an upper bound of the longest path through residual branches) and
rounded up to the total stride ``T``, that is the margin on each side. The same mode
refuses, naming the module path, anything that is not local in eval mode: training-mode
batch norm (or batch norm without running statistics), global pooling or reductions over
the spatial dims inside the trunk (squeeze-excitation), group / instance norm, resizing,
crops, circular padding, and every other call :class:`halo.guard.ShardingGuard` refuses.
It stays active on every block, and each block's own calls are checked against the margin.

With a process ``group``, the blocks are dealt out round-robin over its ranks (fewer
ranks than blocks, down to one), each rank writes its crops into a zero feature map, one
all-reduce sum stitches them (every entry has exactly one nonzero contribution, so the sum
is exact) and every rank runs the head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from halo.errors import HaloNotSupportedError, HaloShapeError
from halo.guard import WINDOW_OPS, ShardingGuard, spatial_dims
from halo.nn._window import pair
from halo.nn.same import padded_widths

__all__ = [
    "WindowCall",
    "Margins",
    "BlockwiseResult",
    "RegionReader",
    "trunk_margins",
    "block_cuts",
    "predict_blockwise",
    "region_reader",
]

Reader = Callable[[int, int, int, int], torch.Tensor]
"""``reader(y0, y1, x0, x1)``: the ``(N, C, y1 - y0, x1 - x0)`` pixels of that rectangle of the image."""

# argument names, in position order, of the window ops the blockwise guard follows
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "convolution": ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                    "groups"),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "max_pool2d_with_indices": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                "return_indices"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                   "divisor_override"),
    "lp_pool2d": ("input", "norm_type", "kernel_size", "stride", "ceil_mode"),
    "pad": ("input", "pad", "mode", "value"),
}
_ADAPTIVE = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_max_pool2d", "adaptive_max_pool2d_with_indices",
             "adaptive_avg_pool1d", "adaptive_max_pool1d", "adaptive_avg_pool3d", "adaptive_max_pool3d"}
# what may look at a padded tensor before the window op that consumes it
_INSPECT = {"__get__", "size", "dim", "shape", "is_contiguous", "numel"}
_PAD_ATTR = "_halo_blockwise_pad"  # (top, bottom, left, right) of explicit padding still to be consumed

_SUPPORTED = ("convolutions (zeros, reflect or replicate padding), max / average / power pooling, explicit "
              "padding (constant, reflect, replicate), eval-mode batch norm with running statistics, point-wise "
              "ops and ops along the batch or channel dims (layer norm over channels, channel concatenation)")


@dataclass(frozen=True)
class WindowCall:
    """One window op the trunk called: where, and how far its padding reaches.

    Attributes
    ----------
    path, op:
        Module path (``trunk.1.0.conv1``) and the torch function (``conv2d``, ``max_pool2d`` ...).
    in_size:
        ``(h, w)`` of the op's input (explicit padding folded into it excluded).
    before, after:
        ``(top, left)`` and ``(bottom, right)`` halo widths in rows / columns of the op's input
        (:func:`halo.geometry.halo_widths`; ``after`` may be negative: rows never read).
    stride:
        ``(sh, sw)`` of the op.
    """

    path: str
    op: str
    in_size: tuple[int, int]
    before: tuple[int, int]
    after: tuple[int, int]
    stride: tuple[int, int]


@dataclass(frozen=True)
class Margins:
    """How far each block is extended, in input pixels, and why.

    Attributes
    ----------
    stride:
        The trunk's total output stride ``T`` (:func:`halo.models.total_stride`).
    top, bottom, left, right:
        Margins in input pixels: ``reach`` rounded up to a multiple of ``stride``.
    reach:
        ``(top, bottom, left, right)`` the receptive-field bound itself: the sum over every window
        op of its halo width times the input pixels per row (column) of its input.
    calls:
        The window ops of the probe forward the bound was summed over.
    out_channels, out_dtype:
        Channels and dtype of the trunk's feature map (on the probe, under the caller's autocast).
    """

    stride: int
    top: int
    bottom: int
    left: int
    right: int
    reach: tuple[int, int, int, int]
    calls: tuple[WindowCall, ...] = field(repr=False, default=())
    out_channels: int = 0
    out_dtype: torch.dtype | None = None

    @property
    def pixels(self) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)``."""
        return self.top, self.bottom, self.left, self.right


@dataclass
class BlockwiseResult:
    """What :func:`predict_blockwise` computed.

    Attributes
    ----------
    logits:
        ``(N, num_classes)``: the head on the stitched feature map.
    features:
        ``(N, C, H / T, W / T)``: the trunk's feature map of the whole image.
    head_map:
        The head's ``last_map`` after the call (attention weights or class scores over the
        feature map, for heatmaps), or None.
    margins:
        See :class:`Margins`.
    row_cuts, col_cuts:
        Block boundaries in input pixels (``[0, ..., H]``, ``[0, ..., W]``).
    inputs:
        ``(y0, y1, x0, x1)`` of every extended block this process fed to the trunk, in order.
    """

    logits: torch.Tensor
    features: torch.Tensor
    head_map: torch.Tensor | None
    margins: Margins
    row_cuts: tuple[int, ...]
    col_cuts: tuple[int, ...]
    inputs: list[tuple[int, int, int, int]]

    @property
    def largest_input(self) -> tuple[int, int]:
        """``(h, w)``: the tallest and the widest extended block this process read."""
        return (max((b - a for a, b, _, _ in self.inputs), default=0),
                max((d - c for _, _, c, d in self.inputs), default=0))


def _name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _refusal(path: str, what: str, why: str) -> HaloNotSupportedError:
    return HaloNotSupportedError(
        f"{path} ({what}) {why}, so blockwise prediction cannot crop it exactly; it needs a trunk whose every "
        f"layer is local in eval mode: {_SUPPORTED}. Predict with the model sharded by halo.parallelize instead"
    )


class _BlockGuard(ShardingGuard):
    """Follows the spatial dims of the trunk's tensors as :class:`ShardingGuard` does; records
    window ops instead of refusing them, refuses global ops instead of routing them."""

    def __init__(self, where: list[str], calls: list[WindowCall]) -> None:
        super().__init__(None, where)  # type: ignore[arg-type]  # no mesh: nothing is routed to a collective
        self.calls = calls

    def _path(self) -> str:
        return self.where[-1] if self.where else "<trunk>"

    def refusal(self, name: str, x: torch.Tensor, why: str) -> HaloNotSupportedError:
        return _refusal(self._path(), f"calls {name} on a tensor of shape {tuple(x.shape)}, spatial dims "
                        f"{spatial_dims(x)}", f"which {why}")

    def global_reduce(self, name: str, x: torch.Tensor, dims, keepdim: bool) -> torch.Tensor:
        raise self.refusal(name, x, "reduces over the whole feature map inside the trunk (a global op, as in "
                                    "squeeze-excitation): on a block it would see the block, not the image")

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, torch.Tensor) and spatial_dims(x):
            if name in _SIGNATURES:
                return self._window(func, name, x, args, kwargs)
            if name in _ADAPTIVE:
                raise self.refusal(name, x, "pools the feature map to a fixed size inside the trunk (a global op, "
                                            "as in squeeze-excitation): on a block it would pool the block, not "
                                            "the image")
            if name in WINDOW_OPS:
                raise self.refusal(name, x, "mixes pixels in a way the margins cannot bound or depends on the "
                                            "image size (resizing, unfold, group or instance norm, flips, ...)")
        if name not in _INSPECT:
            for t in (args, kwargs.values()):
                for a in t:
                    if isinstance(a, torch.Tensor) and getattr(a, _PAD_ATTR, None) is not None:
                        raise self.refusal(name, a, "uses an explicitly padded tensor other than as the input of "
                                                    "the window op that follows the padding")
        return super().__torch_function__(func, types, args, kwargs)

    def _window(self, func, name: str, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        path = self._path()
        what = f"{name} on a tensor of shape {tuple(x.shape)}"
        if x.dim() != 4 or spatial_dims(x) != (2, 3):
            raise self.refusal(name, x, "runs a 2-D window over dims that are not (2, 3) of an (N, C, H, W) tensor")
        a = dict(zip(_SIGNATURES[name], args))
        a.update(kwargs)
        pad = getattr(x, _PAD_ATTR, None) or (0, 0, 0, 0)
        if name == "pad":
            return self._pad(func, x, a, args, kwargs, pad, path, what)
        if name in ("conv2d", "convolution"):
            if a.get("transposed", False):
                raise _refusal(path, what, "is a transposed convolution (it maps one input pixel to a window)")
            kernel = tuple(a["weight"].shape[-2:])
            stride, dilation = pair(a.get("stride", 1)), pair(a.get("dilation", 1))
            padding = a.get("padding", 0)
        else:
            kernel = pair(a["kernel_size"])
            stride = a.get("stride")
            stride = kernel if stride is None or stride == [] or stride == () else pair(stride)
            dilation = pair(a.get("dilation", 1))
            padding = a.get("padding", 0)
            if name.startswith("max") and (a.get("return_indices", False) or name.endswith("with_indices")):
                raise _refusal(path, what, "returns indices, which are positions in the block, not in the image")
        if isinstance(padding, str):
            if padding == "valid":
                own = ((0, 0), (0, 0))
            elif padding == "same":
                own = tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation))
            else:
                raise _refusal(path, what, f"has padding={padding!r}")
        else:
            own = tuple((p, p) for p in pair(padding))
        sizes = (x.shape[2] - pad[0] - pad[1], x.shape[3] - pad[2] - pad[3])
        widths = []
        for dim, (n, k, s, d, (b, e), extra) in enumerate(zip(sizes, kernel, stride, dilation, own,
                                                            ((pad[0], pad[1]), (pad[2], pad[3])))):
            if n % s:
                raise HaloShapeError(
                    f"{path} ({what}) gets {'HW'[dim]} = {n}, not a multiple of its stride {s}: the trunk's input "
                    f"must be a multiple of its total stride (and so must every block)")
            widths.append(padded_widths(path, what, k, s, d, b + extra[0], e + extra[1]))
        out = func(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        want = (sizes[0] // stride[0], sizes[1] // stride[1])
        if tuple(y.shape[-2:]) != want:
            raise HaloShapeError(
                f"{path} ({what}) maps {sizes[0]} x {sizes[1]} to {tuple(y.shape[-2:])}, not {want[0]} x {want[1]} "
                f"(ceil_mode?); blockwise prediction needs every window op to divide its input by its stride")
        self.calls.append(WindowCall(path, name, sizes, (widths[0].before, widths[1].before),
                                     (widths[0].after, widths[1].after), stride))
        return out

    def _pad(self, func, x, a: dict, args, kwargs, pad, path: str, what: str) -> torch.Tensor:
        widths = tuple(a["pad"])
        mode = a.get("mode", "constant") or "constant"
        if len(widths) not in (2, 4) or any(int(p) < 0 for p in widths):
            raise _refusal(path, what, f"pads by {widths} (only non-negative padding of the last two dims)")
        if mode not in ("constant", "reflect", "replicate"):
            raise _refusal(path, what, f"pads in mode {mode!r} (circular padding wraps the image around)")
        left, right = int(widths[0]), int(widths[1])
        top, bottom = (int(widths[2]), int(widths[3])) if len(widths) == 4 else (0, 0)
        out = func(*args, **kwargs)
        setattr(out, _PAD_ATTR, (pad[0] + top, pad[1] + bottom, pad[2] + left, pad[3] + right))
        return out


def _trunk_of(model: nn.Module) -> tuple[nn.Module, str]:
    trunk = getattr(model, "trunk", None)
    if isinstance(trunk, nn.Module):
        return trunk, "trunk"
    return model, ""


def _check_model(model: nn.Module, trunk: nn.Module, prefix: str) -> None:
    if getattr(model, "_halo_mesh", None) is not None or getattr(trunk, "_halo_mesh", None) is not None:
        raise HaloNotSupportedError(
            f"{type(model).__name__} is sharded by halo.parallelize (its layers exchange halos over a mesh); "
            f"predict_blockwise takes the unsharded model: build it again and load the same state dict")
    training: list[tuple[str, nn.Module]] = []
    for name, m in trunk.named_modules():
        path = ".".join(p for p in (prefix, name) if p) or "<trunk>"
        if type(m).__module__.startswith("halo.nn"):
            raise HaloNotSupportedError(
                f"{path} ({_name(type(m))}) is a halo layer of a sharded model; predict_blockwise takes the "
                f"unsharded model (the same state dict loads into it)")
        if m.training:
            training.append((path, m))
    if training:
        # name a layer whose mode matters (batch norm, dropout, a leaf) rather than a container
        modal = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)
        path, m = next((t for t in training if isinstance(t[1], modal)),
                       next((t for t in training if not t[1]._modules), training[0]))
        raise HaloNotSupportedError(
            f"{path} ({_name(type(m))}) is in training mode: blockwise prediction is exact only in eval mode "
            f"(batch norm in training mode normalises each block by its own statistics, dropout draws per "
            f"block); call model.eval() first")


class _Where:
    """Forward hooks keeping the path of the running trunk module, for the guard's messages."""

    def __init__(self, trunk: nn.Module, prefix: str) -> None:
        self.where: list[str] = []
        self._hooks = []
        for name, m in trunk.named_modules():
            path = ".".join(p for p in (prefix, name) if p) or "<trunk>"
            self._hooks.append(m.register_forward_pre_hook(lambda _m, _a, p=path: self._enter(p)))
            self._hooks.append(m.register_forward_hook(lambda _m, _a, _o: self._leave(), always_call=True))

    def _enter(self, path: str) -> None:  # hooks return None: a forward hook's return replaces the output
        self.where.append(path)

    def _leave(self) -> None:
        if self.where:
            self.where.pop()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def _run_trunk(model: nn.Module, trunk: nn.Module, where: _Where, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    from halo.models import SlideClassifier

    calls: list[WindowCall] = []
    where.where.clear()
    with _BlockGuard(where.where, calls):
        y = model.features(x) if isinstance(model, SlideClassifier) else trunk(x)
    if not isinstance(y, torch.Tensor) or y.dim() != 4:
        raise HaloNotSupportedError(f"the trunk of {type(model).__name__} returns "
                                    f"{type(y).__name__}{tuple(getattr(y, 'shape', ()))}, not an (N, C, h, w) "
                                    f"feature map")
    return y, calls


def _reach(calls: Sequence[WindowCall], size: tuple[int, int], stride: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)``: how far, in input pixels of a ``size`` input, the padding at a
    cut edge reaches into the trunk's output, summed over ``calls`` (see the module docstring)."""
    reach = [0, 0, 0, 0]
    for c in calls:
        for dim in range(2):
            n, m = size[dim], c.in_size[dim]
            grid = n // m if m and n % m == 0 else 0
            if not grid or stride % (grid * c.stride[dim]):
                raise HaloNotSupportedError(
                    f"{c.path} ({c.op}) runs on {c.in_size[0]} x {c.in_size[1]} of a {size[0]} x {size[1]} input: "
                    f"its grid does not divide the trunk's total stride {stride}, so a block's crop would not "
                    f"fall on its output grid")
            reach[2 * dim] += c.before[dim] * grid
            reach[2 * dim + 1] += max(c.after[dim], 0) * grid
    return reach[0], reach[1], reach[2], reach[3]


def _first_input_channels(trunk: nn.Module) -> int:
    for m in trunk.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels
    return 3


def _total_stride(trunk: nn.Module, channels: int, dtype: torch.dtype, probe: int = 4096) -> int:
    """Input size over output size on meta tensors (as :func:`halo.models.total_stride`, in the
    parameters' dtype: a padded convolution checks that its input's dtype is its weight's)."""
    import itertools

    from torch.func import functional_call

    state = {k: torch.empty_like(v, device="meta")
             for k, v in itertools.chain(trunk.named_parameters(), trunk.named_buffers())}
    try:
        with torch.no_grad():
            out = functional_call(trunk, state, (torch.empty(1, channels, probe, probe, device="meta", dtype=dtype),))
    except Exception as e:  # noqa: BLE001 - say which model could not be measured
        raise HaloNotSupportedError(f"cannot measure the total stride of {type(trunk).__name__} on a meta "
                                    f"{probe} x {probe} image: {type(e).__name__}: {e}") from e
    h, w = out.shape[-2:]
    if probe % h or probe % w or h != w:
        raise HaloShapeError(f"the trunk maps {probe} x {probe} to {h} x {w}: not a whole output stride")
    return probe // h


def trunk_margins(model: nn.Module, *, channels: int | None = None) -> Margins:
    """The margins blockwise prediction extends each block by, derived from the model's own layers.

    Runs the trunk (``model.trunk``, or ``model`` itself) once under ``torch.no_grad`` on a
    ``2U x 3U`` probe image (``U = lcm(T, 64)``, ``T`` its total stride), recording every window op and refusing
    every op that is not local in eval mode (see the module docstring).

    Raises
    ------
    HaloNotSupportedError
        Naming the module path of the first layer that is in training mode, sharded, or not
        local (a global op inside the trunk, training-mode batch norm, resizing, ...).
    """
    trunk, prefix = _trunk_of(model)
    _check_model(model, trunk, prefix)
    param = next(iter(trunk.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    channels = channels or _first_input_channels(trunk)
    where = _Where(trunk, prefix)

    def run(size: tuple[int, int]) -> tuple[torch.Tensor, list[WindowCall]]:
        probe = torch.randn(1, channels, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return _run_trunk(model, trunk, where, probe.to(device=device, dtype=dtype))

    try:
        try:
            stride = _total_stride(trunk, channels, dtype)
        except (HaloNotSupportedError, HaloShapeError):
            run((256, 384))  # a layer the guard refuses (returning indices, resizing) says so by name
            raise
        unit = math.lcm(stride, 64)  # at least 64: a trunk that upsamples has a small "stride"
        size = (2 * unit, 3 * unit)
        y, calls = run(size)
    finally:
        where.close()
    if tuple(y.shape[-2:]) != (2 * unit // stride, 3 * unit // stride):
        raise HaloShapeError(f"the trunk maps a {size[0]} x {size[1]} probe to {tuple(y.shape[-2:])}, not "
                             f"{2 * unit // stride} x {3 * unit // stride} (its total stride {stride})")
    reach = _reach(calls, size, stride)
    up = [-(-r // stride) * stride for r in reach]
    return Margins(stride, *up, reach=reach, calls=tuple(calls), out_channels=int(y.shape[1]),
                   out_dtype=y.dtype)


def block_cuts(length: int, parts: int | Sequence[int], multiple: int, what: str = "H") -> tuple[int, ...]:
    """Boundaries ``[0, ..., length]`` of the blocks along one dim.

    ``parts`` blocks (an int) as equal as the ``multiple`` allows: each a whole number of
    ``multiple`` pixels, the first ``(length / multiple) % parts`` one ``multiple`` longer. Or
    explicit boundaries (a sequence from 0 to ``length``, multiples of ``multiple``).
    """
    if length % multiple:
        raise HaloShapeError(f"image {what} = {length} is not a multiple of the trunk's total stride {multiple}; pad "
                             f"it (halo.geometry.padded_size) as the sharded model needs too")
    units = length // multiple
    if isinstance(parts, int):
        if not 1 <= parts <= units:
            raise HaloShapeError(f"cannot cut {what} = {length} into {parts} blocks of whole multiples of {multiple}")
        q, r = divmod(units, parts)
        cuts = [0]
        for i in range(parts):
            cuts.append(cuts[-1] + (q + (i < r)) * multiple)
        return tuple(cuts)
    cuts = tuple(int(c) for c in parts)
    if (len(cuts) < 2 or cuts[0] != 0 or cuts[-1] != length or any(b <= a for a, b in zip(cuts, cuts[1:]))
            or any(c % multiple for c in cuts)):
        raise HaloShapeError(f"block boundaries {list(cuts)} along {what} must rise from 0 to {length} in multiples of "
                             f"the trunk's total stride {multiple}")
    return cuts


class RegionReader:
    """Reads rectangles ``(y0, y1, x0, x1)`` of a :func:`halo.data.plan_region` plan's padded region
    (un-augmented, stain-normalised as ``read_block`` does) as ``(1, 3, h, w)`` float tensors in
    ``[0, 1]``, then ``transform`` (e.g. ImageNet normalisation). ``size`` is ``plan.shape()``."""

    def __init__(self, plan, transform: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 slide=None, device: torch.device | str | None = None) -> None:
        self.plan = plan
        self.transform = transform
        self.slide = slide
        self.device = device
        self.size = tuple(plan.shape())

    def __call__(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        import numpy as np

        from halo.data.region import read_rect

        img = read_rect(self.plan, (y0, y1, x0, x1), slide=self.slide)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float().div_(255)
        if self.device is not None:
            x = x.to(self.device)
        return self.transform(x) if self.transform is not None else x


def region_reader(plan, transform: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs) -> RegionReader:
    """A reader of ``plan``'s padded region for :func:`predict_blockwise` (see :class:`RegionReader`)."""
    return RegionReader(plan, transform, **kwargs)


@torch.no_grad()
def predict_blockwise(
    model: nn.Module,
    image: torch.Tensor | Reader,
    *,
    grid: tuple[int | Sequence[int], int | Sequence[int]] = (1, 1),
    size: tuple[int, int] | None = None,
    batch: int | None = None,
    group: Any = None,
    device: torch.device | str | None = None,
) -> BlockwiseResult:
    """The eval-mode prediction of ``model`` on ``image``, one block (plus margins) at a time.

    Parameters
    ----------
    model:
        An unsharded slide classifier in eval mode: ``model.trunk`` (the convolutional trunk,
        run through ``model.features`` for a :class:`halo.models.SlideClassifier`) and
        ``model.head`` (run once on the stitched feature map).
    image:
        ``(N, C, H, W)`` tensor, or a reader ``reader(y0, y1, x0, x1) -> (N, C, y1 - y0, x1 - x0)``
        (with ``size``, or a ``size`` attribute as :class:`RegionReader` has): then only the
        extended blocks are ever read.
    grid:
        ``(rows, cols)``: blocks per dim, each an int (as equal as the trunk's stride allows,
        :func:`block_cuts`) or explicit boundaries in pixels. Any number of blocks works on any
        number of processes; more blocks mean smaller reads and more margin overhead.
    size:
        ``(H, W)`` of a reader's image.
    batch:
        ``N`` of a reader's blocks (default 1).
    group:
        A ``torch.distributed`` process group (or ``dist.group.WORLD``) sharing the blocks
        round-robin; every rank returns the same result. None: this process does every block.
    device:
        Where blocks are computed (default: the device of the model's parameters).

    Returns
    -------
    BlockwiseResult
        The logits, the stitched feature map, the head's map, the margins, the block cuts and
        the rectangles this process fed to the trunk.

    Raises
    ------
    HaloNotSupportedError
        A layer that is not local in eval mode (see :func:`trunk_margins`), naming its module path.
    HaloShapeError
        An image or block size that is not a multiple of the trunk's total stride.
    """
    trunk, prefix = _trunk_of(model)
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module) or trunk is model:
        raise TypeError(f"predict_blockwise needs a model with a `trunk` and a `head` (halo.models.SlideClassifier); "
                        f"got {type(model).__name__}")
    if isinstance(image, torch.Tensor):
        if image.dim() != 4:
            raise HaloShapeError(f"predict_blockwise expects an (N, C, H, W) image, got shape {tuple(image.shape)}")
        height, width = image.shape[-2:]
        n = image.shape[0]
        read: Reader = lambda y0, y1, x0, x1: image[:, :, y0:y1, x0:x1]  # noqa: E731 - a view, no copy
    elif callable(image):
        size = size if size is not None else getattr(image, "size", None)
        if size is None:
            raise TypeError("predict_blockwise: a reader needs size=(H, W) (or a `size` attribute)")
        height, width = (int(s) for s in size)
        n = batch or 1
        read = image
    else:
        raise TypeError(f"predict_blockwise: image must be a tensor or a reader, got {type(image).__name__}")
    param = next(iter(model.parameters()), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else None)
    channels = image.shape[1] if isinstance(image, torch.Tensor) else None
    margins = trunk_margins(model, channels=channels)
    t = margins.stride
    rows = block_cuts(height, grid[0], t, "H")
    cols = block_cuts(width, grid[1], t, "W")
    rank, world = 0, 1
    if group is not None:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    features: torch.Tensor | None = None
    inputs: list[tuple[int, int, int, int]] = []
    where = _Where(trunk, prefix)
    try:
        blocks = [(i, j) for i in range(len(rows) - 1) for j in range(len(cols) - 1)]
        for index, (i, j) in enumerate(blocks):
            if index % world != rank:
                continue
            a, b, c, d = rows[i], rows[i + 1], cols[j], cols[j + 1]
            y0, y1 = max(0, a - margins.top), min(height, b + margins.bottom)
            x0, x1 = max(0, c - margins.left), min(width, d + margins.right)
            x = read(y0, y1, x0, x1)
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[-2:]) != (y1 - y0, x1 - x0):
                raise HaloShapeError(f"the reader returned {tuple(getattr(x, 'shape', ()))} for rows {y0}:{y1}, "
                                     f"cols {x0}:{x1}; expected (N, C, {y1 - y0}, {x1 - x0})")
            if device is not None:
                x = x.to(device)
            inputs.append((y0, y1, x0, x1))
            y, calls = _run_trunk(model, trunk, where, x)
            del x
            need = _reach(calls, (y1 - y0, x1 - x0), t)
            if any(r > m for r, m in zip(need, margins.reach)):
                raise HaloNotSupportedError(
                    f"the trunk's window ops on block {(i, j)} reach {need} (top, bottom, left, right) but on the "
                    f"probe {margins.reach}: its layers depend on the input size; blockwise prediction cannot bound "
                    f"them")
            if tuple(y.shape[-2:]) != ((y1 - y0) // t, (x1 - x0) // t):
                raise HaloShapeError(f"the trunk maps a {y1 - y0} x {x1 - x0} block to {tuple(y.shape[-2:])}, "
                                     f"not its size over the total stride {t}")
            if features is None:
                features = y.new_zeros(y.shape[0], y.shape[1], height // t, width // t)
            features[:, :, a // t:b // t, c // t:d // t] = y[:, :, (a - y0) // t:(b - y0) // t,
                                                            (c - x0) // t:(d - x0) // t]
            del y
    finally:
        where.close()
    if world > 1:
        if features is None:  # more ranks than blocks: this one adds zeros
            features = torch.zeros(n, margins.out_channels, height // t, width // t, dtype=margins.out_dtype,
                                   device=device)
        dist.all_reduce(features, group=group)
    assert features is not None
    logits = head(features)
    return BlockwiseResult(logits=logits, features=features, head_map=getattr(head, "last_map", None),
                           margins=margins, row_cuts=rows, col_cuts=cols, inputs=inputs)
