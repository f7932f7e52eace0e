"""Real launches of the trainer: halo-submit (SLURM and local), sbatch, mpiexec, a killed rank, requeue.

Every run trains halo's tiny model for a few epochs on a tiny synthetic cohort (8 slides of
512 x 512) with two ranks on CPU (gloo), and checks the run directory it leaves.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

try:
    from tests.launch_helpers import BIN, PY, REPO, TORCHRUN, clean_env, need_mpiexec, run_cmd
    from tests.launch_helpers import slurm_cluster  # noqa: F401 - the fixture
except ImportError:  # tests/ itself on sys.path (pytest's rootdir-less import mode)
    from launch_helpers import BIN, PY, REPO, TORCHRUN, clean_env, need_mpiexec, run_cmd  # type: ignore[no-redef]
    from launch_helpers import slurm_cluster  # type: ignore[no-redef]  # noqa: F401

SUBMIT = [str(BIN / "halo-submit")] if (BIN / "halo-submit").exists() else [PY, "-m", "launch.submit"]
START_S = 40.0  # interpreter + torch import + rendezvous, on a loaded 2-CPU machine


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    from halo.data.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("cohort"), slides=8, seed=1, size=(512, 512), mpp=0.5, levels=2)


def _tiny(cohort: Path, epochs: int, *extra: str) -> list[str]:
    return ["data=csv", f"data.csv={cohort}", "data.classes=[normal,tumour]", "data.mpp=1.0",
            f"train.epochs={epochs}", "train.progress=false", "train.threads=1",
            "train.heatmaps=false", *extra]  # heatmaps: tests/test_train.py and test_engine.py


def _epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv") as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


def _check_run(run_dir: Path, epochs: int, output: str) -> dict:
    assert (run_dir / "summary.json").is_file(), output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"val_auc", "best_epoch", "slides_seen"} <= set(summary), summary
    assert summary["slides_seen"] == 6 * epochs, summary  # 6 training slides, one group of 2 ranks
    assert _epochs(run_dir) == list(range(1, epochs + 1)), output
    for name in (".hydra/config.yaml", "predictions.csv", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), f"{name} missing\n{output}"
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["state"]["epoch"] == epochs
    return summary


def _job_id(output: str) -> str:
    m = re.search(r"halo-submit: \w+ job (\S+) submitted", output)
    assert m, output
    return m.group(1)


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, log: Path, limit: float, poll: float) -> None:
    """Wait (at most ``limit`` s) for the run's first ``last.pt``; fail with the log if ``proc`` ends first."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not (run_dir / "checkpoints" / "last.pt").is_file():
        assert proc.poll() is None, log.read_text()
        time.sleep(poll)


# ---- the requeue hook, without a cluster -------------------------------------------------------


def test_checkpoint_requeues_with_resume(tmp_path: Path, monkeypatch) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from halo.train import CONF_DIR
    from launch.submit import TrainJob, make_executor

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["launcher=slurm", "train.epochs=5"])
    assert cfg.launcher.name == "slurm" and cfg.launcher.srun_args == ["--kill-on-bad-exit=1"]
    job = TrainJob(OmegaConf.to_container(cfg, resolve=True), str(tmp_path))
    assert job.config().train.resume is False
    delayed = job.checkpoint()
    again = delayed.function
    assert isinstance(again, TrainJob) and again is not job
    assert again.run_dir == str(tmp_path) and again.config().train.resume is True
    assert again.config().train.epochs == 5 and job.cfg["train"]["resume"] is False
    # requeued by SLURM itself (scontrol requeue, node failure): resume as well
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert job.config().train.resume is True

    # the command line travels with the job (and its requeue) to halo.train.run: in mode=predict,
    # what was given explicitly is kept over the checkpoint's config
    told = TrainJob(OmegaConf.to_container(cfg, resolve=True), str(tmp_path), ["head=mean", "data.mpp=2.0"])
    assert told.checkpoint().function.overrides == ["head=mean", "data.mpp=2.0"]
    seen = {}
    monkeypatch.setattr("launch.train.start", lambda cfg, run_dir, **kw: seen.update(kw, run_dir=run_dir))
    told()
    assert seen["overrides"] == ["head=mean", "data.mpp=2.0"] and seen["run_dir"] == str(tmp_path)

    # DESIGN.md's command line becomes this batch script
    if shutil.which("srun"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            big = compose("config", overrides=[
                "launcher=slurm", "launcher.nodes=2", "launcher.tasks_per_node=4", "launcher.gpus_per_node=4",
                "launcher.partition=gpu", "launcher.mem=64G", "launcher.account=lab", "launcher.timeout_min=90",
                "+launcher.additional_parameters.exclusive=true", "train.epochs=10"])
        script = make_executor(big.launcher, tmp_path / "submitit" / "%j")._make_submission_file_text("CMD", "u")
        for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--mem=64G",
                     "--account=lab", "--time=90", "--cpus-per-task=8", "--signal=USR2@120", "--exclusive"):
            assert f"#SBATCH {flag}\n" in script, script
        assert "--kill-on-bad-exit=1" in script and "export OMP_NUM_THREADS=8" in script, script

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        local = compose("config", overrides=["launcher=local", "launcher.tasks_per_node=2"])
    executor = make_executor(local.launcher, tmp_path / "submitit" / "%j")
    assert executor.parameters["tasks_per_node"] == 2


