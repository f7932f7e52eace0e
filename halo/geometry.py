"""Pure integer arithmetic of spatial sharding: halo widths, block sizes, output shapes.

Vocabulary: "axis" is a mesh axis (``row``, ``col``); "dim" is a tensor dimension.
Everything here is pure Python on ints; nothing knows about torch.distributed.

A window op (convolution or pooling) with kernel ``k``, stride ``s``, padding ``p`` and
dilation ``d`` is *same-style* when a global input of length ``n * s`` gives an output
of length ``n``. Then a rank owning input rows ``[a, a + m)`` (``m`` a multiple of
``s``) computes output rows ``[a / s, (a + m) / s)`` and needs input rows
``a - p`` to ``a + m - 1 + (d (k - 1) - p - s + 1)``: a halo of ``p`` before and
``d (k - 1) - p - s + 1`` after (negative: that many trailing rows are trimmed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "HaloWidths",
    "conv_output_size",
    "is_same_style",
    "halo_widths",
    "block_bounds",
    "block_size",
    "required_multiple",
    "padded_size",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class HaloWidths:
    """Halo widths along one tensor dim.

    Attributes
    ----------
    before:
        Rows (or columns) needed from the neighbour toward index 0; ``>= 0``.
    after:
        Rows needed from the neighbour toward the last index; negative means that
        many trailing rows of the local block are trimmed instead.
    """

    before: int
    after: int

    @property
    def width(self) -> int:
        """The widest strip that crosses a block edge."""
        return max(self.before, self.after, 0)


def conv_output_size(
    size: int, kernel: int, stride: int, padding: int, dilation: int = 1, ceil_mode: bool = False
) -> int:
    """Output length of a torch convolution or pooling window along one dim.

    Follows ``torch.nn.Conv2d`` / ``MaxPool2d`` exactly, including the ceil-mode rule
    that the last window must start inside the input or the leading padding.
    """
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= size + padding:
            out -= 1
        return out
    return span // stride + 1


def is_same_style(kernel: int, stride: int, padding: int, dilation: int = 1) -> bool:
    """Whether an input of length ``n * stride`` always gives an output of length ``n``.

    Holds exactly when ``d (k - 1) + 1 - s <= 2 p <= d (k - 1)``.
    """
    reach = dilation * (kernel - 1)
    return reach + 1 - stride <= 2 * padding <= reach


def halo_widths(kernel: int, stride: int, padding: int, dilation: int = 1) -> HaloWidths:
    """Halo widths along one dim for a same-style window op.

    Raises
    ------
    ValueError
        If the op is not same-style (see :func:`is_same_style`): its output length is
        not the input length divided by the stride, so equal blocks cannot stay equal.
    """
    for name, value in (("kernel", kernel), ("stride", stride), ("dilation", dilation)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if not is_same_style(kernel, stride, padding, dilation):
        reach = dilation * (kernel - 1)
        lo = math.ceil(max(reach + 1 - stride, 0) / 2)
        raise ValueError(
            f"kernel={kernel}, stride={stride}, padding={padding}, dilation={dilation} does not map "
            f"an input of n*{stride} to n outputs; padding must be in [{lo}, {reach // 2}]"
        )
    return HaloWidths(before=padding, after=dilation * (kernel - 1) - padding - stride + 1)


def block_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of block ``index`` when ``size`` is cut into ``parts`` equal blocks."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"index {index} is outside a split into {parts} parts")
    if size % parts:
        raise ValueError(f"size {size} does not split into {parts} equal blocks")
    step = size // parts
    return index * step, (index + 1) * step


def block_size(size: int, parts: int) -> int:
    """Length of each of ``parts`` equal blocks of ``size``."""
    return block_bounds(size, parts, 0)[1]


def required_multiple(total_stride: int, parts: int) -> int:
    """The multiple a global length must be so that every block divides by ``total_stride``."""
    if total_stride < 1 or parts < 1:
        raise ValueError(f"total_stride and parts must be >= 1, got {total_stride}, {parts}")
    return total_stride * parts


def padded_size(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``."""
    return -(-size // multiple) * multiple
