"""Training checkpoints: atomic save and exact resume, with every rank's RNG states.

The file format, its signature check and atomic writes are :mod:`halo.checkpoint`'s; this
module decides what a training checkpoint holds: the model, optimizer and scheduler states,
the run's progress, the config, and every rank's torch (CPU and CUDA), numpy and Python
generator states.
"""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from halo.checkpoint import FORMAT, check_signature, load_checkpoint, save_atomic
from halo.errors import InputError
from halo.train.job import Job, all_gather

__all__ = ["rng_state", "set_rng_state", "save", "restore", "load_model", "mesh_note", "MODEL_KEYS", "READ_KEYS",
           "RESUME_KEYS", "given_keys", "adopt", "resume_differences", "check_resume", "train_on_advice"]

log = logging.getLogger("halo.train")


def rng_state() -> dict[str, Any]:
    """Every random generator this process draws from: torch (CPU and CUDA), numpy, Python."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any] | torch.Tensor) -> None:
    """Restore :func:`rng_state` (or a bare torch state, from checkpoints before it existed)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def save(job: Job, paths: list[Path], opt, sched, state: dict[str, Any]) -> None:
    """Write one checkpoint to each of ``paths`` in order (on rank 0), then wait for all ranks; collective."""
    rng = all_gather(rng_state())
    if job.is_main:
        ckpt = {
            "format": FORMAT, "signature": job.signature, "model_state": job.model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng,
            "state": dict(state), "config": OmegaConf.to_container(job.cfg, resolve=True),
        }
        for path in paths:
            save_atomic(ckpt, path)
    dist.barrier()


def restore(job: Job, path: Path, opt, sched, ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load ``path`` into the model, optimizer, scheduler and this rank's generators; the run's progress.

    ``ckpt`` is the file's contents when already loaded (:func:`check_resume` reads it first).
    """
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    check_signature(ckpt, job.signature, path)
    _check_schedule(job, ckpt, path, sched)
    job.model.load_state_dict(ckpt["model_state"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if len(ckpt["rng"]) == dist.get_world_size():
        set_rng_state(ckpt["rng"][job.rank])
    elif job.is_main:
        log.warning("%s was written by %d ranks, this run has %d: random streams (dropout, and any "
                    "augmentation drawn from torch) are re-seeded, not continued", path, len(ckpt["rng"]),
                    dist.get_world_size())
    if job.is_main:
        log.info("resumed from %s at epoch %d", path, ckpt["state"]["epoch"])
    return dict(ckpt["state"])


def _span(sched_state: dict[str, Any]) -> int | None:
    """How many optimizer steps a schedule is planned over (one-cycle, cosine; None: unbounded)."""
    return sched_state.get("total_steps", sched_state.get("T_max"))


def _check_schedule(job: Job, ckpt: dict[str, Any], path: Path, sched) -> None:
    """Refuse to resume into a learning-rate schedule other than the checkpoint's.

    One-cycle and cosine schedules are planned over ``epochs x optimizer steps per epoch``;
    loading a shorter one's state and stepping on fails deep in torch (``Tried to step N
    times``) after an epoch's work, and a longer one would silently restart its cycle.
    """
    t = job.cfg.train
    before = (ckpt.get("config") or {}).get("train") or {}
    old_kind = before.get("schedule", t.schedule)
    old_span, new_span = _span(ckpt["scheduler"]), _span(sched.state_dict())
    if old_kind == t.schedule and old_span == new_span:
        return
    old_epochs, old_accumulate = before.get("epochs", "?"), before.get("accumulate", "?")
    old_world = len(ckpt.get("rng") or []) or "?"
    warm = (f"to train as this run asks, start a new run from its weights instead: model.weights={path} "
            f"train.schedule={t.schedule} train.epochs={t.epochs} hydra.run.dir=<a new directory> (the model's "
            f"weights are loaded; the optimizer and the schedule start afresh)")
    if old_kind != t.schedule:
        finish = f" train.epochs={old_epochs}" if old_span is not None else ""
        raise InputError(
            f"halo-train: {path} was written by a run with train.schedule={old_kind}; this run asks for "
            f"train.schedule={t.schedule}, and a run resumes only into its own schedule. To continue it, resume with "
            f"train.schedule={old_kind}{finish}; {warm}")
    raise InputError(
        f"halo-train: {path} was written by a run whose {old_kind} learning-rate schedule spans {old_span} optimizer "
        f"steps (train.epochs={old_epochs}, world size {old_world}, train.accumulate={old_accumulate}); this run's "
        f"spans {new_span} (train.epochs={t.epochs}, world size {dist.get_world_size()}, "
        f"train.accumulate={t.accumulate}), and a {old_kind} schedule cannot be stretched. To finish it, resume with "
        f"train.epochs={old_epochs}, world size {old_world} and train.accumulate={old_accumulate}; {warm}")


def train_on_advice(job: Job, last: Path, schedule: str, done: int) -> str:
    """What to do to train a finished run (``done`` epochs) for longer: advice that works for its schedule."""
    if schedule == "constant":
        return (f"to train on, resume with train.epochs above {done} (a constant schedule extends; "
                f"train.resume=true)")
    return (f"its {schedule} schedule has run its course and cannot be extended: to train longer, start a new run "
            f"from its weights: model.weights={last} train.epochs=N hydra.run.dir=<a new directory>")


def load_model(job: Job, path: str | Path, ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the model of a checkpoint written on any mesh and world size (its signature must match).

    ``ckpt`` is the file's contents when already loaded (:func:`halo.checkpoint.load_checkpoint`).
    Returns the config the checkpoint was trained with (empty for checkpoints without one).
    """
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    check_signature(ckpt, job.signature, path)
    job.model.load_state_dict(ckpt["model_state"])
    return ckpt.get("config") or {}


