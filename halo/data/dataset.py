"""``SlideDataset``: a CSV manifest of slides and labels, validated at start-up.

Columns (header on line 1; rows are numbered by their line in the file). The delimiter is
detected from the header line (``,``, ``;``, tab or ``|``; see :attr:`SlideDataset.delimiter`).
Headers are matched to the columns below ignoring case, surrounding spaces and ``_`` versus
space, by the names in :data:`ALIASES` (``Patient ID``, ``patient_id`` and ``CASE`` are all
``patient``; ``Slide Path`` and ``File`` are ``slide``; ``Diagnosis`` and ``Class`` are
``label``), or named explicitly with ``columns`` (``data.columns.patient="MRN"``). Two headers
that mean one column, or a ``columns`` entry naming no header, are problems; a header that
names no column is kept in :attr:`ManifestRow.extra` and listed in
:attr:`SlideDataset.ignored_columns`.

``slide`` (required)
    A path, absolute or relative to ``root``, or an id resolved to ``root/<id>.<ext>``.
``label`` (required, unless ``labels_required=False``)
    A class name or a class index. Names match ignoring case (``Tumour``, ``NORMAL``) unless two
    classes differ only by case; then they match exactly. For prediction (``labels_required=False``) the column may be
    absent and an entry empty: the row is unlabelled (label ``-1``); a label outside the classes
    is still a problem.
``split``
    ``train``, ``val`` or ``test`` (case-insensitive). Given on some rows, it must be given on
    every row. Absent or empty everywhere, it is derived (see below). With
    ``derive_split=False`` (prediction) each row keeps the split it gives, empty included.
``patient``
    Slides of one patient are kept in one split: a derived split puts them on one side, and a
    given split that has a patient in two splits is a problem.
``mpp``
    The slide's real level-0 microns per pixel, overriding its metadata (for slides with none or
    a wrong one). The level to read is then chosen from it and the dataset's ``mpp``.
``level``
    The pyramid level to read this slide at, overriding the dataset's ``mpp`` and ``level``
    (an ``mpp`` column beside it then only sets the plan's mpp).
``mask``
    A ground-truth mask image (heatmap outlines), relative to ``root``.
``slide_id``
    The slide's key (see below).

Other columns are kept in :attr:`ManifestRow.extra`.

**Slide keys.** Every row has a key unique in the CSV, which names its prediction row and its
heatmap: the ``slide_id`` column where given, else the ``slide`` entry as written (relative to
``root`` when it is an absolute path under it), without a known slide extension unless another
row would then get the same key. An absolute path outside ``root`` (``/data/x/slide1.svs``) is
keyed by its file name without the extension (``slide1``) where no other row has that name, else
by its path below the longest folder common to the CSV's absolute paths outside ``root``
(``x/slide1``). Keys may contain ``/``; :func:`slide_file_name` makes a safe,
still unique, file name of one. The same file listed twice and two rows with one key are
problems.

**Derived split.** Without a ``split``, groups (a patient, or a slide where ``patient`` is
empty or absent: then slides of one patient can land on both sides, as
:attr:`SlideDataset.split_note` says) are split into ``train`` and ``val``, stratified by label:
each group is counted in the
class most of its slides have (ties: the lower class index), and of a class's ``n`` groups
``round(val_fraction * n)`` go to ``val``, at least one and at most ``n - 1`` when ``n >= 2``,
none when ``n == 1`` (and none at all with ``val_fraction=0``). Which groups, scikit-learn's
``train_test_split`` draws from a ``RandomState(seed)``: the split depends only on the CSV,
``val_fraction`` and ``seed``, so every process and every ``split=`` selection sees the same
one. No ``test`` rows are derived. :attr:`SlideDataset.derived_split` says it happened.

**Resolution, per slide.** A row's ``level`` column is read as is. Otherwise the slide's
level-0 mpp (the row's ``mpp`` column, else its metadata if plausible: within
:data:`MPP_PLAUSIBLE` um per pixel) and the dataset's ``mpp`` choose the level, as
:func:`halo.data.select_level` does. A slide with no usable mpp (none, or an implausible one
such as the 352.8 that OpenSlide derives from a 72-dpi TIFF resolution tag) is read at the
dataset's ``level``; without one it is a problem naming the file and the overrides. The
dataset's ``level`` applies only to such slides (and to every slide when the dataset's ``mpp``
is None).

At start-up every row is checked and every problem reported at once in one
:class:`ManifestError`, sorted by CSV line, each naming the line and the file: missing or
duplicate files, duplicate keys, unreadable slides, labels outside the classes, bad ``split``,
``mpp`` or ``level`` values, a patient in two splits, resolutions that cannot be decided,
slides too small for the grid; and two files of one slide (the files of one DICOM series).
With ``skip_unreadable=True`` missing and unreadable slides are skipped instead (listed in
:attr:`SlideDataset.unreadable`, recorded; the other problems stay fatal). A slide that becomes
unreadable mid-run is skipped, logged (logger ``halo.data``) and recorded once in
``<record_dir>/skipped_slides.csv`` (columns: :data:`SKIPPED_COLUMNS`); ``strict=True`` makes it fatal.

With spatial sharding, a read can fail on one rank of an image and not on the
others: the training loop should agree across the image's ranks (for example an
all-reduce of "skip" flags) before using a block.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import logging
import math
import os
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from halo.data.augment import AugmentSpec
from halo.data.region import RegionPlan, plan_region, read_block
from halo.data.slide import (
    LevelChoice, Slide, SlideError, SlideOpenError, SlideReadError, SlideResolutionError, open_cached, select_level,
)
from halo.data.tissue import TissueOptions

__all__ = [
    "ManifestError", "ManifestRow", "SlideItem", "SlideDataset", "SLIDE_EXTENSIONS", "SPLITS", "COLUMNS",
    "MPP_PLAUSIBLE", "ALIASES", "SKIPPED_COLUMNS", "derive_split", "skipped_message", "write_skipped",
    "slide_file_name", "slide_ref",
]

log = logging.getLogger("halo.data")

SLIDE_EXTENSIONS: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".dcm", ".czi",
)
"""Extensions tried, in order, when a ``slide`` entry is an id rather than a file."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The values a ``split`` entry may take."""

