"""One training epoch (DDP, accumulation, autocast), the optimizer and schedule, the trunk modes.

Trunk modes: ``train.trunk=frozen`` freezes the whole trunk; ``train.freeze_stages=N`` the first
N stages, trained too from epoch ``train.unfreeze_at``; the trunk's learning rate is
``train.lr * train.trunk_lr_scale``. The optimizer holds every parameter from the start (a
frozen one has no gradient and does not step), so its state and schedule carry on across an
unfreeze; DDP, which reduces only the parameters that required gradients when it was built,
is built again (:func:`trunk_mode`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from halo.data import Prefetcher, SlideDataset
from halo.errors import InputError
from halo.train.data import SlideSource, group_steps
from halo.train.job import Job

__all__ = ["frozen_stages", "trunk_mode", "param_groups", "optimizer", "train_epoch", "Progress", "progress"]

log = logging.getLogger("halo.train")


class Progress:
    """How far one pass over slides is, on rank 0: tqdm bars on a terminal, plain log lines elsewhere.

    A SLURM ``.out`` file is not a terminal: bars redrawn there are one line per redraw. Without
    bars, a line ``"<desc>: <n>/<total> slides, <s> s elapsed[, loss ...]"`` goes to the
    ``halo.train`` log at most every ``every_s`` seconds, and once when the pass ends.

    Parameters
    ----------
    total, desc, unit:
        Steps in the pass, its name (``epoch 3``), what a step is.
    file:
        Where bars go (default ``sys.stderr``); whether it is a TTY decides ``bars=None``.
    bars:
        None: bars when ``file`` is a terminal; True: bars always; False: log lines always
        (``train.progress_bars``).
    every_s:
        Seconds between log lines without bars (``train.progress_every_s``).
    clock:
        Seconds (``time.monotonic``; tests pass their own).
    """

    def __init__(self, total: int, desc: str, *, file=None, bars: bool | None = None, every_s: float = 30.0,
                 unit: str = "slide", clock=None) -> None:
        import sys
        import time

        self.total, self.desc, self.unit, self.every_s, self.n = total, desc, unit, every_s, 0
        self.file = file if file is not None else sys.stderr
        isatty = getattr(self.file, "isatty", None)
        self.bars = bool(isatty()) if bars is None and callable(isatty) else bool(bars)
        self._clock = clock or time.monotonic
        self._bar = None
        if self.bars:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=self.file)
        else:
            self._start = self._last = self._clock()

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more steps done; ``postfix`` values (or callables giving them, evaluated only when
        shown, e.g. ``loss=loss.item``) are shown beside the count."""
        before, self.n = self.n, self.n + n
        if self._bar is not None:
            self._bar.update(n)
            if postfix and before % 4 == 0:
                self._bar.set_postfix(**{k: _shown(v) for k, v in postfix.items()})
            return
        now = self._clock()
        if self.n >= self.total or now - self._last >= self.every_s:
            self._last = now
            extra = "".join(f", {k.replace('_', ' ')} {_shown(v)}" for k, v in postfix.items())
            log.info("%s: %d/%d %ss, %.1f s elapsed%s", self.desc, self.n, self.total, self.unit, now - self._start,
                     extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _shown(value: Any) -> str:
    value = value() if callable(value) else value
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def progress(job: Job, total: int, desc: str) -> Progress | None:
    """A :class:`Progress` on rank 0 when ``train.progress`` (None elsewhere)."""
    t = job.cfg.train
    if not (job.is_main and t.progress):
        return None
    return Progress(total, desc, bars=t.get("progress_bars"), every_s=float(t.get("progress_every_s", 30.0)))


def frozen_stages(job: Job, epoch: int) -> int:
    """How many trunk stages are frozen in epoch ``epoch`` (0-based).

    Raises
    ------
    halo.errors.InputError
        ``train.freeze_stages`` outside the trunk, or ``train.unfreeze_at`` without frozen stages.
    """
    t, stages = job.cfg.train, len(job.model.trunk)
    n = stages if t.trunk == "frozen" else t.freeze_stages
    if not 0 <= n <= stages:
        raise InputError(f"halo-train: train.freeze_stages={n}, but {job.cfg.model.name}'s trunk has "
                         f"{stages} stages (0 to {stages})")
    at = t.unfreeze_at
    if at is not None and (t.trunk == "frozen" or n == 0 or at < 1):
        raise InputError(f"halo-train: train.unfreeze_at={at} needs train.freeze_stages >= 1, "
                         f"train.trunk=train and an epoch >= 1")
    return 0 if at is not None and epoch + 1 >= at else n


def trunk_mode(job: Job, epoch: int, ddp: DDP | None) -> DDP:
    """Freeze or unfreeze trunk stages for this epoch; a new DDP wrapper when that changes."""
    n = frozen_stages(job, epoch)
    if ddp is not None and n == job.model.frozen_stages:
        return ddp
    if ddp is not None and job.is_main:
        log.info("epoch %d: trunk stages 1-%d unfrozen (train.unfreeze_at), DDP rebuilt", epoch + 1,
                 job.model.frozen_stages)
    elif ddp is None and epoch > 0 and job.is_main:  # resumed: say what an uninterrupted run has said
        t = job.cfg.train
        if t.trunk == "frozen":
            log.info("epoch %d (resumed): trunk frozen (train.trunk=frozen)", epoch + 1)
        elif t.unfreeze_at is not None and n == 0:
            log.info("epoch %d (resumed): trunk stages 1-%d unfrozen since epoch %d (train.unfreeze_at)", epoch + 1,
                     t.freeze_stages, t.unfreeze_at)
        elif n > 0:
            until = f" until epoch {t.unfreeze_at} (train.unfreeze_at)" if t.unfreeze_at is not None else ""
            log.info("epoch %d (resumed): trunk stages 1-%d frozen (train.freeze_stages)%s", epoch + 1, n, until)
    job.model.freeze(n)
    if not any(p.requires_grad for p in job.model.parameters()):
        raise InputError("halo-train: nothing to train: every parameter is frozen")
    return DDP(job.model, device_ids=[job.device.index] if job.device.type == "cuda" else None)


def param_groups(job: Job) -> list[dict[str, Any]]:
    """The head at ``train.lr``, the trunk at ``train.lr * train.trunk_lr_scale``."""
    lr = job.cfg.train.lr
    return [{"params": list(job.model.head.parameters()), "lr": lr, "name": "head"},
            {"params": list(job.model.trunk.parameters()), "lr": lr * job.cfg.train.trunk_lr_scale, "name": "trunk"}]


def optimizer(job: Job, steps: int):
    """The optimizer over :func:`param_groups` and its schedule over ``train.epochs * steps`` steps."""
    t = job.cfg.train
    groups = param_groups(job)
    if t.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    total = max(1, t.epochs * steps)
    if t.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=total,
                                                    pct_start=t.warmup_fraction)
    elif t.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def _train_mode(job: Job) -> None:
    job.model.train()
    if job.cfg.train.freeze_bn:
        for m in job.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def train_epoch(job: Job, source: SlideSource, ddp: DDP, opt, sched, ds: SlideDataset, epoch: int,
                weights: torch.Tensor | None) -> tuple[float, int]:
    """One pass over ``ds``; returns the mean loss over the slides trained on and their count."""
    t = job.cfg.train
    accumulate = max(1, t.accumulate)
    rng = np.random.default_rng([t.seed, epoch])
    steps = group_steps([int(i) for i in rng.permutation(len(ds))], job.mesh.data, job.group)
    order = [i for i, _ in steps]
    seeds = {i: int(np.random.default_rng([t.seed, epoch, i]).integers(2**31)) for i in order}
    _train_mode(job)
    total = torch.zeros((), device=job.device)
    count = torch.zeros((), device=job.device)
    bar = progress(job, len(order), f"epoch {epoch + 1}")
    opt.zero_grad(set_to_none=True)
    with Prefetcher(lambda i: source.block(ds, i, seeds[i]), order) as blocks:
        for step, (index, x) in enumerate(blocks):
            ok = source.agree(x is not None)
            use = bool(ok[job.group]) and steps[step][1] > 0  # padding steps repeat a slide, weight 0
            if x is None:  # keep every collective in step: a zero input with zero weight
                x = source.zeros(ds, order[0])
            label = torch.tensor([ds.rows[index].label], device=job.device)
            sync = (step + 1) % accumulate == 0 or step + 1 == len(order)
            ctx = ddp.no_sync() if not sync else torch.enable_grad()
            with ctx, job.autocast():
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
                bar.update(1, last_slide_loss=loss.item)  # the epoch line gives the mean
    if bar is not None:
        bar.close()
    # every group's sum counts once; every rank of a group holds the same loss
    both = torch.stack([total, count]) / job.mesh.size
    dist.all_reduce(both)
    return float(both[0] / both[1].clamp(min=1)), int(both[1].item())
