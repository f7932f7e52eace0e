"""Shared fixtures: pools of spawned gloo ranks; which tests are ``slow``.

``pytest -m "not slow"`` is the fast subset (under 3 minutes on 2 cores): it leaves out the
launcher tests (torchrun, mpiexec, SLURM), the benchmarks' quick modes, meshes of 8 and more
ranks, halo-train end to end, the backbone sweep, whole models on four ranks and the 50-layer
models. Every layer still runs on 1, 2 and 4 ranks. The full suite runs everything.
"""

from __future__ import annotations

import ctypes
import gc
import os

import pytest

from distributed import ProcessPool

POOLS: list[ProcessPool] = []
"""The session's pools, so that :func:`_free_memory` can recycle their workers."""

RECYCLE_RSS = 1.5 * 2**30
"""A worker holding more than this after a module (big models stay in glibc's heap) is restarted."""

SLOW_MODULES = {"test_benchmarks", "test_launch_real", "test_launch_train", "test_meshes", "test_plan_measure",
                "test_zoo", "test_train", "test_engine", "test_predict", "test_outcomes"}
"""Modules whose every test is slow: launchers, end-to-end runs, many ranks."""

SLOW_TESTS = ("wide_resnet", "resnext", "densenet", "test_model_four_ranks", "test_layout_models",
              "test_optimizer_steps_match", "test_autocast_bfloat16", "test_checkpointed_stage_ending",
              "test_equals_sharded_prediction", "test_matches_full_forward", "test_sync_counts_equal_a_real_run_on_2x2",
              "test_after_resume",
              # whole models on four ranks (the layers' 2x2 runs stay fast), and the 50-layer models (their
              # families' small members stay): by measured durations, to keep the fast set under 3 minutes
              "test_models_four_ranks", "test_timm_four_ranks", "resnet50]", "resnetv2_50x1_bit", "convnext_tiny")
"""Name fragments of single slow tests elsewhere (the biggest models, whole models on four ranks)."""


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        if (module in SLOW_MODULES or item.get_closest_marker("slurm") is not None
                or any(part in item.nodeid for part in SLOW_TESTS)):
            item.add_marker(pytest.mark.slow)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@pytest.fixture(autouse=True, scope="module")
def _free_memory():
    """After each module, give memory back: the suite runs on 24 GB beside pools of up to 9 ranks.

    Workers of the session's pools that grew past :data:`RECYCLE_RSS` are closed (the next
    ``run`` starts fresh ones), and this process returns its freed heap to the system.
    """
    yield
    for pool in POOLS:
        if any(_rss(p.pid) > RECYCLE_RSS for p in pool._procs if p.pid is not None):
            pool.close()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@pytest.fixture(scope="session")
def pool1():
    pool = ProcessPool(1)
    POOLS.append(pool)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool2():
    pool = ProcessPool(2)
    POOLS.append(pool)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool4():
    pool = ProcessPool(4)
    POOLS.append(pool)
    yield pool
    pool.close()
