"""The fine task's foci: visible at full resolution, gone when downsampled (halo-synth --task fine).

Before any method is compared on the fine cohort, this shows that its label signal is where the
generator puts it: in nuclear size, shape and chromatin texture at 0.5-1 um per pixel, and not in the
colour or density that survive box-downsampling to 4-8 um per pixel.

* ``benchmarks/results/fine_foci.png``: a focus and normal tissue of the same slide, the same 128 um
  square, at 0.5, 1, 2, 4 and 8 um/px (each a 2x2 box mean of the one before, as the slide's pyramid is).
* Separability per mpp: non-overlapping square patches of one physical size (64 um by default) that lie
  wholly inside a focus or wholly in normal tissue (at least one patch away from any focus) are cut from
  slides rendered by :func:`halo.data.synth.render_fine`, box-downsampled, and described by a fixed set of
  texture features (per-channel mean and std, grey-level percentiles, high-frequency and Laplacian
  energy, gradient magnitude, grey-level co-occurrence properties at distances 1 and 2, and a uniform
  LBP histogram; scikit-image). A standardised logistic regression (scikit-learn) is trained and scored
  with cross-validation grouped by slide (no slide in both training and test folds); the figure is the ROC
  AUC of the pooled out-of-fold scores, focus against normal, with equal numbers of each. The features,
  model and folds are the same at every mpp; only the resolution changes.

  Two sets of slides: *measurement* slides, whose focus is one half of the tissue (alternately left and
  right) so there are many focus patches, with the cohort's nuclei, stroma and stain unchanged; and
  *cohort* slides, positive slides exactly as ``halo-synth --task fine`` writes them (1-3 foci of
  100-300 um), with 32 um patches because the foci are small.

Usage::

    python benchmarks/plot_fine_foci.py            # writes the PNG and its RESULTS.md section
    python benchmarks/plot_fine_foci.py --quick    # small slides, prints only (< 30 s)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, parser, report  # noqa: E402

__all__ = ["MPPS", "box", "features", "patches", "measurement_slides", "cohort_slides", "separability", "main"]

MPPS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Resolutions compared (um/px); slides are rendered at the first."""

PNG = Path(__file__).resolve().parent / "results" / "fine_foci.png"


def box(img: np.ndarray, factor: int) -> np.ndarray:
    """Box-downsample by a power of two as the slide pyramid does: repeated 2x2 means, rounded to uint8."""
    out = img
    while factor > 1:
        h, w = out.shape[0] // 2, out.shape[1] // 2
        out = out[: 2 * h, : 2 * w].reshape(h, 2, w, 2, *out.shape[2:]).mean(axis=(1, 3))
        out = np.rint(out).astype(np.uint8)
        factor //= 2
    return out


