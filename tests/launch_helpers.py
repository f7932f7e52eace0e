"""Subprocess plumbing shared by the real-launch tests (test_launch_real.py, test_launch_train.py).

Also re-exports the ``slurm_cluster`` fixture, so that a test module importing from here
has it without a second import block.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from tests.slurm_cluster import slurm_cluster
except ImportError:  # tests/ itself on sys.path (pytest's rootdir-less import mode)
    from slurm_cluster import slurm_cluster  # type: ignore[no-redef]

__all__ = ["REPO", "PY", "BIN", "MPIEXEC", "TORCHRUN", "clean_env", "run_cmd", "need_mpiexec", "slurm_cluster"]

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
MPIEXEC = BIN / "mpiexec"
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_LAUNCHER_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "SUBMITIT_", "TORCHELASTIC_")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (pytest may itself run under one)."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env | extra


def run_cmd(cmd: list[str], limit: float, cwd: Path = REPO, **extra: str) -> tuple[int, str, float]:
    """Run ``cmd`` in ``clean_env(**extra)`` within ``limit`` seconds: exit code, stdout + stderr, seconds taken."""
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=cwd, env=clean_env(**extra))
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def need_mpiexec() -> Path:
    """The mpiexec beside this interpreter; skips the calling test when there is none."""
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {PY} (the mpich wheel provides it)")
    return MPIEXEC
