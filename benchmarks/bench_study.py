"""The study: halo end to end at full resolution against what a user would otherwise do.

Four approaches on one synthetic cohort (``halo-synth --task fine`` by default: labels that depend on
small foci seen only at 0.5-1 um per pixel), with the same backbone (``halo_tiny_<width>``), gated
attention head, optimizer, schedule, epochs and seeds:

1. **downsampled**: ``halo-train`` on one process (mesh 1x1) at coarser ``data.mpp`` (1, 2, 4, 8 um):
   the same network on a slide shrunk until it fits one device;
2. **patch MIL**: ``study_baselines.py``: a fixed budget of tissue patches per slide at full resolution
   (halo's tissue detection), drawn afresh every epoch, encoder and gated attention MIL head trained end
   to end (Campanella et al. 2019, Ilse et al. 2018); validation from every tissue patch;
3. **frozen encoder + attention head**: the encoder trained in (2) (its last epoch's weights, chosen
   without looking at validation), loaded by ``halo-train
   model.weights=...`` with ``train.trunk=frozen`` on one process: only the head trains, over the
   whole-slide feature map at full resolution (the frozen trunk runs without autograd and keeps no
   activations, so the whole slide fits one process);
4. **halo**: ``torchrun --standalone --nproc-per-node 2 -m halo.train mesh.rows=1 mesh.cols=2`` at full
   resolution (and at 1 um, where it meets the downsampled curve).

Per approach and mpp: validation AUC (the best epoch's, as ``summary.json`` reports it, recomputed from
``predictions.csv`` with sklearn; and the last epoch's) as mean and spread over seeds, the peak RSS of
the largest training process (``VmHWM`` of every process of the run, sampled; the torchrun agent left
out), training seconds per slide per epoch (``metrics.csv``: ``train_seconds`` over the slides of an epoch) and
each run's wall time. Every run is a fresh process tree, so peaks do not mix.

Usage::

    python benchmarks/bench_study.py                 # 3 seeds; writes RESULTS.md and results/study.png
    python benchmarks/bench_study.py --quick         # 1 seed, 4 tiny slides, 1 epoch; prints only
    python benchmarks/bench_study.py --task coarse   # halo-synth's default cohort (dark tumour regions)

Runs go to ``benchmarks/out/study/`` (``--quick``: a temporary directory); ``--reuse`` keeps the
results of runs that finished before (an interrupted full run continues).
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, parser, report  # noqa: E402

__all__ = ["main", "make_study_cohort", "run_measured", "halo_run", "mil_run", "estimate_full"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PNG = HERE / "results" / "study.png"
PY = sys.executable
CLASSES = ["normal", "tumour"]

FULL = dict(seeds=3, slides=40, epochs=8, size=None, down_mpps=(1.0, 2.0, 4.0, 8.0), halo_mpps=(0.5, 1.0),
            patches=16, patch=128, timeout=3600, threads=None)
QUICK = dict(seeds=1, slides=4, epochs=1, size=(512, 512), down_mpps=(4.0,), halo_mpps=(0.5,),
             patches=4, patch=64, timeout=150, threads=1)
"""The full study and the quick (CI) one: every approach runs in both; the frozen encoder's head trains
on one process (its trunk keeps no activations), halo on a 1x2 mesh under torchrun. ``threads``: torch threads
per process (None: the cores shared among the processes of a run, as halo-train does; the quick run uses one,
which spins less on a loaded machine)."""


# -- the cohort ------------------------------------------------------------------------------------

def _synth_tasks() -> tuple[str, ...] | None:
    """The tasks ``halo.data.synth.make_cohort`` takes (None: an older synth without ``task``)."""
    from halo.data import synth

    if "task" not in inspect.signature(synth.make_cohort).parameters:
        return None
    return tuple(getattr(synth, "TASKS", ()))


def make_study_cohort(out: Path, task: str, slides: int, seed: int, size: tuple[int, int] | None) -> tuple[Path, str]:
    """``labels.csv`` of the cohort (generated on first use, cached by its parameters) and the task used.

    ``task`` goes to ``halo.data.synth.make_cohort`` (``default``: its default task); a synth without
    tasks makes its default cohort (and says so) whatever ``task`` asks.
    """
    from halo.data import synth

    tasks = _synth_tasks()
    kwargs: dict[str, Any] = {}
    if tasks is None:
        if task not in ("default", "coarse"):
            print(f"halo.data.synth.make_cohort takes no task yet: using its default cohort, not --task {task}")
        used = "default"
    else:
        used = inspect.signature(synth.make_cohort).parameters["task"].default if task == "default" else task
        if tasks and used not in tasks:
            raise SystemExit(f"bench_study: --task {task} is not one of halo-synth's tasks {', '.join(tasks)}")
        kwargs["task"] = used
    if size is not None:
        kwargs["size"] = tuple(size)
    name = f"{used}_n{slides}_s{seed}" + (f"_{size[0]}x{size[1]}" if size else "")
    folder = out / "cohorts" / name
    csv_path = folder / "labels.csv"
    if not csv_path.is_file():
        t0 = time.perf_counter()
        if folder.exists():
            shutil.rmtree(folder)
        synth.make_cohort(folder, slides=slides, seed=seed, **kwargs)
        print(f"cohort {name}: {slides} slides in {time.perf_counter() - t0:.1f} s -> {folder}")
    return csv_path, used


def _full_size(task: str) -> tuple[int, int]:
    """The level-0 size of the full run's slides: ``make_cohort``'s default for ``task``."""
    from halo.data import synth

    if task == "fine" and hasattr(synth, "FINE_SIZE"):
        return tuple(synth.FINE_SIZE)
    default = inspect.signature(synth.make_cohort).parameters["size"].default
    return tuple(default) if isinstance(default, (tuple, list)) else (2048, 1536)


# -- one measured run --------------------------------------------------------------------------------

def _descendants(root: int) -> list[int]:
    parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parent.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parent.get(pid, [])
    return out


def _hwm(pid: int) -> tuple[int, str] | None:
    """Peak RSS (``VmHWM``) of ``pid`` in bytes and its command line."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            hwm = next((int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:")), None)
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return (hwm, cmd) if hwm is not None else None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when this process dies (a killed benchmark leaves no run behind;
    torchrun passes the signal on to its ranks)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_measured(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (its output to ``log``) in its own session; wall seconds, exit code and peak RSS.

    ``peak_rss``: the largest ``VmHWM`` over the processes of the run, sampled every 0.2 s, leaving
    out a torchrun agent (which trains nothing), and at least the ``ru_maxrss`` that ``wait4`` reports
    for the command itself when it is not torchrun.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    peaks: dict[int, tuple[int, str]] = {}
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
        done = threading.Event()
        killed = [False]

        def sample() -> None:
            while not done.wait(0.2):
                for pid in _descendants(proc.pid):
                    got = _hwm(pid)
                    if got is not None and got[0] >= peaks.get(pid, (0, ""))[0]:
                        peaks[pid] = got
                if time.perf_counter() - t0 > timeout and not killed[0]:
                    killed[0] = True
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        done.set()
        th.join()
    torchrun = "torchrun" in " ".join(cmd[:2])
    workers = [v for pid, v in peaks.items() if not (torchrun and pid == proc.pid)]
    peak = max((v[0] for v in workers), default=0)
    if not torchrun:
        peak = max(peak, usage.ru_maxrss * 1024)
    return {"rc": proc.returncode, "wall": wall, "peak_rss": peak, "timed_out": killed[0],
            "cpu": usage.ru_utime + usage.ru_stime}


def _tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _auc_from_predictions(path: Path) -> float | None:
    import csv

    from sklearn.metrics import roc_auc_score

    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    y = [CLASSES.index(r["label"]) for r in rows]
    if len(set(y)) < 2:
        return None
    return float(roc_auc_score(y, [float(r[f"prob_{CLASSES[1]}"]) for r in rows]))


def _last_auc(metrics: Path) -> float | None:
    import csv

    if not metrics.is_file():
        return None
    with open(metrics, newline="") as fh:
        rows = list(csv.DictReader(fh))
    value = rows[-1].get("val_auc") if rows else None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _train_pixels(slides_csv: Path) -> float:
    """Mean padded pixels per training slide from halo-train's ``slides.csv``."""
    import csv

    if not slides_csv.is_file():
        return math.nan
    with open(slides_csv, newline="") as fh:
        px = [int(r["padded_height"]) * int(r["padded_width"]) for r in csv.DictReader(fh) if r["split"] == "train"]
    return statistics.fmean(px) if px else math.nan


def _cached(result: Path, reuse: bool, **same: Any) -> dict | None:
    """The record of a finished run with the same settings (``same``), with ``--reuse``."""
    if reuse and result.is_file():
        rec = json.loads(result.read_text())
        if all(rec.get(k) == v for k, v in same.items()):
            print(f"  reusing {result.parent.name}")
            return rec
    return None


def halo_run(name: str, out: Path, csv_path: Path, *, approach: str, mpp: float, cols: int, seed: int, epochs: int,
             width: int, timeout: float, reuse: bool, extra: tuple[str, ...] = (), threads: int | None = None
             ) -> dict[str, Any]:
    """One ``halo-train`` run (``python -m halo.train``; under torchrun for ``cols`` > 1); its record."""
    run_dir = out / "runs" / name
    cached = _cached(run_dir / "study_record.json", reuse, epochs=epochs)
    if cached is not None:
        return cached
    overrides = [
        "data=csv", f"data.csv={csv_path}", f"data.classes=[{','.join(CLASSES)}]", f"data.mpp={mpp:g}",
        f"model.name=halo_tiny_{width}", "head=attention", "mesh.rows=1", f"mesh.cols={cols}",
        f"train.epochs={epochs}", f"train.seed={seed}", "train.progress=false", "train.heatmaps=false",
        "train.overwrite=true", *([f"train.threads={threads}"] if threads else []), *extra, f"hydra.run.dir={run_dir}",
    ]
    if cols > 1:
        launcher = [str(Path(PY).with_name("torchrun")), "--standalone", f"--nproc-per-node={cols}", "-m", "halo.train"]
    else:
        launcher = [PY, "-m", "halo.train"]
    m = run_measured(launcher + overrides, out / "logs" / f"{name}.log", timeout)
    log = out / "logs" / f"{name}.log"
    if m["rc"] != 0 or not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"{name}: halo-train exited with {m['rc']}{' (timed out)' if m['timed_out'] else ''}; "
                           f"command: {' '.join(launcher + overrides)}\n{_tail(log)}")
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as fh:  # one row per epoch: train_seconds, slides_seen
        epochs_seen = list(csv.DictReader(fh))
    if not epochs_seen or "train_seconds" not in epochs_seen[0]:
        raise RuntimeError(f"{name}: {run_dir / 'metrics.csv'} has no train_seconds per epoch\n{_tail(log)}")
    train_s = [float(r["train_seconds"]) for r in epochs_seen]
    n_train = int(epochs_seen[0]["slides_seen"])
    per_slide = sum(train_s) / (n_train * len(train_s))
    rec = {
        "name": name, "approach": approach, "mpp": mpp, "seed": seed, "mesh": f"1x{cols}", "processes": cols,
        "auc": _auc_from_predictions(run_dir / "predictions.csv"), "summary_auc": summary.get("val_auc"),
        "best_epoch": summary.get("best_epoch"), "last_auc": _last_auc(run_dir / "metrics.csv"),
        "epochs": epochs, "train_slides": n_train, "val_slides": int((summary.get("final") or {}).get("n", 0)),
        "train_seconds": sum(train_s), "s_per_slide": per_slide, "wall": m["wall"], "cpu": m["cpu"],
        "peak_rss": m["peak_rss"], "px_train": _train_pixels(run_dir / "slides.csv"),
        "frozen": "train.trunk=frozen" in extra,
    }
    (run_dir / "study_record.json").write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def mil_run(name: str, out: Path, csv_path: Path, *, mpp: float, seed: int, epochs: int, width: int, patches: int,
            patch: int, timeout: float, reuse: bool, threads: int | None = None) -> dict[str, Any]:
    """One patch-MIL run of ``study_baselines.py`` in a fresh process; its record (and the encoder's path)."""
    run_dir = out / "runs" / name
    cached = _cached(run_dir / "study_record.json", reuse, epochs=epochs, patches=patches, patch=patch)
    if cached is not None and Path(cached["encoder"]).is_file():
        return cached
    cmd = [PY, str(HERE / "study_baselines.py"), "--csv", str(csv_path), "--out", str(run_dir), "--seed", str(seed),
           "--epochs", str(epochs), "--width", str(width), "--mpp", f"{mpp:g}", "--patches", str(patches),
           "--patch", str(patch), "--classes", *CLASSES, *(["--threads", str(threads)] if threads else [])]
    log = out / "logs" / f"{name}.log"
    m = run_measured(cmd, log, timeout)
    if m["rc"] != 0 or not (run_dir / "result.json").is_file():
        raise RuntimeError(f"{name}: study_baselines.py exited with {m['rc']}; command: {' '.join(cmd)}\n{_tail(log)}")
    r = json.loads((run_dir / "result.json").read_text())
    rec = {
        "name": name, "approach": "patch MIL", "mpp": mpp, "seed": seed, "mesh": "1 process", "processes": 1,
        "auc": _auc_from_predictions(run_dir / "predictions.csv"), "summary_auc": r["val_auc"],
        "best_epoch": r["best_epoch"], "last_auc": r["last_auc"], "epochs": epochs, "train_slides": r["train_slides"],
        "val_slides": r["val_slides"], "train_seconds": sum(r["train_seconds"]),
        "s_per_slide": sum(r["train_seconds"]) / (r["train_slides"] * len(r["train_seconds"])),
        "wall": m["wall"], "cpu": m["cpu"], "peak_rss": m["peak_rss"], "px_train": float(patches * patch * patch),
        "px_val": r["val_patches_per_slide"] * patch * patch, "encoder": r["encoder_last"], "frozen": False,
        "patches": patches, "patch": patch, "calibration": r["calibration"],
    }
    (run_dir / "study_record.json").write_text(json.dumps(rec, indent=2) + "\n")
    return rec


