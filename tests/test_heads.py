"""Slide-level heads on a sharded feature map against the same head on one device.

float64, relative error < 1e-9 on logits, input gradient, every parameter gradient and
batch-norm buffers (``check_equivalence``), plus the per-position maps (``last_map``)
gathered from the blocks, on meshes 1x2, 2x1, 2x2 and 1x2 with two images.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import halo
from distributed import shared_mesh
from equivalence import assert_exact, check_equivalence, rel_err
from halo.errors import HaloShapeError
from halo.nn import GatedAttentionHead, MaxHead, MeanHead, TopKHead


def trunk(head: nn.Module) -> nn.Sequential:
    """A small stride-2 trunk under ``head`` (8 feature channels, 3 classes)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), head,
    )


def tied(head: nn.Module) -> nn.Sequential:
    """A trunk whose features are the same vector at every position: every score ties.

    The trunk's weight gradient still depends on which positions the head selects, so
    this checks that ties go to the same positions as on one device.
    """
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.uniform_(0.5, 1.5)
    return nn.Sequential(conv, head)


# name: (builder, input channels). Builders are looked up by name on every rank.
HEADS = {
    "mean": (lambda: trunk(MeanHead(8, 3, keep_maps=True)), 3),
    "mean_dropout": (lambda: trunk(MeanHead(8, 3, dropout=0.5)), 3),
    "max": (lambda: trunk(MaxHead(8, 3, keep_maps=True)), 3),
    "max_tied": (lambda: tied(MaxHead(8, 3)), 3),
    "attention": (lambda: trunk(GatedAttentionHead(8, 3, hidden=6)), 3),
    "attention_dropout": (lambda: trunk(GatedAttentionHead(8, 3, hidden=6, dropout=0.5)), 3),
    "topk": (lambda: trunk(TopKHead(8, 3, k=5)), 3),
    "topk_mean": (lambda: trunk(TopKHead(8, 3, k=3, mlp_hidden=0)), 3),
    "topk_mlp": (lambda: trunk(TopKHead(8, 3, k=4, mlp_hidden=6)), 3),
    "topk_max_only": (lambda: trunk(TopKHead(8, 3, k=4, min_max=False)), 3),
    # More than a 2x2 block's 16 positions; on 64 positions top and bottom overlap.
    "topk_wide": (lambda: trunk(TopKHead(8, 3, k=40, mlp_hidden=0)), 3),
    "topk_tied": (lambda: tied(TopKHead(8, 3, k=10)), 3),  # k > block width: ties span ranks
    # The head as the whole model: parallelize's guard supplies the mesh.
    "topk_bare": (lambda: TopKHead(8, 3, k=4, mlp_hidden=5), 8),
}
RANDOM = {"mean_dropout", "attention_dropout"}  # one mask per batch on one device: not for two images


def run_head(name: str, rows: int, cols: int, h: int, w: int) -> dict[str, float]:
    build, channels = HEADS[name]
    return check_equivalence(build, rows, cols, h, w, channels=channels)


def _head(model: nn.Module) -> nn.Module:
    return model[-1] if isinstance(model, nn.Sequential) else model


def run_batch(name: str, rows: int, cols: int, h: int, w: int, n: int) -> dict[str, float]:
    """``n`` images on one spatial mesh: logits, gradients and the gathered ``last_map``."""
    build, channels = HEADS[name]
    mesh = shared_mesh(rows, cols)
    torch.manual_seed(0)
    ref = build().double()
    model = halo.parallelize(copy.deepcopy(ref), mesh)
    images = torch.randn(n, channels, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full = images.clone().requires_grad_(True)
    torch.manual_seed(3)
    ref_out = ref(full)
    (ref_out * weights).sum().backward()
    x = halo.scatter(images, mesh).requires_grad_(True)
    halo.manual_seed(3, mesh)
    out = model(x)
    (out * weights).sum().backward()
    errors = {
        "logits": rel_err(out, ref_out),
        "input_grad": rel_err(x.grad / mesh.size, halo.scatter(full.grad, mesh)),
        "param_grad": 0.0,
    }
    # Analytically zero gradients (a conv bias before batch norm) are measured against
    # 1e-3 of the largest gradient, as check_equivalence does.
    floor = 1e-3 * max(q.grad.abs().max().item() for q in ref.parameters())
    for p, q in zip(model.parameters(), ref.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        errors["param_grad"] = max(errors["param_grad"], rel_err(grad / mesh.world_size, q.grad, floor))
    head, ref_head = _head(model), _head(ref)
    if ref_head.last_map is not None:
        errors["last_map"] = rel_err(halo.gather(head.last_map, mesh), ref_head.last_map)
    return errors



@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_two_ranks(pool2, name: str) -> None:
    for rows, cols in [(1, 2), (2, 1)]:
        assert_exact(pool2.run(run_head, name, rows, cols, 16 * rows, 16 * cols))
    if name not in RANDOM:  # 1x1: one rank per image, no collectives in the head
        assert_exact(pool2.run(run_head, name, 1, 1, 16, 16))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_four_ranks(pool4, name: str) -> None:
    # 2x2 (blocks of 4x4 features), then 1x2 with two images (data axis of 2).
    assert_exact(pool4.run(run_head, name, 2, 2, 16, 16))
    if name not in RANDOM:
        assert_exact(pool4.run(run_head, name, 1, 2, 16, 32))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["mean", "max", "attention", "attention_dropout", "topk", "topk_wide"])
def test_head_maps_and_batch(pool2, pool4, name: str) -> None:
    """Two images per rank, and ``last_map`` gathered equals the one-device map."""
    assert_exact(pool2.run(run_batch, name, 1, 2, 16, 32, 2))
    results = pool4.run(run_batch, name, 2, 2, 16, 16, 2)
    assert_exact(results)
    assert all("last_map" in r for r in results)


def test_one_device_semantics() -> None:
    """mesh=None heads are the textbook heads (no process group needed)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)

    mean = MeanHead(8, 3, keep_maps=True).double()
    out = mean(x)
    assert torch.allclose(out, mean.fc(x.mean((2, 3))))
    assert torch.allclose(mean.last_map.mean((2, 3)), out)  # class-activation map averages to logits

    att = GatedAttentionHead(8, 3, hidden=4).double()
    a = att.attention_w(torch.tanh(att.attention_v(x)) * torch.sigmoid(att.attention_u(x))).flatten(2)
    weights = torch.softmax(a, dim=-1)
    assert torch.allclose(att(x), att.fc((weights * x.flatten(2)).sum(-1)))
    assert torch.allclose(att.last_map.flatten(2), weights)

    top = TopKHead(8, 3, k=4, mlp_hidden=0).double()
    s = top.score(x).flatten(2)
    expected = torch.cat([s.topk(4, -1).values, s.topk(4, -1, largest=False).values], -1).mean(-1)
    assert torch.allclose(top(x), expected)

    with pytest.raises(HaloShapeError, match="k=36"):
        TopKHead(8, 3, k=36).double()(x)
    with pytest.raises(HaloShapeError, match="feature map block"):
        MeanHead(8, 3).double()(x.mean((2, 3)))
