"""Patch-based attention MIL on tissue patches: the baseline of ``bench_study.py`` (a benchmark, not a product mode).

What Campanella- and ABMIL-style pipelines do, end to end on one process:

* tissue is found with halo's own detection (``halo.data.plan_region``: the thumbnail mask of
  ``halo.data.tissue_mask`` with the default :class:`halo.data.TissueOptions`);
* each training epoch draws a fixed budget of patches per slide (``patches`` of ``patch`` x ``patch``
  pixels at full resolution, ``mpp``), centred on tissue pixels of the thumbnail chosen at random
  afresh every epoch, each flipped and turned at random;
* a CNN encoder (halo's ``halo_tiny_<width>`` backbone: the same network halo-train trains, its
  ``features`` stages) embeds each patch (global mean of its feature map), and a gated attention head
  (Ilse et al. 2018: ``a_i = w^T (tanh(V h_i) * sigmoid(U h_i))``, softmax over the bag) pools the bag
  into slide logits; encoder and head train together, one slide (bag) per optimizer step, with
  halo-train's optimizer and schedule (AdamW, one-cycle, inverse-frequency class weights);
* validation predicts each slide from every tissue patch of a grid over it (at least half tissue on the
  thumbnail), and the AUC is sklearn's ``roc_auc_score``.

The encoder is saved (after the best validation epoch and after the last) as a state dict of the
``halo_tiny_<width>`` backbone's trunk keys (``features.*``), which ``halo-train
model.name=halo_tiny_<width> model.weights=encoder_last.pt`` loads (``halo.models.load_backbone_weights``):
``bench_study.py`` then trains only a head over the whole-slide feature map with ``train.trunk=frozen``.

Command line (``bench_study.py`` runs it in a fresh process so its peak RSS is its own)::

    python benchmarks/study_baselines.py --csv cohort/labels.csv --out runs/mil_s0 --seed 0 --epochs 8

It writes ``result.json`` (AUCs, seconds per slide per epoch), ``metrics.csv``, ``predictions.csv``,
``encoder.pt`` (the best validation epoch's encoder) and ``encoder_last.pt`` (the last epoch's) to
``--out``, and prints ``epoch N: K slides in T s ...`` per epoch, as halo-train does.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedAttentionMIL", "PatchMIL", "SlideRow", "read_cohort", "TissuePatches", "train_mil", "main"]

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # what halo-train normalises blocks with
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling of a bag of instance embeddings (Ilse et al. 2018), then a linear classifier.

    ``h`` ``(n, C)`` -> logits ``(1, num_classes)``; :attr:`last_weights` keeps the attention ``(n,)``.
    """

    def __init__(self, channels: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.attention_v = nn.Linear(channels, hidden)
        self.attention_u = nn.Linear(channels, hidden)
        self.attention_w = nn.Linear(hidden, 1, bias=False)
        self.fc = nn.Linear(channels, num_classes)
        self.last_weights: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h)))  # (n, 1)
        w = torch.softmax(a, dim=0)
        self.last_weights = w.detach()[:, 0]
        return self.fc((w * h).sum(0, keepdim=True))


class PatchMIL(nn.Module):
    """halo's ``halo_tiny_<width>`` trunk as a patch encoder, and a gated attention MIL head."""

    def __init__(self, width: int = 16, num_classes: int = 2, hidden: int = 128) -> None:
        super().__init__()
        from halo.models import tiny_backbone

        self.backbone = tiny_backbone(width=width)  # .features is the trunk halo-train builds from it
        self.head = GatedAttentionMIL(4 * width, num_classes, hidden)

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """``(n, 3, P, P)`` normalised patches -> ``(n, C)`` embeddings."""
        return self.backbone.features(patches).mean((2, 3))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(patches))

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The trunk keys of the backbone's state dict (``features.*``), as ``model.weights`` loads them."""
        return {k: v.detach().clone() for k, v in self.backbone.state_dict().items() if k.startswith("features.")}


@dataclass(frozen=True)
class SlideRow:
    """One slide of the cohort CSV: path, class index, split."""

    key: str
    path: str
    label: int
    split: str


def read_cohort(csv_path: str | os.PathLike[str], classes: list[str]) -> list[SlideRow]:
    """The rows of a ``halo-synth`` ``labels.csv`` (``slide``, ``label``, ``split``); paths relative to it."""
    root = Path(csv_path).resolve().parent
    rows = []
    with open(csv_path, newline="") as fh:
        for r in csv.DictReader(fh):
            label = r["label"]
            index = classes.index(label) if label in classes else int(label)
            rows.append(SlideRow(Path(r["slide"]).stem, str(root / r["slide"]), index, r.get("split") or "train"))
    return rows