COLUMNS: tuple[str, ...] = ("slide", "label", "split", "patient", "mpp", "level", "mask", "slide_id")
"""The columns the manifest reads (``slide`` and ``label`` required); others go to ``extra``."""

ALIASES: dict[str, tuple[str, ...]] = {
    "slide": ("slide", "slide path", "slide file", "path", "file"),
    "label": ("label", "class", "diagnosis"),
    "split": ("split",),
    "patient": ("patient", "patient id", "case", "case id", "subject", "subject id"),
    "mpp": ("mpp",),
    "level": ("level",),
    "mask": ("mask",),
    "slide_id": ("slide id",),
}
"""The headers read as each column, compared lower-cased, stripped, ``_`` read as a space and runs
of spaces as one (so ``Patient_ID`` and `` patient id `` are ``patient id``). Deliberately short:
a header that could mean something else (``Patient name``, ``MRN``, ``Accession``, ``Image``)
is not guessed; name it with ``columns``."""

SKIPPED_COLUMNS: dict[str, str] = {
    "slide": "the slide's key (its CSV entry, or slide_id)",
    "path": "the file",
    "csv_line": "its line in the CSV (header = 1)",
    "split": "its split (train, val, test; empty: none)",
    "epoch": "the training epoch (1-based) it first failed in; 0: at the start-up check (mode=predict or "
             "data.skip_unreadable=true); empty: outside a training run",
    "rank": "the lowest rank it failed on (0 outside torch.distributed)",
    "reader": "what failed: openslide (opening or reading) or tifffile (decoding its tiles); empty: no reader "
              "(the file is missing, or a check of the file itself failed)",
    "error": "why: the error's type and message (the first failure's)",
}
"""The columns of ``skipped_slides.csv``: one row per skipped slide, the first failure's."""

MPP_PLAUSIBLE: tuple[float, float] = (0.1, 20.0)
"""Level-0 microns per pixel a scanner can plausibly have; a slide's metadata outside is not trusted."""


def slide_ref(line: int, key: str, path: str | os.PathLike[str]) -> str:
    """How every per-slide message names a slide: ``line 4, slide 'A12' (/data/A12.svs)``: its CSV
    line (header = 1), its key (:attr:`ManifestRow.slide_id`) and its resolved path."""
    return f"line {line}, slide {key!r} ({os.fspath(path)})"


_PENDING = "\x00slide\x00"
"""Stands for :func:`slide_ref` in a problem found before the row's key is known (:meth:`SlideDataset._parse`)."""


