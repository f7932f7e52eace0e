"""Shared plumbing of window ops (convolution and pooling): halo specs and block checks."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Sequence

import torch

from halo.errors import HaloNotSupportedError, HaloShapeError
from halo.exchange import HaloSpec
from halo.geometry import HaloWidths, halo_widths, is_same_style

__all__ = [
    "pair",
    "window_spec",
    "check_block",
    "check_layout",
    "SPATIAL_ATTR",
    "REPLICATED_ATTR",
    "is_replicated",
    "mark_replicated",
    "halo_op",
    "in_halo_op",
    "split_local",
    "METHODS",
    "native_padding",
    "border_bands",
]

#: How a window op treats its halo: "bands" runs the op on the block under its own padding and
#: recomputes the border bands that read a neighbour's halo, "assemble" builds the
#: halo-extended block, "auto" picks (per op; see HaloConv2d and HaloMaxPool2d).
METHODS = ("auto", "bands", "assemble")

Span = tuple[int, int]

# Outputs of global pooling are the same on every rank of an image; later spatial ops on
# them run locally. The mark is a plain attribute on the tensor object.
REPLICATED_ATTR = "_halo_replicated"


def is_replicated(x: torch.Tensor) -> bool:
    return bool(getattr(x, REPLICATED_ATTR, False))


def mark_replicated(x: torch.Tensor) -> torch.Tensor:
    setattr(x, REPLICATED_ATTR, True)
    return x


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    if len(value) == 1:
        return value[0], value[0]
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair, got {value!r}")
    return int(value[0]), int(value[1])


def _widths(name: str, what: str, k: int, s: int, p: int | tuple[int, int], d: int) -> HaloWidths:
    if isinstance(p, tuple):  # explicit (before, after) padding, e.g. from padding="same"
        before, after_pad = p
        if before + after_pad != d * (k - 1) - (s - 1) and s != 1:
            raise HaloNotSupportedError(f"{name} ({what}): asymmetric padding {p} with stride {s} is not supported")
        return HaloWidths(before=before, after=d * (k - 1) - before - s + 1)
    if not is_same_style(k, s, p, d):
        reach = d * (k - 1)
        raise HaloNotSupportedError(
            f"{name} ({what}): kernel {k}, stride {s}, padding {p}, dilation {d} does not map an input of "
            f"n*{s} to n outputs, so equal blocks cannot stay equal; halo supports padding between "
            f"{-(-max(reach + 1 - s, 0) // 2)} and {reach // 2} for this kernel (\"same\"-style layers)"
        )
    return halo_widths(k, s, p, d)


def window_spec(
    name: str,
    what: str,
    kernel: int | Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int] | str,
    dilation: int | Sequence[int] = 1,
    fill: float = 0.0,
) -> HaloSpec:
    """The halo spec of a 2-D window op, or :class:`HaloNotSupportedError` naming ``name``."""
    kh, kw = pair(kernel)
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            ph: int | tuple[int, int] = 0
            pw: int | tuple[int, int] = 0
        elif padding == "same":
            ph = (dh * (kh - 1) // 2, dh * (kh - 1) - dh * (kh - 1) // 2)
            pw = (dw * (kw - 1) // 2, dw * (kw - 1) - dw * (kw - 1) // 2)
        else:
            raise HaloNotSupportedError(f"{name} ({what}): padding={padding!r} is not supported")
    else:
        ph, pw = pair(padding)
    hh = _widths(name, what, kh, sh, ph, dh)
    ww = _widths(name, what, kw, sw, pw, dw)
    return HaloSpec(top=hh.before, bottom=hh.after, left=ww.before, right=ww.after, fill=fill)


#: Tensor attribute the sharding guard sets: which dims of a block are spatial (``halo.guard``).
SPATIAL_ATTR = "_halo_spatial"


def check_layout(x: torch.Tensor, name: str, what: str) -> None:
    """Refuse a block whose spatial dims are not 2 and 3 (a channels-last block, as ConvNeXt
    permutes to): an ``(N, C, h, w)`` layer would take H or W for its channels."""
    dims = getattr(x, SPATIAL_ATTR, None)
    if dims is not None and tuple(dims) != (2, 3):
        raise HaloShapeError(
            f"{name} ({what}) expects an (N, C, h, w) block but got shape {tuple(x.shape)} with its spatial "
            f"dims at {tuple(dims)}; permute it back to channels-first first"
        )


def check_block(x: torch.Tensor, spec: HaloSpec, stride: int | Sequence[int], name: str, what: str) -> None:
    """Refuse a local block that a window op cannot process exactly."""
    if x.dim() != 4:
        raise HaloShapeError(f"{name} ({what}) expects a local (N, C, h, w) block, got shape {tuple(x.shape)}")
    check_layout(x, name, what)
    sh, sw = pair(stride)
    h, w = x.shape[-2:]
    for dim, size, s, before, after in (("H", h, sh, spec.top, spec.bottom), ("W", w, sw, spec.left, spec.right)):
        if size % s:
            raise HaloShapeError(
                f"{name} ({what}) got a local block of {h} x {w}: {dim} = {size} is not a multiple of the "
                f"stride {s}; pad the image so every block is a multiple of the model's total stride"
            )
        widest = max(before, after, -after)
        if widest > size or (after < 0 and -after >= size):
            raise HaloShapeError(
                f"{name} ({what}) needs a halo of {widest} along {dim} but the local block is only {size} wide; "
                f"use fewer ranks along {dim} or a larger image (a halo may be as wide as the block, not wider)"
            )


_IN_HALO_OP = contextvars.ContextVar("halo_in_layer", default=False)


def in_halo_op() -> bool:
    """Whether a halo layer is running (its own functional calls are not guarded)."""
    return _IN_HALO_OP.get()


def halo_op(forward):
    """Decorate a halo layer's ``forward``: the sharding guard lets its calls through."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        token = _IN_HALO_OP.set(True)
        try:
            return forward(*args, **kwargs)
        finally:
            _IN_HALO_OP.reset(token)

    return wrapper


