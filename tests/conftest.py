"""Shared fixtures: pools of spawned gloo ranks."""

from __future__ import annotations

import pytest

from distributed import ProcessPool


@pytest.fixture(scope="session")
def pool1():
    pool = ProcessPool(1)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool2():
    pool = ProcessPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool4():
    pool = ProcessPool(4)
    yield pool
    pool.close()
