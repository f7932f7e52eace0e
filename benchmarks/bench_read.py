"""Read throughput per rank: ``halo.data.read_block`` beside plain OpenSlide ``read_region``.

Writes a synthetic pyramidal TIFF (generic tiled TIFF, zlib, 256-pixel tiles),
plans it for a grid of ranks, and for every block times

* ``read_block``: what a rank does (tissue-cropped region, alpha composited,
  resampled when the mpp falls between levels), and
* ``openslide``: ``OpenSlide.read_region`` of the same rectangle at the same level
  plus ``numpy.asarray`` (RGBA, no compositing, no resampling).

Each read uses a fresh handle (cold OpenSlide tile cache); figures are the median
over ``--repeat`` runs, in MB/s of RGB output per rank. Results are appended to
``benchmarks/results/bench_read.md`` with the machine.

Usage::

    python benchmarks/bench_read.py            # 8192 x 6144 slide, grid 2x2
    python benchmarks/bench_read.py --quick    # 2048 x 1536, for CI; prints only
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import halo.data as hd
from halo.data.slide import clear_cache
from halo.data.synth import render_tissue, write_pyramid

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, parser  # noqa: E402

__all__ = ["main"]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, python {platform.python_version()}"


def _slide(dir_: Path, size: tuple[int, int]) -> Path:
    base, _, _ = render_tissue(np.random.default_rng(0), (2048, 1536), tumour=True)
    reps = (-(-size[1] // 1536), -(-size[0] // 2048), 1)
    img = np.ascontiguousarray(np.tile(base, reps)[: size[1], : size[0]])
    path = dir_ / "bench.tif"
    write_pyramid(path, img, mpp=0.25, levels=4, tile=256)
    return path


def _time(fn, repeat: int) -> float:  # noqa: ANN001
    ts = []
    for _ in range(repeat):
        clear_cache()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench(path: Path, grid: tuple[int, int], mpp: float, repeat: int) -> list[dict[str, float]]:
    """Time every block of a ``grid`` plan at ``mpp``; one row per rank."""
    import openslide

    plan = hd.plan_region(path, grid=grid, multiple=32, mpp=mpp)
    bh, bw = plan.block_shape()
    out = []
    for r in range(grid[0]):
        for c in range(grid[1]):
            t_halo = _time(lambda: hd.read_block(plan, r, c), repeat)
            # the same rectangle, in level pixels, straight from OpenSlide
            ds = plan.downsample
            x = (plan.origin[0] + c * bw) * ds
            y = (plan.origin[1] + r * bh) * ds
            lw, lh = int(round(bw * plan.scale)), int(round(bh * plan.scale))

            def plain() -> None:
                with openslide.OpenSlide(path) as s:
                    np.asarray(s.read_region((int(x), int(y)), plan.level, (lw, lh)))

            t_os = _time(plain, repeat)
            mb = bh * bw * 3 / 1e6
            out.append({"rank": r * grid[1] + c, "mb": mb, "halo": mb / t_halo, "openslide": lw * lh * 3 / 1e6 / t_os,
                        "halo_ms": 1e3 * t_halo, "openslide_ms": 1e3 * t_os,
                        "level": plan.level, "scale": plan.scale})
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and append the table to ``benchmarks/results/bench_read.md`` (``--out``);
    ``--quick`` only prints unless ``--out`` is given."""
    p = parser(__doc__, quick="small slide, one repeat (CI)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"))
    p.add_argument("--grid", type=int, nargs=2, default=(2, 2), metavar=("ROWS", "COLS"))
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--out", default=None,
                   help="markdown file to append to (default: benchmarks/results/bench_read.md; --quick only prints)")
    a = p.parse_args(argv)
    size = tuple(a.size) if a.size else ((2048, 1536) if a.quick else (8192, 6144))
    repeat = a.repeat or (1 if a.quick else 3)
    grid = (a.grid[0], a.grid[1])
    lines = [
        f"\n## {_dt.datetime.now().isoformat(timespec='seconds')}{' (quick)' if a.quick else ''}\n",
        f"Machine: {_machine()}  ",
        f"Slide: {size[0]}x{size[1]} px at 0.25 mpp, 4 levels, zlib, 256-px tiles; grid {grid[0]}x{grid[1]}; "
        f"median of {repeat}, cold handle per read.\n",
        "openslide reads the same rectangle in level pixels (RGB bytes of its output counted).\n",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = _slide(Path(tmp), size)  # type: ignore[arg-type]
        print(f"wrote {size[0]}x{size[1]} slide in {time.perf_counter() - t:.1f} s")
        for mpp in (0.25, 0.75):  # 0.25: level 0 as is; 0.75: level 1 (0.5 mpp) box-resampled by 1.5
            for row in bench(path, grid, mpp, repeat):
                res = "no" if row["scale"] == 1 else f"x{1 / row['scale']:.2f}"
                rows.append([mpp, row["level"], res, row["rank"], f"{row['mb']:.1f}", f"{row['halo_ms']:.1f}",
                             f"{row['halo']:.0f}", f"{row['openslide_ms']:.1f}", f"{row['openslide']:.0f}"])
        clear_cache()
    table = markdown_table(["target mpp", "level", "resample", "rank", "block MB", "read_block ms", "read_block MB/s",
                            "openslide ms", "openslide MB/s"], rows)
    lines.append(table)
    print(table)
    if a.out is None and a.quick:
        return 0
    out = Path(a.out or Path(__file__).parent / "results" / "bench_read.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with open(out, "a") as fh:
        if new:
            fh.write("# bench_read: read throughput per rank (MB/s of RGB output)\n\n"
                     "Written by `python benchmarks/bench_read.py [--quick]`; newest runs last.\n")
        fh.write("\n".join(lines) + "\n")
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
