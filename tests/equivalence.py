"""Sharded vs one-device checks, run on every rank of a pool (see ``distributed.py``).

Every rank builds the same float64 model and the same images from one seed, runs the
one-device reference on the full batch itself, then the sharded model on its block, and
returns the worst relative error of: logits, the input gradient, every parameter gradient
(averaged over all ranks, as DDP does) and every batch-norm buffer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

import halo
from distributed import shared_mesh

__all__ = ["check_equivalence", "assert_exact", "expect_refusal", "rel_err", "TOL"]

TOL = 1e-9


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """max |a - b| / max(max |b|, floor).

    ``floor`` matters only for quantities that are analytically zero, such as the gradient
    of a convolution bias followed by batch norm, or the running mean of a batch norm fed
    by another batch norm through a linear layer: the reference then holds rounding noise
    (~1e-17), and the error is measured against 1e-3 of the largest gradient (or buffer)
    of the model instead.
    """
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference {tuple(b.shape)}")
    scale = max(b.abs().max().item(), floor)
    diff = (a - b).abs().max().item()
    if scale == 0.0:
        return diff
    return diff / scale


def _loss(out: torch.Tensor, seed: int) -> torch.Tensor:
    """A loss that weighs every logit differently, so every gradient path is exercised."""
    g = torch.Generator().manual_seed(seed + 7)
    w = torch.randn(out.shape[1:], generator=g, dtype=out.dtype)
    return (out * w).sum(dim=tuple(range(1, out.dim()))) + 0.1 * (out**2).sum(dim=tuple(range(1, out.dim())))


def check_equivalence(
    build: Callable[[], nn.Module],
    rows: int,
    cols: int,
    height: int,
    width: int,
    *,
    channels: int = 3,
    train: bool = True,
    seed: int = 0,
    steps: int = 1,
    lr: float = 0.0,
    overlap: bool = False,
    method: str = "auto",
    batch: int = 1,
) -> dict[str, float]:
    """Worst relative errors (by quantity) of the sharded model against one device.

    With ``steps > 1`` and ``lr > 0`` an SGD step is taken after each backward, and the
    comparison also covers the updated weights. ``method`` sets every
    :class:`halo.nn.HaloConv2d`'s and :class:`halo.nn.HaloMaxPool2d`'s ``method``. Each image
    group holds ``batch`` images (the reference all ``batch * mesh.data``).
    """
    mesh = shared_mesh(rows, cols)
    d = mesh.coords[0]
    torch.manual_seed(seed)
    ref = build().double()
    model = copy.deepcopy(ref)
    images = torch.randn(mesh.data * batch, channels, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    halo.parallelize(model, mesh, overlap=overlap)
    for m in model.modules():
        if isinstance(m, (halo.nn.HaloConv2d, halo.nn.HaloMaxPool2d)):
            m.method = method
    ref.train(train)
    model.train(train)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr) if lr else None
    opt = torch.optim.SGD(model.parameters(), lr=lr) if lr else None
    errors: dict[str, float] = {}

    def worst(key: str, value: float) -> None:
        errors[key] = max(errors.get(key, 0.0), value)

    for step in range(steps):
        ref.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        full = images.clone().requires_grad_(True)
        torch.manual_seed(seed + 100 + step)
        ref_out = ref(full)
        _loss(ref_out, seed).mean().backward()

        mine = slice(d * batch, (d + 1) * batch)
        x = halo.scatter(images[mine], mesh).requires_grad_(True)
        halo.manual_seed(seed + 100 + step, mesh)
        out = model(x)
        (_loss(out, seed).sum() / batch).backward()  # the mean over all images, once averaged over ranks
        worst("logits", rel_err(out, ref_out[mine]))
        worst("input_grad", rel_err(x.grad / mesh.world_size, halo.scatter(full.grad[mine], mesh)))
        grad_scale = 1e-3 * max((q.grad.abs().max().item() for q in ref.parameters() if q.grad is not None), default=0.0)
        params = list(model.parameters())
        # one all-reduce of every gradient (as DDP's buckets do), then the average per parameter
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        dist.all_reduce(flat)
        averaged = flat.div_(mesh.world_size).split([p.numel() for p in params])
        for p, q, grad in zip(params, ref.parameters(), averaged):
            q_grad = q.grad if q.grad is not None else torch.zeros_like(q)
            worst("param_grad", rel_err(grad.view_as(p), q_grad, grad_scale))
            p.grad = grad.view_as(p).clone()  # what DDP leaves
        if opt is not None:
            ref_opt.step()
            opt.step()
            for p, q in zip(model.parameters(), ref.parameters()):
                worst("weights", rel_err(p, q))
        buffer_scale = 1e-3 * max((c.abs().max().item() for c in ref.buffers() if c.is_floating_point()), default=0.0)
        for (name, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
            if b.is_floating_point():
                worst("buffers", rel_err(b, c, buffer_scale))
            else:
                worst("buffers", float((b != c).any()))
    return errors


def assert_exact(results: list[dict[str, float]]) -> None:
    """Every rank's every relative error below :data:`TOL`."""
    for rank, errors in enumerate(results):
        bad = {k: v for k, v in errors.items() if not v < TOL}
        assert not bad, f"rank {rank}: relative errors above {TOL}: {bad} (all: {errors})"


def expect_refusal(build: Callable[[], nn.Module], needles: list[str], *, run: bool = True) -> str:
    """The message of the :class:`~halo.errors.HaloNotSupportedError` that ``parallelize`` (or,
    with ``run``, a forward on a 1x2 mesh) raises for ``build()``; it must contain ``needles``."""
    from halo.errors import HaloNotSupportedError

    mesh = shared_mesh(1, 2)
    model = build()
    try:
        model = halo.parallelize(model, mesh)
        if run:
            model(torch.randn(1, 3, 8, 4))
    except HaloNotSupportedError as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        if missing:
            raise AssertionError(f"message lacks {missing}: {msg}") from e
        return msg
    raise AssertionError(f"{type(model).__name__} was not refused")