# -- the time a full run takes -----------------------------------------------------------------------

EFFICIENCY = 0.75
"""Assumed efficiency of the cores on one image (two ranks, or two threads of one process) in the estimate."""
OVERHEAD = 2.0
"""CPU seconds of a run's per-pixel work (reading, augmentation, normalisation, halo exchange, batch-norm
synchronisation) per CPU second of the trunk's own arithmetic, for the estimate: full-size runs of every
approach on the development machine spent 1.6-3x the calibrated arithmetic after start-up."""


def _compute_cpu(rec: dict, cal: dict, n_train: int, n_val: int, epochs: int, px_train: float,
                 px_val: float) -> float:
    """CPU seconds of the trunk's arithmetic in a run: ``epochs`` passes over the training pixels (a
    training step each, or a forward where the trunk is frozen) and ``epochs + 1`` forwards over the
    validation pixels, at the calibrated one-thread rates (``study_baselines.calibrate``)."""
    step, fwd = cal["step_cpu_s"] / cal["pixels"], cal["forward_cpu_s"] / cal["pixels"]
    return epochs * n_train * px_train * (fwd if rec["frozen"] else step) + (epochs + 1) * n_val * px_val * fwd


def _run_cost(rec: dict, cal: dict, n_train: int, n_val: int, epochs: int, px_train: float, px_val: float,
              cores: int) -> float:
    """Seconds of ``rec``'s run at other sizes on an idle machine of ``cores`` cores.

    The run's CPU time less its per-pixel work is start-up (imports, opening and planning slides),
    which runs on one core per process; the per-pixel work at the new sizes (the trunk's arithmetic
    times :data:`OVERHEAD`) spreads over the cores at :data:`EFFICIENCY`.
    """
    q_px_val = rec.get("px_val", rec["px_train"])
    q_compute = OVERHEAD * _compute_cpu(rec, cal, rec["train_slides"], rec["val_slides"], rec["epochs"],
                                        rec["px_train"], q_px_val)
    procs = rec["processes"] + (1 if rec["processes"] > 1 else 0)  # + torchrun's agent
    startup = max(2.0, rec["cpu"] - q_compute) / min(procs, cores)
    return startup + OVERHEAD * _compute_cpu(rec, cal, n_train, n_val, epochs, px_train, px_val) / (cores * EFFICIENCY)


