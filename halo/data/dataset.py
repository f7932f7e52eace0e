"""``SlideDataset``: a CSV manifest of slides and labels, validated at start-up.

The CSV has a header with columns ``slide`` (a path, absolute or relative to
``root``, or an id resolved to ``root/<id>.<ext>``) and ``label`` (a class name
or a class index), and optionally ``split`` and ``mask``; other columns are kept
but ignored. Rows are numbered by their line in the file (the header is line 1).

At start-up every row is checked and every problem reported at once in one
:class:`ManifestError`: missing files, unreadable slides, labels outside the
classes, resolutions that cannot be decided, slides too small for the grid. A
slide that becomes unreadable mid-run is skipped with a warning and appended to
``<record_dir>/skipped_slides.csv`` (``strict=True`` makes it fatal).

With spatial sharding, a read can fail on one rank of an image and not on the
others: the training loop should agree across the image's ranks (for example an
all-reduce of "skip" flags) before using a block.
"""

from __future__ import annotations

import csv
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from halo.data.augment import AugmentSpec
from halo.data.region import RegionPlan, plan_region, read_block
from halo.data.slide import Slide, SlideError, select_level
from halo.data.tissue import TissueOptions

__all__ = ["ManifestError", "ManifestRow", "SlideItem", "SlideDataset", "SLIDE_EXTENSIONS"]

SLIDE_EXTENSIONS: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".dcm", ".czi",
)
"""Extensions tried, in order, when a ``slide`` entry is an id rather than a file."""


class ManifestError(ValueError):
    """Every problem found in a manifest, one per line, each naming the CSV line and the file.

    Attributes
    ----------
    csv_path:
        The manifest.
    problems:
        One message per problem.
    """

    def __init__(self, csv_path: str | os.PathLike[str], problems: list[str]) -> None:
        self.csv_path = os.fspath(csv_path)
        self.problems = list(problems)
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.csv_path}: {len(self.problems)} problem(s) in the slide manifest:\n{body}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ManifestRow:
    """One CSV row. ``line`` is its line number in the file (header = 1)."""

    line: int
    slide_id: str
    path: str
    label: int
    split: str | None = None
    mask: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class SlideItem:
    """What the training loop needs for one slide; ``plan`` feeds :func:`halo.data.read_block`."""

    index: int
    slide_id: str
    label: int
    plan: RegionPlan
    path: str
    mask: str | None = None