def features(tile: np.ndarray) -> np.ndarray:
    """A fixed texture feature vector of one RGB ``uint8`` tile (any side >= 4)."""
    from scipy.ndimage import gaussian_filter, laplace, sobel
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

    t = tile.astype(np.float64)
    g = t.mean(-1)
    hf = g - gaussian_filter(g, 1.0, mode="reflect")
    grad = np.hypot(sobel(g, 0, mode="reflect"), sobel(g, 1, mode="reflect"))
    q = np.clip(g // 8, 0, 31).astype(np.uint8)
    dists = [1, 2] if min(g.shape) >= 6 else [1]
    glcm = graycomatrix(q, distances=dists, angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32,
                        symmetric=True, normed=True)
    props = []
    for prop in ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM"):
        v = graycoprops(glcm, prop).mean(axis=1)  # over angles, one per distance
        props += list(np.nan_to_num(v, nan=1.0)) + ([] if len(dists) == 2 else [np.nan_to_num(v[0], nan=1.0)])
    lbp = local_binary_pattern(np.rint(g).astype(np.uint8), 8, 1, "uniform")
    hist = np.bincount(lbp.astype(int).ravel(), minlength=10)[:10] / lbp.size
    return np.concatenate([
        t.mean((0, 1)), t.std((0, 1)), np.percentile(g, [5, 25, 50, 75, 95]),
        [np.mean(hf**2), np.mean(np.abs(laplace(g, mode="reflect"))), grad.mean()], props, hist,
    ])


def patches(tissue: np.ndarray, focus: np.ndarray, side: int) -> list[tuple[int, int, int]]:
    """Non-overlapping ``side`` x ``side`` tiles of a slide: ``(y, x, 1)`` wholly in a focus,
    ``(y, x, 0)`` wholly in normal tissue with no focus within one tile of it."""
    from scipy.ndimage import binary_dilation

    near = binary_dilation(focus[::4, ::4], iterations=max(1, side // 4))
    out = []
    h, w = tissue.shape
    for y in range(0, h - side + 1, side):
        for x in range(0, w - side + 1, side):
            if not tissue[y:y + side, x:x + side].all():
                continue
            if focus[y:y + side, x:x + side].all():
                out.append((y, x, 1))
            elif not near[y // 4:(y + side) // 4, x // 4:(x + side) // 4].any():
                out.append((y, x, 0))
    return out


def measurement_slides(n: int, size: tuple[int, int], seed: int = 0, mpp: float = 0.5):
    """``n`` slides whose focus is half the tissue (left or right, alternately): ``[(image, tissue, focus)]``."""
    from halo.data.synth import render_fine

    out = []
    for i in range(n):
        w, h = size
        half = np.zeros((h, w), bool)
        if i % 2:
            half[:, w // 2:] = True
        else:
            half[:, : w // 2] = True
        img, tissue, focus, _ = render_fine(np.random.default_rng([seed, i, 17]), size, mpp, focus_mask=half)
        out.append((img, tissue, focus))
    return out


def cohort_slides(n: int, size: tuple[int, int], seed: int = 0, mpp: float = 0.5):
    """``n`` positive slides as the fine cohort renders them: ``[(image, tissue, focus)]``."""
    from halo.data.synth import render_fine

    out = []
    for i in range(n):
        img, tissue, focus, _ = render_fine(np.random.default_rng([seed, i, 23]), size, mpp, tumour=True)
        out.append((img, tissue, focus))
    return out


def separability(slides, patch_um: float = 64.0, mpps: tuple[float, ...] = MPPS, mpp0: float = 0.5,
                 seed: int = 0, folds: int = 5) -> list[dict[str, float]]:
    """ROC AUC, focus against normal patches, of a logistic regression on :func:`features`, per mpp.

    Cross-validation folds are grouped by slide; normal patches are subsampled (fixed seed) to as many as
    there are focus patches. Also returns, per mpp, the mean grey level and the mean within-patch grey
    standard deviation of each class (the matched statistics).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    side = int(round(patch_um / mpp0))
    rng = np.random.default_rng(seed)
    chosen = []  # (slide, y, x, label)
    for s, (_, tissue, focus) in enumerate(slides):
        tiles = patches(tissue, focus, side)
        pos = [t for t in tiles if t[2] == 1]
        neg = [t for t in tiles if t[2] == 0]
        if len(neg) > len(pos):
            neg = [neg[j] for j in np.sort(rng.choice(len(neg), len(pos), replace=False))]
        chosen += [(s, y, x, lab) for (y, x, lab) in pos + neg]
    labels = np.array([c[3] for c in chosen])
    groups = np.array([c[0] for c in chosen])
    n_groups = len(set(groups.tolist()))
    if labels.sum() < 2 or (labels == 0).sum() < 2 or n_groups < 2:
        raise ValueError(f"too few patches: {int(labels.sum())} focus, {int((labels == 0).sum())} normal")
    rows = []
    for mpp in mpps:
        f = int(round(mpp / mpp0))
        if f < 1 or f & (f - 1):
            raise ValueError(f"mpp {mpp} is not a power-of-two multiple of {mpp0}")
        small = [box(img, f) for img, _, _ in slides]
        p = side // f
        X = np.stack([features(small[s][y // f:y // f + p, x // f:x // f + p]) for s, y, x, _ in chosen])
        grey = np.array([small[s][y // f:y // f + p, x // f:x // f + p].mean(-1).mean() for s, y, x, _ in chosen])
        sd = np.array([small[s][y // f:y // f + p, x // f:x // f + p].mean(-1).std() for s, y, x, _ in chosen])
        score = np.zeros(len(labels))
        for tr, te in GroupKFold(min(folds, n_groups)).split(X, labels, groups):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
            model.fit(X[tr], labels[tr])
            score[te] = model.decision_function(X[te])
        rows.append({
            "mpp": mpp, "auc": float(roc_auc_score(labels, score)), "n_focus": int(labels.sum()),
            "n_normal": int((labels == 0).sum()), "patch_px": p,
            "grey_focus": float(grey[labels == 1].mean()), "grey_normal": float(grey[labels == 0].mean()),
            "sd_focus": float(sd[labels == 1].mean()), "sd_normal": float(sd[labels == 0].mean()),
        })
    return rows


def _table(rows: list[dict[str, float]]) -> str:
    return markdown_table(
        ["um/px", "patch px", "focus / normal patches", "ROC AUC", "mean grey focus / normal",
         "within-patch grey std focus / normal"],
        [[f"{r['mpp']:g}", f"{r['patch_px']}", f"{r['n_focus']} / {r['n_normal']}", f"{r['auc']:.3f}",
          f"{r['grey_focus']:.1f} / {r['grey_normal']:.1f}", f"{r['sd_focus']:.2f} / {r['sd_normal']:.2f}"]
         for r in rows])


def plot(path: Path, seed: int, size: tuple[int, int], aucs: dict[float, float], crop_um: float = 128.0,
         mpp0: float = 0.5) -> None:
    """The figure: a focus and normal tissue of one cohort-style positive slide at every mpp, and the slide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.ndimage import distance_transform_edt

    from halo.data.synth import render_fine

    img, tissue, focus, foci = render_fine(np.random.default_rng([seed, 0, 29]), size, mpp0, tumour=True)
    side = int(round(crop_um / mpp0))
    big = max(foci, key=lambda f: f["radius"])
    fy, fx = int(big["y"]) - side // 2, int(big["x"]) - side // 2
    inside = distance_transform_edt(tissue) > side
    far = distance_transform_edt(~focus) > 2 * side
    cand = np.argwhere(inside & far)
    cand_d = np.hypot(cand[:, 0] - big["y"], cand[:, 1] - big["x"])
    ny, nx = cand[np.argmin(np.abs(cand_d - 4 * side))] - side // 2  # normal tissue about 4 crops away
    fig, axes = plt.subplots(2, len(MPPS) + 1, figsize=(3.0 * (len(MPPS) + 1), 6.6))
    for j, mpp in enumerate(MPPS):
        f = int(round(mpp / mpp0))
        for i, (y, x, name) in enumerate(((fy, fx, "focus"), (ny, nx, "normal"))):
            crop = box(img[y:y + side, x:x + side], f)
            ax = axes[i, j]
            ax.imshow(crop, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                auc = aucs.get(mpp)
                ax.set_title(f"{mpp:g} um/px ({side // f} px)" + (f"\npatch AUC {auc:.2f}" if auc is not None else ""))
            if j == 0:
                ax.set_ylabel(name)
    over = box(img, 8)
    ax = axes[0, -1]
    ax.imshow(over, interpolation="nearest")
    ax.contour(box(focus.astype(np.uint8) * 255, 8) > 127, levels=[0.5], colors="yellow", linewidths=0.8)
    for y, x, c in ((fy, fx, "yellow"), (ny, nx, "cyan")):
        ax.add_patch(plt.Rectangle((x / 8, y / 8), side / 8, side / 8, fill=False, color=c, lw=1.2))
    ax.set_title(f"slide at 4 um/px\nfoci outlined ({100 * focus.sum() / tissue.sum():.1f}% of tissue)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax = axes[1, -1]
    ax.imshow(np.where(tissue, 1 + focus, 0)[::8, ::8], cmap="gray", vmin=0, vmax=2, interpolation="nearest")
    ax.set_title("mask: tissue (grey), foci (white)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.suptitle(f"fine task: {crop_um:g} um squares of a focus and of normal tissue, box-downsampled "
                 f"(slide {size[0]}x{size[1]} px at {mpp0} um/px)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Measure separability per mpp; unless ``--quick``, write the PNG and the RESULTS.md section."""
    ap = parser(__doc__, quick="two small slides per set, prints only (writes no PNG, no RESULTS.md)")
    ap.add_argument("--slides", type=int, default=None, help="slides per set (default 8; quick 2)")
    ap.add_argument("--size", type=int, default=None, help="slide side in px at 0.5 um/px (default 2048; quick 1024)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    n = a.slides or (2 if a.quick else 8)
    side = a.size or (1024 if a.quick else 2048)
    t0 = time.perf_counter()
    meas = separability(measurement_slides(n, (side, side), a.seed), patch_um=64.0, seed=a.seed)
    print(f"measurement slides ({n} x {side}^2 px, 64 um patches): AUC focus vs normal per um/px "
          + ", ".join(f"{r['mpp']:g}: {r['auc']:.3f}" for r in meas), flush=True)
    coh = separability(cohort_slides(n, (side, side), a.seed), patch_um=32.0, seed=a.seed)
    print(f"cohort slides ({n} x {side}^2 px, 32 um patches): AUC focus vs normal per um/px "
          + ", ".join(f"{r['mpp']:g}: {r['auc']:.3f}" for r in coh), flush=True)
    if not a.quick:
        plot(PNG, a.seed, (side, side), {r["mpp"]: r["auc"] for r in meas})
        print(f"wrote {PNG}")
    text = (f"Measurement slides ({n}, {side}x{side} px at 0.5 um/px, focus = half the tissue), 64 um patches:\n\n"
            f"{_table(meas)}\n\nCohort slides ({n} positives as `halo-synth --task fine` renders them, "
            f"{side}x{side} px), 32 um patches:\n\n{_table(coh)}\n")
    report("plot_fine_foci", text, quick=a.quick, argv=argv, intro=(
        "## The fine task: the foci's signal is in fine structure only\n\n"
        "`halo-synth --task fine` foci differ from normal tissue in nuclear size, shape and chromatin "
        "texture, with colour, stain density and nuclear area fraction matched. ROC AUC of a logistic "
        "regression on per-patch texture features (colour mean/std, grey percentiles, high-frequency and "
        "Laplacian energy, gradient, GLCM at distances 1-2, LBP), cross-validated with folds grouped by "
        "slide, focus against normal patches of the same physical size, the slide box-downsampled to each "
        "um/px. Figure: `benchmarks/results/fine_foci.png`.\n\n"))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return meas + coh


if __name__ == "__main__":
    main()
