"""The one-node SLURM cluster as a pytest fixture (import ``slurm_cluster`` in conftest.py).

    from tests.slurm_cluster import slurm_cluster  # noqa: F401

The session fixture runs ``slurm/install.sh`` (apt, once) and ``slurm/cluster.sh start``
(about 15 s cold, instant when up) and stops the cluster at the end if it started it.
It skips, with the reason, only when not root or without apt-get; any other failure
is an error, so CI (root) really runs the SLURM tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["REPO", "slurm_cluster"]

REPO = Path(__file__).resolve().parents[1]


def _cluster(cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "slurm" / "cluster.sh"), cmd],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    """Start (install if needed) the one-node SLURM; yield the repository root."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (slurm/cluster.sh starts munged, slurmctld, ...)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no apt-get to install slurm-wlm (slurm/install.sh is for Debian/Ubuntu)")
    was_up = _cluster("status", 60).returncode == 0
    install = subprocess.run(
        ["bash", str(REPO / "slurm" / "install.sh")], capture_output=True, text=True, timeout=900
    )
    if install.returncode != 0:
        pytest.fail(f"slurm/install.sh failed:\n{install.stdout}\n{install.stderr}")
    start = _cluster("start", 300)
    if start.returncode != 0:
        pytest.fail(f"slurm/cluster.sh start failed:\n{start.stdout}\n{start.stderr}")
    yield REPO
    if not was_up:
        _cluster("stop", 120)
