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
   runs `TrainJob`, which starts as every halo-train process does (`launch.train.start`):
   `launch.env.init_distributed` (which reads submitit's / SLURM's variables), then
   `halo.train.run` inside `launch.failure.guard` (a lost rank ends the job, named).
3. It prints the job id and where the logs are (``<run dir>/submitit/<job id>/``), copies
   rank 0's log to stdout while it waits (``launcher.follow``), and exits 0 with the run's
   summary, or non-zero with the job's state and the tail of every task's error log.

A SLURM job that can never start is not waited on: before submitting, the request (nodes,
tasks per node x CPUs per task, GPUs and memory per node) is checked against what ``sinfo``
says the partition offers (``launcher.check_request``), and refused at once, exit status 2,
naming both. While the job waits, halo-submit prints its state and pending reason (``squeue``)
when they change, and again every ``launcher.status_every_s`` while pending; a reason that
cannot clear on its own (``PartitionConfig``, ``PartitionNodeLimit``, ``BadConstraints``,
``ReqNodeNotAvail`` on a node that does not exist, a request larger than any node, ...) cancels
the job (``scancel``) and exits 2 with the same report. Reasons that clear (``Priority``,
``Resources``, ``BeginTime``, ``Dependency``, ``JobHeldUser``, ...) keep it waiting.

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
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import submitit
from omegaconf import DictConfig, OmegaConf
from submitit.core.utils import JobPaths

from halo.train import CONF_DIR, check, forget_refused  # also registers the ${halo_run_name:} resolver of hydra.run.dir

