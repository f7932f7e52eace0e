"""Benchmark 2: point-to-point bytes per training step against the theoretical two-phase halo volume.

Each rank counts the bytes of every ``isend`` it posts (``torch.distributed.batch_isend_irecv``
is wrapped in the benchmark process, not in the library) during one forward and backward.
The theory is halo-plan's arithmetic: per window op, the row strips (``top + bottom`` rows
of the block width) then the column strips of the row-extended block, forward and back
(the first convolution's input needs no gradient, so its halo goes forward only), as a
mean over ranks. Goal: measured / theory within 5%.

Usage::

    python benchmarks/bench_traffic.py           # resnet18, resnet50 at 128 and 256; writes RESULTS.md
    python benchmarks/bench_traffic.py --quick   # resnet18 at 64 x 64 on 1x2, prints only
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, measure_step, parser, run_ranks, report  # noqa: E402

__all__ = ["main"]

MESHES = [(1, 2), (2, 1), (2, 2)]


def measure(name: str, size: int, rows: int, cols: int, batch: int) -> dict:
    """Bytes sent by each rank in one step, beside the planner's mean per rank."""
    from halo.plan import plan

    sent = [r["sent"] for r in run_ranks(measure_step, rows * cols, name, rows, cols, size, size, batch)]
    theory = plan(name, (size, size), (rows, cols), batch=batch).halo_bytes_per_step_per_rank
    mean = statistics.mean(sent)
    row = {"model": name, "size": size, "mesh": f"{rows}x{cols}", "min": min(sent), "max": max(sent),
           "mean": mean, "theory": theory, "ratio": mean / theory}
    print(f"{name} {size} {rows}x{cols}: sent {mean / 1e6:.3f} MB/rank, theory {theory / 1e6:.3f}, "
          f"ratio {row['ratio']:.4f}", flush=True)
    return row


def table(rows: list[dict]) -> str:
    return markdown_table(
        ["model", "image", "mesh", "sent MB / rank (mean)", "min - max over ranks", "two-phase theory MB",
         "measured / theory"],
        [[r["model"], f"{r['size']}x{r['size']}", r["mesh"], f"{r['mean'] / 1e6:.3f}",
          f"{r['min'] / 1e6:.3f} - {r['max'] / 1e6:.3f}", f"{r['theory'] / 1e6:.3f}", f"{r['ratio']:.4f}"]
         for r in rows])


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the table rows."""
    ap = parser(__doc__, quick="tiny sizes for CI; prints, does not write RESULTS.md")
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args(argv)
    models, sizes, meshes = (["resnet18"], [64], [(1, 2)]) if a.quick else (a.models, a.sizes, MESHES)
    rows = [measure(m, s, r, c, a.batch) for m in models for s in sizes for r, c in meshes]
    text = table(rows)
    report("bench_traffic", text, quick=a.quick, argv=argv, intro=(
        "## 2. Halo traffic per step\n\nBytes each rank passes to `isend` in one forward + backward "
        f"(batch {a.batch}, float32), against the two-phase volume halo-plan predicts "
        "(`halo_bytes_per_step_per_rank`, a mean over ranks; goal: within 5%). Edge ranks send less "
        "than interior ones, hence the min - max column. Batch-norm and global-pooling collectives are "
        "not halo traffic and are not counted.\n\n"))
    return rows


if __name__ == "__main__":
    main()