class TissuePatches:
    """Patches of one slide at ``mpp``, on tissue found by halo's thumbnail detection.

    Frames: patch corners ``(x, y)`` in target pixels (the stored level ``plan.level``, read as is);
    the thumbnail mask in thumbnail pixels, ``plan.thumb_downsample`` level-0 pixels each.
    """

    def __init__(self, path: str, mpp: float, patch: int, min_tissue: float = 0.5) -> None:
        from halo.data import open_slide, plan_region

        self.plan = plan = plan_region(path, grid=(1, 1), multiple=1, mpp=mpp)
        if not plan.exact:
            raise ValueError(f"{path}: no pyramid level at {mpp} um per pixel (the MIL baseline reads a stored "
                             f"level as is; levels are at {plan.level_downsample:g}x)")
        self.slide = open_slide(path)
        self.patch, self.level = int(patch), plan.level
        self.width, self.height = plan.target_size
        fx, fy = plan.target_factors
        sx, sy = plan.thumb_downsample
        self.kx, self.ky = fx / sx, fy / sy  # thumbnail pixels per target pixel
        mask = plan.thumb_mask if plan.thumb_mask is not None and plan.thumb_mask.any() else None
        self.mask = mask if mask is not None else np.ones((max(1, int(self.height * self.ky)),
                                                           max(1, int(self.width * self.kx))), bool)
        self.tissue_yx = np.argwhere(self.mask)
        self.grid = self._grid(min_tissue)

    def _fraction(self, x: int, y: int) -> float:
        """Tissue fraction of the thumbnail under the patch at ``(x, y)``."""
        p = self.patch
        y0, y1 = int(y * self.ky), max(int(y * self.ky) + 1, int(math.ceil((y + p) * self.ky)))
        x0, x1 = int(x * self.kx), max(int(x * self.kx) + 1, int(math.ceil((x + p) * self.kx)))
        cut = self.mask[y0:y1, x0:x1]
        return float(cut.mean()) if cut.size else 0.0

    def _grid(self, min_tissue: float) -> list[tuple[int, int]]:
        """Corners of the non-overlapping patches of a grid over the slide with enough tissue."""
        p = self.patch
        cells = [(x, y) for y in range(0, self.height - p + 1, p) for x in range(0, self.width - p + 1, p)]
        scored = [(self._fraction(x, y), (x, y)) for x, y in cells]
        keep = [c for f, c in scored if f >= min_tissue]
        if not keep:  # a slide with little tissue: its best cells
            keep = [c for _, c in sorted(scored, reverse=True)[: max(1, len(scored) // 10)]]
        return keep

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
        """``n`` corners of patches centred on random tissue pixels of the thumbnail (jittered within them)."""
        p = self.patch
        picks = self.tissue_yx[rng.integers(0, len(self.tissue_yx), n)]
        cy = (picks[:, 0] + rng.random(n)) / self.ky
        cx = (picks[:, 1] + rng.random(n)) / self.kx
        xs = np.clip(np.rint(cx - p / 2), 0, max(0, self.width - p)).astype(int)
        ys = np.clip(np.rint(cy - p / 2), 0, max(0, self.height - p)).astype(int)
        return list(zip(xs.tolist(), ys.tolist()))

    def read(self, corners: list[tuple[int, int]], rng: np.random.Generator | None = None) -> torch.Tensor:
        """The patches at ``corners``, normalised as halo-train normalises blocks: ``(n, 3, P, P)``.

        With ``rng``, each patch is flipped left-right with probability 1/2 and turned 0-3 quarter turns.
        """
        out = []
        for x, y in corners:
            a = self.slide.read_level(self.level, (x, y), (self.patch, self.patch))
            if rng is not None:
                if rng.random() < 0.5:
                    a = a[:, ::-1]
                a = np.rot90(a, int(rng.integers(4)))
            out.append(np.ascontiguousarray(a))
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div_(255)
        return (x - MEAN) / STD

    def close(self) -> None:
        self.slide.close()


@torch.no_grad()
def predict(model: PatchMIL, patches: TissuePatches, chunk: int = 64) -> np.ndarray:
    """Class probabilities of one slide from every grid patch on its tissue."""
    model.eval()
    h = torch.cat([model.embed(patches.read(patches.grid[i:i + chunk]))
                   for i in range(0, len(patches.grid), chunk)])
    return torch.softmax(model.head(h)[0], 0).numpy()


def calibrate(width: int, side: int = 256, repeats: int = 3) -> dict[str, float]:
    """CPU seconds of one training step (forward + backward) and of one forward of the ``halo_tiny_<width>``
    trunk on a ``side`` x ``side`` image, on one thread (the best of ``repeats``; thread CPU time, so a
    loaded machine slows it little): ``bench_study`` scales its time estimate with them."""
    from halo.models import tiny_backbone

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        trunk = tiny_backbone(width=width).features
        x = torch.randn(1, 3, side, side)
        trunk(x).mean().backward()  # warm-up
        step, forward = math.inf, math.inf
        for _ in range(repeats):
            t0 = time.thread_time()
            trunk(x).mean().backward()
            step = min(step, time.thread_time() - t0)
            with torch.no_grad():
                t0 = time.thread_time()
                trunk(x)
                forward = min(forward, time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return {"pixels": float(side * side), "step_cpu_s": step, "forward_cpu_s": forward}


def _auc(labels: list[int], probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(set(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, probs[:, 1]))


def train_mil(csv_path: str, out: str | os.PathLike[str], *, classes: list[str], seed: int = 0, epochs: int = 8,
              width: int = 16, mpp: float = 0.5, patches: int = 16, patch: int = 128, lr: float = 2e-3,
              weight_decay: float = 1e-4, warmup_fraction: float = 0.1, threads: int | None = None) -> dict:
    """Train the patch MIL model on the ``train`` rows, validate on ``val`` every epoch; returns the result."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_cohort(csv_path, classes)
    train_rows = [r for r in rows if r.split == "train"]
    val_rows = [r for r in rows if r.split == "val"]
    if not train_rows:
        raise ValueError(f"{csv_path}: no train rows")
    started = time.perf_counter()
    slides = {r.key: TissuePatches(r.path, mpp, patch) for r in train_rows + val_rows}
    setup_s = time.perf_counter() - started
    torch.manual_seed(seed)
    model = PatchMIL(width, len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * len(train_rows)),
                                                pct_start=warmup_fraction)
    counts = np.bincount([r.label for r in train_rows], minlength=len(classes)).astype(np.float64)
    weights = torch.as_tensor(np.where(counts > 0, counts.sum() / (len(classes) * np.maximum(counts, 1)), 0.0),
                              dtype=torch.float32)
    history, best, train_seconds = [], {"auc": -math.inf, "epoch": 0, "probs": None}, []
    for epoch in range(epochs):
        model.train()
        rng = np.random.default_rng([seed, epoch])
        t0 = time.perf_counter()
        total = 0.0
        for i in rng.permutation(len(train_rows)):
            row = train_rows[int(i)]
            src = slides[row.key]
            x = src.read(src.sample(rng, patches), rng)
            loss = F.cross_entropy(model(x), torch.tensor([row.label]), weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        trained = time.perf_counter() - t0
        train_seconds.append(trained)
        probs = np.stack([predict(model, slides[r.key]) for r in val_rows]) if val_rows else np.zeros((0, 2))
        auc = _auc([r.label for r in val_rows], probs)
        history.append({"epoch": epoch + 1, "train_loss": total / len(train_rows), "val_auc": auc,
                        "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 2)})
        if not math.isnan(auc) and auc > best["auc"] or best["probs"] is None:
            best = {"auc": auc, "epoch": epoch + 1, "probs": probs}
            torch.save(model.encoder_state(), out / "encoder.pt")
        print(f"epoch {epoch + 1}: {len(train_rows)} slides in {trained:.1f} s "
              f"({len(train_rows) / max(trained, 1e-9):.2f} slides/s), train loss {history[-1]['train_loss']:.4f}, "
              f"val auc {auc:.3f}", flush=True)
    torch.save(model.encoder_state(), out / "encoder_last.pt")
    with open(out / "metrics.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(history[0]))
        wr.writeheader()
        wr.writerows(history)
    with open(out / "predictions.csv", "w", newline="") as fh:  # the best epoch's, as halo-train's best.pt
        wr = csv.writer(fh)
        wr.writerow(["slide", "split", "label", "prediction", *[f"prob_{c}" for c in classes]])
        for r, p in zip(val_rows, best["probs"]):
            wr.writerow([r.key, r.split, classes[r.label], classes[int(np.argmax(p))], *[f"{v:.6f}" for v in p]])
    for s in slides.values():
        s.close()
    result = {
        "val_auc": None if math.isnan(best["auc"]) else best["auc"], "best_epoch": best["epoch"],
        "last_auc": None if math.isnan(history[-1]["val_auc"]) else history[-1]["val_auc"],
        "train_slides": len(train_rows), "val_slides": len(val_rows), "epochs": epochs,
        "train_seconds": train_seconds, "setup_seconds": setup_s,
        "patches_per_slide": patches, "patch": patch, "mpp": mpp,
        "val_patches_per_slide": float(np.mean([len(slides[r.key].grid) for r in val_rows])) if val_rows else 0.0,
        "encoder": str(out / "encoder.pt"), "encoder_last": str(out / "encoder_last.pt"),
        "calibration": calibrate(width),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    """Command line: train the patch MIL baseline on a cohort CSV."""
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--csv", required=True, help="cohort CSV (slide, label, split), e.g. halo-synth's labels.csv")
    ap.add_argument("--out", required=True, help="directory for result.json, metrics.csv, predictions.csv, encoder.pt")
    ap.add_argument("--classes", nargs="+", default=["normal", "tumour"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=int, default=16, help="halo_tiny width of the encoder")
    ap.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of the patches (a stored level)")
    ap.add_argument("--patches", type=int, default=16, help="patches per slide per training step")
    ap.add_argument("--patch", type=int, default=128, help="patch side, pixels")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    return train_mil(a.csv, a.out, classes=a.classes, seed=a.seed, epochs=a.epochs, width=a.width, mpp=a.mpp,
                     patches=a.patches, patch=a.patch, lr=a.lr, threads=a.threads)


if __name__ == "__main__":
    main()