def _pad_unit(rows: int, cols: int, multiple: int, canvas: int | None) -> int:
    """What a slide's padded region sides are multiples of (training plans with quarter turns)."""
    unit = math.lcm(int(rows), int(cols)) * int(multiple)
    return math.lcm(unit, int(canvas)) if canvas else unit


def mesh_note(trained: dict[str, Any], job: Job) -> str | None:
    """Why predictions here may differ slightly from those on the training mesh, or None.

    Every rank's block is a multiple of the network's stride, so a slide's region is padded
    to multiples of ``lcm(rows, cols) x stride`` (and of ``data.canvas``): another mesh can pad
    it with more background, which the slide head pools over too and which moves the tissue
    on the stride grid. The network itself is exact on any mesh.
    """
    mesh = trained.get("mesh") or {}
    if mesh.get("rows") is None or mesh.get("cols") is None:
        return None
    before = _pad_unit(mesh["rows"], mesh["cols"], job.multiple, ((trained.get("data") or {}).get("canvas")))
    rows, cols = job.grid  # the mesh, or predict's blocks
    now = _pad_unit(rows, cols, job.multiple, job.cfg.data.canvas)
    if before == now:
        return None
    fits = before % _pad_unit(rows, cols, job.multiple, None) == 0  # this grid can pad so
    fix = (f"data.canvas={before} pads every slide exactly as in training" if fits else
           f"mesh.rows={mesh['rows']} mesh.cols={mesh['cols']} pads as in training")
    return (f"the checkpoint was trained on mesh {mesh['rows']}x{mesh['cols']} with regions padded to multiples of "
            f"{before} pixels; this run uses {rows}x{cols}, padding to multiples of {now}: a slide "
            f"padded to another size (slides.csv: padded_height, padded_width) sees more or less background, and its "
            f"prediction can differ slightly; {fix}. Train with data.canvas set to a multiple of every mesh's unit "
            f"to make predictions independent of the mesh")


MODEL_KEYS = ("model.name", "model.num_classes", "head.name", "head.options", "data.classes")
"""What ``mode=predict`` takes from the checkpoint's config: its weights load into that model only,
so a value given otherwise is refused."""

