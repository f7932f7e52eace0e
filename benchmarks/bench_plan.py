"""halo-plan's answer for a real case: a 100,000 x 100,000 pixel slide at 0.5 microns per pixel.

ResNet-50, bfloat16, batch 1, on 8 x 8 H100s (80 GB each), with activation checkpointing
off and on, and on 12 x 12 without checkpointing (11 x 11 is the smallest square mesh that fits, at 79.3 of 80 GB). Pure arithmetic: nothing of slide size is allocated.

Usage::

    python benchmarks/bench_plan.py            # writes RESULTS.md
    python benchmarks/bench_plan.py --quick    # prints only
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parser, report  # noqa: E402

__all__ = ["main", "CASES"]

BASE = ["--model", "resnet50", "--image", "100000", "100000", "--mesh", "8", "8", "--dtype", "bfloat16",
        "--batch", "1", "--mpp", "0.5"]
CASES = [BASE + ["--json"], BASE + ["--checkpointing", "--json"],
         [*BASE[:6], "12", "12", *BASE[8:], "--json"]]  # fits with room; 11 x 11 needs 79.3 of 80 GB


def main(argv: list[str] | None = None) -> str:
    """Run halo-plan on each case; returns the markdown."""
    from halo.plan import main as halo_plan

    ap = parser(__doc__, quick="prints only, does not write RESULTS.md")
    a = ap.parse_args(argv)
    parts = []
    for case in CASES:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            halo_plan(case)
        parts.append(f"```\n$ halo-plan {' '.join(case)}\n{buf.getvalue().rstrip()}\n```")
    text = "\n\n".join(parts)
    report("bench_plan", text, quick=a.quick, argv=argv, intro=(
        "## halo-plan: a 100,000 x 100,000 slide at 0.5 mpp on 8x8 H100s\n\nA 50 x 50 mm field, padded to "
        "the mesh multiple (8 x 32 pixels), cut into 64 blocks. Parameters, gradients and AdamW states in "
        "float32; activations in bfloat16; `total_bytes_per_rank` adds a workspace of twice the largest "
        "layer output plus 1 GiB.\n\n"))
    return text


if __name__ == "__main__":
    main()
