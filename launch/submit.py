"""``halo-submit``: run ``halo-train`` as a job (SLURM, or local processes) through submitit.

Same config as ``halo-train`` (``conf/config.yaml``) plus the ``launcher`` group::

    halo-submit launcher=slurm launcher.nodes=2 launcher.tasks_per_node=4 \\
        launcher.gpus_per_node=4 launcher.partition=gpu train.epochs=10 hydra.run.dir=runs/z
    halo-submit launcher=local launcher.tasks_per_node=2 train.epochs=3 hydra.run.dir=runs/l

What it does:

1. Hydra composes the config and names the run directory (``hydra.run.dir``, by default
   ``runs/<date>/<time>``) here, on the submitting side, once; every task gets that absolute
   path and the fully resolved config, so all ranks agree on both.
2. One job of ``nodes x tasks_per_node`` tasks is submitted: ``launcher=slurm`` with
   submitit's `SlurmExecutor` (``srun --kill-on-bad-exit=1``; a failing task ends the step),
   ``launcher=local`` with its `LocalExecutor` (``tasks_per_node`` processes here). Each task
   runs `TrainJob`: `launch.env.init_distributed` (which reads submitit's / SLURM's variables),
   then `halo.train.run` inside `launch.failure.guard` (a lost rank ends the job, named).
3. It prints the job id and where the logs are (``<run dir>/submitit/<job id>/``), copies
   rank 0's log to stdout while it waits (``launcher.follow``), and exits 0 with the run's
   summary, or non-zero with the job's state and the tail of every task's error log.

Preemption and time-outs: SLURM sends SIGUSR2 ``launcher.signal_delay_s`` before the time
limit (and a preempting scheduler or ``scancel --signal=USR2`` sends it too); submitit calls
`TrainJob.checkpoint` on rank 0, which returns the same job with ``train.resume=true``, and
requeues it. The requeued job continues from ``<run dir>/checkpoints/last.pt`` (written after
every epoch). A job requeued without submitit (``scontrol requeue``, a node failure) resumes
too: ``SLURM_RESTART_COUNT > 0`` sets ``train.resume=true``.

Ctrl-C while waiting cancels the job.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import submitit
from omegaconf import DictConfig, OmegaConf
from submitit.core.utils import JobPaths

from halo.train import CONF_DIR  # also registers the ${halo_run_id:} resolver of hydra.run.dir

__all__ = ["TrainJob", "make_executor", "submit", "main"]

log = logging.getLogger("halo.submit")
_TAIL_LINES = 40


class TrainJob(submitit.helpers.Checkpointable):
    """One rank of a halo training job: what submitit pickles and runs in every task.

    Parameters
    ----------
    cfg : dict
        The resolved config (``OmegaConf.to_container(cfg, resolve=True)``); plain data so
        that the pickle does not depend on Hydra's state.
    run_dir : str
        Absolute run directory, fixed by the submitting side.
    """

    def __init__(self, cfg: dict[str, Any], run_dir: str) -> None:
        self.cfg = cfg
        self.run_dir = str(run_dir)
        self._requeued = False

    def config(self) -> DictConfig:
        """The config this task trains with (``train.resume=true`` after a SLURM requeue)."""
        cfg = OmegaConf.create(self.cfg)
        restarts = os.environ.get("SLURM_RESTART_COUNT", "")
        if restarts.isdigit() and int(restarts) > 0 and cfg.mode == "train" and not cfg.train.resume:
            log.info("SLURM restart %s of this job: resuming from the last checkpoint", restarts)
            cfg.train.resume = True
        return cfg

    def __call__(self) -> dict[str, Any]:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
        logging.getLogger("submitit").propagate = False  # it has its own handler
        from launch.env import init_distributed, shutdown
        from launch.failure import guard

        from halo.train import run

        cfg = self.config()
        env = init_distributed(backend=cfg.dist.backend, timeout_s=float(cfg.dist.timeout_s))
        log.info("rank %d of %d (%s), run dir %s, resume=%s", env.rank, env.world_size, env.source,
                 self.run_dir, cfg.train.resume)
        with guard(env):  # a failing rank ends the whole job, naming itself; nothing hangs
            try:
                summary = run(cfg, self.run_dir, env=env)
            except SystemExit as exc:
                if not self._requeued:
                    raise
                # submitit's SIGUSR2 handler requeued the job and exits: leave with its code
                # (the local executor requeues on its own exit code), not as a failure.
                code = exc.code if isinstance(exc.code, int) else 1
                log.info("requeued (preempted or timed out): leaving with exit code %d", code)
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                os._exit(code & 0xFF)
        if env.rank == 0:
            print(json.dumps({"run_dir": summary.get("run_dir"), "val_auc": summary.get("val_auc")}), flush=True)
        shutdown()
        return summary

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 when the job is preempted or times out.

        The engine writes ``checkpoints/last.pt`` after every epoch, so nothing needs saving
        here: the requeued job is this one with ``train.resume=true``.
        """
        self._requeued = True
        cfg = OmegaConf.create(self.cfg)
        cfg.train.resume = True
        log.info("checkpoint: requeueing with train.resume=true (continues from %s)",
                 Path(self.run_dir) / "checkpoints" / "last.pt")
        return submitit.helpers.DelayedSubmission(
            TrainJob(OmegaConf.to_container(cfg, resolve=True), self.run_dir))  # type: ignore[arg-type]


