"""Run test functions on a pool of spawned gloo processes (CPU), with timeouts.

A :class:`ProcessPool` starts ``world_size`` processes once (each initialises
torch.distributed with gloo over a file store) and then runs test functions on every rank.
A function is named by module and qualified name, so it must live at module level in an
importable test module. If any rank raises, the pool is torn down at once and the error
is raised in pytest with that rank's traceback: one failing rank never leaves the others
hanging. If the ranks do not finish in time, the pool is killed and the test fails.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

__all__ = ["ProcessPool", "RankError", "shared_mesh"]


@functools.cache
def shared_mesh(rows: int, cols: int):
    """This worker's :class:`halo.SpatialMesh` of one shape, made once and reused.

    Every new mesh creates process groups whose gloo threads live until the worker exits;
    a mesh per test call grows a long-lived worker to thousands of threads and slows the
    whole machine down.
    """
    import halo

    return halo.SpatialMesh(rows, cols)


class RankError(AssertionError):
    """A test function failed on one rank."""


def _worker(rank: int, world_size: int, store: str, path: list[str], tasks, results) -> None:
    sys.path[:] = path
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=90)
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        module, name, args, kwargs = task
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - every failure goes back to pytest
            results.put((rank, False, traceback.format_exc()))
        _trim()  # a big model's memory goes back to the system, not only to glibc's heap
    dist.destroy_process_group()


def _trim() -> None:
    """Collect the task's garbage and return freed memory to the system.

    The survivors are then frozen (:func:`gc.freeze`): torch, torchvision and timm hold some
    340,000 objects, and a full collection over them took 0.35 s after every task on every rank,
    most of a small layer test's time. Frozen objects are still freed by reference counting;
    only cycles among them are left to the worker's recycling (:data:`conftest.RECYCLE_RSS`).
    """
    import ctypes
    import gc

    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ProcessPool:
    """``world_size`` gloo ranks waiting for test functions."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: list[mp.Process] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        fd, store = tempfile.mkstemp(prefix="halo-store-")
        os.close(fd)
        os.unlink(store)
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, store, list(sys.path), self._tasks[r], self._results),
                        daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def close(self) -> None:
        for q, p in zip(getattr(self, "_tasks", []), self._procs):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self._procs = []

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 180.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; the per-rank results, in rank order."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for q in self._tasks:
            q.put((fn.__module__, fn.__qualname__, args, kwargs))
        out: dict[int, Any] = {}
        try:
            while len(out) < self.world_size:
                try:
                    rank, ok, value = self._results.get(timeout=timeout)
                except queue.Empty:
                    raise RankError(
                        f"{fn.__qualname__} did not finish on ranks "
                        f"{sorted(set(range(self.world_size)) - set(out))} within {timeout} s"
                    ) from None
                if not ok:
                    raise RankError(f"{fn.__qualname__} failed on rank {rank}:\n{value}")
                out[rank] = value
        except BaseException:
            self.close()
            raise
        return [out[r] for r in range(self.world_size)]


@contextmanager
def counting_sends() -> Iterator[list[int]]:
    """Count the bytes this rank posts with ``dist.batch_isend_irecv`` inside the block.

    Yields a one-item list whose item is the running total (the halo exchange sends through
    ``batch_isend_irecv`` only).
    """
    import torch.distributed as dist

    sent = [0]
    real = dist.batch_isend_irecv

    def counting(ops):
        sent[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return real(ops)

    dist.batch_isend_irecv = counting
    try:
        yield sent
    finally:
        dist.batch_isend_irecv = real
