"""End the whole job, non-zero and with a reason, when one rank is lost.

The failure policy: if a rank dies, is killed or hangs, every other rank exits
non-zero within a bounded time (the process-group timeout, ``dist.timeout_s``)
with a message that names the lost rank; nothing waits forever.

How each case ends:

- A peer dies or is killed: gloo collectives on the survivors raise at once
  ("Connection closed by peer"); launchers also notice the exit (torchrun stops
  the other workers, ``srun --kill-on-bad-exit=1`` the other tasks, MPICH's
  ``mpiexec`` the other processes).
- A peer hangs (alive, never enters the collective): the survivors' collective
  raises after the process-group timeout given to `launch.env.init_distributed`.

In both cases `guard` turns the exception into a report and an exit: it writes
``halo/failed/<rank>`` to the rendezvous store, compares the heartbeats that a
daemon thread on every rank bumps in that store to tell dead ranks (no
heartbeat) from hung ones (heartbeat, no failure report), logs
``halo: rank R failed: ...; lost: rank 1 (no heartbeat for 1.2 s: dead or killed)``
and exits with ``MPI.COMM_WORLD.Abort(1)`` under MPI (else ``mpiexec`` waits in
``MPI_Finalize``) or ``os._exit(1)`` elsewhere (no atexit handlers, which could
block on the broken group).

Bad input (`halo.errors.InputError`, found alike by every rank) is not a failure: rank 0 prints
its message once, waits briefly for the other ranks to reach it, and every rank exits with status
2 without a report; a rank that the launcher stops (or whose collective breaks) after rank 0's
report leaves quietly with status 2 as well.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from halo.errors import InputError
from launch.env import DistEnv

__all__ = ["Heartbeat", "Terminated", "cause", "diagnose", "exit_job", "guard", "run_guarded"]

T = TypeVar("T")
_BEAT = "halo/beat/{}"
_FAILED = "halo/failed/{}"
_STORE_TIMEOUT = timedelta(seconds=5)
_REPORTED = "halo/input_reported"
_INPUT = "halo/input/{}"
_INPUT_WAIT_S = 10.0
"""How long rank 0, having printed a bad-input message, waits for the other ranks to reach theirs."""
INPUT_EXIT_CODE = 2
"""Exit status of every rank when the input is bad (`halo.errors.InputError`): nothing ran."""


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM while `guard` is active (the launcher stops us)."""


def _default_store() -> Any | None:
    """The default process group's rendezvous store, or None (not initialised)."""
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - private API; diagnosis is best effort
        return None


class Heartbeat:
    """A daemon thread that bumps ``halo/beat/<rank>`` in the store every ``interval_s``.

    Parameters
    ----------
    rank : int
        This process's global rank.
    store : torch.distributed.Store
        The rendezvous store shared by all ranks.
    interval_s : float
        Seconds between beats.
    """

    def __init__(self, rank: int, store: Any, interval_s: float = 0.5) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.rank, self.store, self.interval_s = rank, store, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"halo-heartbeat-{rank}", daemon=True)

    def _run(self) -> None:
        key = _BEAT.format(self.rank)
        while not self._stop.is_set():
            try:
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001 - store gone: the job is ending anyway
                return
            self._stop.wait(self.interval_s)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def diagnose(rank: int, world_size: int, store: Any, interval_s: float = 0.5) -> list[str]:
    """Name the other ranks that are lost, failed or not responding.

    Reads every rank's heartbeat counter twice, ``2.5 * interval_s`` apart: a
    counter that did not move is a dead (or GIL-blocked) rank; a rank that wrote
    ``halo/failed/<r>`` reports its own error; a rank that beats but reported
    nothing is alive but not in the collective (hung).

    Returns
    -------
    list of str
        One line per such rank; ``["rendezvous store unreachable ..."]`` when the
        store itself is gone (its host, rank 0 or the launcher, was lost).
    """
    others = [r for r in range(world_size) if r != rank]
    try:
        before = {r: store.add(_BEAT.format(r), 0) for r in others}
        time.sleep(2.5 * interval_s)
        after = {r: store.add(_BEAT.format(r), 0) for r in others}
        failed = {}
        for r in others:
            if store.check([_FAILED.format(r)]):
                failed[r] = store.get(_FAILED.format(r)).decode(errors="replace")
    except Exception as exc:  # noqa: BLE001
        return [f"rendezvous store unreachable ({type(exc).__name__}): its host (rank 0 or the launcher) is lost"]
    lines = []
    for r in others:
        if r in failed:
            lines.append(f"rank {r} failed: {failed[r]}")
        elif after[r] == before[r]:
            lines.append(f"rank {r} lost (no heartbeat for {2.5 * interval_s:.1f} s: dead or killed)")
        elif after[r] == 0:
            lines.append(f"rank {r} never started its heartbeat")
        else:
            lines.append(f"rank {r} alive but not responding (hung?)")
    return lines