__all__ = ["TrainJob", "make_executor", "submit", "main", "Request", "Node", "Offer", "slurm_request",
           "partition_offer", "request_problems", "never_starts", "cannot_start_message", "StatusLine"]

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
    overrides : list of str, optional
        The submitting command line's overrides: what was given explicitly, which
        ``mode=predict`` keeps over the checkpoint's config (see :func:`halo.train.run`).
    """

    def __init__(self, cfg: dict[str, Any], run_dir: str, overrides: list[str] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = str(run_dir)
        self.overrides = list(overrides or [])
        self._requeued = False

    def config(self) -> DictConfig:
        """The config this task trains with (``train.resume=true`` after a SLURM requeue)."""
        from launch.train import resume_if_requeued

        return resume_if_requeued(OmegaConf.create(self.cfg))

    def __call__(self) -> dict[str, Any]:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
        logging.getLogger("submitit").propagate = False  # it has its own handler
        from launch.train import start

        # submitit's SIGUSR2 handler requeues the job and exits: leave with its code then
        return start(self.config(), self.run_dir, requeued=lambda: self._requeued, overrides=self.overrides)

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
            TrainJob(OmegaConf.to_container(cfg, resolve=True), self.run_dir, self.overrides))  # type: ignore[arg-type]


def _mem(value: Any) -> dict[str, Any]:
    """``launcher.mem`` as sbatch wants it: a number is GB (also as text: the typed config holds
    ``launcher.mem=64`` as ``"64"``, which sbatch would read as MB), anything else goes as written."""
    if value is None or value == "":
        return {}
    try:
        value = float(value) if isinstance(value, str) else value
    except ValueError:
        return {"mem": value}
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


# ---- can SLURM ever start the job? ------------------------------------------------------------

# Pending reasons that do not clear on their own (someone must change the job or the cluster).
_FINAL_REASONS = {
    "PartitionConfig": "the request exceeds the CPUs, memory, GPUs or nodes per job that the partition allows",
    "PartitionNodeLimit": "more nodes than the partition allows per job",
    "PartitionTimeLimit": "a time limit above the partition's MaxTime",
    "BadConstraints": "constraints, features or GRES that no node of the partition has",
    "InvalidAccount": "an invalid account",
    "InvalidQOS": "an invalid QOS",
}
_SLURM_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Request:
    """What a SLURM job of ``launcher`` asks for (per node, except ``nodes``)."""

    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int = 0
    mem: str | None = None        # as given to sbatch ("64G"); None: the partition's default
    partition: str | None = None  # None: the cluster's default partition

    @property
    def cpus_per_node(self) -> int:
        return self.tasks_per_node * self.cpus_per_task

    @property
    def mem_mb(self) -> int | None:
        return _mb(self.mem) if self.mem else None

    def describe(self, partition: str | None = None) -> str:
        """``nodes=1, tasks_per_node=2, cpus_per_task=8 (16 CPUs per node), ...``."""
        part = self.partition or (f"{partition} (the default)" if partition else "the default")
        return (f"nodes={self.nodes}, tasks_per_node={self.tasks_per_node}, cpus_per_task={self.cpus_per_task} "
                f"({self.cpus_per_node} CPUs per node), gpus_per_node={self.gpus_per_node}, "
                f"mem={self.mem or 'partition default'}, partition={part}")


@dataclass(frozen=True)
class Node:
    """One node as ``sinfo`` reports it."""

    name: str
    cpus: int
    mem_mb: int
    gpus: int = 0


@dataclass(frozen=True)
class Offer:
    """What a partition offers one job; ``known_nodes``: every node of the cluster."""

    partition: str
    nodes: tuple[Node, ...]
    max_nodes: int | None = None          # per job (MaxNodes); None: unlimited
    max_cpus_per_node: int | None = None  # MaxCPUsPerNode; None: unlimited
    known_nodes: frozenset[str] = frozenset()

    def describe(self) -> str:
        """``partition debug offers 1 node (any number per job): vm: 2 CPUs, 23593M memory, 0 GPUs``."""
        limit = "any number per job" if self.max_nodes is None else f"at most {self.max_nodes} per job"
        groups: dict[tuple[int, int, int], list[str]] = {}
        for n in self.nodes:
            groups.setdefault((self.cpus_of(n), n.mem_mb, n.gpus), []).append(n.name)
        kinds = []
        for (cpus, mem, gpus), names in sorted(groups.items(), reverse=True):
            shown = ",".join(names[:4]) + (f",... ({len(names)} nodes)" if len(names) > 4 else "")
            kinds.append(f"{shown}: {cpus} CPUs, {mem}M memory, {gpus} GPUs")
        count = f"{len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}"
        return f"partition {self.partition} offers {count} ({limit}): " + "; ".join(kinds or ["no nodes"])

    def cpus_of(self, node: Node) -> int:
        """The CPUs of ``node`` one job may use (MaxCPUsPerNode)."""
        return node.cpus if self.max_cpus_per_node is None else min(node.cpus, self.max_cpus_per_node)

    def fits(self, node: Node, request: Request) -> bool:
        """Whether one node of this partition can hold ``request``'s share of a node."""
        mem = request.mem_mb
        return (self.cpus_of(node) >= request.cpus_per_node and node.gpus >= request.gpus_per_node
                and (mem is None or node.mem_mb >= mem))


def _mb(text: str) -> int | None:
    """sbatch's memory (``64G``, ``500M``, ``2T``, ``1024``: MB) in MB; None when unreadable."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _gpus(gres: str) -> int:
    """GPUs in sinfo's ``%G`` (``gpu:4``, ``gpu:a100:2(S:0-1),gpu:v100:2``, ``(null)``)."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        fields = item.strip().split(":")
        if fields[0] == "gpu" and len(fields) > 1 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def _limit(text: str) -> int | None:
    """A sinfo limit: a number, or None for ``UNLIMITED`` / ``infinite`` / ``N/A``."""
    return int(text) if text.strip().isdigit() else None


