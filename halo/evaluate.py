"""Slide-level metrics, prediction files and heatmaps over the slide.

Metrics come from scikit-learn: ROC AUC (one-vs-rest for more than two classes), balanced
accuracy, F1 (binary for two classes, macro otherwise), the confusion matrix and the log loss. Heatmaps
are matplotlib PNGs: the slide region's thumbnail, the head's map (attention weights or
class activation) over it, and the ground-truth outline where the data has a mask.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["slide_metrics", "write_predictions", "region_thumbnail", "save_heatmap"]


def slide_metrics(labels: Sequence[int], probs: np.ndarray, num_classes: int,
                  classes: Sequence[str] | None = None) -> dict[str, float]:
    """AUC, balanced accuracy, F1, the confusion matrix and the log loss of slide predictions.

    ``probs`` is ``(n_slides, num_classes)``. AUC is NaN (with a warning) when the labels
    hold a single class; with more than two classes it is the one-vs-rest mean over the classes
    the labels hold (a warning names the absent ones, by ``classes`` where given). ``loss`` is the
    mean cross-entropy of the probabilities (``sklearn.metrics.log_loss``), which ranks epochs of
    equal AUC (:func:`halo.train.train`).
    """
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, log_loss, roc_auc_score

    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    pred = p.argmax(1)
    out: dict[str, float] = {"n": len(y)}  # a count: written 10, not 10.0
    if len(np.unique(y)) < 2:
        warnings.warn("validation labels hold a single class: AUC is undefined", RuntimeWarning, stacklevel=2)
        out["auc"] = math.nan
    elif num_classes == 2:
        out["auc"] = float(roc_auc_score(y, p[:, 1]))
    else:
        present = [int(c) for c in np.unique(y)]
        absent = [c for c in range(num_classes) if c not in present]
        if absent:
            names = [str(classes[c]) if classes is not None else str(c) for c in absent]
            warnings.warn(f"validation holds no slide of class {', '.join(names)}: AUC is the one-vs-rest mean over "
                          f"the {len(present)} classes it holds", RuntimeWarning, stacklevel=2)
        out["auc"] = float(np.mean([roc_auc_score(y == c, p[:, c]) for c in present]))
    out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred)) if len(y) else math.nan
    # cross-entropy of the predicted probabilities: breaks ties between epochs of equal AUC
    total = p.sum(1, keepdims=True)  # float32 softmax rows: sum to 1 within rounding only
    out["loss"] = (float(log_loss(y, p / np.where(total > 0, total, 1), labels=list(range(num_classes))))
                   if len(y) else math.nan)
    average = "binary" if num_classes == 2 else "macro"
    out["f1"] = float(f1_score(y, pred, average=average, labels=list(range(num_classes)), zero_division=0))
    out["confusion"] = confusion_matrix(y, pred, labels=list(range(num_classes))).tolist()  # type: ignore[assignment]
    return out


def write_predictions(path: str | os.PathLike[str], rows: list[dict], classes: Sequence[str]) -> None:
    """One row per slide: id, split, true label, predicted label, a probability per class."""
    with open(path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["slide", "split", "label", "prediction", *[f"prob_{c}" for c in classes]])
        for r in sorted(rows, key=lambda r: r["slide"]):
            label = classes[r["label"]] if r["label"] is not None and r["label"] >= 0 else ""
            wr.writerow([r["slide"], r.get("split") or "", label, classes[int(np.argmax(r["probs"]))],
                         *[f"{p:.6f}" for p in r["probs"]]])


def region_thumbnail(plan, max_side: int = 512) -> np.ndarray:
    """RGB thumbnail ``(h, w, 3)`` of a plan's padded region, background outside the slide."""
    import openslide

    (x0, y0), (bw, bh) = plan.padded_box_level0
    with openslide.OpenSlide(plan.path) as slide:
        level = slide.get_best_level_for_downsample(max(bw, bh) / max_side)
        ds = slide.level_downsamples[level]
        size = (max(1, int(round(bw / ds))), max(1, int(round(bh / ds))))
        rgba = np.asarray(slide.read_region((int(round(x0)), int(round(y0))), level, size))
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + plan.background * (1.0 - alpha)
    return rgb.astype(np.uint8)


def _mask_in_region(plan, mask_path: str, shape: tuple[int, int]) -> np.ndarray | None:
    from skimage.io import imread
    from skimage.transform import resize

    if not mask_path or not os.path.isfile(mask_path):
        return None
    mask = np.asarray(imread(mask_path)) > 0
    if mask.ndim == 3:
        mask = mask.any(-1)
    sw, sh = plan.slide_dimensions
    (x0, y0), (bw, bh) = plan.padded_box_level0
    fy, fx = mask.shape[0] / sh, mask.shape[1] / sw
    out = np.zeros((int(round(bh * fy)) or 1, int(round(bw * fx)) or 1), dtype=bool)
    ox, oy = int(round(x0 * fx)), int(round(y0 * fy))
    ys, xs = slice(max(oy, 0), min(oy + out.shape[0], mask.shape[0])), slice(max(ox, 0), min(ox + out.shape[1], mask.shape[1]))
    out[ys.start - oy : ys.stop - oy, xs.start - ox : xs.stop - ox] = mask[ys, xs]
    return resize(out.astype(float), shape, order=0) > 0.5


def save_heatmap(
    path: str | os.PathLike[str],
    plan,
    score_map: np.ndarray,
    *,
    title: str = "",
    mask_path: str | None = None,
    label: str = "score",
) -> None:
    """Write the region thumbnail with ``score_map`` (any resolution) over it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thumb = region_thumbnail(plan)
    h, w = thumb.shape[:2]
    fig, ax = plt.subplots(figsize=(6, 6 * h / max(w, 1) + 0.6), dpi=100)
    ax.imshow(thumb)
    im = ax.imshow(np.asarray(score_map, dtype=float), cmap="inferno", alpha=0.5, extent=(0, w, h, 0),
                   interpolation="nearest")
    mask = _mask_in_region(plan, mask_path, (h, w)) if mask_path else None
    if mask is not None and mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors="cyan", linewidths=1.2)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