def exit_job(env: DistEnv, code: int = 1) -> None:
    """Flush and end this process so that the launcher ends the job; never returns."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    if env.source == "mpi":
        try:
            from mpi4py import MPI

            MPI.COMM_WORLD.Abort(code)
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def cause(exc: BaseException) -> BaseException:
    """The error to report: a launcher's SIGTERM that arrived while this rank was already
    handling an error (a collective that lost its peer) reports that error."""
    if isinstance(exc, Terminated) and exc.__context__ is not None and not isinstance(exc.__context__, Terminated):
        return exc.__context__
    return exc


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:400]


@contextmanager
def guard(
    env: DistEnv, *, heartbeat_s: float | None = 0.5, handle_sigterm: bool = True, exit_code: int = 1
) -> Iterator[None]:
    """Run a block so that an error on this rank ends the whole job with a report.

    Parameters
    ----------
    env : DistEnv
        This process's place in the job (from `launch.env.init_distributed`).
    heartbeat_s : float or None
        Heartbeat interval; None disables heartbeats (the report then cannot
        tell dead ranks from hung ones). Needs an initialised process group.
    handle_sigterm : bool
        Turn SIGTERM into a `Terminated` exception (reported like any other
        failure) when no other handler is installed, e.g. submitit's.
    exit_code : int
        Exit status of the process on failure.

    Notes
    -----
    On any exception (also ``KeyboardInterrupt`` and a non-zero ``SystemExit``)
    this logs ``halo: rank R failed: ...`` with the lost ranks and the traceback
    to stderr and ends the process (`exit_job`); it does not return.
    """
    store = _default_store() if env.world_size > 1 else None
    if store is not None:
        try:
            store.set_timeout(_STORE_TIMEOUT)
        except Exception:  # noqa: BLE001
            pass
    beat = Heartbeat(env.rank, store, heartbeat_s).start() if store is not None and heartbeat_s else None
    failing = threading.Event()
    old_handler = None
    if handle_sigterm and threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def _on_term(signum: int, frame: Any) -> None:
            if not failing.is_set():  # already reporting a failure: finish that, then exit
                raise Terminated("SIGTERM from the launcher")

        old_handler = signal.signal(signal.SIGTERM, _on_term)
    try:
        yield
    except InputError as exc:  # every rank found the same bad input: say it once, plainly
        failing.set()
        _report_once(env, store, exc)
        exit_job(env, INPUT_EXIT_CODE)
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        _fail(env, store, exc, beat, failing, exit_code, heartbeat_s)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job
        _fail(env, store, exc, beat, failing, exit_code, heartbeat_s)
    finally:
        if beat is not None:
            beat.stop()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _report_once(env: DistEnv, store: Any, exc: InputError) -> None:
    """Rank 0 prints the message; the others wait until it has (a launcher that sees their exit
    would otherwise terminate rank 0 before it prints), then exit silently.

    Rank 0 then waits (up to ``_INPUT_WAIT_S``) for the other ranks to reach the same error: a
    launcher that sees rank 0 leave first terminates the others, which would report that as a
    crash. A rank stopped anyway after rank 0's report leaves quietly too (:func:`_input_reported`).
    """
    if store is not None:
        try:
            store.set(_INPUT.format(env.rank), "1")
        except Exception:  # noqa: BLE001
            pass
    if env.rank == 0:
        print(str(exc), file=sys.stderr, flush=True)
        if store is not None:
            try:
                store.set(_REPORTED, "1")
                others = [_INPUT.format(r) for r in range(1, env.world_size)]
                if others:
                    store.wait(others, timedelta(seconds=_INPUT_WAIT_S))
            except Exception:  # noqa: BLE001 - a rank that never gets there (it is in a collective): leave
                pass
    elif store is not None:
        try:
            store.wait([_REPORTED], timedelta(seconds=10))
        except Exception:  # noqa: BLE001 - rank 0 is gone: nothing more to wait for
            pass


def _input_reported(store: Any) -> bool:
    """Whether rank 0 has reported bad input (the job ends with status 2 for that reason)."""
    try:
        return bool(store.check([_REPORTED]))
    except Exception:  # noqa: BLE001 - store gone: cannot tell
        return False


def _fail(
    env: DistEnv, store: Any, exc: BaseException, beat: Heartbeat | None,
    failing: threading.Event, exit_code: int, heartbeat_s: float | None,
) -> None:
    failing.set()
    if store is not None and _input_reported(store):
        # rank 0 reported bad input and left, and this rank was stopped because of it (the launcher's
        # SIGTERM, or a collective whose peer left): that message is the job's; leave quietly, like rank 0
        if beat is not None:
            beat.stop()
        exit_job(env, INPUT_EXIT_CODE)
    exc = cause(exc)
    reason = _describe(exc)
    lost: list[str] = []
    if store is not None:
        try:
            store.set(_FAILED.format(env.rank), reason)
        except Exception:  # noqa: BLE001
            pass
        # also when the launcher terminates this rank: under torchrun that is how a peer's
        # death arrives, often before this rank's own collective fails
        lost = diagnose(env.rank, env.world_size, store, heartbeat_s or 0.5)
    if beat is not None:
        beat.stop()
    summary = "; ".join(lost) if lost else "no other rank reported lost"
    print(
        f"halo: rank {env.rank} of {env.world_size} ({env.source}) failed: {reason}\n"
        f"halo: rank {env.rank} sees: {summary}\n"
        f"halo: ending the job (exit {exit_code})",
        file=sys.stderr,
    )
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    exit_job(env, exit_code)


def run_guarded(fn: Callable[..., T], *args: Any, env: DistEnv, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` inside `guard` (see there); return its result."""
    with guard(env):
        return fn(*args, **kwargs)
    raise AssertionError("unreachable")  # pragma: no cover - guard exits on failure