def split_local(spec: HaloSpec, mesh) -> tuple[HaloSpec, tuple[int, int]]:
    """Leave the dims that are not sharded to the op's own padding.

    Along a mesh axis of size 1 the block is the whole image there: the op pads that dim
    itself (``padding = before``; a same-style op never needs more after than before), so
    nothing is exchanged, concatenated or filled. Returns the spec still to exchange and
    the native ``(pad_h, pad_w)``.
    """
    local_h = mesh.rows == 1 and spec.bottom <= spec.top
    local_w = mesh.cols == 1 and spec.right <= spec.left
    exchange = HaloSpec(
        top=0 if local_h else spec.top,
        bottom=0 if local_h else spec.bottom,
        left=0 if local_w else spec.left,
        right=0 if local_w else spec.right,
        fill=spec.fill,
    )
    return exchange, (spec.top if local_h else 0, spec.left if local_w else 0)


def native_padding(spec: HaloSpec, padding: tuple[int, int]) -> tuple[int, int] | None:
    """Padding under which the op on the block alone has the extended block's output grid,
    or None: symmetric padding ``before`` fits wherever the halo after the block is no wider
    (a same-style op reads at most ``after`` rows past the block's end). ``padding`` is the
    op's own, on dims that exchange nothing (:func:`split_local`)."""
    if spec.bottom > spec.top or spec.right > spec.left:
        return None
    return padding[0] + spec.top, padding[1] + spec.left


def _inner(n: int, before: int, k: int, s: int, d: int) -> Span:
    """Along one dim: outputs from ``lo`` on start inside the block, outputs before ``hi``
    end inside it (on a block narrower than the window, ``hi < lo``)."""
    return -(-before // s), (n - 1 - d * (k - 1) + before) // s + 1


def _window(lo: int, hi: int, s: int, d: int, k: int) -> Span:
    """Rows of the extended block that outputs ``[lo, hi)`` read."""
    return lo * s, (hi - 1) * s + d * (k - 1) + 1


def border_bands(x_shape, spec: HaloSpec, kernel, stride, dilation, out_shape, mesh=None) -> list:
    """``(output rows, output cols, extended-block rows, extended-block cols)`` of the border
    bands whose windows read a neighbour's halo: rows above and below the halo-free middle
    (full width), then columns left and right of it (middle rows). With a ``mesh``, sides
    at the image edge are left out: they read only the op's padding, which the op on the
    block alone already has right. Without one, every side with a halo has its band (each
    rank then keeps the same, whatever its place in the mesh)."""
    dims = list(zip(x_shape[-2:], (spec.top, spec.left), (spec.bottom, spec.right), kernel, stride,
                    dilation, out_shape, ("row", "col")))
    middle = []
    for n, before, after, k, s, d, n_out, axis in dims:
        # without a mesh, every rank is treated as an inner one (neighbours on both sides)
        index, size = (mesh.axis_index(axis), mesh.axis_size(axis)) if mesh is not None else (1, 3)
        lo, hi = _inner(n, before, k, s, d)
        a = min(lo, n_out) if before > 0 and index > 0 else 0
        middle.append((a, max(min(hi, n_out), a) if after > 0 and index < size - 1 else n_out))

    def read(dim: int, span: Span) -> Span:
        n, before, after, k, s, d = dims[dim][:6]
        # a dim without halo is the block's own, under the op's padding
        return _window(*span, s, d, k) if before or after else (0, n)

    (ra, rb), (ca, cb) = middle
    oh, ow = out_shape
    bands = [((0, ra), (0, ow)), ((rb, oh), (0, ow)), ((ra, rb), (0, ca)), ((ra, rb), (cb, ow))]
    return [(r, c, read(0, r), read(1, c)) for r, c in bands if r[0] < r[1] and c[0] < c[1]]