def estimate_full(records: list[dict], full: dict, area_ratio: float, cores: int) -> float:
    """Seconds a full run (``full``: seeds, slides, epochs, resolutions) would take on an idle machine of
    ``cores`` cores, from the quick run's records scaled to the full sizes.

    Pixels per slide scale with the slides' area (``area_ratio``) and with ``(mpp_quick / mpp)^2``
    at resolutions the quick run did not train at (each from the nearest one it did).
    """
    slides = full["slides"]
    n_val = max(2, round(0.25 * slides))
    n_train = slides - n_val
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["approach"], []).append(r)
    mil = by["patch MIL"][0]
    cal = mil["calibration"]

    def cost(approach: str, mpp: float) -> float:
        r = min(by[approach], key=lambda r: abs(math.log2(r["mpp"] / mpp)))
        px = r["px_train"] * area_ratio * (r["mpp"] / mpp) ** 2
        return _run_cost(r, cal, n_train, n_val, full["epochs"], px, px, cores)

    per_seed = sum(cost("downsampled", m) for m in full["down_mpps"]) + sum(cost("halo", m) for m in full["halo_mpps"])
    per_seed += cost("frozen encoder", mil["mpp"])
    per_seed += _run_cost(mil, cal, n_train, n_val, full["epochs"], full["patches"] * full["patch"] ** 2,
                          mil["px_val"] * area_ratio, cores)
    return per_seed * full["seeds"]


