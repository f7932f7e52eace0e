"""Benchmark 3b: the window ops' two methods, layer by layer, and what ``auto`` picks.

A sharded 3x3 convolution either convolves its block with zero padding and recomputes only
the border bands that read a neighbour's halo (``bands``: no block-sized copy, but each
band costs a weight-sized gradient in backward), or assembles the halo-extended block
(``assemble``: three block-sized copies per forward + backward). For each stage of
ResNet-18 (64 to 512 channels at strides 4 to 32) two gloo ranks time one forward +
backward of the same layer (bias-free, input gradient on) with each method, alternating,
median over steps of the slower rank. ``auto`` is the method the layer picks by itself
(``BANDS_MIN_RATIO`` in :mod:`halo.nn.conv`). The stem's max pooling (3x3, stride 2, 64
channels at stride 2) is timed the same way: by bands it pools the block under its own
-inf padding and recomputes the border bands; assembling fills and copies an extended
block in forward and spreads the gradient over one in backward.

Usage::

    python benchmarks/bench_conv.py            # images 512 and 1024, meshes 1x2 and 2x1; writes RESULTS.md
    python benchmarks/bench_conv.py --quick    # image 64, 1 step, prints only
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, parser, report, run_ranks  # noqa: E402

__all__ = ["main", "conv_times"]

METHODS = ("bands", "assemble")
STAGES = ((64, 4), (128, 8), (256, 16), (512, 32))  # ResNet-18: (channels, stride of the stage)
POOL = "max pool 3x3/2"  # ResNet's stem pooling: 64 channels at stride 2


def conv_times(channels: int, h: int, w: int, rows: int, cols: int, steps: int, layer: str = "conv 3x3") -> dict:
    """Median seconds of forward + backward of one ``layer`` (a 3x3 convolution, or ``"max
    pool 3x3/2"``) on an ``h x w`` image per method, the slower rank's each step, and the
    method ``auto`` picks on this rank."""
    import torch
    import torch.distributed as dist
    from torch import nn

    import halo
    from halo.nn import HaloConv2d, HaloMaxPool2d
    from halo.nn._window import native_padding
    from halo.nn.conv import _plan

    mesh = halo.SpatialMesh(rows, cols)
    torch.manual_seed(0)
    if layer == POOL:
        op = HaloMaxPool2d.from_module(nn.MaxPool2d(3, 2, 1), mesh)
    else:
        op = HaloConv2d.from_module(nn.Conv2d(channels, channels, 3, padding=1, bias=False), mesh)
    x = halo.scatter(torch.randn(1, channels, h, w), mesh).requires_grad_(True)
    g = torch.randn(op(x).shape)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(steps + 1):
        for method in METHODS:
            op.method = method
            dist.barrier()
            t0 = time.perf_counter()
            op(x).backward(g)
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            x.grad = None
            op.zero_grad(set_to_none=True)
            if i:  # the first round warms up
                times[method].append(t.item())
    if layer == POOL:
        native = native_padding(op.halo_exchange, op.halo_padding)
    else:
        native, _ = _plan(x, op.weight, op.halo_exchange, op.halo_padding, op.stride, op.dilation, mesh, "auto")
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    return {**med, "auto": "bands" if native is not None else "assemble", "block": tuple(x.shape[-2:])}


def measure(size: int, meshes: list[tuple[int, int]], steps: int) -> list[dict]:
    out = []
    for rows, cols in meshes:
        for layer, channels, stride in [(POOL, 64, 2)] + [("conv 3x3", c, s) for c, s in STAGES]:
            if size // stride < max(rows, cols):
                continue
            res = run_ranks(conv_times, rows * cols, channels, size // stride, size // stride, rows, cols, steps, layer)
            picks = {r["auto"] for r in res}
            row = {"size": size, "mesh": f"{rows}x{cols}", "layer": layer, "channels": channels, "block": res[0]["block"],
                   "bands": res[0]["bands"], "assemble": res[0]["assemble"], "auto": "/".join(sorted(picks))}
            out.append(row)
            print(f"{size} {row['mesh']} {layer} {channels} ch, block {row['block'][0]}x{row['block'][1]}: bands "
                  f"{row['bands'] * 1e3:.2f} ms, assemble {row['assemble'] * 1e3:.2f} ms, auto picks {row['auto']}",
                  flush=True)
    return out


def table(rows: list[dict]) -> str:
    header = ["image", "mesh", "layer", "channels", "block", "bands ms", "assemble ms", "bands / assemble", "auto picks"]
    return markdown_table(header, [
        [f"{r['size']}x{r['size']}", r["mesh"], r["layer"], r["channels"], f"{r['block'][0]}x{r['block'][1]}",
         f"{r['bands'] * 1e3:.2f}", f"{r['assemble'] * 1e3:.2f}", f"{r['bands'] / r['assemble']:.3f}", r["auto"]]
        for r in rows])


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the table rows."""
    ap = parser(__doc__)
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--steps", type=int, default=9)
    a = ap.parse_args(argv)
    sizes, steps = ([64], 1) if a.quick else (a.sizes, a.steps)
    meshes = [(1, 2)] if a.quick else [(1, 2), (2, 1)]
    rows = [r for s in sizes for r in measure(s, meshes, steps)]
    report("bench_conv", table(rows), quick=a.quick, argv=argv, intro=(
        "## 3b. The window ops' two methods, per ResNet-18 stage\n\n"
        f"The stem's max pooling (3x3, stride 2) and one 3x3 convolution (channels in = out, no bias) "
        f"of each ResNet-18 stage, on the block "
        f"its stage has at that image size, two gloo ranks with one thread each; forward + backward "
        f"(input and weight gradient), median of {steps} steps of the slower rank, methods alternating. "
        "*bands* convolves (pools) the block under its own zero (-inf) padding and recomputes the border "
        "bands that read a neighbour's halo; *assemble* builds the halo-extended block. *auto picks* is "
        "the layer's own choice there (`BANDS_MIN_RATIO` in `halo/nn/conv.py`; max pooling always takes "
        "bands where its padding is symmetric).\n\n"))
    return rows


if __name__ == "__main__":
    main()