# ---- SLURM ----------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_halo_submit_slurm(slurm_cluster: Path, cohort: Path, tmp_path: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "z"
    rc, out, _ = run_cmd([*SUBMIT, "launcher=slurm", "launcher.nodes=1", "launcher.tasks_per_node=2",
                         "launcher.cpus_per_task=1", "launcher.timeout_min=10", "launcher.poll_s=1",
                         *_tiny(cohort, 2), f"hydra.run.dir={run_dir}"], 400)
    assert rc == 0, out
    job = _job_id(out)
    assert f"logs in {run_dir / 'submitit' / job}" in out, out
    assert "halo.train: epoch 2" in out  # rank 0's log, followed while waiting
    _check_run(run_dir, 2, out)
    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "--format=State,NNodes,NCPUS"],
                           capture_output=True, text=True, timeout=30).stdout.split()
    assert sacct and sacct[0] == "COMPLETED|1|2", sacct


@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_sbatch_template_trains(slurm_cluster: Path, cohort: Path, tmp_path: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    cmd = ["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
           "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/slurm-%j.out",
           str(REPO / "slurm" / "halo.sbatch"), *_tiny(cohort, 1)]
    rc, out, _ = run_cmd(cmd, 400, HALO_PYTHON=PY, HALO_RUN_DIR=str(run_dir))
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert rc == 0, out + logs
    for rank in (0, 1):  # an srun step's SLURM variables, as launch.env discovers them
        assert f"rank {rank} of 2 (slurm), local rank {rank}," in logs, out + logs
    _check_run(run_dir, 1, out + logs)


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_slurm_requeue_resumes_from_checkpoint(slurm_cluster: Path, cohort: Path, tmp_path: Path) -> None:  # noqa: F811
    """Preempt a running job (SIGUSR2, as SLURM sends before a time limit or preemption):
    submitit calls TrainJob.checkpoint, requeues, and the job continues from last.pt."""
    run_dir, epochs = tmp_path / "rq", 6
    log = tmp_path / "submit.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [*SUBMIT, "launcher=slurm", "launcher.nodes=1", "launcher.tasks_per_node=2", "launcher.cpus_per_task=1",
             "launcher.timeout_min=10", "launcher.poll_s=1", *_tiny(cohort, epochs), f"hydra.run.dir={run_dir}"],
            cwd=REPO, env=clean_env(), stdout=fh, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_checkpoint(proc, run_dir, log, 400, 0.2)
        job = _job_id(log.read_text())
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        # A requeued job waits for its BeginTime (about two minutes) so that its new launch credential
        # postdates the revocation of the old one on the node (one-second timestamps). Start it sooner,
        # but only once the node has let go of the old incarnation and that second has passed:
        # forcing it at once gets "Killing non-startable batch job: Job credential revoked".
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True,
                                   timeout=30).stdout.strip()
            node = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
            if state.startswith("PENDING") and node == "idle":
                time.sleep(2.0)
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30)
                break
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert rc == 0, out
    assert "checkpoint: requeueing with train.resume=true" in out, out
    assert "resumed from" in out and "resume=True" in out, out
    _check_run(run_dir, epochs, out)
    restarts = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    assert "Restarts=1" in restarts, restarts


# ---- mpiexec, submitit local ------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_mpiexec_trains(cohort: Path, tmp_path: Path) -> None:
    mpiexec = need_mpiexec()
    # relative run dir, as in DESIGN.md: both ranks must resolve it to the same directory
    rc, out, _ = run_cmd([str(mpiexec), "-n", "2", PY, "-m", "halo.train", *_tiny(cohort, 1), "hydra.run.dir=runs/y"],
                        280, cwd=tmp_path)
    assert rc == 0, out
    for rank in (0, 1):  # mpi4py's COMM_WORLD, as launch.env discovers it
        assert f"rank {rank} of 2 (mpi), local rank {rank}," in out, out
    _check_run(tmp_path / "runs" / "y", 1, out)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["y"]