# -- the table and the plot --------------------------------------------------------------------------

ORDER = {"halo": 0, "frozen encoder": 1, "patch MIL": 2, "downsampled": 3}


def _fmt(values: list[float | None], digits: int = 3) -> str:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.fmean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def _groups(records: list[dict]) -> list[tuple[tuple[str, float], list[dict]]]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        groups.setdefault((r["approach"], r["mpp"]), []).append(r)
    return sorted(groups.items(), key=lambda kv: (ORDER.get(kv[0][0], 9), kv[0][1]))


def table(records: list[dict]) -> str:
    rows = []
    for (approach, mpp), rs in _groups(records):
        rows.append([
            approach, f"{mpp:g}", rs[0]["mesh"], len(rs), _fmt([r["auc"] for r in rs]),
            _fmt([r["last_auc"] for r in rs]),
            f"{max(r['peak_rss'] for r in rs) / 2**20:.0f}", f"{statistics.fmean(r['s_per_slide'] for r in rs):.3f}",
            f"{statistics.fmean(r['wall'] for r in rs):.0f}",
        ])
    return markdown_table(
        ["approach", "mpp (um/px)", "processes", "seeds", "val AUC, best epoch (mean ± sd)", "val AUC, last epoch",
         "peak RSS MB / process", "train s / slide / epoch", "wall s / run"], rows)


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def stats(rs: list[dict]) -> tuple[float, float]:
        v = [r["auc"] for r in rs if r["auc"] is not None]
        if not v:
            return math.nan, 0.0
        return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    style = {"downsampled": ("o-", "C0", "downsampled, 1 process"), "halo": ("s-", "C3", "halo end to end, 1x2"),
             "patch MIL": ("^", "C2", "patch MIL (ABMIL)"), "frozen encoder": ("D", "C1", "frozen MIL encoder + head")}
    shift = {"patch MIL": 0.94, "frozen encoder": 1.06}
    for approach, (marker, color, label) in style.items():
        pts = [(mpp, *stats(rs)) for (a, mpp), rs in _groups(records) if a == approach]
        if not pts:
            continue
        pts.sort()
        xs = [p[0] * shift.get(approach, 1.0) for p in pts]
        ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=marker, color=color, label=label,
                    capsize=3, markersize=6)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["mpp"] for r in records})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("microns per pixel trained at (log scale; finer to the left)")
    ax.set_ylabel("validation AUC (mean ± sd over seeds)")
    ax.set_ylim(-0.03, 1.03)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the study ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> list[dict]:
    """Run the study; returns every run's record."""
    ap = parser(__doc__, quick="1 seed, 4 tiny slides, 1 epoch, tiny patches; prints, does not write RESULTS.md")
    ap.add_argument("--task", default="fine", help="halo-synth task of the cohort (default fine: foci seen only at "
                    "0.5-1 um/px; coarse or default: dark tumour regions); a synth without tasks makes its default")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds 0..N-1 (full: 3)")
    ap.add_argument("--slides", type=int, default=None, help="slides in the cohort (full: 40, a quarter val)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every approach (full: 8)")
    ap.add_argument("--width", type=int, default=16, help="halo_tiny width of every encoder (default 16)")
    ap.add_argument("--full-mpp", type=float, default=0.5, help="full resolution (the cohort's level 0)")
    ap.add_argument("--out", default=None, help="where cohorts, runs and logs go (default benchmarks/out/study; "
                    "--quick: a temporary directory, removed)")
    ap.add_argument("--reuse", action="store_true", help="keep the records of runs that finished before")
    a = ap.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    for key in ("seeds", "slides", "epochs"):
        if getattr(a, key) is not None:
            cfg[key] = getattr(a, key)
    tmp = tempfile.mkdtemp(prefix="halo-study-") if a.quick and not a.out else None  # quick: nothing stays
    out = Path(tmp or a.out or HERE / "out" / "study").resolve()
    started = time.perf_counter()
    try:
        csv_path, task = make_study_cohort(out, a.task, cfg["slides"], 0, cfg["size"])
        records: list[dict] = []
        common = dict(epochs=cfg["epochs"], width=a.width, timeout=cfg["timeout"], reuse=a.reuse,
                      threads=cfg["threads"])
        for seed in range(cfg["seeds"]):
            print(f"seed {seed}:", flush=True)
            mil = mil_run(f"mil_{a.full_mpp:g}_s{seed}", out, csv_path, mpp=a.full_mpp, seed=seed,
                          patches=cfg["patches"], patch=cfg["patch"], **common)
            records.append(mil)
            runs = [("frozen encoder", a.full_mpp, 1, (f"model.weights={mil['encoder']}", "train.trunk=frozen"))]
            runs += [("halo", m, 2, ()) for m in cfg["halo_mpps"]]
            runs += [("downsampled", m, 1, ()) for m in cfg["down_mpps"]]
            for approach, mpp, cols, extra in runs:
                name = f"{approach.split()[0]}_{mpp:g}_s{seed}"
                records.append(halo_run(name, out, csv_path, approach=approach, mpp=mpp, cols=cols, seed=seed,
                                        extra=extra, **common))
            for r in records[-len(runs) - 1:]:
                print(f"  {r['approach']:<15} mpp {r['mpp']:<4g} {r['mesh']:<9} auc {r['auc']}  last {r['last_auc']}  "
                      f"{r['peak_rss'] / 2**20:.0f} MB  {r['s_per_slide']:.3f} s/slide  {r['wall']:.0f} s", flush=True)
            done = time.perf_counter() - started
            print(f"  {done / 60:.1f} min so far; the {cfg['seeds'] - seed - 1} seed(s) left take about "
                  f"{done / (seed + 1) * (cfg['seeds'] - seed - 1) / 60:.0f} min more", flush=True)
        elapsed = time.perf_counter() - started
        text = table(records)
        fine = task == "fine"
        png = Path(out) / "study.png" if a.quick else PNG
        plot(records, png, f"halo-synth --task {task}, {cfg['slides']} slides, {cfg['epochs']} epochs, "
                           f"{cfg['seeds']} seed(s), halo_tiny_{a.width}")
        lines = [f"Cohort: `halo-synth --task {task}`, {cfg['slides']} slides (a quarter validation), "
                 f"level 0 at {a.full_mpp:g} um/px; {cfg['epochs']} epochs; seeds 0-{cfg['seeds'] - 1}; "
                 f"halo_tiny_{a.width} trunk and gated attention head everywhere; patch MIL draws "
                 f"{cfg['patches']} patches of {cfg['patch']} px per slide per epoch.", "", text, "",
                 f"Plot: {png if a.quick else 'benchmarks/results/study.png'}. Whole study: {elapsed / 60:.1f} min "
                 f"on {os.cpu_count()} cores."]
        if a.quick:
            full = dict(FULL)
            size = _full_size(task)
            ratio = (size[0] * size[1]) / (cfg["size"][0] * cfg["size"][1])
            est = estimate_full(records, full, ratio, os.cpu_count() or 1)
            n_runs = len(full["down_mpps"]) + len(full["halo_mpps"]) + 2
            lines += ["", f"estimated full run (--seeds {full['seeds']} --slides {full['slides']} --epochs "
                      f"{full['epochs']}, {size[0]}x{size[1]} slides, {n_runs} runs per seed): {est / 60:.0f} min on "
                      f"{os.cpu_count()} idle cores (from this quick run's CPU seconds and the trunk's calibrated "
                      f"CPU seconds per pixel; load now {os.getloadavg()[0]:.1f})"]
        intro = ("## The study: halo against downsampling, patch MIL and a frozen encoder\n\n"
                 "Same network (trunk, gated attention head), optimizer, schedule, epochs and seeds for every "
                 "approach. *val AUC, best epoch*: the AUC of the epoch chosen on validation (halo-train's "
                 "`summary.json` / `best.pt`, recomputed from `predictions.csv`), so optimistic for every row "
                 "alike; *last epoch* is without that choice. *Peak RSS*: the largest process of the run "
                 "(torchrun's agent left out), imports included (about 0.5 GB of it is torch and halo). "
                 "*train s / slide / epoch*: training only (validation not included); halo rows use 2 processes "
                 "of one thread, the others 1 process of all threads, on the same cores.\n\n")
        if not fine:
            intro += f"Cohort task `{task}` (not `fine`): its labels do not need full resolution.\n\n"
        report("bench_study", "\n".join(lines), intro=intro, quick=a.quick, argv=argv)
        return records
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
