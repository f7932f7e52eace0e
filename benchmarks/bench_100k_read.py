"""A 100,000 x 100,000 slide at 0.5 um, read as the 64 ranks of an 8x8 mesh would read it.

1. Writes one pyramidal tiled TIFF (JPEG tiles, 256 px, levels halved with rounding up, mpp 0.5
   in the resolution tags) tile by tile in bounded memory (``benchmarks/_bigslide.py``), cached
   under ``/tmp/halo_100k/`` and reused while its parameters match. The writer runs in its own
   process: its peak RSS is the writer's alone.
2. Every rank, in a fresh process (``--workers`` at a time), does what a rank does: imports halo,
   plans with ``halo.data.plan_region(path, grid=(8, 8), multiple=32, mpp=0.5)`` (ResNet-50's
   stride; thumbnail, tissue mask, level choice) and reads its block with
   ``halo.data.read_block(plan, row, col)``. Recorded per rank: seconds to plan and to read, the
   process's peak RSS (``ru_maxrss``) and its RSS just before the read, the block's bytes, the
   tiles the block touches, the tile reads and decodes the read made (``os.pread`` counted) and
   the compressed bytes they fetched.
3. A prototype of a tile-aligned read (every tile the block touches decoded once, straight into
   the preallocated block: ``Slide._read_tiles`` over the whole block instead of
   ``read_block``'s row chunks) on a few blocks, whose pixels must equal ``read_block``'s; and
   halo's OpenSlide path (``Slide(path, reader="openslide")``: ``read_region`` in row chunks,
   RGBA composited) on one block, for the memory and time it would cost.
4. Exactness: the slide planned on the same grid at the mpp of a coarser whole level; a few
   blocks of ``read_block`` against the same crop of ``read_full`` (max abs difference, must be 0).
5. Tissue detection on the thumbnail timed the way ``plan_region`` does it
   (``Slide.thumbnail`` then ``tissue_mask``).

Usage::

    python benchmarks/bench_100k_read.py                 # 100,000^2, 8x8; writes RESULTS.md
    python benchmarks/bench_100k_read.py --size 50000 --grid 8 8
    python benchmarks/bench_100k_read.py --quick         # 8,000^2, 2x2, temporary file; prints only
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bigslide import SlideSpec, cached_slide, level_sizes  # noqa: E402
from _common import markdown_table, parser, write_section  # noqa: E402

__all__ = ["main"]

_MB = 2**20


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MB


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5: VmHWM and ru_maxrss restart from now)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _kind(r: int, c: int, grid: tuple[int, int]) -> str:
    rows, cols = grid
    er, ec = r in (0, rows - 1), c in (0, cols - 1)
    if rows == 1 or cols == 1:
        return "edge" if (er or ec) else "interior"
    return "corner" if er and ec else "edge" if er or ec else "interior"


# -- worker processes (spawned: nothing inherited) -------------------------------------------------
def _write(directory: str, spec: SlideSpec, maxworkers: int) -> tuple[str, dict, bool]:
    path, meta, reused = cached_slide(directory, spec, maxworkers=maxworkers)
    return str(path), meta, reused


def _probe(path: str, grid: tuple[int, int], mpp: float) -> dict:
    """Open, thumbnail, tissue mask and plan, each timed, in a fresh process."""
    t = time.perf_counter()
    import halo.data as hd
    from halo.data.slide import Slide
    from halo.data.tissue import TissueOptions, tissue_mask

    t_import = time.perf_counter() - t
    t = time.perf_counter()
    s = Slide(path)
    t_open = time.perf_counter() - t
    opts = TissueOptions()
    t = time.perf_counter()
    thumb, _ = s.thumbnail(opts.thumb_size)
    t_thumb = time.perf_counter() - t
    t = time.perf_counter()
    mask = tissue_mask(thumb, opts)
    t_mask = time.perf_counter() - t
    t = time.perf_counter()
    plan = hd.plan_region(path, grid=grid, multiple=32, mpp=mpp)
    t_plan = time.perf_counter() - t
    page = s._pages[plan.level]  # noqa: SLF001 - benchmark introspection
    return {"import_s": t_import, "open_s": t_open, "thumb_s": t_thumb, "mask_s": t_mask, "plan_s": t_plan,
            "thumb_shape": thumb.shape[:2], "thumb_level": s.thumbnail_level(opts.thumb_size),
            "tissue_fraction": float(mask.mean()), "level": plan.level, "exact": plan.exact,
            "reader": plan.reader, "block": plan.block_shape(), "content": plan.content, "origin": plan.origin,
            "padded": plan.padded_size, "levels": s.level_dimensions, "downsamples": s.level_downsamples,
            "tile": (page.tilelength, page.tilewidth), "compression": int(page.compression),
            "photometric": int(page.photometric), "mpp": s.mpp}


def _block_geometry(plan, r: int, c: int):  # noqa: ANN001, ANN202
    """The part of block ``(r, c)`` inside the content box, in level pixels: (x0, y0, x1, y1, dst slice) or None."""
    import halo.data as hd

    window = hd.content_window(plan, hd.block_rect(plan, r, c))
    if window is None:
        return None
    (ty0, ty1, tx0, tx1), dst = window
    return tx0, ty0, tx1, ty1, dst


def _tile_aligned_read(plan, r: int, c: int, slide):  # noqa: ANN001, ANN202
    """Prototype: block ``(r, c)`` decoded tile by tile, each tile once, into one preallocated array."""
    import numpy as np

    import halo.data as hd

    bh, bw = plan.block_shape()
    out = np.full((bh, bw, 3), plan.background, np.uint8)
    g = _block_geometry(plan, r, c)
    if g is None:
        return out
    x0, y0, x1, y1, (sy, sx) = g
    slide._read_tiles(plan.level, x0, y0, x1, y1, out[sy, sx])  # noqa: SLF001 - the prototype
    del hd
    return out


def _rank(path: str, grid: tuple[int, int], mpp: float, r: int, c: int, mode: str) -> dict:
    """What rank ``(r, c)`` does, in a fresh process: plan, then read its block (``mode``: halo | tiles | openslide)."""
    t0 = time.perf_counter()
    import numpy as np

    import halo.data as hd
    from halo.data.slide import Slide, open_cached

    t_import = time.perf_counter() - t0
    rss_import = _rss_now_mb()
    calls, fetched = [0], [0]
    real = os.pread

    def counting(fd: int, n: int, off: int) -> bytes:
        calls[0] += 1
        fetched[0] += n
        return real(fd, n, off)

    os.pread = counting  # halo's tifffile reader reads every tile with os.pread
    try:
        t = time.perf_counter()
        plan = hd.plan_region(path, grid=grid, multiple=32, mpp=mpp)
        t_plan = time.perf_counter() - t
        slide = open_cached(path) if mode != "openslide" else Slide(path, reader="openslide")
        page = open_cached(path)._pages[plan.level]  # noqa: SLF001 - benchmark introspection
        th, tw = page.tilelength, page.tilewidth
        g = _block_geometry(plan, r, c)
        touched = 0
        comp = 0
        if g is not None:
            x0, y0, x1, y1, _ = g
            across = -(-page.imagewidth // tw)
            counts = np.asarray(page.databytecounts, np.int64)
            for ty in range(y0 // th, (y1 - 1) // th + 1):
                row = counts[ty * across + x0 // tw: ty * across + (x1 - 1) // tw + 1]
                touched += int((row > 0).sum())
                comp += int(row.sum())
        calls[0] = fetched[0] = 0
        peak_before = _peak_mb()  # of the process so far: imports and plan_region
        reset = _reset_peak()
        rss_before = _rss_now_mb()
        t = time.perf_counter()
        if mode == "halo":
            blk = hd.read_block(plan, r, c)
        elif mode == "tiles":
            blk = _tile_aligned_read(plan, r, c, slide)
        else:
            blk = hd.read_block(plan, r, c, slide=slide)
        t_read = time.perf_counter() - t
        peak = _peak_mb()
    finally:
        os.pread = real
    digest = hashlib.sha1(blk).hexdigest()
    sub = blk[::8, ::8].astype(np.float32)
    mx, mn = sub.max(-1), sub.min(-1)
    tissue = float(((mx - mn) / np.maximum(mx, 1.0) > 8 / 255).mean())
    return {"r": r, "c": c, "mode": mode, "kind": _kind(r, c, grid), "import_s": t_import, "plan_s": t_plan,
            "read_s": t_read, "rss_import_mb": rss_import, "rss_before_mb": rss_before,
            "peak_before_mb": peak_before, "peak_mb": peak, "process_peak_mb": max(peak, peak_before),
            "peak_reset": reset, "block_bytes": blk.nbytes, "shape": blk.shape,
            "tiles_touched": touched, "tile_reads": calls[0], "fetched_bytes": fetched[0],
            "touched_comp_bytes": comp, "tile_raw_bytes": th * tw * 3, "tissue": tissue, "digest": digest}


def _exact(path: str, grid: tuple[int, int], mpp: float, blocks: list[tuple[int, int]]) -> dict:
    """read_block of ``blocks`` against the same crop of read_full, at ``mpp``."""
    import numpy as np

    import halo.data as hd

    plan = hd.plan_region(path, grid=grid, multiple=32, mpp=mpp)
    t = time.perf_counter()
    full = hd.read_full(plan)
    t_full = time.perf_counter() - t
    out = []
    for r, c in blocks:
        y0, y1, x0, x1 = hd.block_rect(plan, r, c)
        blk = hd.read_block(plan, r, c)
        d = int(np.abs(blk.astype(np.int16) - full[y0:y1, x0:x1].astype(np.int16)).max())
        out.append({"r": r, "c": c, "max_abs_diff": d, "equal": bool(np.array_equal(blk, full[y0:y1, x0:x1]))})
    return {"level": plan.level, "exact": plan.exact, "mpp": plan.mpp, "padded": plan.padded_size,
            "block": plan.block_shape(), "full_s": t_full, "full_mb": full.nbytes / _MB, "blocks": out,
            "peak_mb": _peak_mb()}


# -- the benchmark --------------------------------------------------------------------------------
def _in_process(ctx, fn, *args):  # noqa: ANN001, ANN002, ANN202
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


def _fmt(v: float, nd: int = 2) -> str:
    return f"{v:.{nd}f}"


def _summary_rows(res: list[dict]) -> list[list[str]]:
    rows = []
    kinds = [k for k in ("corner", "edge", "interior") if any(x["kind"] == k for x in res)]
    for name, sel in [*[(k, [x for x in res if x["kind"] == k]) for k in kinds], ("all", res)]:
        if not sel:
            continue
        rd = [x["read_s"] for x in sel]
        pp = [x["process_peak_mb"] for x in sel]
        pk = [x["peak_mb"] for x in sel]
        ratio = [x["peak_mb"] * _MB / x["block_bytes"] for x in sel]
        inc = [(x["peak_mb"] - x["rss_before_mb"]) * _MB / x["block_bytes"] for x in sel]
        dec = sum(x["tile_reads"] for x in sel) / max(1, sum(x["tiles_touched"] for x in sel))
        mbs = [x["block_bytes"] / _MB / x["read_s"] for x in sel]
        rows.append([name, len(sel), f"{statistics.mean(x['tissue'] for x in sel):.2f}",
                     f"{min(rd):.2f} / {statistics.median(rd):.2f} / {max(rd):.2f}",
                     f"{statistics.median(mbs):.0f}", f"{statistics.median(x['plan_s'] for x in sel):.2f}",
                     f"{statistics.median(pp):.0f} / {max(pp):.0f}",
                     f"{statistics.median(x['rss_before_mb'] for x in sel):.0f}",
                     f"{statistics.median(pk):.0f} / {max(pk):.0f}",
                     f"{statistics.median(ratio):.2f} / {max(ratio):.2f}",
                     f"{statistics.median(inc):.3f} / {max(inc):.3f}",
                     f"{sum(x['tile_reads'] * x['tile_raw_bytes'] for x in sel) / 1e9:.2f}",
                     f"{sum(x['fetched_bytes'] for x in sel) / 1e9:.3f}", f"{dec:.2f}"])
    return rows


_SUMMARY_HEADER = ["ranks", "n", "tissue fraction", "read s min / median / max", "read MB/s (median)",
                   "plan s (median)", "process peak RSS MB median / max", "RSS before read MB",
                   "read peak RSS MB median / max", "peak RSS / block median / max",
                   "(peak - before) / block median / max",
                   "GB decoded", "GB fetched (compressed)", "tile decodes / tiles touched"]


def _grid_map(res: list[dict], grid: tuple[int, int], key: str, fmt: str) -> str:
    rows, cols = grid
    cell = {(x["r"], x["c"]): x for x in res}
    body = [[f"**{r}**", *[fmt.format(cell[(r, c)][key]) if (r, c) in cell else "" for c in range(cols)]]
            for r in range(rows)]
    return markdown_table(["row \\ col", *[str(c) for c in range(cols)]], body)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, quick="8,000^2 slide, 2x2 grid, temporary file (CI); prints, does not write RESULTS.md")
    p.add_argument("--size", type=int, default=None, help="slide side in pixels (default 100000; quick 8000)")
    p.add_argument("--grid", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                   help="mesh (default 8 8; quick 2 2)")
    p.add_argument("--mpp", type=float, default=0.5, help="target mpp (level 0 is 0.5)")
    p.add_argument("--workers", type=int, default=2, help="ranks read at a time (default 2)")
    p.add_argument("--cache", default=None, help="directory of the cached slide (default /tmp/halo_100k)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality (default 85)")
    p.add_argument("--prototype", type=int, default=None,
                   help="blocks also read by the tile-aligned prototype (default 4; quick all)")
    p.add_argument("--delete", action="store_true", help="delete the slide afterwards")
    p.add_argument("--no-results", action="store_true", help="print only, do not write RESULTS.md")
    a = p.parse_args(argv)
    size = a.size or (8000 if a.quick else 100000)
    grid = tuple(a.grid) if a.grid else ((2, 2) if a.quick else (8, 8))
    ctx = mp.get_context("spawn")
    tmp = tempfile.TemporaryDirectory(prefix="halo_100k_") if (a.quick and a.cache is None) else None
    cache = tmp.name if tmp is not None else (a.cache or "/tmp/halo_100k")
    spec = SlideSpec(size, mpp=0.5, quality=a.quality)
    t_all = time.perf_counter()
    try:
        print(f"slide {size}x{size} at 0.5 mpp, grid {grid[0]}x{grid[1]}, cache {cache}", flush=True)
        path, meta, reused = _in_process(ctx, _write, cache, spec, 2)
        print(f"{'reused' if reused else 'wrote'} {path}: {meta['bytes'] / 1e9:.2f} GB, written in "
              f"{meta['write_s']:.0f} s ({meta['write_cpu_s']:.0f} s CPU), writer peak RSS "
              f"{meta['writer_peak_rss_mb']:.0f} MB", flush=True)
        probe = _in_process(ctx, _probe, path, grid, a.mpp)  # a spawned process: import and open timed
        # every rank in a fresh process, forked from a server that has imported halo.data (as a rank
        # has by the time it reads): no handle, cache or allocation of another rank is inherited
        fctx = ctx
        if "forkserver" in mp.get_all_start_methods():
            fctx = mp.get_context("forkserver")
            fctx.set_forkserver_preload(["numpy", "halo.data", "halo.data.slide", "tifffile", "imagecodecs"])
        pool = fctx.Pool(a.workers, maxtasksperchild=1)
        print(f"plan: level {probe['level']} ({probe['reader']}, exact {probe['exact']}), block "
              f"{probe['block'][1]}x{probe['block'][0]}, content {probe['content']}; thumbnail level "
              f"{probe['thumb_level']} {probe['thumb_shape'][1]}x{probe['thumb_shape'][0]} read in "
              f"{probe['thumb_s']:.2f} s, tissue_mask {probe['mask_s']:.2f} s, plan_region {probe['plan_s']:.2f} s",
              flush=True)
        rows, cols = grid
        tasks = [(path, grid, a.mpp, r, c, "halo") for r in range(rows) for c in range(cols)]
        res: list[dict] = []
        t = time.perf_counter()
        if True:
            for x in pool.imap_unordered(_star_rank, tasks):
                res.append(x)
                print(f"  rank ({x['r']}, {x['c']}) {x['kind']}: read {x['read_s']:.2f} s, peak RSS "
                      f"{x['peak_mb']:.0f} MB (before read {x['rss_before_mb']:.0f}), block "
                      f"{x['block_bytes'] / _MB:.0f} MB, {x['tile_reads']} tile decodes of {x['tiles_touched']} "
                      f"tiles, tissue {x['tissue']:.2f}", flush=True)
        t_ranks = time.perf_counter() - t
        res.sort(key=lambda x: (x["r"], x["c"]))
        # the tile-aligned prototype and the OpenSlide path on a few blocks
        nproto = (2 if a.quick else 4) if a.prototype is None else a.prototype
        mid = (rows // 2, cols // 2)
        picks = [(0, 0), (0, cols // 2), mid, (rows - 1, cols - 1), (rows // 2, 0), (1 % rows, 1 % cols)]
        picks = list(dict.fromkeys(picks + [(x["r"], x["c"]) for x in res]))[:nproto]
        # each alternative runs beside a second read_block of the same block (submitted together, so
        # the pair meets the same load on this shared machine): the times of a pair compare
        pairs = [(r, c, "tiles") for r, c in picks] + [(mid[0], mid[1], "openslide")]
        extra = [(path, grid, a.mpp, r, c, m) for r, c, alt_mode in pairs for m in ("halo", alt_mode)]
        if not (probe["exact"] and probe["reader"] == "tifffile"):
            extra = []
        alt: list[dict] = []
        for i, x in enumerate(pool.imap(_star_rank, extra)):
            if i % 2:
                x["paired"] = prev
                alt.append(x)
                print(f"  {x['mode']} ({x['r']}, {x['c']}): read {x['read_s']:.2f} s (read_block beside it "
                      f"{prev['read_s']:.2f} s), peak RSS {x['peak_mb']:.0f} MB (before read {x['rss_before_mb']:.0f}), "
                      f"{x['tile_reads']} tile decodes", flush=True)
            prev = x
        alt.sort(key=lambda x: (x["mode"], x["r"], x["c"]))
        by_pos = {(x["r"], x["c"]): x for x in res}
        # exactness at a coarser whole level
        sizes = level_sizes(size, size, spec.min_side)
        coarse = next((lv for lv in range(1, len(sizes)) if max(sizes[lv]) <= 8192), len(sizes) - 1)
        coarse_mpp = 0.5 * size / sizes[coarse][0]
        check = sorted({(0, 0), (0, cols - 1), mid, (rows - 1, cols // 3)})
        ex = pool.apply(_exact, (path, grid, coarse_mpp, check))
        pool.close()
        pool.join()
    finally:
        if tmp is not None:
            tmp.cleanup()
    if a.delete and tmp is None:
        for f in (Path(path), Path(path).with_suffix(".json")):
            f.unlink(missing_ok=True)

    # -- report ---------------------------------------------------------------------------------
    bh, bw = probe["block"]
    lines = []
    lines.append(f"Slide: {size:,} x {size:,} px at {probe['mpp']:g} um/px, {len(probe['levels'])} levels "
                 f"({', '.join(f'{w}' for w, _ in probe['levels'])} px wide; downsamples "
                 f"{', '.join(f'{d:.4g}' for d in probe['downsamples'])}), {probe['tile'][1]}-px JPEG tiles "
                 f"(quality {a.quality}, YCbCr 4:2:0; TIFF compression {probe['compression']}, photometric "
                 f"{probe['photometric']}), {meta['bytes'] / 1e9:.2f} GB; {meta['tiles']:,} tiles of which "
                 f"{meta['tissue_tiles']:,} tissue, {meta['glass_tiles']:,} glass, {meta['boundary_tiles']:,} "
                 f"boundary. Tissue covers {probe['tissue_fraction']:.0%} of the thumbnail.")
    lines.append("")
    lines.append(f"**Writing** (`benchmarks/_bigslide.py`, tifffile `TiffWriter.write` of a tile generator per level, "
                 f"2 compression threads, run once and cached): {meta['write_s']:.0f} s wall, "
                 f"{meta['write_cpu_s']:.0f} s CPU, writer peak RSS {meta['writer_peak_rss_mb']:.0f} MB "
                 f"(levels: {', '.join(f'{w}: {s:.0f} s' for w, _, s in meta['levels'])})"
                 f"{' (figures of the write that made the cached file)' if reused else ''}.")
    lines.append("")
    lines.append(f"**Planning** (`plan_region(path, grid=({rows}, {cols}), multiple=32, mpp={a.mpp:g})`): level "
                 f"{probe['level']}, reader `{probe['reader']}`, exact {probe['exact']}, padded region "
                 f"{probe['padded'][0]:,} x {probe['padded'][1]:,}, block {bw:,} x {bh:,} "
                 f"({bw * bh * 3 / _MB:.0f} MB RGB). Tissue detection on the thumbnail (level {probe['thumb_level']}, "
                 f"{probe['thumb_shape'][1]} x {probe['thumb_shape'][0]} px): reading it {probe['thumb_s']:.2f} s, "
                 f"`tissue_mask` {probe['mask_s']:.2f} s; the whole `plan_region` {probe['plan_s']:.2f} s in a fresh "
                 f"process (opening the slide {probe['open_s']:.2f} s, `import halo.data` {probe['import_s']:.1f} s).")
    lines.append("")
    lines.append(f"**Reading**: each rank in a fresh process ({fctx.get_start_method()}: forked from a server that has "
                 f"imported halo.data), {a.workers} at a time ({t_ranks:.0f} s for all "
                 f"{len(res)}); `read_block(plan, row, col)` after "
                 "`plan_region`. *Process peak RSS* is the process's `ru_maxrss` over its life (it includes "
                 "`import halo`, i.e. torch, and `plan_region`: see *RSS before read*); *read peak RSS* restarts the "
                 "peak (`/proc/self/clear_refs`) just before `read_block`, so it is the read's own high-water mark "
                 "(and the ratios use it). Decoded = tile "
                 f"decodes x {res[0]['tile_raw_bytes']:,} bytes; fetched = compressed bytes `os.pread` returned.")
    lines.append("")
    lines.append(markdown_table(_SUMMARY_HEADER, _summary_rows(res)))
    lines.append("")
    if rows * cols > 4:
        lines.append("Seconds per block (read_block), by grid position:\n")
        lines.append(_grid_map(res, grid, "read_s", "{:.1f}"))
        lines.append("")
        lines.append("Tissue fraction per block:\n")
        lines.append(_grid_map(res, grid, "tissue", "{:.2f}"))
        lines.append("")
    if alt:
        arows = []
        for x in alt:
            h = by_pos.get((x["r"], x["c"]))
            same = "yes" if h is not None and h["digest"] == x["digest"] else "no"
            q = x["paired"]
            arows.append([x["mode"], f"({x['r']}, {x['c']})", x["kind"], f"{x['tissue']:.2f}", _fmt(x["read_s"]),
                          _fmt(q["read_s"]), f"{x['read_s'] / q['read_s']:.2f}", f"{x['peak_mb']:.0f}",
                          f"{q['peak_mb']:.0f}",
                          f"{(x['peak_mb'] - x['rss_before_mb']) * _MB / x['block_bytes']:.2f}",
                          f"{x['tile_reads']} / {x['tiles_touched']}", same])
        lines.append("Other ways to read the same blocks: `tiles` is a prototype that "
                     "decodes each tile the block touches once, straight into the preallocated block "
                     "(`Slide._read_tiles` over the whole block); `openslide` is halo's OpenSlide path for formats "
                     "only OpenSlide reads (`read_block(..., slide=Slide(path, reader='openslide'))`: "
                     "`read_region` of row chunks, RGBA composited). Each ran beside a second `read_block` of the same "
                     "block (started together, each in its own fresh process, so both met the same load): "
                     "*read_block s* and its peak are that paired run's. `same pixels` compares the block's SHA-1 "
                     "with the rank's `read_block`.\n")
        lines.append(markdown_table(["read", "block", "kind", "tissue", "read s", "read_block s (paired)",
                                     "time / read_block's", "peak RSS MB",
                                     "read_block peak RSS MB", "(peak - before) / block",
                                     "reads / tiles touched", "same pixels"], arows))
        lines.append("")
    from halo.data.region import _CHUNK_PIXELS

    chunk_rows = max(1, _CHUNK_PIXELS // bw)
    dec = sum(x["tile_reads"] for x in res) / max(1, sum(x["tiles_touched"] for x in res))
    lines.append(f"Why *tile decodes / tiles touched* is {dec:.2f}: `read_block` fills the block in row chunks of "
                 f"`_CHUNK_PIXELS // width` = {chunk_rows} rows (`halo.data.region._read_target`), each a "
                 f"`Slide.read_level` that decodes every tile the chunk touches; the chunks do not line up with the "
                 f"{probe['tile'][0]}-row tiles, so a tile row cut by a chunk boundary is decoded twice. Memory is "
                 f"not the issue (the read holds the block plus one chunk).\n")
    erows = [[f"({b['r']}, {b['c']})", b["max_abs_diff"], "yes" if b["equal"] else "NO"] for b in ex["blocks"]]
    lines.append(f"**Exactness** at a coarser whole level: planned at mpp {coarse_mpp:g} (level {ex['level']}, exact "
                 f"{ex['exact']}, padded {ex['padded'][0]} x {ex['padded'][1]}, blocks {ex['block'][1]} x "
                 f"{ex['block'][0]}); `read_full` ({ex['full_mb']:.0f} MB, {ex['full_s']:.1f} s) cropped to each "
                 f"block against `read_block`:\n")
    lines.append(markdown_table(["block", "max abs diff", "equal"], erows))
    text = "\n".join(lines)
    print()
    print(text)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    bad = [b for b in ex["blocks"] if not b["equal"]] + [x for x in alt if x["mode"] == "tiles" and
                                                         by_pos[(x["r"], x["c"])]["digest"] != x["digest"]]
    if not (a.quick or a.no_results):
        intro = (f"## 7. A {size:,} x {size:,} slide read as {rows * cols} ranks would\n\n"
                 "Written by `benchmarks/bench_100k_read.py`: one synthetic pyramidal TIFF written tile by tile, "
                 f"then every rank of a {rows}x{cols} mesh plans (`plan_region`) and reads its own block "
                 "(`read_block`) in a fresh process, as halo-train's ranks do for ResNet-50 (multiple 32).\n")
        write_section("bench_100k_read", intro + "\n" + text, sys.argv[1:] if argv is None else argv)
        print("wrote section bench_100k_read of benchmarks/RESULTS.md")
    return 1 if bad else 0


def _star_rank(args: tuple) -> dict:
    return _rank(*args)


if __name__ == "__main__":
    raise SystemExit(main())
