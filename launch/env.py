"""Map a launcher's environment to rank, world size, local rank and rendezvous address.

halo runs one process per rank and learns its place from whoever started it:

1. ``torchrun`` (or anything that sets ``RANK`` and ``WORLD_SIZE``, including
   srun + torchrun rendezvous): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
   ``MASTER_ADDR``, ``MASTER_PORT``.
2. SLURM, inside an ``srun`` step (``SLURM_STEP_ID`` is set; submitit's SLURM
   executor runs its tasks this way): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``
   (else ``SLURM_NTASKS``), ``SLURM_LOCALID``; the master is the first host of
   ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``) and the port is
   ``15000 + SLURM_JOB_ID % 20000``. ``MASTER_ADDR`` / ``MASTER_PORT`` override both.
   A batch script itself (no ``srun``) is not a step and falls through.
3. submitit's local executor (``SUBMITIT_EXECUTOR=local``): ``SUBMITIT_LOCAL_*``;
   one host, so the master is 127.0.0.1.
4. MPI (``mpiexec``; detected by ``PMI_RANK``/``PMI_SIZE`` (MPICH hydra),
   ``OMPI_COMM_WORLD_RANK``/``OMPI_COMM_WORLD_SIZE`` (Open MPI) or ``PMIX_RANK``):
   rank and size from ``mpi4py``'s ``COMM_WORLD``; rank 0 picks the master
   address and a free port and broadcasts them.
5. Otherwise one process: rank 0 of 1 on 127.0.0.1 with a free port.

Only this module reads launcher variables; the rest of halo receives a `DistEnv`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from itertools import product
from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "Source",
    "discover",
    "expand_nodelist",
    "slurm_restarts",
    "init_distributed",
    "shutdown",
    "slurm_port",
]

Source = Literal["torchrun", "slurm", "submitit", "mpi", "single"]

_MPI_MARKERS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True, kw_only=True, slots=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes
    ----------
    rank : int
        Global rank, ``0 <= rank < world_size``.
    world_size : int
        Number of processes in the job.
    local_rank : int
        Rank among the processes on this host; selects the GPU.
    master_addr : str
        Host (name or address) of rank 0, where the rendezvous store listens.
    master_port : int
        TCP port of the rendezvous store.
    source : {"torchrun", "slurm", "submitit", "mpi", "single"}
        Which launcher the values came from.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: Source

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size} (from {self.source})")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank must be in [0, world_size={self.world_size}), got {self.rank} (from {self.source})"
            )
        if not 0 <= self.local_rank < self.world_size:
            raise ValueError(
                f"local_rank must be in [0, world_size={self.world_size}), got {self.local_rank} "
                f"(from {self.source})"
            )
        if not self.master_addr:
            raise ValueError(f"master_addr must not be empty (from {self.source})")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be in [1, 65535], got {self.master_port} (from {self.source})")


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    """Read an integer variable; a missing one without default, or a non-integer, is an error."""
    value = environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {name} is required but not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def free_port(host: str = "") -> int:
    """Return a TCP port that is free on this host now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def slurm_port(job_id: int) -> int:
    """Rendezvous port of a SLURM job: ``15000 + job_id % 20000``, the same on every task."""
    return 15000 + job_id % 20000


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a[1,2],b"`` -> ``["a[1,2]", "b"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in SLURM node list {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    """``"01-03,7"`` -> ``["01", "02", "03", "7"]``, keeping zero padding."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if m is None:
            raise ValueError(f"bad range {item!r} in SLURM node list {nodelist!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in SLURM node list {nodelist!r}")
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _parse_nodelist(nodelist: str) -> list[str]:
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        # "a[1-2]-b[3,4]" -> pieces "a", ["1","2"], "-b", ["3","4"]; hosts are their product.
        pieces: list[list[str]] = []
        for text, brackets in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", part):
            if text:
                pieces.append([text])
            if brackets:
                pieces.append(_expand_range(brackets, nodelist))
        hosts.extend("".join(p) for p in product(*pieces))
    if not hosts:
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    return hosts


def expand_nodelist(nodelist: str, *, use_scontrol: bool = True) -> list[str]:
    """Expand a SLURM node list such as ``"node[01-04,07],gpu5"`` into host names.

    Parameters
    ----------
    nodelist : str
        Compressed SLURM syntax, as in ``SLURM_JOB_NODELIST``.
    use_scontrol : bool
        Ask ``scontrol show hostnames`` first when it is installed; fall back to
        halo's own parser when it is missing or fails.

    Returns
    -------
    list of str
        Host names in SLURM's order.

    Raises
    ------
    ValueError
        If the list is empty or malformed.
    """
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return _parse_nodelist(nodelist)


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    world_size = _int(environ, "WORLD_SIZE")
    rank = _int(environ, "RANK")
    if world_size > 1:
        addr = environ.get("MASTER_ADDR") or ""
        if not addr:
            raise ValueError("RANK and WORLD_SIZE are set but MASTER_ADDR is not")
        port = _int(environ, "MASTER_PORT")
    else:
        addr = environ.get("MASTER_ADDR") or "127.0.0.1"
        port = _int(environ, "MASTER_PORT", 0) or free_port("127.0.0.1")
    return DistEnv(
        rank=rank, world_size=world_size, local_rank=_int(environ, "LOCAL_RANK", 0),
        master_addr=addr, master_port=port, source="torchrun",
    )


