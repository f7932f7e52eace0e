"""Shared plumbing of the benchmarks: spawned gloo ranks, one measured training step, RESULTS.md.

Every figure in ``benchmarks/RESULTS.md`` comes from a script here; each script replaces
its own section (between ``<!-- name:begin -->`` and ``<!-- name:end -->``) with the
command that regenerated it, the date and the machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import multiprocessing as mp
import os
import platform
import queue
import resource
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = [
    "run_ranks", "machine", "write_section", "measure_step", "timed_steps", "RESULTS", "count_sends",
    "markdown_table", "parser", "report", "sync_latency", "mimic_halo_syncs",
]

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
_HEADER = (
    "# halo benchmarks: measured figures\n\n"
    "Each section is written by the script named in it (`python benchmarks/NAME.py`; `--quick` is the CI mode "
    "and does not write here). Ratios are measured within one run: the machine is shared and noisy.\n"
)


def _worker(fn: Callable[..., Any], rank: int, world: int, store: str, threads: int, args: tuple, out,
            backend: str = "gloo") -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
        out.put((rank, True, fn(*args)))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, False, traceback.format_exc()))


_PRELOAD = ["torch", "torchvision", "halo"]


def _context() -> Any:
    """``spawn`` by default: every configuration starts in a fresh interpreter, so peak-RSS
    figures stay apart. ``HALO_BENCH_FORKSERVER=1`` (the benchmarks' CI test sets it for the
    ``--quick`` runs) forks ranks from a server that has imported torch once: the same code,
    without a 3-5 s interpreter start and torch import per rank and configuration."""
    if os.environ.get("HALO_BENCH_FORKSERVER") == "1":
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1, timeout: float = 1800,
              backend: str = "gloo") -> list[Any]:
    """Run ``fn(*args)`` on ``world`` fresh spawned ranks (gloo, or ``backend``); their results in rank order.

    ``fn`` must live at module level of an importable module. Fresh processes keep
    peak-RSS figures of one configuration apart from the next.
    """
    ctx = _context()
    fd, store = tempfile.mkstemp(prefix="halo-bench-")
    os.close(fd)
    os.unlink(store)
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, store, threads, args, out, backend),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, ok, value = out.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead:  # died before reporting (a crash, or it could not even unpickle fn)
                    raise RuntimeError(f"{fn.__name__}: rank {dead[0]} exited with code {procs[dead[0]].exitcode} "
                                       "without a result") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{fn.__name__} did not finish within {timeout} s") from None
                continue
            if not ok:
                raise RuntimeError(f"{fn.__name__} failed on rank {rank}:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def parser(doc: str | None, quick: str = "tiny sizes for CI; prints, does not write RESULTS.md") -> argparse.ArgumentParser:
    """The argument parser every benchmark starts from: its docstring's first line and ``--quick``."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    ap.add_argument("--quick", action="store_true", help=quick)
    return ap


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; cells are formatted by the caller (``str()`` otherwise)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """CPU model, core count, OS, Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"python {platform.python_version()}, torch {torch.__version__}")


def write_section(name: str, body: str, argv: list[str] | None = None) -> None:
    """Replace (or append) section ``name`` of RESULTS.md with ``body`` plus command, date and machine."""
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python", f"benchmarks/{name}.py", *argv])
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    block = (f"<!-- {name}:begin -->\n{body.rstrip()}\n\nRegenerate: `{command}`  \n"
             f"Ran {stamp} on: {machine()}\n<!-- {name}:end -->\n")
    text = RESULTS.read_text() if RESULTS.exists() else _HEADER
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)


def report(name: str, text: str, intro: str, quick: bool, argv: list[str] | None) -> None:
    """Print ``text``; unless ``quick``, make it section ``name`` of RESULTS.md after ``intro``."""
    print(text)
    if not quick:
        write_section(name, intro.rstrip("\n") + "\n\n" + text, argv if argv is not None else sys.argv[1:])


def count_sends():
    """Patch ``torch.distributed.batch_isend_irecv`` to count bytes this rank sends; returns (counter, undo)."""
    import torch.distributed as dist

    real = dist.batch_isend_irecv
    sent = [0]

    def counting(ops):
        sent[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return real(ops)

    dist.batch_isend_irecv = counting

    def undo() -> None:
        dist.batch_isend_irecv = real

    return sent, undo


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _setup(name: str, rows: int, cols: int, h: int, w: int, batch: int, sharded: bool, dtype: str = "float32"):
    import torch
    import torchvision

    import halo

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=2).to(getattr(torch, dtype))
    image = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1)).to(getattr(torch, dtype))
    if not sharded:
        return model, image, None
    mesh = halo.SpatialMesh(rows, cols)
    return halo.parallelize(model, mesh), halo.scatter(image, mesh), mesh


def measure_step(name: str, rows: int, cols: int, h: int, w: int, batch: int, sharded: bool = True,
                 peak: bool = False) -> dict[str, int]:
    """One training step on this rank: saved bytes, bytes sent, peak RSS increase, and FLOPs
    (forward + backward, as torch's ``FlopCounterMode`` counts them: convolutions and matrix products).

    ``sharded=False`` runs plain torch on the whole image (the one-process reference).
    ``peak=True`` also runs a second step, with gradients already allocated and zeroed, under
    torch's ``MemTracker`` (which follows every tensor storage): ``peak`` is the most memory held
    at once by tensors other than parameters, buffers and gradients (activations, halo strips and
    backward temporaries), the allocator-free counterpart of a CUDA peak.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from halo.plan import measure_saved_bytes

    model, x, _ = _setup(name, rows, cols, h, w, batch, sharded)
    exclude = list(model.parameters()) + list(model.buffers())
    sent, undo = count_sends()
    before = _rss()
    out: list[torch.Tensor] = []
    try:
        with FlopCounterMode(display=False) as flops:
            saved = measure_saved_bytes(lambda: out.append(model(x)) or out[0], exclude)
            out.pop().sum().backward()
    finally:
        undo()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"saved": saved, "sent": sent[0], "rss": max(rss - before, 0), "flops": flops.get_total_flops()}
    if peak:
        result["peak"], result["peak_temp"] = _peak_live_bytes(model, x)
    return result


