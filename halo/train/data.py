"""Which slide each image group reads at each step, the block this rank reads of it, and
``slides.csv`` (what was read).

Every image group runs the same number of steps whatever the slide count (:func:`group_steps`),
so collectives stay in step; a block that fails to read is agreed on by every rank
(:meth:`SlideSource.agree`) and replaced by zeros with zero loss weight.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from halo.data import ManifestError, SlideDataset, SlideError
from halo.data.dataset import COLUMNS, skipped_message, slide_ref, write_skipped
from halo.errors import InputError
from halo.train.config import augment_options, columns_map, tissue_options
from halo.train.job import Job, all_gather, broadcast

__all__ = ["group_steps", "SLIDE_RECORD", "slide_record", "SlideSource", "SMALL_CELLS", "one_cell_reason"]

log = logging.getLogger("halo.train")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def group_steps(order: list[int], groups: int, group: int) -> list[tuple[int, float]]:
    """The slides image group ``group`` of ``groups`` reads, one per step, each with its loss weight.

    Every group gets ``ceil(len(order) / groups)`` steps, so every group runs the same collectives
    whatever the slide count; steps past the end of ``order`` repeat slides from its start
    (cyclically) with weight 0, so each slide of ``order`` counts exactly once.
    """
    n = len(order)
    steps = -(-n // groups) if n else 0
    return [(order[k % n], 1.0 if k < n else 0.0) for k in (s * groups + group for s in range(steps))]


SLIDE_RECORD = {
    "key": "the slide's key (its CSV entry, or slide_id): predictions and heatmaps are named by it",
    "path": "the file read",
    "csv_line": "its line in the CSV (header = 1)",
    "split": "train, val or test (predict: the CSV's own, empty where it gives none)",
    "label": "its class (empty: unlabelled, predict only)",
    "vendor": "OpenSlide's format name (aperio, generic-tiff, dicom, ...)",
    "reader": "what decoded its pixels (tifffile: the stored level as is; openslide)",
    "level": "pyramid level read",
    "level_downsample": "level-0 pixels per pixel of that level",
    "downsample": "level-0 pixels per training pixel (above level_downsample: box-filtered)",
    "mpp": "microns per training pixel (empty: unknown)",
    "region_x": "left of the tissue box read, level-0 pixels",
    "region_y": "top of the tissue box read, level-0 pixels",
    "region_width": "width of the tissue box read, level-0 pixels",
    "region_height": "height of the tissue box read, level-0 pixels",
    "padded_height": "height of the padded region the model sees, training pixels",
    "padded_width": "width of the padded region the model sees, training pixels",
    "block_height": "height of each rank's block",
    "block_width": "width of each rank's block",
    "tissue_fraction": "fraction of the slide's thumbnail detected as tissue (empty: detection off)",
    "read_seconds": "seconds to read one block (the slowest rank of its image group, last read)",
}
"""The columns of ``slides.csv``: one row per slide read in the run."""


def slide_record(row, plan, classes: list[str]) -> dict[str, Any]:
    """One ``slides.csv`` row (see :data:`SLIDE_RECORD`) from a manifest row and its region plan."""
    (bx, by), (bw, bh) = plan.tissue_box
    pw, ph = plan.padded_size
    bh_, bw_ = plan.block_shape()
    mask = plan.thumb_mask
    return {
        "key": row.slide_id, "path": row.path, "csv_line": row.line, "split": row.split or "",
        "label": classes[row.label] if 0 <= row.label < len(classes) else "",
        "vendor": getattr(plan, "vendor", ""), "reader": getattr(plan, "reader", "openslide"),
        "level": plan.level, "level_downsample": round(plan.level_downsample, 6),
        "downsample": round(plan.downsample, 6), "mpp": "" if plan.mpp is None else round(plan.mpp, 6),
        "region_x": bx, "region_y": by, "region_width": bw, "region_height": bh,
        "padded_height": ph, "padded_width": pw, "block_height": bh_, "block_width": bw_,
        "tissue_fraction": "" if mask is None else round(float(mask.mean()), 4), "read_seconds": 0.0,
    }


SMALL_CELLS = 4
"""Slides whose whole image at the training resolution is at most this many output cells of the trunk
a side are planned at start-up to find those whose region is a single cell (:meth:`SlideSource.dataset`)."""


def one_cell_reason(plan, multiple: int) -> str:
    """Why a slide whose padded region is a single output cell cannot be trained on, and what would work."""
    pw, ph = plan.padded_size
    return (f"its region pads to {ph} x {pw} (H x W) pixels at level {plan.level}, a single {multiple}-pixel cell "
            f"of the trunk's output, and batch norm in training needs at least two values per channel: read it at a "
            f"finer resolution (its mpp or level column, data.mpp) or set data.canvas={2 * multiple}")


class SlideSource:
    """The cohort of a run on this rank: its datasets, this rank's blocks, and their records."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.augment = augment_options(job.cfg.data)
        self.records: dict[str, dict[str, Any]] = {}  # slide key -> what this rank read
        self.epoch: int | None = None  # the training epoch (1-based) running: skipped_slides.csv's epoch
        self._datasets: list[SlideDataset] = []  # every dataset of the run: their skipped slides are gathered
        self._unreadable: dict[int, tuple[str, str]] = {}  # CSV line -> (reason, reader), skipped at start-up
        self._reported: set[str] = set()  # rank 0: paths already in skipped_slides.csv
        self._announced: set[str] = set()  # rank 0: paths logged at start-up as to be skipped (one cell)
        self._norms: list[torch.nn.Module] | None = None  # the trunk's batch norms, found once

    def csv_path(self) -> str:
        """The cohort CSV; the synthetic cohort is generated on rank 0 on first use."""
        data = self.job.cfg.data
        if data.kind == "synthetic":
            path = Path(data.csv)
            if self.job.is_main and not path.is_file():
                from halo.data.synth import make_cohort

                log.info("generating the synthetic cohort in %s (cached for later runs)", data.root)
                make_cohort(data.root, slides=data.slides, seed=data.seed)
            dist.barrier()
            return str(path)
        return str(data.csv)

    def dataset(self, split: str | None, validate: bool) -> SlideDataset:
        """The rows of ``split`` (None: all); with ``validate``, rank 0 checks the whole cohort first.

        Missing and unreadable slides are skipped (left out of every dataset of the run, logged once
        and recorded in ``skipped_slides.csv`` with epoch 0) in ``mode=predict`` and with
        ``data.skip_unreadable=true``; every other problem refuses the run.

        Raises
        ------
        halo.errors.InputError
            On every rank, listing every problem of the cohort (printed once by the launcher).
        """
        job, data = self.job, self.job.cfg.data
        kwargs = dict(
            classes=job.classes, grid=job.grid, multiple=job.multiple, mpp=data.mpp,
            level=data.level, split=split, strict=data.strict, root=data.root, record_dir=None,
            val_fraction=data.val_fraction, seed=data.split_seed, tissue=tissue_options(data),
            stain_normalize=data.stain_normalize, canvas=data.canvas or None,
            # prediction: unlabelled rows are welcome, and each row keeps the CSV's own split
            labels_required=job.cfg.mode == "train", derive_split=job.cfg.mode == "train",
            columns=columns_map(data), report=False,  # skipped slides: gathered and reported by rank 0
        )
        skip = job.cfg.mode == "predict" or bool(data.get("skip_unreadable", False))
        path = self.csv_path()
        problem, unreadable = None, {}
        if job.is_main and validate:
            try:
                checked = SlideDataset(path, **kwargs, validate=True, skip_unreadable=skip)
            except (ManifestError, ValueError, FileNotFoundError) as e:
                problem = f"{type(e).__name__}: {e}"
                if getattr(e, "unreadable", None) and not skip:
                    problem += ("\n(data.skip_unreadable=true skips missing and unreadable slides instead, "
                                "recording them in skipped_slides.csv)")
            else:
                unreadable = checked.unreadable
                self._log_columns(checked)
                mixed = checked.resolution_warnings()
                if mixed:
                    log.warning("%s: %d slide(s) at another resolution than the cohort:\n%s", path, len(mixed),
                                "\n".join(f"  - {m}" for m in mixed))
                if unreadable:
                    self._report_unreadable(checked, unreadable)
                if split == "train" and job.cfg.mode == "train":
                    problem = self._one_cell_at_start(checked)
                    kept = [r.label for r in checked.rows if r.line not in unreadable]
                    empty = [c for i, c in enumerate(job.classes) if i not in kept]
                    if empty:
                        log.warning("%s: no training slide is labelled %s (data.classes=[%s]): the model never sees "
                                    "that class in training", path, ", ".join(repr(c) for c in empty),
                                    ",".join(job.classes))
        problem, unreadable = broadcast((problem, unreadable))
        if problem:  # every rank raises it; the launcher's guard prints it once
            done = "trained" if job.cfg.mode == "train" else "predicted"
            raise InputError(f"halo-train: nothing was {done}, the manifest has problems:\n{problem}")
        if validate:
            self._unreadable = dict(unreadable)
        ds = SlideDataset(path, **kwargs, validate=False, skipped_lines=self._unreadable)  # a split without them
        if self._unreadable:
            ds.exclude(self._unreadable)
        self._datasets.append(ds)
        return ds

    def _one_cell_at_start(self, checked: SlideDataset) -> str | None:
        """Rank 0, at start-up: the training slides that :meth:`_one_cell` will skip (batch norm in
        training cannot train on a single output cell), logged once; with ``data.strict=true`` the
        problem that refuses the run, naming them (None: nothing to refuse).

        Only a 1 x 1 grid without a larger ``data.canvas`` can give one cell, and only slides whose
        whole image at the training resolution is at most :data:`SMALL_CELLS` cells a side are
        planned (thumbnail and tissue detection) to find out: a larger slide whose tissue box alone
        falls in one cell is still caught mid-run by :meth:`_one_cell`, the backstop.
        """
        job, m = self.job, self.job.multiple
        canvas = int(job.cfg.data.canvas or 0)
        unit = math.lcm(m, canvas) if canvas else m
        if tuple(job.grid) != (1, 1) or unit != m or not self._norm_trains():
            return None
        small = []
        for i, r in enumerate(checked.rows):
            ch = checked.choices.get(r.line)
            if ch is None or max(ch.target_size) > SMALL_CELLS * m:
                continue
            try:
                plan = checked.plan(i)
            except SlideError:  # it fails to plan: recorded when it is read, as before
                continue
            pw, ph = plan.padded_size
            if pw // m * (ph // m) <= 1:
                small.append(f"{slide_ref(r.line, r.slide_id, r.path)}: {one_cell_reason(plan, m)}")
                self._announced.add(r.path)
        if not small:
            return None
        if job.cfg.data.strict:
            return (f"data.strict=true: {len(small)} training slide(s) too small to train on:\n"
                    + "\n".join(f"  - {line}" for line in small))
        log.warning("%s: %d training slide(s) will be skipped in training (recorded in skipped_slides.csv when "
                    "reached; data.strict=true refuses the run instead):\n%s", checked.csv_path, len(small),
                    "\n".join(f"  - {line}" for line in small))
        return None

    def _norm_trains(self) -> bool:
        """Whether a batch norm of the trunk trains in some epoch of the run (not all of its stages
        frozen throughout: ``train.trunk``, ``train.freeze_stages``, ``train.unfreeze_at``)."""
        from halo.train.loop import frozen_stages

        try:
            n = min(frozen_stages(self.job, e) for e in range(max(1, int(self.job.cfg.train.epochs))))
        except InputError:  # a bad freeze setting: refused when training starts
            return False
        return any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm)
                   for stage in list(self.job.model.trunk)[n:] for x in stage.modules())

    def _log_columns(self, ds: SlideDataset) -> None:
        """Rank 0, once: which headers were read as which column (where not by name), which were ignored."""
        renamed = {c: h for c, h in ds.columns.items() if h != c}
        if renamed:
            log.info("%s: column(s) read from other headers: %s", ds.csv_path,
                     ", ".join(f"{c} <- {h!r}" for c, h in renamed.items()))
        if ds.ignored_columns:
            log.info("%s: column(s) %s ignored (halo reads %s; name a header with data.columns.<column>=<header>)",
                     ds.csv_path, ds.ignored_columns, ", ".join(COLUMNS))
        if ds.delimiter != ",":
            log.info("%s: read as %r-delimited", ds.csv_path, ds.delimiter)

    def _report_unreadable(self, checked: SlideDataset, unreadable: dict[int, tuple[str, str]]) -> None:
        """Rank 0: log the slides the start-up check skipped, once, and record them (epoch 0)."""
        why = "mode=predict" if self.job.cfg.mode == "predict" else "data.skip_unreadable=true"
        recs = [{"slide": r.slide_id, "path": r.path, "csv_line": r.line, "epoch": 0,
                 "split": "" if checked.derived_split else r.split or "",  # a derived split gives them none
                 "rank": 0, "reader": unreadable[r.line][1], "error": unreadable[r.line][0]}
                for r in checked.all_rows if r.line in unreadable]
        write_skipped(self.job.run_dir, recs)
        self._reported.update(r["path"] for r in recs)
        log.warning("%s: %d of %d slides are missing or unreadable and are skipped (%s), recorded in %s:\n%s",
                    checked.csv_path, len(recs), len(checked.all_rows), why, self.job.run_dir / "skipped_slides.csv",
                    "\n".join(f"  - {skipped_message(r)}" for r in recs))

    def block(self, ds: SlideDataset, index: int, augment_seed: int | None) -> torch.Tensor | None:
        """This rank's block of slide ``index``, normalised, on the device; None if the read failed."""
        job = self.job
        spec = self.augment.draw(augment_seed) if augment_seed is not None and job.cfg.data.augment.enabled else None
        _, row, col = job.mesh.coords
        started = time.perf_counter()
        block = ds.read_block_safe(index, row, col, augment=spec)
        if block is None:
            return None
        if augment_seed is not None and self._one_cell(ds, index):
            return None
        self._note(ds, index, time.perf_counter() - started)
        x = torch.from_numpy(np.ascontiguousarray(block)).permute(2, 0, 1)[None].float().div_(255)
        return ((x - MEAN) / STD).to(job.device, non_blocking=True)

    def _one_cell(self, ds: SlideDataset, index: int) -> bool:
        """Whether slide ``index`` is too small to train on: its padded region is one output cell of
        the trunk, and batch norm in training needs two values per channel. Skipped and recorded
        (every rank of the group plans it alike), or raised with ``data.strict=true``. The backstop of
        :meth:`_one_cell_at_start`, which names such slides (and refuses them with strict) at start-up."""
        from halo.data.slide import SlideTooSmallError

        plan, m = ds.plan(index), self.job.multiple
        pw, ph = plan.padded_size
        if pw // m * (ph // m) > 1 or not self._norm_training():
            return False
        ds.mark_failed(index, SlideTooSmallError(plan.path, one_cell_reason(plan, m)))
        return True

    def _norm_training(self) -> bool:
        """Whether any batch norm of the trunk is in training mode (the modules are walked once;
        their modes are read each time, as :func:`halo.train.loop.trunk_mode` may change them)."""
        if self._norms is None:
            self._norms = [x for x in self.job.model.trunk.modules()
                           if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
        return any(x.training for x in self._norms)

    def blockwise(self, ds: SlideDataset, index: int):
        """Slide ``index`` predicted block by block by this rank alone (``blocks=[rows, cols]``):
        a :class:`halo.blockwise.BlockwiseResult`, or None if a read failed (recorded as
        :meth:`block` records it)."""
        from halo.blockwise import predict_blockwise, region_reader
        from halo.data import SlideError

        job = self.job
        started = time.perf_counter()
        item = ds.get_safe(index)
        if item is None:
            return None
        reader = region_reader(item.plan, lambda x: (x - MEAN) / STD, device=job.device)
        try:
            with job.autocast():
                out = predict_blockwise(job.model, reader, grid=job.blocks)
        except SlideError as exc:
            ds.mark_failed(index, exc)  # raises again with data.strict=true
            return None
        self._note(ds, index, time.perf_counter() - started)
        return out

    def zeros(self, ds: SlideDataset, index: int) -> torch.Tensor:
        """A zero block of slide ``index``'s shape: what a rank computes on when a read failed
        (two cells wide if that slide is a single output cell, which batch norm cannot train on)."""
        m = self.job.multiple
        try:
            h, w = ds.plan(index).block_shape()
        except SlideError:  # it failed to plan (recorded): every rank of its group computes on this
            h, w = m, m
        if h // m * (w // m) <= 1:
            w *= 2
        return torch.zeros(1, 3, h, w, device=self.job.device)

    def agree(self, ok: bool) -> torch.Tensor:
        """Which image groups read their slide this step (every rank of a group must agree); collective."""
        job = self.job
        flags = torch.zeros(job.mesh.data, device=job.device)
        flags[job.group] = 0.0 if ok else 1.0
        dist.all_reduce(flags)
        return flags == 0

    def _note(self, ds: SlideDataset, index: int, seconds: float) -> None:
        row = ds.rows[index]
        rec = self.records.get(row.slide_id)
        if rec is None:
            rec = self.records[row.slide_id] = slide_record(row, ds.plan(index), self.job.classes)
        rec["read_seconds"] = round(seconds, 4)

    def write_records(self) -> None:
        """Merge every rank's records (the slowest rank's read time) into ``slides.csv``, and the slides
        skipped since the last call into ``skipped_slides.csv`` (one row per slide, from the lowest
        rank it failed on; logged once, by rank 0); collective."""
        mine = {p: rec for ds in self._datasets for p, rec in ds.skipped.items() if p not in self._reported}
        parts = all_gather((mine, self.records))  # one collective: (skipped slides, records) of every rank
        skipped: dict[str, dict[str, Any]] = {}
        for part, _ in parts:
            for p, rec in part.items():
                if p not in skipped or int(rec["rank"]) < int(skipped[p]["rank"]):
                    skipped[p] = rec
        new = sorted((r for p, r in skipped.items() if p not in self._reported), key=lambda r: int(r["csv_line"]))
        self._reported.update(skipped)
        if self.job.is_main and new:
            for r in new:
                if r["epoch"] == "" and self.epoch is not None:
                    r["epoch"] = self.epoch
            write_skipped(self.job.run_dir, new)
            for r in new:
                if r["path"] not in self._announced:  # those were logged once, at start-up
                    log.warning("%s (recorded in skipped_slides.csv)", skipped_message(r))
        merged: dict[str, dict[str, Any]] = {}
        for _, part in parts:
            for key, rec in part.items():
                old = merged.get(key)
                if old is None or rec["read_seconds"] > old["read_seconds"]:
                    merged[key] = rec
        if self.job.is_main and merged:
            rows = sorted(merged.values(), key=lambda r: (r["split"] or "", r["key"]))
            with open(self.job.run_dir / "slides.csv", "w", newline="") as fh:
                wr = csv.DictWriter(fh, fieldnames=list(SLIDE_RECORD))
                wr.writeheader()
                wr.writerows(rows)