def _from_slurm(environ: Mapping[str, str], use_scontrol: bool) -> DistEnv:
    world_size = _int(environ, "SLURM_STEP_NUM_TASKS", 0) or _int(environ, "SLURM_NTASKS")
    addr = environ.get("MASTER_ADDR")
    if not addr:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") \
            or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("SLURM step without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST")
        addr = expand_nodelist(nodelist, use_scontrol=use_scontrol)[0]
    port = _int(environ, "MASTER_PORT", 0) or slurm_port(_int(environ, "SLURM_JOB_ID"))
    return DistEnv(
        rank=_int(environ, "SLURM_PROCID"), world_size=world_size,
        local_rank=_int(environ, "SLURM_LOCALID", 0),
        master_addr=addr, master_port=port, source="slurm",
    )


def _from_submitit_local(environ: Mapping[str, str]) -> DistEnv:
    port = _int(environ, "MASTER_PORT", 0) or slurm_port(_int(environ, "SUBMITIT_LOCAL_JOB_ID"))
    return DistEnv(
        rank=_int(environ, "SUBMITIT_LOCAL_GLOBALID"),
        world_size=_int(environ, "SUBMITIT_LOCAL_NTASKS"),
        local_rank=_int(environ, "SUBMITIT_LOCAL_LOCALID", 0),
        master_addr=environ.get("MASTER_ADDR") or "127.0.0.1", master_port=port, source="submitit",
    )


def _host_address() -> str:
    """A non-loopback address of this host if it has one, else its host name."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return name
    for *_, sockaddr in infos:
        if not str(sockaddr[0]).startswith("127."):
            return str(sockaddr[0])
    return name


def _from_mpi(environ: Mapping[str, str], comm: Any) -> DistEnv:
    if comm is None:
        from mpi4py import MPI  # initialises MPI; only imported when mpiexec started us

        comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(socket.gethostname())
    if rank == 0:
        addr = environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else _host_address())
        port = _int(environ, "MASTER_PORT", 0) or free_port()
        chosen: tuple[str, int] | None = (addr, port)
    else:
        chosen = None
    addr, port = comm.bcast(chosen, root=0)
    for name in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK"):
        if environ.get(name):
            local_rank = _int(environ, name)
            break
    else:
        local_rank = hosts[:rank].count(hosts[rank])
    return DistEnv(
        rank=rank, world_size=size, local_rank=local_rank,
        master_addr=addr, master_port=port, source="mpi",
    )


def discover(
    environ: Mapping[str, str] | None = None, *, comm: Any = None, use_scontrol: bool = True
) -> DistEnv:
    """Find this process's rank, world size, local rank and rendezvous address.

    Parameters
    ----------
    environ : mapping of str to str, optional
        The environment to read; ``os.environ`` when None.
    comm : mpi4py communicator, optional
        Used under MPI instead of ``MPI.COMM_WORLD`` (tests pass a stand-in).
    use_scontrol : bool
        Expand SLURM node lists with ``scontrol`` when it is installed.

    Returns
    -------
    DistEnv
        See the module docstring for the order in which launchers are tried.

    Raises
    ------
    ValueError
        If a launcher's variables are incomplete, not integers or inconsistent
        (e.g. rank >= world size); the message names the variable.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env) and "SLURM_PROCID" in env:
        return _from_slurm(env, use_scontrol)
    if env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        return _from_submitit_local(env)
    if any(env.get(name) for name in _MPI_MARKERS):
        return _from_mpi(env, comm)
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    port = _int(env, "MASTER_PORT", 0) or free_port("127.0.0.1")
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr=addr, master_port=port, source="single")


def _pick_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA, but torch.cuda.is_available() is False; use 'gloo' or 'auto'")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def init_distributed(
    backend: str = "auto", timeout_s: float = 300.0, env: DistEnv | None = None
) -> DistEnv:
    """Initialise ``torch.distributed`` for this process (idempotent).

    Parameters
    ----------
    backend : {"auto", "nccl", "gloo"}
        "auto" picks NCCL when CUDA is available, gloo otherwise.
    timeout_s : float
        Process-group timeout: how long a collective waits for a lost or hung
        peer before raising (the job then exits non-zero, see `launch.failure`).
    env : DistEnv, optional
        Where this process sits; `discover()` when None.

    Returns
    -------
    DistEnv
        The environment used. With NCCL, ``torch.cuda.set_device(local_rank)`` is done.

    Raises
    ------
    ValueError
        For an unknown backend, NCCL without CUDA, a non-positive timeout, or an
        already initialised group whose rank or size disagree with ``env``.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    name = _pick_backend(backend)
    env = discover() if env is None else env
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
            raise ValueError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the environment says rank {env.rank} of {env.world_size}"
            )
        return env
    os.environ["MASTER_ADDR"] = env.master_addr
    os.environ["MASTER_PORT"] = str(env.master_port)
    if name == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        name,
        init_method="env://",  # MASTER_ADDR/PORT above; reuses torchrun's agent store
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return env


def slurm_restarts(environ: Mapping[str, str] | None = None) -> int:
    """How many times SLURM has restarted this job (``SLURM_RESTART_COUNT``; 0 when unset or not SLURM)."""
    value = (os.environ if environ is None else environ).get("SLURM_RESTART_COUNT", "").strip()
    return int(value) if value.isdigit() else 0


def shutdown() -> None:
    """Destroy the default process group if there is one (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()
