"""The training engine behind ``halo-train``: data split over image groups, DDP, checkpoints.

Vocabulary: an *image group* is the ``rows x cols`` ranks that share one slide (the mesh's
``data`` index names it); every rank of a group reads its own block of the same slide.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

import halo
from halo.checkpoint import check_signature, load_checkpoint, save_atomic, signature
from halo.checkpoint import FORMAT as CKPT_FORMAT
from halo.config import augment_options, tissue_options
from halo.data import ManifestError, Prefetcher, SlideDataset
from halo.data.dataset import slide_file_name
from halo.errors import InputError
from halo.evaluate import save_heatmap, slide_metrics, write_predictions
from halo.models import build_classifier, total_stride

__all__ = ["Engine", "group_steps", "slide_record", "SLIDE_RECORD"]

log = logging.getLogger("halo.train")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_RUN_FILES = ("metrics.csv", "summary.json", "predictions.csv", "test_predictions.csv", "slides.csv",
              "skipped_slides.csv")
"""What a training run writes beside ``checkpoints/`` and ``heatmaps/`` (removed by ``train.overwrite``)."""


def _folder_name(value: str) -> str:
    """A run id usable as a folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in value) or "run"


def _overrides() -> list[str]:
    """The command line's overrides (Hydra's ``overrides.yaml``), or [] outside ``@hydra.main``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _rng_state() -> dict[str, Any]:
    """Every random generator this process draws from: torch (CPU and CUDA), numpy, Python."""
    import random

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any] | torch.Tensor) -> None:
    """Restore :func:`_rng_state` (or a bare torch state, from checkpoints before it existed)."""
    import random

    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


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
    "split": "train, val or test",
    "label": "its class",
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


class Engine:
    """One training or prediction run on this rank. See :func:`halo.train.run`."""

    def __init__(self, cfg: DictConfig, env, run_dir: Path) -> None:
        self.cfg, self.env = cfg, env
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        self.run_dir = Path(_broadcast(str(Path(run_dir).resolve())))
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        if cfg.train.threads:
            torch.set_num_threads(int(cfg.train.threads))
        elif self.device.type == "cpu":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or min(dist.get_world_size(), os.cpu_count() or 1)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        self.mesh = halo.SpatialMesh(int(cfg.mesh.rows), int(cfg.mesh.cols))
        self.group = self.mesh.coords[0]
        self.classes = list(cfg.data.classes)
        self._records: dict[str, dict[str, Any]] = {}  # slide key -> what this rank read (slides.csv)
        self._augment = augment_options(cfg.data)
        self.run_dir = self._claim(self.run_dir)
        torch.manual_seed(int(cfg.train.seed))  # the same initial weights on every rank
        self.model = build_classifier(
            cfg.model.name, int(cfg.model.num_classes), head=cfg.head.name,
            head_options=OmegaConf.to_container(cfg.head.options, resolve=True), weights=cfg.model.weights,
            checkpointing=bool(cfg.train.checkpointing),
        )
        if len(self.classes) != int(cfg.model.num_classes):
            raise ValueError(f"data.classes has {len(self.classes)} names but model.num_classes={cfg.model.num_classes}")
        self.signature = signature(self.model, name=cfg.model.name, head=cfg.head.name, num_classes=len(self.classes))
        self.multiple = total_stride(self.model.trunk)
        self.model = halo.parallelize(self.model, self.mesh).to(self.device)
        halo.manual_seed(int(cfg.train.seed), self.mesh)  # dropout: same draws within an image group

    # -- the run directory ------------------------------------------------------------
    def _claim(self, run_dir: Path) -> Path:
        """The directory this run writes to, checked on rank 0 and agreed by every rank.

        ``mode=predict`` writes into ``predict/<run id>/`` of ``run_dir``, so a training run's files
        stay as they are. ``mode=train`` into a directory that holds checkpoints is refused unless
        ``train.resume=true`` (continue it) or ``train.overwrite=true`` (its results are removed).
        Hydra writes nothing itself (``hydra.output_subdir: null``): ``.hydra/config.yaml`` and
        ``.hydra/overrides.yaml`` are written here, once the directory is claimed.
        """
        from halo.train import run_id

        problem, out = None, run_dir
        if self.is_main:
            t = self.cfg.train
            old = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
            if self.cfg.mode == "predict":
                out = run_dir / "predict" / _folder_name(run_id())
                if out.exists() and any(out.iterdir()):
                    problem = f"halo-train: {out} already holds a prediction; choose another hydra.run.dir"
            elif old and not t.resume and not t.get("overwrite", False):
                problem = (f"halo-train: {run_dir} already holds a training run (checkpoints/{', '.join(old)}): "
                           f"pass train.resume=true to continue it, train.overwrite=true to replace it, or "
                           f"another hydra.run.dir")
            elif old and not t.resume:
                for name in ("checkpoints", "heatmaps", "predict"):
                    shutil.rmtree(run_dir / name, ignore_errors=True)
                for name in _RUN_FILES:
                    (run_dir / name).unlink(missing_ok=True)
                log.warning("train.overwrite=true: removed the earlier run's results in %s", run_dir)
        problem, out = _broadcast((problem, str(out)))
        if problem:
            raise InputError(problem)
        out = Path(out)
        if self.is_main:
            (out / ".hydra").mkdir(parents=True, exist_ok=True)
            (out / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            (out / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(_overrides()))
        return out

    # -- data -------------------------------------------------------------------------
    def _csv(self) -> str:
        data = self.cfg.data
        if data.kind == "synthetic":
            csv = Path(data.csv)
            if self.is_main and not csv.is_file():
                from halo.data.synth import make_cohort

                log.info("generating the synthetic cohort in %s (cached for later runs)", data.root)
                make_cohort(data.root, slides=int(data.slides), seed=int(data.seed))
            dist.barrier()
            return str(csv)
        return str(data.csv)

    def _dataset(self, split: str | None, validate: bool) -> SlideDataset:
        data = self.cfg.data
        kwargs = dict(
            classes=self.classes, grid=(self.mesh.rows, self.mesh.cols), multiple=self.multiple, mpp=data.mpp,
            level=data.level, split=split, strict=bool(data.strict), root=data.root, record_dir=self.run_dir,
            val_fraction=float(data.val_fraction), seed=int(data.split_seed),
            tissue=tissue_options(data), stain_normalize=bool(data.stain_normalize),
        )
        csv = self._csv()
        problem = None
        if self.is_main and validate:
            try:
                checked = SlideDataset(csv, **kwargs, validate=True)
            except (ManifestError, ValueError, FileNotFoundError) as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                mixed = checked.resolution_warnings()
                if mixed:
                    log.warning("%s: %d slide(s) at another resolution than the cohort:\n%s", csv, len(mixed),
                                "\n".join(f"  - {m}" for m in mixed))
        problem = _broadcast(problem)
        if problem:  # every rank raises it; the launcher's guard prints it once
            raise InputError(f"halo-train: nothing was trained, the manifest has problems:\n{problem}")
        return SlideDataset(csv, **kwargs, validate=False)

    def _block(self, ds: SlideDataset, index: int, augment_seed: int | None) -> torch.Tensor | None:
        spec = self._augment.draw(augment_seed) if augment_seed is not None and self.cfg.data.augment.enabled else None
        _, row, col = self.mesh.coords
        started = time.perf_counter()
        block = ds.read_block_safe(index, row, col, augment=spec)
        if block is None:
            return None
        self._note_read(ds, index, time.perf_counter() - started)
        x = torch.from_numpy(np.ascontiguousarray(block)).permute(2, 0, 1)[None].float().div_(255)
        return ((x - MEAN) / STD).to(self.device, non_blocking=True)

    def _agree(self, ok: bool) -> torch.Tensor:
        """Which image groups read their slide this step (every rank of a group must agree)."""
        flags = torch.zeros(self.mesh.data, device=self.device)
        flags[self.group] = 0.0 if ok else 1.0
        dist.all_reduce(flags)
        return flags == 0

    # -- records: slides.csv -----------------------------------------------------------
    def _note_read(self, ds: SlideDataset, index: int, seconds: float) -> None:
        """Remember what this rank read of a slide (its plan) and how long its block took."""
        row = ds.rows[index]
        rec = self._records.get(row.slide_id)
        if rec is None:
            rec = self._records[row.slide_id] = slide_record(row, ds.plan(index), self.classes)
        rec["read_seconds"] = round(seconds, 4)

    def _write_slides(self) -> None:
        """Merge every rank's records (the slowest rank's read time) into ``slides.csv``; collective."""
        merged: dict[str, dict[str, Any]] = {}
        for part in _all_gather(self._records):
            for key, rec in part.items():
                old = merged.get(key)
                if old is None or rec["read_seconds"] > old["read_seconds"]:
                    merged[key] = rec
        if self.is_main and merged:
            rows = sorted(merged.values(), key=lambda r: (r["split"] or "", r["key"]))
            with open(self.run_dir / "slides.csv", "w", newline="") as fh:
                wr = csv.DictWriter(fh, fieldnames=list(SLIDE_RECORD))
                wr.writeheader()
                wr.writerows(rows)

    # -- training ---------------------------------------------------------------------
    # -- trunk modes: frozen, freeze_stages, unfreeze_at --------------------------------
    def _frozen_at(self, epoch: int) -> int:
        """How many trunk stages are frozen in epoch ``epoch`` (0-based)."""
        t = self.cfg.train
        stages = len(self.model.trunk)
        mode = str(t.get("trunk", "train"))
        if mode not in ("train", "frozen"):
            raise InputError(f"halo-train: train.trunk must be 'train' or 'frozen', got {mode!r}")
        n = stages if mode == "frozen" else int(t.get("freeze_stages", 0))
        if not 0 <= n <= stages:
            raise InputError(f"halo-train: train.freeze_stages={n}, but {self.cfg.model.name}'s trunk has "
                             f"{stages} stages (0 to {stages})")
        at = t.get("unfreeze_at")
        if at is not None and (mode == "frozen" or n == 0 or int(at) < 1):
            raise InputError(f"halo-train: train.unfreeze_at={at} needs train.freeze_stages >= 1, "
                             f"train.trunk=train and an epoch >= 1")
        return 0 if at is not None and epoch + 1 >= int(at) else n

    def _trunk_mode(self, epoch: int, ddp: DDP | None) -> DDP:
        """Freeze or unfreeze trunk stages for this epoch; a new DDP wrapper when that changes.

        DDP reduces only the parameters that required gradients when it was built: one built
        with a stage frozen would leave that stage's gradients different on every rank once it
        trains. The optimizer holds every parameter from the start (a frozen one has no
        gradient, so it does not step), so its state and schedule carry on unchanged.
        """
        n = self._frozen_at(epoch)
        if ddp is not None and n == self.model.frozen_stages:
            return ddp
        if ddp is not None and self.is_main:
            log.info("epoch %d: trunk stages 1-%d unfrozen (train.unfreeze_at), DDP rebuilt", epoch + 1,
                     self.model.frozen_stages)
        self.model.freeze(n)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise InputError("halo-train: nothing to train: every parameter is frozen")
        return DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _param_groups(self) -> list[dict[str, Any]]:
        """The head at ``train.lr``, the trunk at ``train.lr * train.trunk_lr_scale``."""
        lr = float(self.cfg.train.lr)
        scale = float(self.cfg.train.get("trunk_lr_scale", 1.0))
        return [{"params": list(self.model.head.parameters()), "lr": lr, "name": "head"},
                {"params": list(self.model.trunk.parameters()), "lr": lr * scale, "name": "trunk"}]

    def _optimizer(self, groups: list[dict[str, Any]], steps_per_epoch: int):
        t = self.cfg.train
        if t.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=float(t.lr), weight_decay=float(t.weight_decay))
        elif t.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=float(t.lr), momentum=float(t.momentum), weight_decay=float(t.weight_decay))
        else:
            raise ValueError(f"train.optimizer must be adamw or sgd, got {t.optimizer!r}")
        total = max(1, int(t.epochs) * steps_per_epoch)
        if t.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=total,
                                                        pct_start=float(t.warmup_fraction))
        elif t.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        elif t.schedule == "constant":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        else:
            raise ValueError(f"train.schedule must be onecycle, cosine or constant, got {t.schedule!r}")
        return opt, sched

    def _autocast(self):
        enabled = bool(self.cfg.train.bf16) and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.cfg.train.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def train(self) -> dict[str, Any]:
        t = self.cfg.train
        train_ds = self._dataset("train", validate=True)
        val_ds = self._dataset("val", validate=False)
        test_ds = self._dataset("test", validate=False)
        if len(train_ds) == 0:
            raise InputError(f"halo-train: no slides with split 'train' in {train_ds.csv_path}")
        if train_ds.derived_split and self.is_main:
            log.info("%s has no split column: a patient-level stratified split (data.val_fraction=%g, "
                     "data.split_seed=%d) gives %d train and %d val slides", train_ds.csv_path,
                     float(self.cfg.data.val_fraction), int(self.cfg.data.split_seed), len(train_ds), len(val_ds))
        if len(val_ds) == 0 and self.is_main:
            log.warning("no validation slides in %s (no rows with split 'val'): no AUC is measured, and "
                        "checkpoints/best.pt is the last epoch's weights", train_ds.csv_path)
        steps_per_epoch = math.ceil(len(train_ds) / self.mesh.data)
        accumulate = max(1, int(t.accumulate))
        opt, sched = self._optimizer(self._param_groups(), math.ceil(steps_per_epoch / accumulate))
        weights = torch.as_tensor(train_ds.class_weights(), dtype=torch.float32, device=self.device) if t.class_weights else None
        state = {"epoch": 0, "best_auc": -math.inf, "best_epoch": -1, "slides_seen": 0, "history": []}
        last = self.run_dir / "checkpoints" / "last.pt"
        if t.resume and last.is_file():
            state = self._restore(last, opt, sched)
        elif t.resume:
            log.warning("train.resume=true but %s does not exist: starting from scratch", last)
        ddp = None
        for epoch in range(state["epoch"], int(t.epochs)):
            ddp = self._trunk_mode(epoch, ddp)
            started = time.time()
            loss_sum, seen = self._train_epoch(ddp, opt, sched, train_ds, epoch, steps_per_epoch, accumulate, weights)
            trained_s = time.time() - started
            state["slides_seen"] += seen
            metrics, rows = self._evaluate(val_ds, heatmaps=False)
            record = {"epoch": epoch + 1, "train_loss": loss_sum, **{f"val_{k}": v for k, v in metrics.items() if k != "confusion"},
                      "lr": sched.get_last_lr()[0], "slides_seen": state["slides_seen"], "seconds": round(time.time() - started, 2)}
            state["history"].append(record)
            if len(val_ds) == 0:  # nothing to choose by: the last epoch is the best
                improved = True
            else:
                improved = not math.isnan(metrics.get("auc", math.nan)) and metrics["auc"] > state["best_auc"]
            if improved:
                state["best_auc"], state["best_epoch"] = metrics.get("auc", math.nan), epoch + 1
            state["epoch"] = epoch + 1
            # best.pt before last.pt: a job stopped in between resumes from the previous last.pt
            # and redoes this epoch; a last.pt that names a best epoch always has its best.pt
            self._save([self.run_dir / "checkpoints" / "best.pt", last] if improved else [last], opt, sched, state)
            self._write_slides()
            if self.is_main:
                self._write_metrics(state["history"])
                self._write_predictions(rows)
                log.info("epoch %d: %d slides in %.1f s (%.2f slides/s), train loss %.4f, val auc %.3f, "
                         "balanced acc %.3f", epoch + 1, seen, trained_s, seen / max(trained_s, 1e-9), loss_sum,
                         metrics.get("auc", math.nan), metrics.get("balanced_accuracy", math.nan))
        return self._finish(state, val_ds, test_ds)

    def _train_epoch(self, ddp, opt, sched, ds, epoch, steps, accumulate, weights) -> tuple[float, int]:
        t = self.cfg.train
        rng = np.random.default_rng([int(t.seed), epoch])
        steps = group_steps([int(i) for i in rng.permutation(len(ds))], self.mesh.data, self.group)
        order = [i for i, _ in steps]
        seeds = {i: int(np.random.default_rng([int(t.seed), epoch, i]).integers(2**31)) for i in order}
        self._set_train_mode()
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        bar = None
        if self.is_main and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(order), desc=f"epoch {epoch + 1}", unit="slide", dynamic_ncols=True)
        opt.zero_grad(set_to_none=True)
        with Prefetcher(lambda i: self._block(ds, i, seeds[i]), order) as blocks:
            for step, (index, x) in enumerate(blocks):
                ok = self._agree(x is not None)
                use = bool(ok[self.group]) and steps[step][1] > 0  # padding steps repeat a slide, weight 0
                if x is None:  # keep every collective in step: a zero input with zero weight
                    x = torch.zeros(1, 3, *ds.plan(order[0]).block_shape(), device=self.device) if x is None else x
                label = torch.tensor([ds.rows[index].label], device=self.device)
                sync = (step + 1) % accumulate == 0 or step + 1 == len(order)
                ctx = ddp.no_sync() if not sync else torch.enable_grad()
                with ctx, self._autocast():
                    logits = ddp(x)
                    loss = F.cross_entropy(logits.float(), label, weight=weights)
                    ((loss if use else loss * 0) / accumulate).backward()
                if sync:
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                if use:
                    total += loss.detach()
                    count += 1
                if bar is not None:
                    bar.update(1)
                    if step % 4 == 0:
                        bar.set_postfix(loss=f"{loss.item():.3f}")
        if bar is not None:
            bar.close()
        # every group's sum counts once; every rank of a group holds the same loss
        both = torch.stack([total, count]) / self.mesh.size
        dist.all_reduce(both)
        return float(both[0] / both[1].clamp(min=1)), int(both[1].item())

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self, ds: SlideDataset, heatmaps: bool) -> tuple[dict[str, float], list[dict]]:
        """Predict every slide of ``ds``, streaming: each slide's map is gathered within its image
        group only, and the group's first rank writes its heatmap at once and keeps nothing of it;
        only the prediction rows (a few numbers per slide) are gathered over the world."""
        self.model.eval()
        mine = group_steps(list(range(len(ds))), self.mesh.data, self.group)
        first = self.mesh.coords[1:] == (0, 0)
        rows = []
        bar = None
        if self.is_main and self.cfg.train.progress and mine:
            from tqdm import tqdm

            bar = tqdm(total=len(mine), desc=f"predict {ds.split or 'all'}", unit="slide", dynamic_ncols=True)
        for index, weight in mine:
            x = self._block(ds, index, None)
            ok = self._agree(x is not None)
            if x is None:
                x = torch.zeros(1, 3, *ds.plan(mine[0][0]).block_shape(), device=self.device)
            with self._autocast():
                logits = self.model(x).float()
            head_map = getattr(self.model.head, "last_map", None)
            if heatmaps and head_map is not None:
                full = halo.gather(head_map.float(), self.mesh)  # a collective of the image group
                if first and weight > 0 and ok[self.group]:
                    self._heatmap(ds, index, full[0].cpu().numpy())
                del full
            if ok[self.group] and weight > 0 and first:
                item = ds.rows[index]
                rows.append({"slide": item.slide_id, "index": index, "split": item.split, "label": item.label,
                             "probs": torch.softmax(logits[0], 0).cpu().tolist()})
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        unique = {r["slide"]: r for part in _all_gather(rows) for r in part}
        all_rows = list(unique.values())
        metrics: dict[str, float] = {}
        if all_rows:
            metrics = slide_metrics([r["label"] for r in all_rows], np.array([r["probs"] for r in all_rows]), len(self.classes))
        return metrics, all_rows

    def _write_metrics(self, history: list[dict]) -> None:
        keys = list(dict.fromkeys(k for r in history for k in r))
        lines = [",".join(keys)] + [",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) for r in history]
        (self.run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")

    def _write_predictions(self, rows: list[dict]) -> None:
        write_predictions(self.run_dir / "predictions.csv", rows, self.classes)

    def _heatmap(self, ds: SlideDataset, index: int, m: np.ndarray) -> None:
        """Write ``heatmaps/<key>.png`` of slide ``index`` from its whole map ``(C, h, w)``."""
        item = ds.rows[index]
        score = m[-1] if m.shape[0] > 1 else m[0]  # positive class (CAM) or attention weights
        label = "attention" if m.shape[0] == 1 else f"{self.classes[-1]} score"
        save_heatmap(self.run_dir / "heatmaps" / f"{slide_file_name(item.slide_id)}.png", ds.plan(index), score,
                     mask_path=item.mask, label=label, title=f"{item.slide_id} (label {self.classes[item.label]})")

    def _finish(self, state: dict, val_ds: SlideDataset, test_ds: SlideDataset) -> dict[str, Any]:
        best = self.run_dir / "checkpoints" / "best.pt"
        if best.is_file():
            self.model.load_state_dict(load_checkpoint(best)["model_state"])
        metrics, rows = self._evaluate(val_ds, heatmaps=bool(self.cfg.train.heatmaps))
        test: tuple | None = None
        if len(test_ds):  # held-out rows: predicted once, with the best checkpoint
            test = self._evaluate(test_ds, heatmaps=bool(self.cfg.train.heatmaps))
        self._write_slides()
        summary = {
            "val_auc": state["best_auc"] if state["best_epoch"] > 0 and not math.isnan(state["best_auc"]) else None,
            "best_epoch": state["best_epoch"], "slides_seen": state["slides_seen"], "epochs": state["epoch"],
            "final": {k: v for k, v in metrics.items()}, "world_size": dist.get_world_size(),
            "mesh": [self.mesh.rows, self.mesh.cols], "run_dir": str(self.run_dir),
        }
        if test is not None:
            summary["test"] = {"slides": len(test[1]), **test[0]}
        if self.is_main:
            self._write_predictions(rows)
            if test is not None:
                write_predictions(self.run_dir / "test_predictions.csv", test[1], self.classes)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        dist.barrier()
        return summary

    # -- checkpoints ------------------------------------------------------------------
    def _save(self, paths: list[Path], opt, sched, state: dict) -> None:
        """Write one checkpoint to each of ``paths`` in order (on the main rank), then wait for all ranks."""
        rng = _all_gather(_rng_state())
        if self.is_main:
            ckpt = {
                "format": CKPT_FORMAT, "signature": self.signature, "model_state": self.model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng,
                "state": {k: v for k, v in state.items()}, "config": OmegaConf.to_container(self.cfg, resolve=True),
            }
            for path in paths:
                save_atomic(ckpt, path)
        dist.barrier()

    def _restore(self, path: Path, opt, sched) -> dict:
        ckpt = load_checkpoint(path)
        check_signature(ckpt, self.signature, path)
        self.model.load_state_dict(ckpt["model_state"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if len(ckpt["rng"]) == dist.get_world_size():
            _set_rng_state(ckpt["rng"][self.rank])
        elif self.is_main:
            log.warning("%s was written by %d ranks, this run has %d: random streams (dropout, and any "
                        "augmentation drawn from torch) are re-seeded, not continued", path, len(ckpt["rng"]),
                        dist.get_world_size())
        log.info("resumed from %s at epoch %d", path, ckpt["state"]["epoch"])
        return dict(ckpt["state"])

    def predict(self) -> dict[str, Any]:
        if not self.cfg.checkpoint:
            raise ValueError("mode=predict needs checkpoint=PATH (a best.pt or last.pt)")
        ckpt = load_checkpoint(self.cfg.checkpoint)
        check_signature(ckpt, self.signature, self.cfg.checkpoint)
        self.model.load_state_dict(ckpt["model_state"])
        ds = self._dataset(None, validate=True)
        metrics, rows = self._evaluate(ds, heatmaps=bool(self.cfg.train.heatmaps))
        self._write_slides()
        summary = {"mode": "predict", "checkpoint": str(self.cfg.checkpoint), "slides": len(rows),
                   "metrics": {k: v for k, v in metrics.items()}}
        if self.is_main:
            self._write_predictions(rows)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        dist.barrier()
        return summary