def _peak_live_bytes(model, x) -> tuple[int, int]:
    """Peak bytes of live tensors in one training step, less parameters, buffers and gradients;
    and how many of them are backward temporaries (MemTracker's ``Temp``) at that moment."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    if any(p.grad is None for p in model.parameters() if p.requires_grad):
        model(x).sum().backward()           # allocate the gradients
    model.zero_grad(set_to_none=False)      # gradients stay allocated: a constant, not part of the peak
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(x).sum().backward()
    snap = tracker.get_tracker_snapshot("peak")[x.device]
    state = (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.GRAD, _MemRefType.OPT)
    return snap["Total"] - sum(snap.get(kind, 0) for kind in state), snap.get(_MemRefType.TEMP, 0)


class _TimedWork:
    """A p2p request whose ``wait`` adds its blocking time to a counter and marks when the
    batch it belongs to was last waited for (``entry[1]``)."""

    def __init__(self, work, clock: list[float], entry: list[float]) -> None:
        self.work, self.clock, self.entry = work, clock, entry

    def wait(self, *args):
        t0 = time.perf_counter()
        try:
            return self.work.wait(*args)
        finally:
            t1 = time.perf_counter()
            self.clock[0] += t1 - t0
            self.entry[1] = max(self.entry[1], t1)


def _log_collectives(log: list[list[float]]):
    """Patch the collectives the halo layers call to append ``[enter, exit]`` to ``log``; returns undo."""
    import torch.distributed as dist

    from halo.nn import _collectives

    patched = []
    for owner, name in ((_collectives, "_all_gather"), (dist, "all_reduce"), (dist, "all_gather")):
        real = getattr(owner, name)

        def logged(*args, _real=real, **kwargs):
            t0 = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                log.append([t0, time.perf_counter()])

        setattr(owner, name, logged)
        patched.append((owner, name, real))

    def undo() -> None:
        for owner, name, real in patched:
            setattr(owner, name, real)

    return undo


def _run_delay() -> tuple[float, float]:
    """Seconds this process's threads have waited, runnable, for a CPU (``/proc/.../schedstat``):
    (main thread, all others). Zeros where the kernel does not report it."""
    main_tid, main, other = threading.get_native_id(), 0.0, 0.0
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                delay = int(f.read().split()[1]) * 1e-9
            if int(tid) == main_tid:
                main += delay
            else:
                other += delay
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0
    return main, other


def _split_sync_cost(log: list[list[float]]) -> tuple[float, float]:
    """(arrival spread, time after the last arrival), summed over this step's synchronisations.

    Every rank's ``[enter, exit]`` log is gathered (clocks are the same host's monotonic
    clock). The spread is how far apart the ranks reach each synchronisation (load
    imbalance); the rest is what the communication itself takes once all have arrived.
    """
    import torch.distributed as dist

    logs: list = [None] * dist.get_world_size()
    dist.all_gather_object(logs, log)
    n = min(len(entry) for entry in logs)
    spread = after = 0.0
    for i in range(n):
        enters, exits = [lg[i][0] for lg in logs], [lg[i][1] for lg in logs]
        spread += max(enters) - min(enters)
        after += max(0.0, max(exits) - max(enters))
    return spread, after


def mimic_halo_syncs(model, rows: int, cols: int, exchanges: bool = True) -> list:
    """Make a plain model on one block synchronise where its halo twin would, and nothing more.

    Two ranks on a 1x2 or 2x1 mesh. Before every convolution and max pooling whose window
    needs a halo, the ranks swap a strip of the input as wide as the layer's padding, and
    in backward a strip of that input's gradient (the adjoint); every batch norm all-gathers
    its per-channel statistics in forward and its two gradient sums in backward, and global
    pooling its per-channel sums both ways. The messages have the halo run's sizes and pass
    through the same calls; no halo arithmetic runs. ``exchanges=False`` keeps only the
    statistics: the synchronisations every exact batch-norm network has, as if each halo
    exchange travelled with one of them. Returns the hook handles.
    """
    import torch
    import torch.distributed as dist
    from torch import nn

    from halo.nn._collectives import gather_ranks

    if dist.get_world_size() != 2 or rows * cols != 2:
        raise ValueError("mimic_halo_syncs runs on two ranks, a 1x2 or 2x1 mesh")
    peer, dim = 1 - dist.get_rank(), 3 if cols == 2 else 2

    def swap(t: torch.Tensor, width: int) -> None:
        strip = t.detach().narrow(dim, 0, width).contiguous()
        got = torch.empty_like(strip)
        for work in dist.batch_isend_irecv([dist.P2POp(dist.irecv, got, peer), dist.P2POp(dist.isend, strip, peer)]):
            work.wait()

    def halo_layer(width: int):
        def pre(_module, args):
            swap(args[0], width)
            if args[0].requires_grad:
                args[0].register_hook(lambda g: swap(g, width))
        return pre

    def statistics(factor: int):
        def post(_module, args, out):
            channels = out.shape[1]
            gather_ranks(torch.zeros(factor * channels + 1), None)
            if out.requires_grad:
                def back(_grad: torch.Tensor) -> None:
                    gather_ranks(torch.zeros(factor * channels), None)
                out.register_hook(back)
        return post

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and exchanges:
            padding = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
            width = padding[dim - 2]
            if isinstance(width, int) and width > 0:
                handles.append(m.register_forward_pre_hook(halo_layer(width)))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_hook(statistics(2)))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            handles.append(m.register_forward_hook(statistics(1)))
    return handles


def timed_steps(name: str, rows: int, cols: int, h: int, w: int, batch: int, steps: int, sharded: bool = True,
                overlap: bool | None = None, method: str | None = None, mimic: str | None = None) -> dict[str, float]:
    """Median seconds of a training step (forward, backward) after one warm-up, slowest rank.

    Also the median seconds this rank spends blocked in halo p2p waits (``wait``), and
    posting them (``post``), per step, how many times per step the ranks synchronise
    (``syncs``: p2p batches plus collectives), and the CPU seconds of the step spent by this
    rank's main thread (``main_cpu``) and by its other threads (``other_cpu``: gloo's
    communication threads), and the seconds its threads waited, runnable, for a CPU
    (``queued_main``, ``queued_other``: the scheduler's run-queue delay). ``spread`` and
    ``after`` split the synchronisations' cost into how far apart the ranks arrive and what
    passes after the last arrives
    (:func:`_split_sync_cost`; meaningful with ``overlap`` off, where every post is waited
    for at once). ``overlap`` and ``method`` set ``HaloConv2d.overlap`` and ``.method``.
    ``mimic`` (with ``sharded=False``, ``h x w`` one block's size) adds the synchronisations
    of a halo run on a ``rows x cols`` mesh to the plain model (:func:`mimic_halo_syncs`):
    ``"all"`` of them, or the batch-norm ``"statistics"`` only.
    """
    import torch
    import torch.distributed as dist

    model, x, _ = _setup(name, rows, cols, h, w, batch, sharded)
    if mimic not in (None, "all", "statistics"):
        raise ValueError(f"mimic must be None, 'all' or 'statistics', not {mimic!r}")
    if mimic:  # plain torch on a block-sized image, synchronising as a halo run on (rows, cols) does
        mimic_halo_syncs(model, rows, cols, exchanges=mimic == "all")
    for attr, value in (("overlap", overlap), ("method", method)):
        for m in model.modules():
            if value is not None and hasattr(m, attr):
                setattr(m, attr, value)
    real = dist.batch_isend_irecv
    wait, post = [0.0], [0.0]
    log: list[list[float]] = []  # [enter, exit] of every synchronisation of the step

    def timed(ops):
        t0 = time.perf_counter()
        works = real(ops)
        post[0] += time.perf_counter() - t0
        entry = [t0, t0]
        log.append(entry)
        return [_TimedWork(wk, wait, entry) for wk in works]

    dist.batch_isend_irecv = timed
    times, waits, posts, syncs, mains, others, spreads, afters, q_main, q_other = ([] for _ in range(10))
    try:
        for i in range(steps + 1):
            dist.barrier()
            wait[0] = post[0] = 0.0
            log.clear()
            undo = _log_collectives(log)
            delay0 = _run_delay()
            t0, main0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
            try:
                model(x).sum().backward()
            finally:
                undo()
            model.zero_grad(set_to_none=True)
            main, other = time.thread_time() - main0, time.process_time() - proc0
            delay = [b - a for a, b in zip(delay0, _run_delay())]
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            spread, after = _split_sync_cost(log) if dist.get_world_size() > 1 else (0.0, 0.0)
            if i:
                times.append(t.item())
                waits.append(wait[0])
                posts.append(post[0])
                syncs.append(len(log))
                mains.append(main)
                others.append(other - main)
                spreads.append(spread)
                afters.append(after)
                q_main.append(delay[0])
                q_other.append(delay[1])
    finally:
        dist.batch_isend_irecv = real
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"step": med(times), "wait": med(waits), "post": med(posts), "syncs": med(syncs), "main_cpu": med(mains),
            "other_cpu": med(others), "spread": med(spreads), "after": med(afters),
            "queued_main": med(q_main), "queued_other": med(q_other)}


def sync_latency(repeats: int = 200) -> dict[str, float]:
    """Seconds one synchronisation costs two idle ranks: the batch-norm all-gather of a few
    hundred floats, and one p2p batch that swaps a small strip (median of ``repeats``)."""
    import torch
    import torch.distributed as dist

    from halo.nn._collectives import gather_ranks

    vec, strip = torch.zeros(258), torch.zeros(64 * 64)
    peer = (dist.get_rank() + 1) % dist.get_world_size()
    prev = (dist.get_rank() - 1) % dist.get_world_size()

    def swap() -> None:
        got = torch.empty_like(strip)
        ops = [dist.P2POp(dist.irecv, got, prev), dist.P2POp(dist.isend, strip, peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    out = {}
    for key, fn in (("gather", lambda: gather_ranks(vec, None)), ("p2p", swap)):
        times = []
        for i in range(repeats + 10):
            t0 = time.perf_counter()
            fn()
            if i >= 10:
                times.append(time.perf_counter() - t0)
        out[key] = sorted(times)[len(times) // 2]
    return out
