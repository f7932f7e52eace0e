"""Lost ranks under real launches of tests/scripts/dist_probe.py: torchrun, mpiexec and srun.

Each run all-reduces through `launch.env.init_distributed` (gloo); a dead or hung rank must end
the whole launch non-zero, within the process-group timeout plus start-up, and the survivor
must name the lost rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest

try:
    from tests.launch_helpers import PY, REPO, TORCHRUN, need_mpiexec, run_cmd
    from tests.launch_helpers import slurm_cluster  # noqa: F401 - the fixture
except ImportError:  # tests/ itself on sys.path (pytest's rootdir-less import mode)
    from launch_helpers import PY, REPO, TORCHRUN, need_mpiexec, run_cmd  # type: ignore[no-redef]
    from launch_helpers import slurm_cluster  # type: ignore[no-redef]  # noqa: F401

PROBE = REPO / "tests" / "scripts" / "dist_probe.py"
START_S = 20.0  # generous bound for interpreter + torch import + rendezvous on a loaded 2-CPU box


def _torchrun(*args: str) -> list[str]:
    return [*TORCHRUN, str(PROBE), *args]


def _mpiexec(*args: str, flags: tuple[str, ...] = ()) -> list[str]:
    return [str(need_mpiexec()), *flags, "-n", "2", PY, str(PROBE), *args]


def _srun(*args: str) -> list[str]:
    return ["srun", "-n", "2", "--cpus-per-task=1", "--kill-on-bad-exit=1", PY, str(PROBE), *args]


# The happy paths (torchrun, mpiexec, an srun step, the sbatch template) are the trainer's own
# launches in tests/test_launch_train.py and tests/test_train.py: each checks the rank, world size,
# local rank and launcher that launch.env discovered (each rank logs "rank R of 2 (source), local rank R").


# ---- lost ranks -----------------------------------------------------------------------------

DIE = ("--steps", "30", "--die-rank", "1", "--die-after", "3", "--timeout-s", "20")
HANG_TIMEOUT_S = 8.0
HANG = ("--steps", "30", "--hang-rank", "1", "--die-after", "2", "--timeout-s", str(HANG_TIMEOUT_S))


def _assert_lost(rc: int, out: str, elapsed: float, timeout_s: float, lost: str) -> None:
    assert rc != 0, out
    assert elapsed < timeout_s + START_S, f"took {elapsed:.1f} s\n{out}"
    assert lost in out, out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["exit", "KILL"])
def test_torchrun_dead_rank(how: str) -> None:
    rc, out, elapsed = run_cmd(_torchrun(*DIE, "--die-signal", how), 80)
    _assert_lost(rc, out, elapsed, 20, "halo: rank 0 sees: rank 1 lost")


@pytest.mark.timeout(90)
def test_torchrun_hung_rank() -> None:
    rc, out, elapsed = run_cmd(_torchrun(*HANG), 80)
    assert elapsed > HANG_TIMEOUT_S, out  # only the collective timeout catches a hang
    _assert_lost(rc, out, elapsed, HANG_TIMEOUT_S, "rank 1 alive but not responding")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["exit", "KILL"])
def test_mpiexec_dead_rank(how: str) -> None:
    # MPICH's mpiexec ends the whole job itself when one process exits badly.
    rc, out, elapsed = run_cmd(_mpiexec(*DIE, "--die-signal", how), 80)
    _assert_lost(rc, out, elapsed, 20, "probe: rank 1 dies")


@pytest.mark.timeout(90)
def test_mpiexec_dead_rank_reported_without_auto_cleanup() -> None:
    # Without mpiexec's clean-up the survivor's guard reports the loss and calls MPI_Abort,
    # which ends mpiexec (else it would wait in MPI_Finalize). mpiexec's own "MPI_Abort" line
    # is not asserted: the abort races with mpiexec forwarding the last output.
    rc, out, elapsed = run_cmd(_mpiexec(*DIE, flags=("-disable-auto-cleanup",)), 80)
    _assert_lost(rc, out, elapsed, 20, "halo: rank 0 sees: rank 1 lost")
    assert "halo: ending the job" in out, out


@pytest.mark.timeout(90)
def test_mpiexec_hung_rank() -> None:
    rc, out, elapsed = run_cmd(_mpiexec(*HANG), 80)
    assert elapsed > HANG_TIMEOUT_S, out
    _assert_lost(rc, out, elapsed, HANG_TIMEOUT_S, "rank 1 alive but not responding")


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_srun_dead_rank(slurm_cluster: Path) -> None:  # noqa: F811
    rc, out, elapsed = run_cmd(_srun(*DIE), 110)
    _assert_lost(rc, out, elapsed, 20, "task 1: Exited with exit code 1")


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_srun_hung_rank(slurm_cluster: Path) -> None:  # noqa: F811
    rc, out, elapsed = run_cmd(_srun(*HANG), 110)
    _assert_lost(rc, out, elapsed, HANG_TIMEOUT_S, "rank 1 alive but not responding")
