"""halo-plan's arithmetic against what autograd saves, what the exchange sends and the FLOPs torch
counts, on small cases."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import halo
from distributed import shared_mesh
from halo.models import build_classifier
from halo.plan import main, measure_checkpointed_bytes, measure_saved_bytes, plan, plan_model

TOL = 0.10  # the goal; on these cases the arithmetic is exact


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=2)


def _pools() -> torch.nn.Module:
    """Every pooling kind halo shards: max, average with and without counting the padding."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        nn.Conv2d(8, 8, 3, padding=1), nn.AvgPool2d(3, 2, 1), nn.Conv2d(8, 8, 1), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )


def measure_rank(name: str, rows: int, cols: int, height: int, width: int, batch: int) -> tuple[int, int, int, int]:
    """On one rank: bytes autograd saves for the forward, bytes this rank sends in one step, and
    the forward's and the whole step's FLOPs as torch's ``FlopCounterMode`` counts them
    (convolutions and matrix products, halo's border bands included)."""
    mesh = shared_mesh(rows, cols)
    model = halo.parallelize(_pools() if name == "pools" else _model(name), mesh)
    image = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    x = halo.scatter(image, mesh)
    sent = [0]
    real = dist.batch_isend_irecv

    def counting(ops):
        sent[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return real(ops)

    out: list[torch.Tensor] = []
    exclude = list(model.parameters()) + list(model.buffers())
    dist.batch_isend_irecv = counting
    try:
        with FlopCounterMode(display=False) as forward:
            saved = measure_saved_bytes(lambda: out.append(model(x)) or out[0], exclude)
        with FlopCounterMode(display=False) as backward:
            out[0].sum().backward()
    finally:
        dist.batch_isend_irecv = real
    fwd = forward.get_total_flops()
    return saved, sent[0], fwd, fwd + backward.get_total_flops()


def _check(results: list[tuple[int, int, int, int]], name: str, rows: int, cols: int, h: int, w: int,
           batch: int) -> None:
    p = plan(name, (h, w), (rows, cols), batch=batch)
    for rank, (saved, _, fwd, step) in enumerate(results):
        assert abs(p.activation_bytes_per_rank - saved) <= TOL * saved, (rank, p.activation_bytes_per_rank, saved)
        # the plan adds about one FLOP per output of pointwise layers, which torch does not count
        assert abs(p.forward_flops_per_rank - fwd) <= TOL * fwd, (rank, p.forward_flops_per_rank, fwd)
        assert abs(p.flops_per_rank - step) <= TOL * step, (rank, p.flops_per_rank, step)
    mean_sent = sum(s for _, s, _, _ in results) / len(results)
    assert abs(p.halo_bytes_per_step_per_rank - mean_sent) <= 0.05 * max(mean_sent, 1), (p.halo_bytes_per_step_per_rank, mean_sent)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_plain_one_process(name: str, size: tuple[int, int]) -> None:
    model = _model(name)
    x = torch.randn(2, 3, *size)
    measured = measure_saved_bytes(lambda: model(x), list(model.parameters()) + list(model.buffers()))
    predicted = plan_model(_model(name), name=name, image=size, batch=2, halo_layers=False).activation_bytes_per_rank
    assert abs(predicted - measured) <= TOL * measured, (predicted, measured)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_one_by_one_mesh(pool1, name: str) -> None:
    _check(pool1.run(measure_rank, name, 1, 1, 96, 64, 2), name, 1, 1, 96, 64, 2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("grid", [(1, 2), (2, 1)])
def test_two_ranks(pool2, name: str, grid: tuple[int, int]) -> None:
    h, w = 64 * grid[0], 64 * grid[1]
    _check(pool2.run(measure_rank, name, *grid, h, w, 2), name, *grid, h, w, 2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_two_by_two(pool4, name: str) -> None:
    _check(pool4.run(measure_rank, name, 2, 2, 128, 192, 1), name, 2, 2, 128, 192, 1)


@pytest.mark.timeout(300)
def test_pooling_layers(pool1, pool4) -> None:
    """Sharded pooling saves only max-pool indices and the divisors that exclude padding."""
    for halo_layers in (False, True):  # plain torch keeps the pooling inputs; halo does not
        model = _pools()
        x = torch.randn(2, 3, 64, 64)
        measured = (measure_saved_bytes(lambda: model(x), list(model.parameters()) + list(model.buffers()))
                    if not halo_layers else pool1.run(measure_rank, "pools", 1, 1, 64, 64, 2)[0][0])
        predicted = plan_model(_pools(), name="pools", image=(64, 64), batch=2, halo_layers=halo_layers)
        assert predicted.activation_bytes_per_rank == measured, (halo_layers, predicted.activation_bytes_per_rank, measured)
    for grid in [(1, 2), (2, 1), (2, 2)]:
        h, w = 32 * grid[0], 32 * grid[1]
        results = pool4.run(measure_rank, "pools", *grid, h, w, 2)
        predicted = plan_model(_pools(), name="pools", image=(h, w), mesh=grid, batch=2)
        for rank, (saved, *_) in enumerate(results):
            assert predicted.activation_bytes_per_rank == saved, (grid, rank, predicted.activation_bytes_per_rank, saved)
        mean_sent = sum(sent for _, sent, *_ in results) / len(results)
        assert abs(predicted.halo_bytes_per_step_per_rank - mean_sent) <= 0.05 * max(mean_sent, 1), grid


def _checkpointed(name: str, rows: int, cols: int, height: int, width: int) -> int:
    """What halo-train's ``train.checkpointing`` keeps on this rank at its peak, by autograd's hooks."""
    model = build_classifier(name, 2, head="mean", checkpointing=True)
    image = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    if (rows, cols) != (1, 1):
        mesh = shared_mesh(rows, cols)
        model, image = halo.parallelize(model, mesh), halo.scatter(image, mesh)
    return measure_checkpointed_bytes(model, image)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_checkpointing_plans_what_training_recomputes(pool2, name: str) -> None:
    """``--checkpointing`` plans the segments halo-train checkpoints (a ResNet's stem and its four
    layers), for a torchvision model given by name as for the slide classifier itself."""
    torch.manual_seed(0)
    classifier = build_classifier(name, 2, head="mean", checkpointing=True)
    for mesh, measured in [((1, 1), [_checkpointed(name, 1, 1, 128, 96)]),
                           ((1, 2), pool2.run(_checkpointed, name, 1, 2, 128, 192))]:
        image = (128, 96 * mesh[1])
        kwargs = {"mesh": mesh, "batch": 2, "checkpointing": True, "halo_layers": mesh != (1, 1)}
        for planned in (plan_model(classifier, name=name, image=image, **kwargs), plan(name, image, **kwargs)):
            for rank, saved in enumerate(measured):
                assert planned.activation_bytes_per_rank == saved, (mesh, rank, planned.activation_bytes_per_rank, saved)


def test_halo_bytes_closed_form() -> None:
    """A 3x3 conv on a 2x2 mesh: rows then columns of the row-extended block, both ways."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 8, 3, padding=1))
    p = plan_model(model, name="toy", image=(64, 64), mesh=(2, 2), batch=1)
    first, second = p.layers[0], p.layers[2]
    rows = 0.5 * (1 + 1) * 32 * 4  # half the ranks send each one-row strip of 32 float32
    cols = 0.5 * (1 + 1) * 34 * 4  # columns of the 34-row extended block
    assert first.halo_bytes == 3 * (rows + cols)  # the image needs no gradient: forward only
    assert second.halo_bytes == 2 * 4 * (rows + cols)  # 4 channels, forward and backward
    assert p.halo_bytes_per_step_per_rank == 11 * (rows + cols)
    assert plan_model(model, name="toy", image=(64, 64), mesh=(1, 1)).halo_bytes_per_step_per_rank == 0


def test_scaling_and_fit() -> None:
    small = plan("resnet18", (256, 256), (1, 1))
    big = plan("resnet18", (512, 512), (1, 2))
    assert abs(big.activation_bytes_per_rank / small.activation_bytes_per_rank - 2) < 0.05
    assert big.flops_per_rank == pytest.approx(2 * small.flops_per_rank, rel=0.01)
    bf16 = plan("resnet18", (256, 256), dtype="bfloat16")
    assert bf16.activation_bytes_per_rank < 0.55 * small.activation_bytes_per_rank  # int64 pooling indices stay
    ckpt = plan("resnet18", (256, 256), checkpointing=True)
    assert ckpt.activation_bytes_per_rank < 0.6 * small.activation_bytes_per_rank
    assert plan("resnet18", (1000, 1000), gpu_memory=1e9).fits is False
    assert plan("resnet18", (1000, 1000)).padded_image == (1024, 1024)


def test_huge_slide_is_arithmetic_only(capsys) -> None:
    main(["--model", "resnet50", "--image", "100000", "100000", "--mesh", "8", "8",
          "--dtype", "bfloat16", "--batch", "1", "--mpp", "0.5", "--json"])
    out = json.loads(capsys.readouterr().out)
    for key in ("activation_bytes_per_rank", "halo_bytes_per_step_per_rank", "param_bytes", "flops_per_rank", "fits"):
        assert key in out
    assert out["block"] == [12512, 12512] and out["field_mm"] == [50.0, 50.0]
    assert out["activation_bytes_per_rank"] > 0 and out["halo_bytes_per_step_per_rank"] > 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dtype"):
        plan("resnet18", (64, 64), dtype="int8")
    with pytest.raises(ValueError, match="unknown model"):
        plan("not_a_model", (64, 64))
    with pytest.raises(ValueError, match="mesh"):
        plan_model(_model("resnet18"), name="r", image=(64, 64), mesh=(1, 2), halo_layers=False)