class ManifestError(ValueError):
    """Every problem found in a manifest, one per line, each naming the slide by :func:`slide_ref`
    (CSV line, key and path) or, for the CSV's own structure, the line.

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
    """One CSV row. ``line`` is its line number in the file (header = 1).

    Attributes
    ----------
    slide_id:
        The row's key, unique in the CSV (see the module docstring).
    path:
        The slide's resolved path.
    label:
        The class index; ``-1`` for an unlabelled row (only with ``labels_required=False``).
    split:
        ``train``, ``val`` or ``test``: given, or derived (:attr:`SlideDataset.derived_split`).
    patient:
        The ``patient`` entry, or None.
    mpp:
        The ``mpp`` column: the slide's level-0 microns per pixel, overriding its metadata; or None.
    level:
        The ``level`` column: the pyramid level to read the slide at; or None.
    """

    line: int
    slide_id: str
    path: str
    label: int
    split: str | None = None
    patient: str | None = None
    mpp: float | None = None
    level: int | None = None
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
        The manifest (columns: see the module docstring).
    classes:
        Class names; a label is a name in this list or an index into it.
    grid, multiple, tissue, rot90, stain_normalize:
        Passed to :func:`halo.data.plan_region`.
    mpp:
        Microns per target pixel; chooses each slide's level from its level-0 mpp (the row's
        ``mpp`` column, else its plausible metadata). None: read ``level`` on every slide.
    level:
        Pyramid level for slides without a usable mpp (or every slide when ``mpp`` is None);
        a row's ``level`` column overrides it.
    split:
        Keep only rows of this split (``train``, ``val``, ``test``; None: all rows).
    strict:
        Make a mid-run read failure fatal instead of skipping the slide.
    root:
        Directory relative slide paths are resolved against (default: the CSV's).
    record_dir:
        Where ``skipped_slides.csv`` is written (default: nowhere).
    val_fraction:
        Fraction of each class's patients put in ``val`` when the split is derived.
    seed:
        Seed of a derived split.
    validate:
        Validate the whole manifest now (default True). Without it, only problems found in
        the CSV itself (no slide opened) are raised.
    labels_required:
        Every row needs a label (training). False (prediction): the ``label`` column may be
        absent and entries empty; such rows get label ``-1``.
    read_labels:
        False (halo-plan, which plans regions, whatever their class): every row gets label ``-1``,
        whatever its label entry says; use with ``labels_required=False``.
    derive_split:
        Derive a split when the CSV gives none (training). False (prediction): every row keeps
        its own ``split`` entry, None where it is empty, and no split is required.
    columns:
        Column name -> CSV header, for headers :data:`ALIASES` does not know
        (``{"patient": "MRN"}``); a header named here that the CSV lacks is a problem.
    skip_unreadable:
        With ``validate``: a missing or unreadable slide is skipped (left out of :attr:`rows`,
        listed in :attr:`unreadable`, recorded) instead of a problem, unless every slide is.
    report:
        Log and record (``record_dir``) each skipped slide here (default). False: the caller
        reports :attr:`skipped` (as ``halo.train`` does, once across ranks).
    skipped_lines:
        CSV lines of slides the start-up check skipped (:attr:`unreadable` of a validated dataset):
        they take no place in a derived split (their split is None), which is then the split of
        the readable rows alone. Leave them out of :attr:`rows` with :meth:`exclude` as before.

    Attributes
    ----------
    all_rows:
        Every row of the CSV, with its split filled in.
    rows:
        The rows of ``split``.
    derived_split:
        True when the CSV gives no split and this dataset derived one.
    split_note:
        What the derived split is (patient- or slide-level), for the log; "" when not derived.
    columns:
        Column name -> the CSV header read as it.
    ignored_columns:
        Headers read as no column (kept in :attr:`ManifestRow.extra`).
    delimiter:
        The CSV's delimiter, detected from its header line.
    unreadable:
        CSV line -> ``(reason, reader)`` of each slide skipped by ``skip_unreadable``.
    skipped:
        Path -> record (:data:`SKIPPED_COLUMNS`) of each slide skipped so far.

    Raises
    ------
    ManifestError
        Listing every problem at once.
    ValueError
        Bad ``classes``, ``split`` or ``val_fraction``.
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
        canvas: int | None = None,
        val_fraction: float = 0.25,
        seed: int = 0,
        validate: bool = True,
        labels_required: bool = True,
        read_labels: bool = True,
        derive_split: bool = True,
        columns: dict[str, str] | None = None,
        skip_unreadable: bool = False,
        report: bool = True,
        skipped_lines: Collection[int] = (),
    ) -> None:
        self.csv_path = os.fspath(csv_path)
        self.classes = [str(c) for c in classes]
        if len(self.classes) < 1 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct names, got {list(classes)!r}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)} or None, got {split!r}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.multiple, self.mpp, self.level = int(multiple), mpp, level
        self.split, self.strict = split, bool(strict)
        self.val_fraction, self.seed = float(val_fraction), int(seed)
        self.labels_required, self.derive = bool(labels_required), bool(derive_split)
        self._skipped_lines = {int(line) for line in skipped_lines}
        self.read_labels = bool(read_labels)
        self.column_map = {str(k): str(v) for k, v in (columns or {}).items()}
        unknown = sorted(set(self.column_map) - set(COLUMNS))
        if unknown:
            raise ValueError(f"data.columns: {unknown} name no column halo reads; the columns are {list(COLUMNS)}")
        self.skip_unreadable, self.report = bool(skip_unreadable), bool(report)
        self.columns: dict[str, str] = {}
        self.ignored_columns: list[str] = []
        self.delimiter = ","
        self.unreadable: dict[int, tuple[str, str]] = {}
        self.split_note = ""
        self.root = Path(os.path.abspath(root)) if root is not None else Path(self.csv_path).resolve().parent
        self.record_dir = Path(record_dir) if record_dir is not None else None
        self._plan_kw: dict[str, Any] = {"tissue": tissue, "rot90": rot90, "stain_normalize": stain_normalize,
                                         "canvas": canvas}
        self._plans: dict[int, RegionPlan] = {}
        self.choices: dict[int, LevelChoice] = {}  # CSV line -> resolution chosen, filled by validate()
        self._lock = threading.Lock()
        self.skipped: dict[str, dict[str, Any]] = {}
        self.derived_split = False
        self.all_rows, self._parse_problems = self._parse()
        self.rows = [r for r in self.all_rows if split is None or r.split == split]
        if validate:
            self.validate()
            if self.unreadable:
                self.exclude(self.unreadable)
        elif self._parse_problems:
            raise ManifestError(self.csv_path, [p for _, p in sorted(self._parse_problems, key=lambda lp: lp[0])])

    # -- manifest -----------------------------------------------------------------
    def _parse(self) -> tuple[list[ManifestRow], list[tuple[int, str]]]:
        if not os.path.isfile(self.csv_path):
            raise ManifestError(self.csv_path, ["manifest file not found"])
        pend: list[dict[str, Any]] = []
        problems: list[tuple[int, str]] = []
        with open(self.csv_path, newline="", encoding="utf-8-sig") as fh:
            self.delimiter = _delimiter(fh.readline())
            fh.seek(0)
            reader = csv.reader(fh, delimiter=self.delimiter)
            headers = [c.strip() for c in next(reader, [])]
            self.columns, self.ignored_columns, structural = self._match_columns(headers)
            missing = [c for c in ("slide", "label") if c not in self.columns and c not in self.column_map
                       and (c == "slide" or self.labels_required)]  # a data.columns entry missing: reported
            if missing:
                hint = "; ".join(f"{c} is read from a header {_alias_list(c)}, or name yours with data.columns.{c}="
                                 f"<header>" for c in missing)
                structural.append(f"line 1: missing column(s) {missing}; found {headers} ({hint})")
            if structural:
                raise ManifestError(self.csv_path, structural)
            index = {field: headers.index(h) for field, h in self.columns.items()}
            keep = [(h, i) for i, h in enumerate(headers) if h in self.ignored_columns]
            for values in reader:
                if not any(v.strip() for v in values):
                    continue  # a blank line (as DictReader skips it)
                values = [v.strip() for v in values]
                cell = (lambda i: values[i] if i < len(values) else "")
                rec = {field: cell(i) for field, i in index.items()}
                line = reader.line_num
                entry = rec.get("slide", "")
                if not entry:
                    problems.append((line, f"line {line}: empty 'slide' entry"))
                    continue
                path = self._resolve(entry)
                where = _PENDING  # slide_ref(line, key, path) once the keys are known (below)
                label = (-1 if not self.read_labels or (not self.labels_required and not rec.get("label"))
                         else self._label(rec.get("label", "")))
                if label is None and not rec.get("label"):
                    problems.append((line, f"{where}: no label; training needs one on every row: give it, leave "
                                           f"the row out, or predict unlabelled slides with mode=predict"))
                    label = -1
                elif label is None:
                    problems.append((line, f"{where}: label {rec.get('label', '')!r} is not one of {self.classes}"
                                           f"{self._did_you_mean(rec.get('label', ''))}"))
                    label = -1
                split = rec.get("split", "").lower() or None
                if split is not None and split not in SPLITS:
                    problems.append((line, f"{where}: split {rec['split']!r} is not one of {list(SPLITS)}"))
                mpp, level = _parse_mpp(rec.get("mpp", "")), _parse_level(rec.get("level", ""))
                if isinstance(mpp, str):
                    problems.append((line, f"{where}: {mpp}"))
                    mpp = None
                if isinstance(level, str):
                    problems.append((line, f"{where}: {level}"))
                    level = None
                mask = rec.get("mask") or None
                pend.append({
                    "line": line, "entry": entry, "path": path, "label": label, "split": split,
                    "patient": rec.get("patient") or None, "mpp": mpp, "level": level,
                    "mask": os.fspath(self.root / mask) if mask else None, "explicit": rec.get("slide_id") or None,
                    "extra": {h: cell(i) for h, i in keep},
                })
        if not pend and not problems:
            problems.append((1, "line 1: no slides listed"))
        problems += self._keys(pend)
        refs = {p["line"]: slide_ref(p["line"], p["key"], p["path"]) for p in pend}
        problems = [(line, text.replace(_PENDING, refs[line]) if _PENDING in text else text) for line, text in problems]
        problems += self._splits(pend)
        rows = [ManifestRow(line=p["line"], slide_id=p["key"], path=p["path"], label=p["label"],
                            split=p["split"] if p["split"] in SPLITS else None, patient=p["patient"],
                            mpp=p["mpp"], level=p["level"], mask=p["mask"], extra=p["extra"]) for p in pend]
        return rows, problems

    def _match_columns(self, headers: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
        """``(column -> header, ignored headers, problems)``: ``columns`` first, then :data:`ALIASES`."""
        found: dict[str, str] = {}
        problems: list[str] = []
        for field, want in self.column_map.items():
            exact = [h for h in headers if h == want.strip()]
            loose = [h for h in headers if _norm(h) == _norm(want)]
            hit = exact or (loose if len(loose) == 1 else [])
            if hit:
                found[field] = hit[0]
            else:
                problems.append(f"line 1: data.columns.{field}={want!r} names no column of the CSV; found {headers}")
        claimed = set(found.values())
        for field in COLUMNS:
            if field in self.column_map:
                continue
            hits = [h for h in headers if h and h not in claimed and _norm(h) in ALIASES[field]]
            if len(hits) > 1:
                problems.append(f"line 1: columns {' and '.join(repr(h) for h in hits)} both mean {field!r}; keep one, "
                                f"or choose one with data.columns.{field}=<header>")
            elif hits:
                found[field] = hits[0]
                claimed.add(hits[0])
        ignored = [h for h in headers if h and h not in claimed]
        return found, ignored, problems

    def _keys(self, pend: list[dict[str, Any]]) -> list[tuple[int, str]]:
        """Give every pending row its key; report files listed twice and keys used twice."""
        for p in pend:
            p["real"] = os.path.realpath(p["path"])
            p["full"], p["short"] = self._entry_key(p["entry"])
        self._outside_keys([p for p in pend if Path(p["full"]).is_absolute()])
        explicit = {p["explicit"] for p in pend if p["explicit"]}
        files_per_short: dict[str, set[str]] = defaultdict(set)
        for p in pend:
            if not p["explicit"]:
                files_per_short[p["short"]].add(p["real"])
        for p in pend:
            short_ok = len(files_per_short[p["short"]]) == 1 and p["short"] not in explicit
            p["key"] = p["explicit"] or (p["short"] if short_ok else p["full"])
        problems: list[tuple[int, str]] = []
        first_file: dict[str, dict[str, Any]] = {}
        first_key: dict[str, dict[str, Any]] = {}
        for p in pend:
            where = slide_ref(p["line"], p["key"], p["path"])
            f, k = first_file.setdefault(p["real"], p), first_key.setdefault(p["key"], p)
            if f is not p:
                problems.append((p["line"], f"{where}: the same file as line {f['line']} ({f['entry']!r}); "
                                            f"list each slide once"))
            elif k is not p:
                problems.append((p["line"], f"{where}: slide key {p['key']!r} is also line {k['line']}'s "
                                            f"({k['path']}); give the rows distinct slide_id values"))
        return problems

    def _entry_key(self, entry: str) -> tuple[str, str]:
        """``(full, short)`` keys of a ``slide`` entry: as written (relative to ``root`` when it is an
        absolute path under it), and that without a known slide extension."""
        p = Path(os.path.normpath(entry))
        if p.is_absolute():
            try:
                p = p.relative_to(self.root)
            except ValueError:
                pass
        full = p.as_posix()
        short = full[: -len(p.suffix)] if p.suffix.lower() in SLIDE_EXTENSIONS and p.stem else full
        return full, short

    @staticmethod
    def _outside_keys(outside: list[dict[str, Any]]) -> None:
        """Keys of the rows given by absolute path outside ``root``: the file name without a known
        slide extension (``short``) where no other row has it, else (``full``) the path below the
        longest folder common to all of them (without the extension unless two such rows would
        then agree); see :meth:`_keys`."""
        if not outside:
            return
        common = os.path.commonpath([os.path.dirname(p["full"]) for p in outside])
        for p in outside:
            rel = Path(os.path.relpath(p["full"], common))
            p["rel"] = rel.as_posix()
            p["rel_short"] = (p["rel"][: -len(rel.suffix)] if rel.suffix.lower() in SLIDE_EXTENSIONS and rel.stem
                              else p["rel"])
            p["short"] = Path(p["rel_short"]).name
        counts: dict[str, int] = defaultdict(int)
        for p in outside:
            counts[p["rel_short"]] += 1
        for p in outside:
            p["full"] = p["rel_short"] if counts[p["rel_short"]] == 1 else p["rel"]

    def _splits(self, pend: list[dict[str, Any]]) -> list[tuple[int, str]]:
        """Fill in derived splits, or check given ones (every row has one; no patient in two)."""
        problems: list[tuple[int, str]] = []
        if not self.derive:  # prediction: the CSV's own split per row, empty allowed
            return problems
        if not any(p["split"] for p in pend):
            self.derived_split = True
            alone = sum(not p["patient"] for p in pend if p["line"] not in self._skipped_lines)
            if "patient" not in self.columns:
                self.split_note = (
                    "a slide-level stratified split, as the CSV has no patient column: slides of one patient can "
                    "land in both train and val; add a patient column (headers read as one: "
                    f"{', '.join(ALIASES['patient'])}) or name yours with data.columns.patient=<header>")
            elif alone:
                self.split_note = (f"a patient-level stratified split ({alone} slide(s) with an empty patient entry "
                                   f"are each a group of their own)")
            else:
                self.split_note = "a patient-level stratified split"
            use = [p for p in pend if p["line"] not in self._skipped_lines]  # skipped slides take no place
            groups = [f"patient {p['patient']}" if p["patient"] else f"row {p['line']}" for p in use]
            derived = derive_split([p["label"] for p in use], groups, self.val_fraction, self.seed)
            for p, s in zip(use, derived):
                p["split"] = s
            return problems
        by_patient: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for p in pend:
            if not p["split"]:
                problems.append((p["line"], f"{slide_ref(p['line'], p['key'], p['path'])}: empty split "
                                            f"while other rows have one; give it one of {list(SPLITS)}, or leave "
                                            f"the split empty on every row to have it derived"))
            elif p["patient"] and p["split"] in SPLITS:
                by_patient[p["patient"]][p["split"]].append(p["line"])
        for patient, sides in by_patient.items():
            if len(sides) > 1:
                first = min(min(v) for v in sides.values())
                where = ", ".join(f"{s} ({_lines(sides[s])})" for s in SPLITS if s in sides)
                problems.append((first, f"line {first}: patient {patient!r} is in more than one split: {where}; "
                                        f"all of a patient's slides must be in one split"))
        return problems

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
        folded = [i for i, c in enumerate(self.classes) if c.casefold() == text.casefold()]
        if len(folded) == 1:
            return folded[0]
        try:
            i = int(text)
        except ValueError:
            return None
        return i if 0 <= i < len(self.classes) else None

    def _did_you_mean(self, text: str) -> str:
        """``"; did you mean 'tumour'?"`` for a label close to a class (difflib), else ""."""
        folded = {c.casefold(): c for c in self.classes}
        close = difflib.get_close_matches(text.casefold(), list(folded), n=1, cutoff=0.6)
        return f"; did you mean {folded[close[0]]!r}?" if close else ""

    def _choose(self, r: ManifestRow, slide: Slide) -> tuple[LevelChoice, dict[str, Any]]:
        """Row ``r``'s level choice, and the ``mpp``/``level`` that make :func:`plan_region` plan it.

        Raises
        ------
        SlideResolutionError
            The resolution cannot be decided; the message names the fixes.
        """
        meta = slide.mpp
        trusted = meta if meta is not None and _plausible(meta) else None
        if r.level is not None:
            base, mpp, level, source = r.mpp or trusted, None, r.level, "the level column"
        elif r.mpp is not None:
            base, mpp, level = r.mpp, self.mpp, (self.level if self.mpp is None else None)
            source = f"the mpp column's {r.mpp:g}" + ("" if self.mpp is None else f" with mpp={self.mpp}")
        elif trusted is not None:
            base, mpp, level = trusted, self.mpp, (self.level if self.mpp is None else None)
            source = "the slide's mpp" if self.mpp is not None else "data.level"
        elif self.mpp is None or self.level is not None:
            base, mpp, level, source = None, None, self.level, "data.level"
        else:
            raise SlideResolutionError(slide.path, self._no_mpp(slide, meta))
        try:
            choice = select_level(slide, mpp=mpp, level=level, base_mpp=base)
        except SlideResolutionError as exc:
            raise SlideResolutionError(slide.path, f"{_strip_path(exc)} (from {source})") from exc
        return choice, {"mpp": mpp, "level": level, "base_mpp": base}

    def _no_mpp(self, slide: Slide, meta: float | None) -> str:
        fixes = ("add the slide's level-0 microns per pixel in an mpp column, or the level to read it at in a "
                 "level column (or set data.level for every slide without a usable mpp)")
        if meta is None:
            return f"the slide has no mpp (openslide.mpp-x), so mpp={self.mpp} cannot choose its level: {fixes}"
        lo, hi = MPP_PLAUSIBLE
        return (f"the slide's mpp {meta:.4g} um per pixel{_mpp_origin(slide)} is implausible for a microscope "
                f"(expected {lo:g} to {hi:g}) and is not trusted: {fixes}")

    def validate(self) -> None:
        """Open every slide of the whole manifest and check it against the grid and resolution.

        Raises
        ------
        ManifestError
            Listing every problem, sorted by CSV line: the CSV's own (labels, splits, keys,
            duplicates, leaking patients, ``mpp``/``level`` values), missing files, unreadable
            slides, undecidable resolution, slides smaller than ``grid * multiple``, and an
            empty ``train`` split when ``split='train'``.
        """
        problems: list[tuple[int, str]] = list(self._parse_problems)
        unreadable: list[tuple[int, str, str]] = []  # (line, problem, reader)
        series: dict[str, ManifestRow] = {}  # DICOM SeriesInstanceUID -> the first row of that slide
        rows, cols = self.grid
        for r in self.all_rows:
            where = slide_ref(r.line, r.slide_id, r.path)
            if not os.path.exists(r.path):
                unreadable.append((r.line, "file not found", ""))
                continue
            try:
                with Slide(r.path) as s:
                    uid = s.properties.get("dicom.SeriesInstanceUID") if s.format == "dicom" else None
                    if uid and uid in series:
                        first = series[uid]
                        problems.append((r.line, f"{where}: the same slide as line {first.line} ({first.path}): "
                                                 f"the files of one DICOM slide (SeriesInstanceUID {uid}); list "
                                                 f"each slide once, by any one of its files"))
                        continue
                    if uid:
                        series[uid] = r
                    ch, _ = self._choose(r, s)
                    self.choices[r.line] = ch
                    s.verify(ch.level)  # tile offsets against the file size; one tile decoded
                    wt, ht = ch.target_size
                    if ht < rows * self.multiple or wt < cols * self.multiple:
                        problems.append((r.line,
                            f"{where}: too small for the grid: {ht} x {wt} (H x W) at level "
                            f"{ch.level}, downsample {ch.downsample:g}; a grid of {rows} x {cols} (rows x cols) "
                            f"with multiple {self.multiple} needs at least {rows * self.multiple} x "
                            f"{cols * self.multiple} (H x W): read it at a finer resolution (its mpp or level "
                            f"column, data.mpp), use a smaller mesh, or leave the row out"
                        ))
            except (SlideOpenError, SlideReadError) as exc:
                unreadable.append((r.line, _reason(exc), getattr(exc, "reader", None) or ""))
            except SlideError as exc:
                problems.append((r.line, f"{where}: {_reason(exc)}"))
        refs = {r.line: slide_ref(r.line, r.slide_id, r.path) for r in self.all_rows}
        if self.skip_unreadable and len(unreadable) < len(self.all_rows):
            self.unreadable = {line: (why, reader) for line, why, reader in unreadable}
        else:
            problems += [(line, f"{refs[line]}: {why}") for line, why, _ in unreadable]
        kept = [r for r in self.rows if r.line not in self.unreadable]
        if self.split == "train" and not kept:
            problems.append((1 << 30, "no rows with split='train'"
                                      + (" (derived)" if self.derived_split else "")))
        if problems:
            problems.sort(key=lambda lp: lp[0])  # stable: by CSV line, then check order
            err = ManifestError(self.csv_path, [p for _, p in problems])
            err.unreadable = [line for line, _, _ in unreadable]  # type: ignore[attr-defined]
            raise err

    def exclude(self, unreadable: dict[int, tuple[str, str]]) -> None:
        """Leave the rows of these CSV lines (``line -> (reason, reader)``, :attr:`unreadable` of a
        validated dataset) out of :attr:`rows`, as skipped at the start-up check (epoch 0): they are
        logged and recorded here unless ``report=False``."""
        self.unreadable = dict(unreadable)
        gone = [r for r in self.rows if r.line in self.unreadable]
        self.rows = [r for r in self.rows if r.line not in self.unreadable]
        self._plans.clear()
        for r in gone:
            why, reader = self.unreadable[r.line]
            self._skip(r, why, reader, epoch=0)

    def resolution_warnings(self, tolerance: float = 0.1) -> list[str]:
        """Slides that :meth:`validate` found read at a resolution unlike the rest of the cohort.

        A slide whose training mpp differs from the cohort's median by more than ``tolerance``
        (relative), and a slide of unknown mpp (read at ``data.level`` or a ``level`` column)
        beside slides of known mpp, each give one line naming the CSV line, the file and both
        resolutions. Empty when :meth:`validate` has not run.
        """
        rows = {r.line: r for r in self.all_rows}
        known = {line: ch.mpp for line, ch in self.choices.items() if ch.mpp is not None}
        if not known:
            return []
        median = float(np.median(list(known.values())))
        out = []
        for line, ch in sorted(self.choices.items()):
            r = rows[line]
            if ch.mpp is None:
                out.append(f"{slide_ref(line, r.slide_id, r.path)} is read at level {ch.level} with no "
                           f"known mpp, beside slides at a median {median:.3g} um per pixel: add its mpp column")
            elif abs(ch.mpp - median) > tolerance * median:
                out.append(f"{slide_ref(line, r.slide_id, r.path)} is read at {ch.mpp:.3g} um per pixel "
                           f"(level {ch.level}), {max(ch.mpp, median) / min(ch.mpp, median):.2g}x apart from "
                           f"the cohort's median {median:.3g}")
        return out

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

    def verify(self, i: int) -> LevelChoice:
        """Row ``i``'s slide as :meth:`validate` checks it before its size check: the file opens, its
        level is chosen (as :meth:`plan` chooses it), the tiles of that level lie inside the file and
        one decodes; returns the choice.

        Raises
        ------
        SlideOpenError, SlideReadError
            The slide cannot be opened or read.
        SlideResolutionError
            Its level cannot be chosen.
        """
        r = self.rows[i]
        slide = open_cached(r.path)
        choice, _ = self._choose(r, slide)
        slide.verify(choice.level)
        return choice

    def plan(self, i: int) -> RegionPlan:
        """The region plan of row ``i`` at the row's own resolution (computed once, then cached).

        Raises
        ------
        SlideError
            The slide cannot be opened, read or planned (the message names the file).
        """
        with self._lock:
            cached = self._plans.get(i)
        if cached is not None:
            return cached
        r = self.rows[i]
        slide = open_cached(r.path)
        choice, kw = self._choose(r, slide)
        p = plan_region(r.path, grid=self.grid, multiple=self.multiple, **kw, **self._plan_kw)
        if p.level != choice.level or not math.isclose(p.downsample, choice.downsample, rel_tol=1e-9):
            raise SlideResolutionError(r.path, f"planned level {p.level}, downsample {p.downsample:g}, not the "
                                               f"chosen level {choice.level}, downsample {choice.downsample:g}")
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
        """Skip slide ``i`` from now on: log it once and record it in ``record_dir/skipped_slides.csv``
        (one row per slide, :data:`SKIPPED_COLUMNS`; with ``report=False`` the caller does both).

        Raises
        ------
        SlideError
            With ``strict=True``, ``exc`` is raised again (wrapped if needed).
        """
        r = self.rows[i]
        reason = _reason(exc)
        where = slide_ref(r.line, r.slide_id, r.path)
        if self.strict:
            if isinstance(exc, SlideError):
                raise exc.named(where)
            err = SlideError(r.path, reason)
            err.where, err.args = where, (f"{where}: {reason}",)
            raise err from exc
        self._skip(r, reason, getattr(exc, "reader", None) or "", epoch=None)

    def _skip(self, r: ManifestRow, reason: str, reader: str, epoch: int | None) -> None:
        """Record row ``r`` as skipped (once); log and write it unless ``report=False``."""
        rec = {"slide": r.slide_id, "path": r.path, "csv_line": r.line, "split": r.split or "",
               "epoch": "" if epoch is None else epoch, "rank": _rank(), "reader": reader, "error": reason}
        with self._lock:
            if r.path in self.skipped:
                return
            self.skipped[r.path] = rec
        if not self.report:
            return
        log.warning("%s", skipped_message(rec, self.csv_path))
        if self.record_dir is not None:
            write_skipped(self.record_dir, [rec])

    def __repr__(self) -> str:
        return (f"SlideDataset({self.csv_path!r}, {len(self)} slides, classes={self.classes}, "
                f"grid={self.grid}, split={self.split!r})")


def skipped_message(rec: dict[str, Any], csv_path: str | os.PathLike[str] | None = None) -> str:
    """How a skipped slide (a :data:`SKIPPED_COLUMNS` record) is logged: its CSV line, key and
    path, the reader that failed, and why."""
    where = slide_ref(int(rec["csv_line"]), str(rec["slide"]), str(rec["path"]))
    of = f" of {os.fspath(csv_path)}" if csv_path is not None else ""
    by = f", {rec['reader']} failed" if rec.get("reader") else ""
    when = f" (epoch {rec['epoch']})" if rec.get("epoch") not in ("", None, 0) else ""
    return f"{where}{of}: skipped{when}{by}: {rec['error']}"


def write_skipped(record_dir: str | os.PathLike[str], records: list[dict[str, Any]]) -> None:
    """Append ``records`` (:data:`SKIPPED_COLUMNS`) to ``record_dir/skipped_slides.csv``, less those already
    in it (the same ``path`` and ``epoch``: a resumed run's start-up check finds the same slides again)."""
    out = Path(record_dir) / "skipped_slides.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()

    def key(rec: dict[str, Any]) -> tuple[str, str]:
        return tuple("" if rec.get(k) is None else str(rec.get(k)) for k in ("path", "epoch"))  # as the CSV holds it

    seen: set[tuple[str, str]] = set()
    if not new:
        with open(out, newline="") as fh:
            seen = {key(r) for r in csv.DictReader(fh)}
    fresh = []
    for rec in records:
        if key(rec) not in seen:
            seen.add(key(rec))
            fresh.append(rec)
    if not new and not fresh:
        return
    with open(out, "a", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(SKIPPED_COLUMNS))
        if new:
            wr.writeheader()
        wr.writerows(fresh)


def _rank() -> int:
    """This process's torch.distributed rank (0 outside a process group)."""
    try:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    except ImportError:
        return 0


def derive_split(labels: Sequence[int], groups: Sequence[str], val_fraction: float, seed: int) -> list[str]:
    """``train``/``val`` for each row: groups kept whole, stratified by label (rules: module docstring).

    Parameters
    ----------
    labels:
        Label index of each row.
    groups:
        Group (patient) of each row; rows of one group land on one side.
    val_fraction:
        Fraction of each class's groups in ``val``.
    seed:
        Seed of the draw.

    Returns
    -------
    list of str
        One split per row; a pure function of its arguments.
    """
    from sklearn.model_selection import train_test_split

    members: dict[str, list[int]] = {}
    for g, lab in zip(groups, labels):
        members.setdefault(g, []).append(int(lab))
    group_class = {g: min(Counter(labs).items(), key=lambda kv: (-kv[1], kv[0]))[0] for g, labs in members.items()}
    rs = np.random.RandomState(int(seed))
    val: set[str] = set()
    for c in sorted(set(group_class.values())):
        gs = [g for g in members if group_class[g] == c]  # first-appearance order
        n = len(gs)
        k = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, int(math.floor(val_fraction * n + 0.5))))
        if k:
            val.update(train_test_split(gs, test_size=k, random_state=rs)[1])
    return ["val" if g in val else "train" for g in groups]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slide_file_name(slide_id: str) -> str:
    """A file name (without extension) for a slide key, distinct for distinct keys.

    A key that is already a plain name (letters, digits, ``._-``) is kept; any other gets its
    other characters (``/`` included) replaced by ``_`` and 8 hex digits of its SHA-1 appended,
    e.g. ``siteA/slide_001`` -> ``siteA_slide_001-<hash>``.
    """
    name = _UNSAFE.sub("_", slide_id).strip("._")[:120] or "slide"
    if name == slide_id:
        return name
    return f"{name}-{hashlib.sha1(slide_id.encode('utf-8')).hexdigest()[:8]}"