READ_KEYS = ("data.mpp", "data.level", "data.canvas", "data.stain_normalize", "data.tissue")
"""How training read its slides (what pixels the model saw): ``mode=predict`` reads so too, unless
a value is given otherwise, which is honoured with a warning."""

_GROUPS = {"model": "model.name", "head": "head.name"}  # a group chosen on the command line names its model


def given_keys(overrides: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The config keys a command line's overrides set, each with its override as written
    (``head=mean`` sets ``head.name``).

    Other config groups (``data=csv``, ``mesh=1x1``) choose a cohort or a mesh, not the model or
    its resolution, and set nothing here.
    """
    keys: dict[str, str] = {}
    for item in overrides:
        key = str(item).lstrip("+~").split("=", 1)[0].split("@", 1)[0].strip()
        if "." in key:
            keys[key] = str(item)
        elif key in _GROUPS:
            keys[_GROUPS[key]] = str(item)
    return keys


def _given(key: str, given: dict[str, str]) -> str | None:
    """The override that sets ``key`` (or a key above or below it), or None."""
    return next((text for k, text in given.items() if k == key or k.startswith(key + ".") or key.startswith(k + ".")),
                None)


_ABSENT = object()


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def adopt(cfg: DictConfig, trained: dict[str, Any], given: dict[str, str], path: str | Path,
          is_main: bool) -> DictConfig:
    """``cfg`` for predicting with a checkpoint trained with config ``trained`` (a copy; ``cfg`` is kept).

    :data:`MODEL_KEYS` and :data:`READ_KEYS` not ``given`` on the command line (:func:`given_keys`) are taken from
    ``trained`` (logged once, on rank 0); ``model.weights`` is not read (the checkpoint holds the
    weights). A checkpoint without a config (an old one) changes nothing.

    Raises
    ------
    halo.errors.InputError
        A :data:`MODEL_KEYS` value given unlike the checkpoint's, naming both.
    """
    import copy

    cfg = copy.deepcopy(cfg)
    if not trained:
        if is_main:
            log.warning("%s holds no training config: the model is built as this run's config says", path)
        return cfg
    taken, differ = [], []
    leaves = []
    for key in (*MODEL_KEYS, *READ_KEYS):
        old = _lookup(trained, key)
        if key == "data.tissue" and isinstance(old, dict):
            leaves += [f"{key}.{k}" for k in old]
        elif old is not _ABSENT:
            leaves.append(key)
    for key in leaves:
        old = _lookup(trained, key)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if node is None or leaf not in node.keys():  # (`in node` is False for a missing value)
            continue  # a key this version no longer has
        new = None if OmegaConf.is_missing(node, leaf) else node[leaf]
        new = OmegaConf.to_container(new, resolve=True) if OmegaConf.is_config(new) else new
        text = _given(key, given)
        if text is not None and new != old:
            if key in MODEL_KEYS:
                short = {"model.name": "model", "head.name": "head", "model.num_classes": "num_classes",
                         "data.classes": "classes"}.get(key, key)
                raise InputError(
                    f"halo-train: checkpoint {path} is from another model: {short}={old!r} in training, but the "
                    f"command line gives {text} ({key}={new!r}); its weights load only into the model they were "
                    f"trained in: leave {text} out (mode=predict takes the model, head and classes from the "
                    f"checkpoint)")
            differ.append(f"predicting at {key}={_show(new)}, the model was trained at {_show(old)}: it sees other "
                          f"pixels than in training; leave {key} off the command line to read as training did")
            continue
        if new != old:
            OmegaConf.update(cfg, key, old, merge=False)
        taken.append(f"{key}={_show(old)}")
    note = ""
    if cfg.model.weights:
        note = f"; model.weights={cfg.model.weights} is not read (the checkpoint holds the weights)"
        cfg.model.weights = None
    if is_main:
        log.info("predicting with the model and reading as in training, from the checkpoint %s: %s%s", path,
                 " ".join(taken), note)
        for line in differ:
            log.warning(line)
    return cfg


RESUME_KEYS = ("data.kind", "data.csv", "data.root", "data.slides", "data.seed", "data.columns", "data.val_fraction",
               "data.split_seed", "data.skip_unreadable", *MODEL_KEYS, *READ_KEYS)
"""What defines a training run beside its schedule: the cohort (its source, split, classes and which slides are
skipped), the model and how its slides are read. ``train.resume=true`` refuses a config that gives any otherwise
than the checkpoint's (:func:`check_resume`); the mesh and the world size may differ."""

_SYNTHETIC_ONLY = ("data.slides", "data.seed")
_PATH_KEYS = ("data.csv", "data.root")
_OPEN_DICTS = ("head.options",)  # keys of their own: one given on one side only differs


def _leaves(key: str, old: Any, new: Any):
    if isinstance(old, dict) and isinstance(new, dict):
        for k in dict.fromkeys([*old, *new]):
            yield from _leaves(f"{key}.{k}", old.get(k, _ABSENT), new.get(k, _ABSENT))
    else:
        yield key, old, new


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in _PATH_KEYS and isinstance(old, str) and isinstance(new, str):
        try:
            return os.path.samefile(old, new)
        except OSError:
            return False
    return False


def resume_differences(cfg: DictConfig, trained: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The :data:`RESUME_KEYS` leaves (``data.tissue.margin``) ``cfg`` gives otherwise than ``trained`` (a
    checkpoint's config), each as ``(key, trained value, cfg's value)``; ``_ABSENT``-free except in
    ``head.options``, whose keys are the user's. Paths naming one file are the same; ``data.slides`` and
    ``data.seed`` count for a synthetic cohort only; a key only one side knows (another version) is left out."""
    now = OmegaConf.to_container(cfg, resolve=True)
    synthetic = _lookup(trained, "data.kind") == "synthetic" and _lookup(now, "data.kind") == "synthetic"
    out = []
    for key in RESUME_KEYS:
        if key in _SYNTHETIC_ONLY and not synthetic:
            continue
        for leaf, old, new in _leaves(key, _lookup(trained, key), _lookup(now, key)):
            if (old is _ABSENT or new is _ABSENT) and not leaf.startswith(tuple(k + "." for k in _OPEN_DICTS)):
                continue
            if not _same(leaf, old, new):
                out.append((leaf, old, new))
    return out


def _hydra_value(value: Any) -> str:
    """``value`` as a Hydra override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and (not value or value != value.strip() or any(c in value for c in ",[]{}()='\"\\")):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def _override(key: str, old: Any, new: Any) -> str:
    """The command-line override (shell-quoted) that gives ``key`` the checkpoint's value ``old``."""
    import shlex

    if old is _ABSENT:
        return shlex.quote(f"~{key}")
    return shlex.quote(f"{'++' if new is _ABSENT else ''}{key}={_hydra_value(old)}")


def check_resume(cfg: DictConfig, trained: dict[str, Any], path: str | Path) -> None:
    """Refuse to resume the run of checkpoint ``path`` (config ``trained``) with another cohort, classes, model
    or resolution than it was trained with (:data:`RESUME_KEYS`, :func:`resume_differences`); every rank alike.

    A checkpoint without a config (an old one) is not checked.

    Raises
    ------
    halo.errors.InputError
        Naming each key with the checkpoint's value and this run's, and the overrides that resume it as it was.
    """
    if not trained:
        return
    differ = resume_differences(cfg, trained)
    if not differ:
        return
    def show(value: Any) -> str:
        return "unset" if value is _ABSENT else _show(value)

    shown = "; ".join(f"{key}={show(old)} in the checkpoint, {show(new)} here" for key, old, new in differ)
    fix = " ".join(_override(key, old, new) for key, old, new in differ)
    raise InputError(
        f"halo-train: train.resume=true: {path} was trained on another cohort, model or resolution than this run's "
        f"config gives, and a run resumes only as it was trained: {shown}. To resume it as it was trained, add: {fix} "
        f"(a resume takes the cohort, classes, model and how slides are read from its command line, like the first "
        f"launch, not from the checkpoint; the mesh and the world size may differ); to train otherwise, start a new "
        f"run from its weights: model.weights={path} hydra.run.dir=<a new directory>")
