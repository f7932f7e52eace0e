"""The run directory: what is written where, and the refusal to overwrite a run.

A training run writes ``.hydra/{config,overrides}.yaml``, ``metrics.csv``, ``summary.json``,
``predictions.csv``, ``test_predictions.csv``, ``slides.csv``, ``checkpoints/{last,best}.pt``
and ``heatmaps/<key>.png``; a prediction writes the same kinds of files (no checkpoints) into
``predict/<run id>/`` of the directory it is given. Only rank 0 writes, except heatmaps (each
image group's first rank writes its own slides'). A run refused before writing any result leaves no
directory behind (:func:`forget_refused`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from halo.errors import InputError
from halo.evaluate import write_predictions

__all__ = ["RUN_FILES", "claim", "command_line", "forget", "forget_refused", "new_launch", "write_config",
           "kept_on_refusal", "write_metrics", "write_rows", "write_summary"]

log = logging.getLogger("halo.train")

RUN_FILES = ("metrics.csv", "summary.json", "predictions.csv", "test_predictions.csv", "slides.csv",
             "skipped_slides.csv")
"""What a training run writes beside ``checkpoints/`` and ``heatmaps/`` (removed by ``train.overwrite``)."""

HYDRA_FILES = ("config.yaml", "overrides.yaml")
"""What :func:`claim` writes in ``.hydra/`` (in Hydra's place: ``hydra.output_subdir: null``)."""

_written: list[Path] = []  # directories whose .hydra/ this process's claim() wrote
_made: list[Path] = []  # predict/<id>/ directories this process's claim() created
_pending: dict[Path, tuple[str, str]] = {}  # a resumed run's .hydra/ files, written once the resume is accepted


def _folder_name(value: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in value) or "run"


def command_line() -> list[str]:
    """The command line's overrides (Hydra's ``overrides.yaml``), or [] outside ``@hydra.main``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def claim(cfg: DictConfig, run_dir: Path, is_main: bool) -> Path:
    """The directory this run writes to, checked on rank 0 and agreed by every rank; collective.

    ``mode=predict`` writes into ``predict/<run id>/`` of ``run_dir``, so a training run's files
    stay as they are; a run id already there (two predictions in one second) gets ``-2``, ``-3``,
    ... appended, each directory created exclusively so that no prediction overwrites another.
    ``mode=train`` into a directory that holds checkpoints is refused unless
    ``train.resume=true`` (continue it) or ``train.overwrite=true`` (its results are removed).
    Hydra writes nothing itself (``hydra.output_subdir: null``): ``.hydra/config.yaml`` and
    ``.hydra/overrides.yaml`` are written here, once the directory is claimed; for ``train.resume=true``
    into a directory holding checkpoints, only once the resume is accepted (:func:`write_config`), so
    that a refused resume leaves the run's files as they were.

    Raises
    ------
    halo.errors.InputError
        On every rank, when the directory may not be written.
    """
    from halo.train import run_id
    from halo.train.job import broadcast

    problem, out, defer = None, run_dir, False
    if is_main:
        t = cfg.train
        old = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
        if cfg.mode == "predict":
            out = _new_dir(run_dir / "predict", _folder_name(run_id()))
            if out is None:
                problem = (f"halo-train: {run_dir / 'predict'} holds too many predictions of one run id; "
                           f"choose another hydra.run.dir")
                out = run_dir
        elif old and t.resume:
            defer = True
        elif old and not t.overwrite:
            problem = (f"halo-train: {run_dir} already holds a training run (checkpoints/{', '.join(old)}): "
                       f"pass train.resume=true to continue it, train.overwrite=true to replace it, or "
                       f"another hydra.run.dir")
        elif old:
            for name in ("checkpoints", "heatmaps", "predict"):
                shutil.rmtree(run_dir / name, ignore_errors=True)
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
            log.warning("train.overwrite=true: removed the earlier run's results in %s", run_dir)
    problem, out = broadcast((problem, str(out)))
    if problem:
        raise InputError(problem)
    out = Path(out)
    if is_main:
        if cfg.mode == "predict":
            _made.append(out)
        _pending[out] = (OmegaConf.to_yaml(cfg, resolve=True), OmegaConf.to_yaml(command_line()))
        if not defer:
            write_config(out)
    return out


def write_config(out: Path) -> None:
    """Write the ``.hydra/`` files :func:`claim` kept for ``out`` (a resumed run's, once its resume is
    accepted); nothing if there are none (they are written, or this is not rank 0). Not collective."""
    pending = _pending.pop(Path(out), None)
    if pending is None:
        return
    _written.append(Path(out))
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    for name, text in zip(HYDRA_FILES, pending):
        (out / ".hydra" / name).write_text(text)


@contextlib.contextmanager
def kept_on_refusal(run_dir: Path, is_main: bool, names: tuple[str, ...] = RUN_FILES):
    """Put ``names`` of ``run_dir`` back as they were (bytes, or absent) when the block raises
    :class:`halo.errors.InputError`: a refused resume leaves its run's files byte-identical (the start-up
    check records skipped slides before the checkpoint's schedule is checked). Rank 0 only acts."""
    before = {name: (run_dir / name).read_bytes() if (run_dir / name).is_file() else None
              for name in names} if is_main else {}
    try:
        yield
    except InputError:
        for name, data in before.items():
            try:
                if data is None:
                    (run_dir / name).unlink(missing_ok=True)
                elif not (run_dir / name).is_file() or (run_dir / name).read_bytes() != data:
                    (run_dir / name).write_bytes(data)
            except OSError as exc:  # must not hide the refusal
                log.warning("could not restore %s after the refusal: %s", run_dir / name, exc)
        raise


def forget(out: str | os.PathLike[str], written: list[Path] | tuple[Path, ...] | None = None) -> bool:
    """Remove ``out`` if it holds nothing but what this launch wrote there for Hydra, and its parent
    (``runs/<date>``) if that is then empty, and a ``runs/`` above it that is then empty too;
    whether ``out`` is gone. Not collective: one rank calls it.

    "What this launch wrote" is nothing, or ``.hydra/`` with only :data:`HYDRA_FILES` in it when
    ``out`` is in ``written`` (default: the directories :func:`claim` wrote ``.hydra/`` into in this
    process): an earlier launch's ``.hydra/``, a result, a log or anything else keeps the directory.
    The working directory itself is never removed.
    """
    out = Path(out)
    written = _written if written is None else written
    try:
        if not out.is_dir() or out.resolve() == Path.cwd().resolve():
            return not out.exists()
        entries = {p.name: p for p in out.iterdir()}
        hydra = entries.pop(".hydra", None)
        if entries:
            return False
        if hydra is not None:
            ours = any(out.resolve() == Path(w).resolve() for w in written)
            if not ours or not hydra.is_dir() or not {p.name for p in hydra.iterdir()} <= set(HYDRA_FILES):
                return False
            for p in hydra.iterdir():
                p.unlink()
            hydra.rmdir()
        out.rmdir()
    except OSError:  # another process wrote there meanwhile, or it is gone: leave what is there
        return not out.exists()
    try:
        out.parent.rmdir()  # runs/<date>, if this was its last run
        if out.parent.parent.name == "runs":  # and the default layout's runs/, if that was its last date
            out.parent.parent.rmdir()
    except OSError:
        pass
    return True


def new_launch() -> None:
    """Forget what :func:`claim` wrote for an earlier run of this process (:func:`halo.train.run` calls it)."""
    _written.clear()
    _made.clear()
    _pending.clear()


def forget_refused() -> None:
    """After halo refused a run before writing any result: remove the directories made for it
    (Hydra's output directory, and a ``predict/<id>/`` that :func:`claim` created) with
    :func:`forget`. Every rank calls it for itself, with no collective: a refusal may come before
    the process group, or on some ranks only. That is enough for Hydra's directory: each rank's
    Hydra made it before the rank could refuse, so the last rank to make it also tries to remove
    it afterwards, and rank 0's ``.hydra/`` goes with rank 0's call. Never raises.
    """
    try:
        outs: list[Path] = []
        try:
            from hydra.core.hydra_config import HydraConfig

            outs.append(Path(HydraConfig.get().runtime.output_dir))
        except ValueError:  # not under @hydra.main: nothing of Hydra's to remove
            pass
        for out in [*_made, *outs]:  # a predict/<id>/ takes predict/ with it if that is then empty
            forget(out)
    except Exception as exc:  # noqa: BLE001 - tidying up must not hide the refusal
        log.debug("left the run directory as it is: %s", exc)


def _new_dir(parent: Path, name: str) -> Path | None:
    """``parent/name``, or ``name-2``, ``name-3``, ...: the first that did not exist, now created."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        out = parent / (name if n == 1 else f"{name}-{n}")
        try:
            out.mkdir()
        except FileExistsError:
            continue
        return out
    return None


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.csv``: one row per epoch: ``epoch``, ``train_loss``, ``val_<metric>`` (``val_n``, the
    validation slides, an int; ``val_auc``, ``val_balanced_accuracy``, ``val_f1``), ``lr``,
    ``slides_seen``, ``seconds`` (the whole epoch) and ``train_seconds`` (its training part,
    validation apart)."""
    keys = list(dict.fromkeys(k for r in history for k in r))
    lines = [",".join(keys)] + [",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) for r in history]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")


def write_rows(run_dir: Path, name: str, rows: list[dict[str, Any]], classes: list[str]) -> None:
    """``predictions.csv`` (or ``test_predictions.csv``): one row per slide, named by its key."""
    write_predictions(run_dir / name, rows, classes)


def _strict(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None: strict JSON (``NaN`` is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` (strict JSON: an undefined metric, such as the AUC of one class, is null)."""
    (run_dir / "summary.json").write_text(json.dumps(_strict(summary), indent=2, allow_nan=False) + "\n")