def _plausible(mpp: float) -> bool:
    return MPP_PLAUSIBLE[0] <= mpp <= MPP_PLAUSIBLE[1]


def _mpp_origin(slide: Slide) -> str:
    """Where OpenSlide's mpp came from, when it was derived from a TIFF resolution tag."""
    props = slide.properties
    res, unit = props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit")
    if res is None or "aperio.MPP" in props:
        return ""
    try:
        per_inch = float(res) * {"centimeter": 2.54, "inch": 1.0}[str(unit).lower()]
    except (KeyError, ValueError):
        return f" (from tiff.XResolution {res})"
    return (f" (OpenSlide's {props.get('openslide.vendor', '?')} reader derives it from tiff.XResolution "
            f"{float(res):.4g} per {unit}: {per_inch:.4g} dpi, a print resolution, not a scanner's)")


def _parse_mpp(text: str) -> float | None | str:
    """The ``mpp`` column: a float, None when empty, or a problem message."""
    if not text:
        return None
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    lo, hi = MPP_PLAUSIBLE
    if not math.isfinite(v) or not lo <= v <= hi:
        return f"mpp column {text!r} is not a plausible level-0 microns per pixel (expected {lo:g} to {hi:g})"
    return v


def _parse_level(text: str) -> int | None | str:
    """The ``level`` column: an int >= 0, None when empty, or a problem message."""
    if not text:
        return None
    try:
        v = int(text)
    except ValueError:
        v = -1
    return v if v >= 0 else f"level column {text!r} is not a pyramid level (an integer >= 0)"