class SlideDataset:
    """Slides and labels from a CSV; each item carries a :class:`RegionPlan` for the grid.

    Parameters
    ----------
    csv_path:
        The manifest.
    classes:
        Class names; a label is a name in this list or an index into it.
    grid, multiple, mpp, level, tissue, rot90, stain_normalize:
        Passed to :func:`halo.data.plan_region`.
    split:
        Keep only rows whose ``split`` equals this (None: all rows).
    strict:
        Make a mid-run read failure fatal instead of skipping the slide.
    root:
        Directory relative slide paths are resolved against (default: the CSV's).
    record_dir:
        Where ``skipped_slides.csv`` is written (default: nowhere).
    validate:
        Validate the whole manifest now (default True).

    Raises
    ------
    ManifestError
        Listing every problem at once.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike[str],
        classes: list[str] | tuple[str, ...],
        grid: tuple[int, int] = (1, 1),
        multiple: int = 32,
        mpp: float | None = None,
        level: int | None = None,
        split: str | None = None,
        strict: bool = False,
        root: str | os.PathLike[str] | None = None,
        record_dir: str | os.PathLike[str] | None = None,
        *,
        tissue: TissueOptions | None = None,
        rot90: bool = True,
        stain_normalize: bool = False,
        validate: bool = True,
    ) -> None:
        self.csv_path = os.fspath(csv_path)
        self.classes = [str(c) for c in classes]
        if len(self.classes) < 1 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct names, got {list(classes)!r}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.multiple, self.mpp, self.level = int(multiple), mpp, level
        self.split, self.strict = split, bool(strict)
        self.root = Path(root) if root is not None else Path(self.csv_path).resolve().parent
        self.record_dir = Path(record_dir) if record_dir is not None else None
        self._plan_kw: dict[str, Any] = {"tissue": tissue, "rot90": rot90, "stain_normalize": stain_normalize}
        self._plans: dict[int, RegionPlan] = {}
        self._lock = threading.Lock()
        self.skipped: dict[str, str] = {}
        self.all_rows, self._parse_problems = self._parse()
        self.rows = [r for r in self.all_rows if split is None or r.split == split]
        if validate:
            self.validate()
        elif self._parse_problems:
            raise ManifestError(self.csv_path, self._parse_problems)

    # -- manifest -----------------------------------------------------------------
    def _parse(self) -> tuple[list[ManifestRow], list[str]]:
        if not os.path.isfile(self.csv_path):
            raise ManifestError(self.csv_path, ["manifest file not found"])
        rows: list[ManifestRow] = []
        problems: list[str] = []
        with open(self.csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in ("slide", "label") if c not in cols]
            if missing:
                raise ManifestError(self.csv_path, [f"line 1: missing column(s) {missing}; found {cols}"])
            for raw in reader:
                rec = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                line = reader.line_num
                sid = rec.get("slide", "")
                where = f"line {line}: slide {sid!r}"
                if not sid:
                    problems.append(f"line {line}: empty 'slide' entry")
                    continue
                path = self._resolve(sid)
                label = self._label(rec.get("label", ""))
                if label is None:
                    problems.append(
                        f"{where} ({path}): label {rec.get('label', '')!r} is not one of {self.classes}"
                    )
                    label = -1
                extra = {k: v for k, v in rec.items() if k not in ("slide", "label", "split", "mask")}
                mask = rec.get("mask") or None
                rows.append(ManifestRow(
                    line=line, slide_id=_slide_id(sid), path=path,
                    label=label, split=rec.get("split") or None,
                    mask=os.fspath(self.root / mask) if mask else None, extra=extra,
                ))
        if not rows and not problems:
            problems.append("line 1: no slides listed")
        return rows, problems

    def _resolve(self, sid: str) -> str:
        p = Path(sid)
        p = p if p.is_absolute() else self.root / p
        if p.exists() or p.suffix.lower() in SLIDE_EXTENSIONS:
            return os.fspath(p)
        for ext in SLIDE_EXTENSIONS:
            q = p.with_name(p.name + ext)
            if q.exists():
                return os.fspath(q)
        return os.fspath(p)

    def _label(self, text: str) -> int | None:
        if text in self.classes:
            return self.classes.index(text)
        try:
            i = int(text)
        except ValueError:
            return None
        return i if 0 <= i < len(self.classes) else None

    def validate(self) -> None:
        """Open every slide of the whole manifest and check it against the grid and resolution.

        Raises
        ------
        ManifestError
            Listing every problem: missing files, unreadable slides, undecidable
            resolution, slides smaller than ``grid * multiple`` (and any rows of the
            requested split being absent).
        """
        problems: list[tuple[int, str]] = [(_line_of(p), p) for p in self._parse_problems]
        rows, cols = self.grid
        for r in self.all_rows:
            where = f"line {r.line}: slide {r.slide_id!r} ({r.path})"
            if not os.path.exists(r.path):
                problems.append((r.line, f"{where}: file not found"))
                continue
            try:
                with Slide(r.path) as s:
                    ch = select_level(s, mpp=self.mpp, level=self.level)
                    w0, h0 = s.dimensions
                    wt, ht = int(w0 / ch.downsample + 1e-9), int(h0 / ch.downsample + 1e-9)
                    if ht < rows * self.multiple or wt < cols * self.multiple:
                        problems.append((r.line,
                            f"{where}: too small for the grid: {wt}x{ht} (width x height) at level "
                            f"{ch.level}, downsample {ch.downsample:g}; grid {rows}x{cols} with multiple "
                            f"{self.multiple} needs at least {cols * self.multiple}x{rows * self.multiple}"
                        ))
            except SlideError as exc:
                problems.append((r.line, f"{where}: {_reason(exc)}"))
        if self.split is not None and not self.rows:
            problems.append((1 << 30, f"no rows with split={self.split!r}"))
        if problems:
            problems.sort(key=lambda lp: lp[0])  # stable: by CSV line, then check order
            raise ManifestError(self.csv_path, [p for _, p in problems])

    # -- items --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        """Label index of every row in this split, ``int64`` ``(len,)``."""
        return np.array([r.label for r in self.rows], dtype=np.int64)

    def class_weights(self) -> np.ndarray:
        """Balanced class weights ``n / (n_classes * n_c)`` (0 for absent classes), ``float64``."""
        counts = np.bincount(self.labels, minlength=len(self.classes)).astype(np.float64)
        n, k = counts.sum(), len(self.classes)
        return np.where(counts > 0, n / (k * np.maximum(counts, 1)), 0.0)

    def sample_weights(self) -> np.ndarray:
        """Per-row weights that balance the classes (for a weighted sampler)."""
        return self.class_weights()[self.labels]

    def plan(self, i: int) -> RegionPlan:
        """The region plan of row ``i`` (computed once, then cached)."""
        with self._lock:
            cached = self._plans.get(i)
        if cached is not None:
            return cached
        r = self.rows[i]
        p = plan_region(r.path, grid=self.grid, multiple=self.multiple, mpp=self.mpp, level=self.level,
                        **self._plan_kw)
        with self._lock:
            self._plans[i] = p
        return p

    def __getitem__(self, i: int) -> SlideItem:
        """Item ``i``; raises :class:`SlideError` (naming the file) if it cannot be planned."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} slides")
        i = i % len(self)
        r = self.rows[i]
        return SlideItem(index=i, slide_id=r.slide_id, label=r.label, plan=self.plan(i), path=r.path, mask=r.mask)

    def get_safe(self, i: int) -> SlideItem | None:
        """Like ``self[i]`` but a slide error skips the slide (recorded) and returns None."""
        if self.rows[i].path in self.skipped:
            return None
        try:
            return self[i]
        except SlideError as exc:
            self.mark_failed(i, exc)
            return None

    def read_block_safe(
        self, i: int, row: int, col: int, *, augment: AugmentSpec | None = None
    ) -> np.ndarray | None:
        """Read block ``(row, col)`` of slide ``i``; None (and a record) if the slide fails.

        Raises
        ------
        SlideError
            Only with ``strict=True``.
        """
        item = self.get_safe(i)
        if item is None:
            return None
        try:
            return read_block(item.plan, row, col, augment=augment)
        except SlideError as exc:
            self.mark_failed(i, exc)
            return None

    def mark_failed(self, i: int, exc: BaseException) -> None:
        """Skip slide ``i`` from now on: warn and append it to ``record_dir/skipped_slides.csv``.

        Raises
        ------
        SlideError
            With ``strict=True``, ``exc`` is raised again (wrapped if needed).
        """
        r = self.rows[i]
        reason = _reason(exc)
        if self.strict:
            if isinstance(exc, SlideError):
                raise exc
            raise SlideError(r.path, f"line {r.line}: {reason}") from exc
        with self._lock:
            first = r.path not in self.skipped
            self.skipped[r.path] = reason
        if not first:
            return
        warnings.warn(f"skipping slide {r.slide_id!r} ({r.path}, {self.csv_path} line {r.line}): {reason}",
                      RuntimeWarning, stacklevel=2)
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            out = self.record_dir / "skipped_slides.csv"
            new = not out.exists()
            with open(out, "a", newline="") as fh:
                wr = csv.writer(fh)
                if new:
                    wr.writerow(["slide", "path", "csv_line", "pid", "error"])
                wr.writerow([r.slide_id, r.path, r.line, os.getpid(), reason])

    def __repr__(self) -> str:
        return (f"SlideDataset({self.csv_path!r}, {len(self)} slides, classes={self.classes}, "
                f"grid={self.grid}, split={self.split!r})")


def _line_of(problem: str) -> int:
    """The CSV line a problem message starts with (``line N: ...``), else 0."""
    head = problem.split(":", 1)[0]
    return int(head[5:]) if head.startswith("line ") and head[5:].isdigit() else 0


def _slide_id(entry: str) -> str:
    """The id of a ``slide`` entry: its file name without a known slide extension."""
    p = Path(entry)
    return p.stem if p.suffix.lower() in SLIDE_EXTENSIONS else p.name


def _reason(exc: BaseException) -> str:
    """The message of a slide error without its leading path (the caller names it)."""
    msg = str(exc)
    path = getattr(exc, "path", None)
    if path and msg.startswith(f"{path}: "):
        msg = msg[len(path) + 2:]
    return f"{type(exc).__name__}: {msg}"
