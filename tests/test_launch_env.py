"""`launch.env.discover` on synthetic environments, and its error paths (no processes)."""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from launch.env import DistEnv, discover, expand_nodelist, init_distributed, slurm_port


def test_torchrun_variables() -> None:
    env = discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                    "MASTER_ADDR": "node7", "MASTER_PORT": "29500", "SLURM_PROCID": "0",
                    "SLURM_STEP_ID": "0", "PMI_RANK": "0"})
    assert env == DistEnv(rank=3, world_size=4, local_rank=1, master_addr="node7",
                          master_port=29500, source="torchrun")


def test_torchrun_without_master_addr_is_refused() -> None:
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        discover({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1234"})


@pytest.mark.parametrize("bad", [{"RANK": "x"}, {"RANK": "2"}, {"RANK": "-1"}, {"MASTER_PORT": "70000"}])
def test_torchrun_bad_values_name_the_problem(bad: dict[str, str]) -> None:
    base = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    with pytest.raises(ValueError, match="RANK|rank|master_port"):
        discover(base | bad)


def _slurm(**over: str) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5",
           "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[01-04,07],gpu5"}
    return env | over


@pytest.mark.parametrize("use_scontrol", [False, True])
def test_slurm_step(use_scontrol: bool) -> None:
    env = discover(_slurm(), use_scontrol=use_scontrol)
    assert env == DistEnv(rank=5, world_size=8, local_rank=1, master_addr="node01",
                          master_port=slurm_port(123456), source="slurm")
    assert env.master_port == 15000 + 123456 % 20000


def test_slurm_step_values_win_and_master_overrides() -> None:
    env = discover(_slurm(SLURM_STEP_NUM_TASKS="6", SLURM_STEP_NODELIST="gpu[10-12]",
                          MASTER_PORT="4242"), use_scontrol=False)
    assert (env.world_size, env.master_addr, env.master_port) == (6, "gpu10", 4242)
    env = discover(_slurm(MASTER_ADDR="10.0.0.1"), use_scontrol=False)
    assert env.master_addr == "10.0.0.1"


def test_slurm_batch_script_is_not_a_step() -> None:
    # sbatch's own shell has SLURM_PROCID=0 and SLURM_NTASKS=n but no step: one process.
    env = _slurm(SLURM_PROCID="0")
    del env["SLURM_STEP_ID"]
    assert discover(env).source == "single"


def test_slurm_rank_outside_world_is_refused() -> None:
    with pytest.raises(ValueError, match="rank must be in"):
        discover(_slurm(SLURM_PROCID="8"), use_scontrol=False)


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("vm", ["vm"]),
    ("node[01-04,07],gpu5", ["node01", "node02", "node03", "node04", "node07", "gpu5"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
    ("x[001-002],y,z[9]", ["x001", "x002", "y", "z9"]),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist, use_scontrol=False) == hosts
    if shutil.which("scontrol"):
        assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[1-", "node]1[", "node[3-1]", "node[a-b]"])
def test_expand_nodelist_refuses_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad, use_scontrol=False)


def test_submitit_local_executor() -> None:
    env = discover({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_GLOBALID": "1",
                    "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
                    "SUBMITIT_LOCAL_JOB_ID": "4321"})
    assert env == DistEnv(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1",
                          master_port=slurm_port(4321), source="submitit")


class FakeComm:
    """The three mpi4py calls `discover` makes, for one rank of a job on one host."""

    def __init__(self, rank: int, size: int, hosts: list[str] | None = None) -> None:
        self.rank, self.size = rank, size
        self.hosts = hosts or ["h"] * size

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's names
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def allgather(self, obj: Any) -> list[Any]:
        return list(self.hosts)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj if self.rank == root else ("127.0.0.1", 23456)


@pytest.mark.parametrize("marker", [{"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"},
                                    {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
                                    {"PMIX_RANK": "1"}])
def test_mpi_rank_from_comm_and_master_from_rank0(marker: dict[str, str]) -> None:
    env = discover(marker, comm=FakeComm(1, 2))
    assert env == DistEnv(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1",
                          master_port=23456, source="mpi")
    root = discover({"PMI_RANK": "0"}, comm=FakeComm(0, 2))
    assert root.master_addr == "127.0.0.1" and 0 < root.master_port < 65536


def test_mpi_local_rank_from_hosts_when_no_variable() -> None:
    env = discover({"PMIX_RANK": "3"}, comm=FakeComm(3, 4, hosts=["a", "a", "b", "b"]))
    assert env.local_rank == 1 and env.world_size == 4


def test_single_process() -> None:
    env = discover({})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == \
        (0, 1, 0, "127.0.0.1", "single")
    assert discover({"MASTER_PORT": "5555"}).master_port == 5555


def test_init_distributed_validates_before_touching_anything() -> None:
    single = discover({})
    with pytest.raises(ValueError, match="backend must be one of"):
        init_distributed(backend="mpi", env=single)
    with pytest.raises(ValueError, match="timeout_s"):
        init_distributed(timeout_s=0, env=single)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nccl.*CUDA"):
            init_distributed(backend="nccl", env=single)


def test_init_distributed_single_is_idempotent() -> None:
    import torch.distributed as dist

    from launch.env import shutdown

    env = discover({})
    try:
        assert init_distributed(backend="gloo", timeout_s=30, env=env) == env
        assert dist.get_world_size() == 1
        assert init_distributed(backend="gloo", env=env) == env  # second call: no-op
        with pytest.raises(ValueError, match="already initialised"):
            init_distributed(env=DistEnv(rank=1, world_size=2, local_rank=0, master_addr="h",
                                         master_port=1, source="torchrun"))
    finally:
        shutdown()
        shutdown()
    assert not dist.is_initialized()


def test_sigterm_during_a_failure_reports_the_failure() -> None:
    """torchrun's SIGTERM after a peer died often lands while this rank handles its own
    collective's error: the report names that error, not the signal."""
    from launch.failure import Terminated, cause

    try:
        try:
            raise RuntimeError("Connection reset by peer")
        except RuntimeError:
            raise Terminated("SIGTERM from the launcher")  # noqa: B904 - as the signal handler raises it
    except Terminated as e:
        assert isinstance(cause(e), RuntimeError)
    alone = Terminated("SIGTERM from the launcher")
    assert cause(alone) is alone