@pytest.mark.timeout(300)
def test_halo_submit_local_two_tasks(cohort: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "l"
    rc, out, _ = run_cmd([*SUBMIT, "launcher=local", "launcher.tasks_per_node=2", "launcher.poll_s=0.5",
                         *_tiny(cohort, 2), f"hydra.run.dir={run_dir}"], 280)
    assert rc == 0, out
    job = _job_id(out)
    for rank in (0, 1):
        log = (run_dir / "submitit" / job / f"{job}_{rank}_log.out").read_text()
        assert f"rank {rank} of 2 (submitit), local rank {rank}," in log, log
    _check_run(run_dir, 2, out)


def _local_tasks(job: str) -> list[int]:
    """Pids of the task processes of submitit local job ``job``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SUBMITIT_LOCAL_JOB_ID={job}".encode() in environ and any(
                v.startswith(b"SUBMITIT_LOCAL_GLOBALID=") for v in environ):
            pids.append(int(entry.name))
    return pids


@pytest.mark.timeout(300)
def test_halo_submit_local_preempted_job_resumes(cohort: Path, tmp_path: Path) -> None:
    """SIGUSR2 to every task (what SLURM sends on preemption or before the time limit): the local
    executor requeues the job (TrainJob.checkpoint) and it continues from last.pt."""
    run_dir, epochs, log = tmp_path / "lq", 12, tmp_path / "submit.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [*SUBMIT, "launcher=local", "launcher.tasks_per_node=2", "launcher.poll_s=0.5",
             *_tiny(cohort, epochs), f"hydra.run.dir={run_dir}"],
            cwd=REPO, env=clean_env(), stdout=fh, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_checkpoint(proc, run_dir, log, 240, 0.1)
        tasks = _local_tasks(_job_id(log.read_text()))
        assert len(tasks) == 2, tasks
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert rc == 0, out
    assert "checkpoint: requeueing with train.resume=true" in out and "resumed from" in out, out
    _check_run(run_dir, epochs, out)


@pytest.mark.timeout(200)
def test_halo_submit_reports_a_failed_job(tmp_path: Path) -> None:
    # a world of 1 cannot hold a 2 x 1 mesh: refused before anything is submitted
    rc, out, _ = run_cmd([*SUBMIT, "launcher=local", "launcher.tasks_per_node=1", "mesh=2x1",
                         f"hydra.run.dir={tmp_path / 'm'}"], 120)
    assert rc == 2 and "not a multiple of mesh.rows x mesh.cols = 2" in out, out
    assert not (tmp_path / "m" / "submitit").exists()
    # a task that fails: halo-submit exits non-zero with the task's error
    rc, out, _ = run_cmd([*SUBMIT, "launcher=local", "launcher.tasks_per_node=1", "launcher.poll_s=0.5", "mesh=1x1",
                         "data=csv", f"data.csv={tmp_path}/none.csv", "data.classes=[normal,tumour]",
                         "train.epochs=1", f"hydra.run.dir={tmp_path / 'f'}"], 180)
    assert rc == 1, out
    assert "halo-submit: local job" in out and "failed" in out, out
    assert "none.csv" in out.split("failed", 1)[1], out  # the task's error, in the report


# ---- a killed rank ------------------------------------------------------------------------------


def _child_with_rank(parent: int, rank: int) -> int | None:
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


@pytest.mark.timeout(300)
def test_killed_rank_ends_torchrun_job_and_keeps_checkpoint(cohort: Path, tmp_path: Path) -> None:
    timeout_s = 20
    run_dir, log = tmp_path / "k", tmp_path / "torchrun.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [*TORCHRUN, "-m", "halo.train", *_tiny(cohort, 50), f"dist.timeout_s={timeout_s}",
             f"hydra.run.dir={run_dir}"],
            cwd=REPO, env=clean_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_checkpoint(proc, run_dir, log, 240, 0.1)
        victim = _child_with_rank(proc.pid, 1)
        assert victim is not None, log.read_text()
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        rc = proc.wait(timeout=timeout_s + START_S)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert rc != 0, out
    assert elapsed < timeout_s + START_S, f"took {elapsed:.1f} s\n{out}"
    # the survivor's guard ("rank 1 lost") or torchrun's report ("rank : 1 ... Signal 9") names it
    assert re.search(r"rank 1 lost|rank\s*:\s*1 \(local_rank: 1\)", out), out
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 1 <= ckpt["state"]["epoch"] < 50
    assert len(_epochs(run_dir)) == ckpt["state"]["epoch"]
