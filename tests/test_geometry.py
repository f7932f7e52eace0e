"""Pure halo arithmetic, checked exhaustively against brute force (no processes)."""

from __future__ import annotations

import itertools

import pytest
import torch

from halo.geometry import (
    block_bounds,
    conv_output_size,
    halo_widths,
    is_same_style,
    padded_size,
    required_multiple,
)

CASES = [
    (k, s, p, d)
    for k, s, p, d in itertools.product(range(1, 8), range(1, 5), range(0, 7), range(1, 4))
    if is_same_style(k, s, p, d)
]


def test_cases_cover_the_common_layers() -> None:
    for case in [(3, 1, 1, 1), (7, 2, 3, 1), (1, 2, 0, 1), (3, 2, 1, 1), (5, 2, 2, 1), (2, 2, 0, 1), (3, 1, 2, 2)]:
        assert case in CASES


@pytest.mark.parametrize("k,s,p,d", CASES)
def test_halo_widths_match_brute_force(k: int, s: int, p: int, d: int) -> None:
    """The input rows a block's outputs read are exactly [a - before, a + m - 1 + after]."""
    widths = halo_widths(k, s, p, d)
    for parts in (1, 2, 3):
        m = s * 4
        n = m * parts
        assert conv_output_size(n, k, s, p, d) == n // s
        for r in range(parts):
            a = r * m
            rows = [o * s - p + j * d for o in range(a // s, (a + m) // s) for j in range(k)]
            assert min(rows) == a - widths.before
            assert max(rows) == a + m - 1 + widths.after


def test_conv_output_size_matches_torch() -> None:
    for k, s, p, d in itertools.product(range(1, 6), range(1, 4), range(0, 3), range(1, 3)):
        if 2 * p > d * (k - 1) + 1 or p > k // 2:
            continue
        for n in range(max(1, d * (k - 1) + 1 - 2 * p), 12):
            x = torch.zeros(1, 1, 1, n)
            for ceil in (False, True):
                expected = torch.nn.functional.max_pool2d(x, (1, k), (1, s), (0, p), (1, d), ceil).shape[-1]
                assert conv_output_size(n, k, s, p, d, ceil) == expected, (n, k, s, p, d, ceil)


def test_not_same_style_is_refused() -> None:
    with pytest.raises(ValueError, match="padding must be in"):
        halo_widths(3, 1, 0)
    with pytest.raises(ValueError, match="kernel must be >= 1"):
        halo_widths(0, 1, 0)


def test_block_arithmetic() -> None:
    assert block_bounds(12, 3, 1) == (4, 8)
    with pytest.raises(ValueError, match="does not split"):
        block_bounds(10, 3, 0)
    assert required_multiple(32, 2) == 64
    assert padded_size(65, 64) == 128
    assert padded_size(64, 64) == 64