def _hostnames(spec: str) -> list[str]:
    """SLURM's host list ``a[1-3,05],b`` as names (``a1 a2 a3 a05 b``)."""
    names: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[\]]+)\[([^\]]*)\]|([^,\[\]]+)", spec):
        if plain:
            names.append(plain.strip())
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                names.append(prefix + lo)
            elif lo.isdigit() and hi.isdigit():
                names += [prefix + str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return [n for n in names if n]


def _run(cmd: list[str]) -> str | None:
    """stdout of a SLURM command; None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_SLURM_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def slurm_request(launcher: DictConfig) -> Request:
    """The request that `make_executor` turns ``launcher`` (``launcher=slurm``) into."""
    mem = {**_mem(launcher.get("mem")), **_plain(launcher.get("additional_parameters"), {})}.get("mem")
    return Request(nodes=int(launcher.nodes), tasks_per_node=int(launcher.tasks_per_node),
                   cpus_per_task=int(launcher.cpus_per_task), gpus_per_node=int(launcher.get("gpus_per_node") or 0),
                   mem=str(mem) if mem else None, partition=str(launcher.partition) if launcher.get("partition") else None)


def partition_offer(partition: str | None) -> Offer | None:
    """What ``partition`` (None: the default one) offers, from ``sinfo``; None when unknown."""
    if shutil.which("sinfo") is None:
        return None
    table = _run(["sinfo", "-h", "-o", "%P|%s|%B"])
    if table is None:
        return None
    chosen = None
    for line in table.splitlines():  # "debug*|1-infinite|UNLIMITED"; "*" marks the default
        fields = line.strip().split("|")
        if len(fields) == 3 and (fields[0].rstrip("*") == partition or (partition is None and fields[0].endswith("*"))):
            chosen = fields
            break
    if chosen is None:  # no such partition: sbatch says so itself
        return None
    name = chosen[0].rstrip("*")
    listing = _run(["sinfo", "-h", "-N", "-p", name, "-o", "%N|%c|%m|%G"])
    everything = _run(["sinfo", "-h", "-N", "-o", "%N"])
    if listing is None or everything is None:
        return None
    nodes: dict[str, Node] = {}
    for line in listing.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 4 and fields[1].isdigit():
            nodes[fields[0]] = Node(fields[0], int(fields[1]), _limit(fields[2]) or 0, _gpus(fields[3]))
    return Offer(name, tuple(nodes.values()), max_nodes=_limit(chosen[1].rpartition("-")[2]),
                 max_cpus_per_node=_limit(chosen[2]), known_nodes=frozenset(everything.split()))


def request_problems(request: Request, offer: Offer) -> list[str]:
    """Why ``offer`` can never hold ``request`` (empty: it can)."""
    part, nodes, problems = offer.partition, offer.nodes, []
    if offer.max_nodes is not None and request.nodes > offer.max_nodes:
        problems.append(f"nodes={request.nodes}, but partition {part} allows at most {offer.max_nodes} per job")
    if request.nodes > len(nodes):
        problems.append(f"nodes={request.nodes}, but partition {part} has {len(nodes)}")
    if not nodes:
        return problems
    cpus = max(offer.cpus_of(n) for n in nodes)
    if request.cpus_per_node > cpus:
        problems.append(f"tasks_per_node x cpus_per_task = {request.tasks_per_node} x {request.cpus_per_task} = "
                        f"{request.cpus_per_node} CPUs per node, but the largest node of partition {part} "
                        f"has {cpus} CPUs")
    mem = request.mem_mb
    if mem is not None and mem > max(n.mem_mb for n in nodes):
        problems.append(f"mem={request.mem} ({mem}M) per node, but the largest node of partition {part} has "
                        f"{max(n.mem_mb for n in nodes)}M")
    if request.gpus_per_node > max(n.gpus for n in nodes):
        problems.append(f"gpus_per_node={request.gpus_per_node}, but the nodes of partition {part} have at most "
                        f"{max(n.gpus for n in nodes)} GPUs")
    fitting = sum(offer.fits(n, request) for n in nodes)
    if not problems and fitting < request.nodes:
        problems.append(f"nodes={request.nodes}, but only {fitting} node(s) of partition {part} have "
                        f"{request.cpus_per_node} CPUs, {request.gpus_per_node} GPUs and "
                        f"{request.mem or 'the default'} memory together")
    return problems


def never_starts(reason: str, request: Request, offer: Offer | None) -> str | None:
    """Why a job pending with ``reason`` (squeue's ``%r``) can never start; None if it may.

    Final: the reasons of ``_FINAL_REASONS``, ``ReqNodeNotAvail`` naming a node the cluster
    does not have, and any reason when the request is larger than what the partition offers.
    Others (Priority, Resources, BeginTime, Dependency, JobHeldUser, ...) may clear.
    """
    code = reason.split(",")[0].split("(")[0].strip()
    problems = request_problems(request, offer) if offer is not None else []
    detail = "; ".join(problems)
    if code in _FINAL_REASONS:
        return f"pending with reason {code} ({_FINAL_REASONS[code]})" + (f": {detail}" if detail else "")
    if code == "ReqNodeNotAvail" and offer is not None and offer.known_nodes:
        named = re.search(r"Unavailable(?:Nodes)?:([^\s)]+)", reason)
        missing = [n for n in _hostnames(named.group(1)) if n not in offer.known_nodes] if named else []
        if missing:
            return f"pending with reason ReqNodeNotAvail: no node named {', '.join(missing)} in the cluster"
    if problems:
        return f"pending with reason {code or 'None'}, but the request can never fit: {detail}"
    return None


def cannot_start_message(why: str, request: Request, offer: Offer | None, job_id: str | None = None) -> str:
    """The report of a job that SLURM can never start (``job_id``: it was submitted and cancelled)."""
    head = (f"halo-submit: SLURM can never start job {job_id}: {why}" if job_id else
            f"halo-submit: SLURM can never start this job, not submitting it: {why}")
    offered = offer.describe() if offer is not None else "what the partition offers is unknown (no sinfo answer)"
    tail = (f"halo-submit: cancelled job {job_id}; change" if job_id else "halo-submit: change")
    return "\n".join([
        head,
        f"halo-submit:   requested: {request.describe(offer.partition if offer else None)}",
        f"halo-submit:   {offered}",
        f"{tail} launcher.nodes, launcher.tasks_per_node, launcher.cpus_per_task, launcher.gpus_per_node, "
        f"launcher.mem or launcher.partition",
    ])


def _queue_state(job_id: str) -> tuple[str, str] | None:
    """``(state, reason)`` of a job from ``squeue`` (``("PENDING", "Priority")``); None if not listed."""
    text = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T %r"])
    first = text.strip().splitlines()[0].split(" ", 1) if text and text.strip() else None
    return (first[0], first[1].strip() if len(first) > 1 else "") if first else None


class StatusLine:
    """The job's state (and pending reason) lines: on every change, and every ``every_s`` while pending."""

    def __init__(self, job_id: str, every_s: float = 60.0, repeat_running: bool = False) -> None:
        self.job_id, self.every_s, self.repeat_running = job_id, float(every_s), repeat_running
        self._last: tuple[str, str] | None = None
        self._at = 0.0

    def update(self, state: str, reason: str, now: float) -> str | None:
        """The line to print now, or None."""
        current = (state, reason if state == "PENDING" else "")
        repeat = state == "PENDING" or self.repeat_running
        if current == self._last and not (repeat and now - self._at >= self.every_s):
            return None
        self._last, self._at = current, now
        shown = f"{state} (reason {reason})" if current[1] else state
        return f"halo-submit: job {self.job_id} {shown}"


class _Watch:
    """Follows a submitted SLURM job's queue state: prints it, and says when it can never start."""

    def __init__(self, job: submitit.Job, request: Request, out: Any, every_s: float, follow: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.job, self.request, self.out, self.clock = job, request, out, clock
        self.status = StatusLine(str(job.job_id), every_s, repeat_running=not follow)
        self.offer: Offer | None = None
        self._reason: str | None = None

    def poll(self) -> str | None:
        """Print the state if due; return why the job can never start, or None."""
        queued = _queue_state(self.job.job_id)
        if queued is None:  # not in squeue (yet, or any more): submitit's view (sacct), no reason
            state, reason = _state(self.job), ""
        else:
            state, reason = queued
        line = self.status.update(state, reason, self.clock())
        if line:
            print(line, file=self.out, flush=True)
        if state != "PENDING":
            return None
        if reason != self._reason:  # the partition may have changed too: look again
            self._reason, self.offer = reason, partition_offer(self.request.partition)
        return never_starts(reason, self.request, self.offer)


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


def submit(cfg: DictConfig, run_dir: str | os.PathLike[str], out: Any = None,
           overrides: list[str] | None = None) -> int:
    """Submit the training that ``cfg`` describes, wait for it, report; return the exit status.

    Parameters
    ----------
    cfg : DictConfig
        The composed config (with ``launcher``).
    run_dir : path
        The run directory; made absolute here and passed to every task.
    out : text stream, optional
        Where progress and rank 0's log go (stdout).
    overrides : list of str, optional
        The command line's overrides, passed to every task (:class:`TrainJob`).
    """
    out = out or sys.stdout
    try:  # a bad value refuses the job here, before anything is queued or written
        check(cfg)
    except ValueError as exc:
        print(f"halo-submit: {exc}", file=sys.stderr, flush=True)
        forget_refused()  # the empty directory Hydra made for it, if any
        return 2
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    launcher = cfg.launcher
    ntasks = int(launcher.get("nodes", 1)) * int(launcher.get("tasks_per_node", 1))
    group = int(cfg.mesh.rows) * int(cfg.mesh.cols)
    if ntasks % group:  # refuse before queueing: every rank would fail at start
        print(f"halo-submit: {ntasks} task(s) (launcher.nodes x launcher.tasks_per_node) is not a multiple of "
              f"mesh.rows x mesh.cols = {group}; change one of them", file=sys.stderr, flush=True)
        return 2
    request = slurm_request(launcher) if launcher.name == "slurm" else None
    if request is not None and bool(launcher.get("check_request", True)):  # refuse what can never start
        offer = partition_offer(request.partition)
        problems = request_problems(request, offer) if offer is not None else []
        if problems:
            print(cannot_start_message("; ".join(problems), request, offer), file=sys.stderr, flush=True)
            return 2
    payload = OmegaConf.to_container(cfg, resolve=True)
    executor = make_executor(launcher, run_dir / "submitit" / "%j")
    try:
        job = executor.submit(TrainJob(payload, str(run_dir), overrides))  # type: ignore[arg-type]
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
    watch = (_Watch(job, request, out, float(launcher.get("status_every_s", 60)), follow)
             if request is not None else None)
    try:
        while True:
            done = job.done()
            if follow:
                offset = _copy_new(first.stdout, offset, out)
            if done:
                break
            why = watch.poll() if watch is not None else None
            if why is not None:  # it would pend forever: say why, and do not leave it queued
                job.cancel(check=False)
                print(cannot_start_message(why, request, watch.offer, str(job.job_id)),  # type: ignore[arg-type]
                      file=sys.stderr, flush=True)
                return 2
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

    hydra_cfg = HydraConfig.get()
    _EXIT.append(submit(cfg, hydra_cfg.runtime.output_dir, overrides=list(hydra_cfg.overrides.task)))


def main() -> None:
    """Console script ``halo-submit`` (also ``python -m launch.submit``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    _hydra_main()
    sys.exit(_EXIT[-1] if _EXIT else 1)


if __name__ == "__main__":
    main()
