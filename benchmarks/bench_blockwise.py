"""Blockwise prediction on one process beside the full-image forward: difference, peak memory, time.

``halo.predict_blockwise`` runs the trunk block by block (each block with its receptive-field
margins), stitches the feature map and runs the head once; the full forward runs the whole
image at once. Each measurement runs in a fresh Python process (one thread): the model is
built, then RSS is read, then the image is made and predicted, and the peak is
``ru_maxrss``: "peak RSS increase" is what the prediction added, image included (with
``MALLOC_MMAP_THRESHOLD_=65536``, so that freed tensors leave RSS rather than glibc's heap). The
blockwise run never holds the whole image: its reader synthesises each extended block from
its coordinates (the same pixels the full run synthesises at once). Differences are the
largest absolute difference of the logits and of the feature map against the full forward,
and the latter relative to the feature map's largest magnitude (float32).

Usage::

    python benchmarks/bench_blockwise.py            # ResNet-18 at 1024 x 1024, grids 2x2 and 4x4
    python benchmarks/bench_blockwise.py --quick    # halo_tiny at 1024 x 1024, grid 4x4 (CI; prints only)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, parser, report  # noqa: E402

__all__ = ["main", "synth"]


def synth(y0: int, y1: int, x0: int, x1: int, channels: int = 3):
    """Pixels ``[y0:y1, x0:x1]`` of a deterministic synthetic image, from their coordinates only."""
    import torch

    y = torch.arange(y0, y1, dtype=torch.float64).view(1, 1, -1, 1)
    x = torch.arange(x0, x1, dtype=torch.float64).view(1, 1, 1, -1)
    c = torch.arange(channels, dtype=torch.float64).view(1, -1, 1, 1)
    v = torch.sin(0.037 * y * (c + 1) + 0.011 * x) + torch.cos(0.023 * x * (2 - c) - 0.017 * y + c)
    v = v + 0.5 * torch.sin(0.0031 * (x * y) % 6.283 + c)
    return v.float()


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(mode: str, model_name: str, height: int, width: int, rows: int, cols: int, out: str) -> None:
    """One measurement in this (fresh) process; writes JSON and the outputs next to ``out``."""
    import torch

    import halo
    from halo.models import build_classifier

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_classifier(model_name, 2, head="attention").eval()
    before = _rss()
    started = time.perf_counter()
    with torch.no_grad():
        if mode == "full":
            x = synth(0, height, 0, width)
            features = model.features(x)
            logits = model.head(features)
            inputs = [(height, width)]
        else:
            res = halo.predict_blockwise(model, synth, size=(height, width), grid=(rows, cols))
            features, logits = res.features, res.logits
            inputs = [res.largest_input]
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"logits": logits, "features": features}, out + ".pt")
    info = {"seconds": seconds, "peak_increase": max(peak - before, 0), "largest_input": list(inputs[0])}
    if mode != "full":
        info["margins"] = list(res.margins.pixels)
    Path(out).write_text(json.dumps(info))


def _measure(mode: str, model: str, size: tuple[int, int], grid: tuple[int, int], tmp: str) -> dict:
    out = os.path.join(tmp, f"{mode}-{grid[0]}x{grid[1]}.json")
    # every allocation above 64 KiB is its own mapping, returned on free: RSS follows live tensors instead of
    # glibc's heap, which keeps (and fragments) what blocks of changing shapes freed
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--child", mode, model, str(size[0]), str(size[1]), str(grid[0]), str(grid[1]),
           out]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3000)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(out).read_text()) | {"outputs": out + ".pt"}


def run(model: str, size: tuple[int, int], grids: list[tuple[int, int]]) -> list[dict]:
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="halo-bench-blockwise-") as tmp:
        full = _measure("full", model, size, (1, 1), tmp)
        ref = torch.load(full["outputs"])
        rows.append({"mode": "full forward", **full, "logits_diff": 0.0, "features_diff": 0.0, "features_rel": 0.0})
        for grid in grids:
            res = _measure("blockwise", model, size, grid, tmp)
            got = torch.load(res["outputs"])
            fdiff = (got["features"] - ref["features"]).abs().max().item()
            rows.append({"mode": f"blockwise {grid[0]}x{grid[1]}", **res,
                         "logits_diff": (got["logits"] - ref["logits"]).abs().max().item(),
                         "features_diff": fdiff, "features_rel": fdiff / ref["features"].abs().max().item()})
    return rows


def table(rows: list[dict]) -> str:
    full = rows[0]
    body = [[r["mode"], " x ".join(map(str, r["largest_input"])), f"{r['peak_increase'] / 2**20:.0f}",
             f"{r['peak_increase'] / max(full['peak_increase'], 1):.2f}", f"{r['seconds']:.2f}",
             f"{r['seconds'] / full['seconds']:.2f}", f"{r['logits_diff']:.1e}", f"{r['features_diff']:.1e}",
             f"{r['features_rel']:.1e}"] for r in rows]
    return markdown_table(["mode", "largest trunk input", "peak RSS increase MiB", "/ full", "seconds",
                           "/ full", "max abs diff logits", "max abs diff features", "relative"], body)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        mode, model, h, w, r, c, out = argv[1:8]
        child(mode, model, int(h), int(w), int(r), int(c), out)
        return []
    ap = parser(__doc__)
    ap.add_argument("--model", default=None, help="halo-train model.name (default resnet18; quick: halo_tiny)")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    a = ap.parse_args(argv)
    model = a.model or ("halo_tiny" if a.quick else "resnet18")
    size = tuple(a.size) if a.size else (1024, 1024)
    grids = [(4, 4)] if a.quick else [(2, 2), (4, 4)]
    rows = run(model, size, grids)
    margins = rows[1]["margins"]
    text = (f"{model}, {size[0]} x {size[1]}, float32, one thread, attention head; margins (top, bottom, left, "
            f"right) {margins} px\n\n" + table(rows))
    report("bench_blockwise", text, quick=a.quick, argv=argv, intro=(
        "## Blockwise prediction on one process\n\n"
        "`halo.predict_blockwise` (the trunk block by block, each block with its receptive-field margins, then "
        "the head once on the stitched feature map) beside the full-image forward, each in a fresh process. Peak "
        "RSS increase is `ru_maxrss` minus RSS after the model was built: it includes the image for the full "
        "forward, only the extended blocks for the blockwise one (its reader synthesises each block from its "
        "coordinates). Time is the prediction alone; differences are against the full forward in float32 (the "
        "tests check float64 to 1e-9)."))
    return rows


if __name__ == "__main__":
    main()