def _mem(value: Any) -> dict[str, Any]:
    """``launcher.mem`` as sbatch wants it: a number is GB, a string goes as written."""
    if value is None or value == "":
        return {}
    if isinstance(value, (int, float)):
        return {"mem": f"{int(value)}G" if float(value).is_integer() else f"{int(value * 1024)}M"}
    return {"mem": str(value)}


def _plain(node: Any, default: Any) -> Any:
    """A config node as plain Python data (``default`` when missing or null)."""
    if node is None:
        return default
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def make_executor(launcher: DictConfig, folder: Path) -> submitit.Executor:
    """A submitit executor for ``launcher`` (``slurm`` or ``local``), its logs in ``folder``."""
    name = launcher.name
    if name == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(launcher.max_requeues),
                                          python=launcher.get("python") or None)
        extra = {**_mem(launcher.get("mem")), **_plain(launcher.get("additional_parameters"), {})}
        params: dict[str, Any] = {
            "job_name": launcher.get("job_name") or "halo",
            "nodes": int(launcher.nodes),
            "ntasks_per_node": int(launcher.tasks_per_node),
            "cpus_per_task": int(launcher.cpus_per_task),
            "time": int(launcher.timeout_min),
            "signal_delay_s": int(launcher.signal_delay_s),
            "srun_args": [str(a) for a in _plain(launcher.get("srun_args"), [])],
            "setup": [f"export OMP_NUM_THREADS={int(launcher.cpus_per_task)}",
                      *[str(line) for line in _plain(launcher.get("setup"), [])]],
        }
        if int(launcher.get("gpus_per_node") or 0) > 0:
            params["gpus_per_node"] = int(launcher.gpus_per_node)
        for key in ("partition", "account", "qos", "constraint"):
            if launcher.get(key):
                params[key] = str(launcher[key])
        if extra:
            params["additional_parameters"] = extra
        executor.update_parameters(**params)
        return executor
    if name == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=int(launcher.get("max_requeues", 3)))
        gpus = int(launcher.get("gpus_per_node") or 0)
        executor.update_parameters(
            tasks_per_node=int(launcher.get("tasks_per_node", 1)),
            timeout_min=float(launcher.get("timeout_min", 1440)),
            signal_delay_s=int(launcher.get("signal_delay_s", 60)),
            gpus_per_node=gpus, visible_gpus=tuple(range(gpus)),
        )
        return executor
    raise ValueError(f"launcher.name must be 'slurm' or 'local', got {name!r}")


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _copy_new(path: Path, offset: int, out: Any) -> int:
    """Write what ``path`` gained since ``offset`` to ``out``; return the new offset."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return offset
    if data:
        out.write(data.decode(errors="replace"))
        out.flush()
    return offset + len(data)


def _state(job: submitit.Job) -> str:
    try:
        return (str(job.watcher.get_state(job.job_id, mode="force")).split() or ["UNKNOWN"])[0]  # "CANCELLED by 0"
    except Exception:  # noqa: BLE001 - best effort, for the report
        return "UNKNOWN"


def submit(cfg: DictConfig, run_dir: str | os.PathLike[str], out: Any = None) -> int:
    """Submit the training that ``cfg`` describes, wait for it, report; return the exit status.

    Parameters
    ----------
    cfg : DictConfig
        The composed config (with ``launcher``).
    run_dir : path
        The run directory; made absolute here and passed to every task.
    out : text stream, optional
        Where progress and rank 0's log go (stdout).
    """
    out = out or sys.stdout
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    launcher = cfg.launcher
    ntasks = int(launcher.get("nodes", 1)) * int(launcher.get("tasks_per_node", 1))
    group = int(cfg.mesh.rows) * int(cfg.mesh.cols)
    if ntasks % group:  # refuse before queueing: every rank would fail at start
        print(f"halo-submit: {ntasks} task(s) (launcher.nodes x launcher.tasks_per_node) is not a multiple of "
              f"mesh.rows x mesh.cols = {group}; change one of them", file=sys.stderr, flush=True)
        return 2
    payload = OmegaConf.to_container(cfg, resolve=True)
    executor = make_executor(launcher, run_dir / "submitit" / "%j")
    try:
        job = executor.submit(TrainJob(payload, str(run_dir)))  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - sbatch refused it (partition, account, resources, ...)
        print(f"halo-submit: submission failed: {type(exc).__name__}: {str(exc).strip()}", file=sys.stderr,
              flush=True)
        return 1
    try:  # submitit makes its folder pattern "<run dir>/submitit/%j" itself; only <job id>/ is used
        (run_dir / "submitit" / "%j").rmdir()
    except OSError:
        pass
    folder = job.paths.folder
    first = JobPaths(folder, job.job_id, 0)
    print(f"halo-submit: {launcher.name} job {job.job_id} submitted: {ntasks} task(s), run dir {run_dir}", file=out)
    print(f"halo-submit: logs in {folder} (rank 0: {first.stdout}, {first.stderr})", file=out, flush=True)
    follow, poll_s = bool(launcher.get("follow", True)), float(launcher.get("poll_s", 2.0))
    offset = 0
    try:
        while True:
            done = job.done()
            if follow:
                offset = _copy_new(first.stdout, offset, out)
            if done:
                break
            time.sleep(poll_s)
        results = job.results()
    except KeyboardInterrupt:
        print(f"halo-submit: interrupted, cancelling job {job.job_id}", file=out, flush=True)
        job.cancel(check=False)
        return 130
    except Exception as exc:  # noqa: BLE001 - failed job: report and exit non-zero
        state = _state(job) if launcher.name == "slurm" else "FAILED"
        print(f"halo-submit: job {job.job_id} failed (state {state}): {type(exc).__name__}", file=out)
        for task in range(ntasks):
            tail = _tail(JobPaths(folder, job.job_id, task).stderr)
            if tail:
                print(f"---- task {task} error log (last {_TAIL_LINES} lines) ----\n{tail}", file=out)
        detail = str(exc).strip().splitlines()
        print("---- submitit ----\n" + "\n".join(detail[-_TAIL_LINES:]), file=out, flush=True)
        return 1
    state = "COMPLETED"
    if launcher.name == "slurm":  # every task returned; wait (briefly) for SLURM to close the job
        deadline = time.monotonic() + 60
        while (state := _state(job)) in ("RUNNING", "COMPLETING", "UNKNOWN") and time.monotonic() < deadline:
            time.sleep(1)
        if state not in ("COMPLETED", "RUNNING", "COMPLETING", "UNKNOWN"):
            print(f"halo-submit: every task returned, but SLURM ended job {job.job_id} as {state}",
                  file=out, flush=True)
            return 1
    summary = results[0] if results else {}
    keys = ("val_auc", "best_epoch", "slides_seen")
    brief = {k: summary.get(k) for k in keys} if isinstance(summary, dict) else summary
    print(f"halo-submit: job {job.job_id} {state}: {json.dumps(brief, default=str)}; run dir {run_dir}",
          file=out, flush=True)
    return 0


_EXIT: list[int] = []


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    _EXIT.append(submit(cfg, HydraConfig.get().runtime.output_dir))


def main() -> None:
    """Console script ``halo-submit`` (also ``python -m launch.submit``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    _hydra_main()
    sys.exit(_EXIT[-1] if _EXIT else 1)


if __name__ == "__main__":
    main()