def _lines(lines: list[int]) -> str:
    return ("line " if len(lines) == 1 else "lines ") + ", ".join(str(n) for n in sorted(lines))


def _strip_path(exc: SlideError) -> str:
    msg = str(exc)
    return msg[len(exc.path) + 2:] if msg.startswith(f"{exc.path}: ") else msg


def _reason(exc: BaseException) -> str:
    """The message of a slide error without its leading path (the caller names it)."""
    msg = str(exc)
    where = getattr(exc, "where", None)
    if where and msg.startswith(f"{where}: "):  # named already (SlideError.named): "<type>: ..." follows
        return msg[len(where) + 2:]
    path = getattr(exc, "path", None)
    if path and msg.startswith(f"{path}: "):
        msg = msg[len(path) + 2:]
    return f"{type(exc).__name__}: {msg}"


def _norm(header: str) -> str:
    """A header as :data:`ALIASES` compares it: lower-cased, ``_`` as space, spaces collapsed."""
    return " ".join(header.strip().lower().replace("_", " ").split())


def _alias_list(field: str) -> str:
    return "(" + ", ".join(repr(a) for a in ALIASES[field]) + ", in any case)"


def _delimiter(header_line: str) -> str:
    """The delimiter of a CSV from its header line: ``,``, ``;``, tab or ``|`` (csv.Sniffer); ``,``
    when it cannot tell (a one-column header)."""
    try:
        return csv.Sniffer().sniff(header_line, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","
