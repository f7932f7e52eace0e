"""halo-submit and a SLURM job that can never start (issue 17).

The request is checked against the partition before submitting; a job already queued that
pends for a reason that cannot clear (PartitionConfig, ...) is reported and cancelled; one
that pends for a reason that does clear (JobHeldUser, ...) keeps waiting, its state printed.
The classifier and the messages are tested without SLURM; the rest on the tests' one-node
SLURM, where ``launcher.cpus_per_task=8`` with two tasks asks for more CPUs than the node has.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

try:
    from tests.launch_helpers import BIN, PY, REPO, clean_env, run_cmd
    from tests.launch_helpers import slurm_cluster  # noqa: F401 - the fixture
except ImportError:  # tests/ itself on sys.path (pytest's rootdir-less import mode)
    from launch_helpers import BIN, PY, REPO, clean_env, run_cmd  # type: ignore[no-redef]
    from launch_helpers import slurm_cluster  # type: ignore[no-redef]  # noqa: F401

from launch.submit import (Node, Offer, Request, StatusLine, _gpus, _hostnames, _mb, cannot_start_message,
                           never_starts, request_problems, slurm_request)

SUBMIT = [str(BIN / "halo-submit")] if (BIN / "halo-submit").exists() else [PY, "-m", "launch.submit"]
LIMIT_S = 60.0  # an impossible request must end halo-submit within this (start-up included)

SMALL = Offer("debug", (Node("vm", 2, 23593, 0),), known_nodes=frozenset({"vm"}))
GPU = Offer("gpu", (Node("g1", 64, 512000, 8), Node("g2", 64, 512000, 8), Node("c1", 128, 256000, 0)),
            max_nodes=2, known_nodes=frozenset({"g1", "g2", "c1", "vm"}))


# ---- without SLURM ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_request_problems_name_request_and_offer() -> None:
    big = Request(nodes=1, tasks_per_node=2, cpus_per_task=8)
    problems = request_problems(big, SMALL)
    assert problems == ["tasks_per_node x cpus_per_task = 2 x 8 = 16 CPUs per node, but the largest node of "
                        "partition debug has 2 CPUs"]
    assert request_problems(Request(1, 2, 1), SMALL) == []
    message = cannot_start_message("; ".join(problems), big, SMALL)
    assert message.splitlines() == [
        "halo-submit: SLURM can never start this job, not submitting it: " + problems[0],
        "halo-submit:   requested: nodes=1, tasks_per_node=2, cpus_per_task=8 (16 CPUs per node), gpus_per_node=0, "
        "mem=partition default, partition=debug (the default)",
        "halo-submit:   partition debug offers 1 node (any number per job): vm: 2 CPUs, 23593M memory, 0 GPUs",
        "halo-submit: change launcher.nodes, launcher.tasks_per_node, launcher.cpus_per_task, "
        "launcher.gpus_per_node, launcher.mem or launcher.partition",
    ]
    assert "cancelled job 7;" in cannot_start_message("x", big, SMALL, job_id="7")
    # nodes, memory, GPUs, and a combination no single node has
    assert request_problems(Request(3, 8, 8, 8, partition="gpu"), GPU) == [
        "nodes=3, but partition gpu allows at most 2 per job"]
    assert request_problems(Request(1, 1, 1, mem="600G"), GPU) == [
        "mem=600G (614400M) per node, but the largest node of partition gpu has 512000M"]
    assert request_problems(Request(1, 4, 1, gpus_per_node=16), GPU) == [
        "gpus_per_node=16, but the nodes of partition gpu have at most 8 GPUs"]
    assert request_problems(Request(2, 1, 100, gpus_per_node=1), GPU) == [
        "nodes=2, but only 0 node(s) of partition gpu have 100 CPUs, 1 GPUs and the default memory together"]
    assert request_problems(Request(2, 8, 8, 8, mem="500G"), GPU) == []
    assert "g1,g2: 64 CPUs, 512000M memory, 8 GPUs" in GPU.describe() and "at most 2 per job" in GPU.describe()


@pytest.mark.timeout(30)
def test_pending_reasons_classified() -> None:
    fits, big = Request(1, 2, 1), Request(1, 2, 8)
    for reason in ("PartitionConfig", "PartitionNodeLimit", "BadConstraints", "PartitionTimeLimit"):
        why = never_starts(reason, fits, SMALL)
        assert why is not None and why.startswith(f"pending with reason {reason} ("), why
        assert never_starts(reason, fits, None) is not None  # no sinfo: the reason alone decides
    why = never_starts("PartitionConfig", big, SMALL)
    assert why is not None and "2 x 8 = 16 CPUs per node" in why and "has 2 CPUs" in why, why
    for reason in ("Priority", "Resources", "BeginTime", "Dependency", "JobHeldUser", "None", ""):
        assert never_starts(reason, fits, SMALL) is None, reason
        assert never_starts(reason, fits, None) is None, reason
    # a clearable reason, but larger than any node: never
    why = never_starts("Resources", big, SMALL)
    assert why is not None and why.startswith("pending with reason Resources, but the request can never fit"), why
    # ReqNodeNotAvail: a node that does not exist is final, one that is down may come back
    why = never_starts("ReqNodeNotAvail, UnavailableNodes:vm,gpu[07-08]", fits, SMALL)
    assert why == "pending with reason ReqNodeNotAvail: no node named gpu07, gpu08 in the cluster", why
    assert never_starts("ReqNodeNotAvail, UnavailableNodes:vm", fits, SMALL) is None


@pytest.mark.timeout(30)
def test_status_line_on_change_and_once_a_minute() -> None:
    status = StatusLine("42", every_s=60)
    assert status.update("PENDING", "None", 0.0) == "halo-submit: job 42 PENDING (reason None)"
    assert status.update("PENDING", "Priority", 1.0) == "halo-submit: job 42 PENDING (reason Priority)"
    assert status.update("PENDING", "Priority", 30.0) is None
    assert status.update("PENDING", "Priority", 60.5) is None
    assert status.update("PENDING", "Priority", 61.0) == "halo-submit: job 42 PENDING (reason Priority)"
    assert status.update("RUNNING", "None", 62.0) == "halo-submit: job 42 RUNNING"
    assert status.update("RUNNING", "None", 200.0) is None  # rank 0's log is followed instead
    quiet = StatusLine("43", every_s=60, repeat_running=True)  # launcher.follow=false
    assert quiet.update("RUNNING", "None", 0.0) and quiet.update("RUNNING", "None", 70.0)


@pytest.mark.timeout(30)
def test_parsers_and_request_from_config() -> None:
    from hydra import compose, initialize_config_dir

    from halo.train import CONF_DIR

    assert _hostnames("a[1-3,05],b") == ["a1", "a2", "a3", "a05", "b"]
    assert _gpus("gpu:4") == 4 and _gpus("gpu:a100:2(S:0-1),gpu:v100:2,mps:100") == 4 and _gpus("(null)") == 0
    assert (_mb("64G"), _mb("500M"), _mb("1024"), _mb("1T"), _mb("lots")) == (65536, 500, 1024, 1048576, None)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["launcher=slurm", "launcher.mem=64", "launcher.partition=gpu"])
    assert cfg.launcher.check_request is True and cfg.launcher.status_every_s == 60
    assert slurm_request(cfg.launcher) == Request(1, 2, 8, 0, "64G", "gpu")  # the defaults of launcher=slurm


# ---- on the one-node SLURM --------------------------------------------------------------------------


def _node_cpus() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True, timeout=30).stdout
    return max(int(c) for c in out.split())


def _impossible(tmp_path: Path, *extra: str) -> tuple[list[str], int]:
    cpus = _node_cpus()
    per_task = max(8, cpus)  # two tasks of this many CPUs: more than the node has
    return [*SUBMIT, "launcher=slurm", "launcher.tasks_per_node=2", f"launcher.cpus_per_task={per_task}",
            "launcher.poll_s=1", *extra, f"hydra.run.dir={tmp_path / 'p'}"], cpus


def _job_state(job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "--format=State"], capture_output=True, text=True,
                         timeout=30).stdout.split("\n")
    return out[0].strip()


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_impossible_request_refused_before_submitting(slurm_cluster: Path, tmp_path: Path) -> None:  # noqa: F811
    cmd, cpus = _impossible(tmp_path)
    rc, out, took = run_cmd(cmd, LIMIT_S)
    assert rc == 2, out
    assert "SLURM can never start this job, not submitting it" in out, out
    assert f"cpus_per_task={max(8, cpus)}" in out and f"has {cpus} CPUs" in out and f": {cpus} CPUs," in out, out
    assert "submitted" not in out and not (tmp_path / "p" / "submitit").exists(), out
    assert took < LIMIT_S


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_impossible_pending_job_is_reported_and_cancelled(slurm_cluster: Path, tmp_path: Path) -> None:  # noqa: F811
    """With the check before submitting off (a partition can change after it): the pending reason."""
    name = f"halo-pending-{time.time_ns()}"
    cmd, cpus = _impossible(tmp_path, "launcher.check_request=false", f"launcher.job_name={name}")
    try:
        rc, out, took = run_cmd(cmd, LIMIT_S)
    finally:  # never leave the job queued, even when halo-submit hangs (the fault)
        subprocess.run(["scancel", f"--name={name}"], timeout=30)
    job = out.split("slurm job ", 1)[1].split()[0]
    assert rc == 2, out
    assert f"halo-submit: job {job} PENDING (reason PartitionConfig)" in out, out
    assert f"halo-submit: SLURM can never start job {job}: pending with reason PartitionConfig" in out, out
    assert f"cpus_per_task={max(8, cpus)}" in out and f"has {cpus} CPUs" in out, out
    assert f"halo-submit: cancelled job {job};" in out, out
    assert took < LIMIT_S
    deadline = time.monotonic() + 30
    while (state := _job_state(job)) != "CANCELLED by 0" and time.monotonic() < deadline:
        time.sleep(1)
    assert state.startswith("CANCELLED"), state


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_held_job_keeps_waiting_printed(slurm_cluster: Path, tmp_path: Path) -> None:  # noqa: F811
    """JobHeldUser clears (scontrol release): halo-submit waits, repeating the state every status_every_s."""
    log, name = tmp_path / "submit.log", f"halo-held-{time.time_ns()}"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [*SUBMIT, "launcher=slurm", "launcher.tasks_per_node=2", "launcher.cpus_per_task=1", "launcher.poll_s=1",
             "launcher.status_every_s=3", "+launcher.additional_parameters.hold=true",
             f"launcher.job_name={name}", f"hydra.run.dir={tmp_path / 'h'}"],
            cwd=REPO, env=clean_env(), stdout=fh, stderr=subprocess.STDOUT, text=True)
    job, rc = None, None
    try:
        deadline = time.monotonic() + LIMIT_S
        while "PENDING (reason JobHeldUser)" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
        out = log.read_text()
        job = out.split("slurm job ", 1)[1].split()[0]
        time.sleep(8)  # several polls, and more than two status intervals
        out = log.read_text()
        assert proc.poll() is None, out
        assert out.count(f"halo-submit: job {job} PENDING (reason JobHeldUser)") >= 2, out
        assert "can never start" not in out, out
    finally:  # the end of the wait: cancelled from outside
        subprocess.run(["scancel", f"--name={name}"], timeout=30)
        try:
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log.read_text()
    assert rc == 1 and f"job {job} failed (state CANCELLED)" in out, out
