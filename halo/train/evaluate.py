"""Streaming evaluation: per-slide prediction rows and heatmaps.

Each slide's map is gathered within its image group only; the group's first rank writes its
heatmap at once and keeps nothing of it, so memory does not grow with the slide count. Only
the prediction rows (a few numbers per slide) are gathered over the world, for the metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import halo
from halo.data import SlideDataset
from halo.data.dataset import slide_file_name
from halo.evaluate import save_heatmap, slide_metrics
from halo.train.data import SlideSource, group_steps
from halo.train.job import Job, all_gather

__all__ = ["evaluate", "heatmap"]


@torch.no_grad()
def evaluate(job: Job, source: SlideSource, ds: SlideDataset, heatmaps: bool) -> tuple[dict[str, Any], list[dict]]:
    """Predict every slide of ``ds``; returns the metrics and one row per slide; collective.

    The metrics are those of the labelled rows (``{}`` when none is); an unlabelled row's
    ``label`` is None.
    """
    job.model.eval()
    mine = group_steps(list(range(len(ds))), job.mesh.data, job.group)
    rows = []
    from halo.train.loop import progress  # bars on a terminal, plain log lines in a log file

    bar = progress(job, len(mine), f"predict {ds.split or 'all'}") if mine else None
    for index, weight in mine:
        if job.blocks:  # this rank alone, block by block: the whole map is here
            out = source.blockwise(ds, index)
            ok = source.agree(out is not None)
            if out is None:
                if bar is not None:
                    bar.update(1)
                continue
            logits, head_map = out.logits.float(), out.head_map
            if heatmaps and head_map is not None and weight > 0:
                heatmap(job, ds, index, head_map.float()[0].cpu().numpy(), torch.softmax(logits[0], 0).tolist())
        else:
            x = source.block(ds, index, None)
            ok = source.agree(x is not None)
            if x is None:
                x = source.zeros(ds, mine[0][0])
            with job.autocast():
                logits = job.model(x).float()
            head_map = getattr(job.model.head, "last_map", None)
        if heatmaps and head_map is not None and not job.blocks:
            full = halo.gather(head_map.float(), job.mesh)  # a collective of the image group
            if job.first_in_group and weight > 0 and ok[job.group]:
                heatmap(job, ds, index, full[0].cpu().numpy(), torch.softmax(logits[0], 0).tolist())
            del full
        if ok[job.group] and weight > 0 and job.first_in_group:
            item = ds.rows[index]
            rows.append({"slide": item.slide_id, "index": index, "split": item.split,
                         "label": item.label if item.label >= 0 else None,
                         "probs": torch.softmax(logits[0], 0).cpu().tolist()})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    unique = {r["slide"]: r for part in all_gather(rows) for r in part}
    all_rows = list(unique.values())
    metrics: dict[str, Any] = {}
    labelled = [r for r in all_rows if r["label"] is not None]
    if labelled:
        metrics = slide_metrics([r["label"] for r in labelled], np.array([r["probs"] for r in labelled]),
                                len(job.classes), classes=job.classes)
    return metrics, all_rows


def heatmap(job: Job, ds: SlideDataset, index: int, m: np.ndarray, probs: list[float] | None = None) -> None:
    """Write ``heatmaps/<key>.png`` of slide ``index`` from its whole map ``(C, h, w)``.

    The colour is what the head computed per cell of the trunk's output: the attention weight
    (attention head, one channel), or the last class's logit (the class activation map of the
    mean, max and top-k heads, before their pooling); the title gives the slide's label and
    its predicted probability of that class (``probs``).
    """
    item = ds.rows[index]
    positive = job.classes[-1]
    score = m[-1] if m.shape[0] > 1 else m[0]  # positive class (CAM) or attention weights
    label = ("attention weight per cell" if m.shape[0] == 1 else
             f"{positive} logit per cell (class activation, before pooling)")
    title = f"{item.slide_id} (label {job.classes[item.label]})" if item.label >= 0 else f"{item.slide_id} (unlabelled)"
    if probs is not None:
        title += f", P({positive}) = {probs[-1]:.3f}"
    save_heatmap(job.run_dir / "heatmaps" / f"{slide_file_name(item.slide_id)}.png", ds.plan(index), score,
                 mask_path=item.mask, label=label, title=title)
