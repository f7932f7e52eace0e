"""Every supported torchvision family, sharded, against one process: float64, rel. error < 1e-9."""

from __future__ import annotations

import pytest

from equivalence import assert_exact, check_equivalence
from models_zoo import MODELS

# Image sizes keep every block a multiple of the total stride 32 and the deepest global
# feature map at least 2 x 2 (batch norm needs two values per channel in training).


# EfficientNet and MobileNetV3 have 5x5 convolutions at stride 32: blocks of 2 there.
_DEEP_HALO = {"efficientnet_b0", "mobilenet_v3_small"}


def run_model(name: str, rows: int, cols: int, train: bool, steps: int = 1, lr: float = 0.0,
              overlap: bool = False) -> dict[str, float]:
    unit = 64 if name in _DEEP_HALO else 32
    size = unit * max(2 if unit == 32 else 1, rows), unit * max(2 if unit == 32 else 1, cols)
    return check_equivalence(MODELS[name], rows, cols, *size, train=train, steps=steps, lr=lr, overlap=overlap)



@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_two_ranks(pool2, name: str) -> None:
    for rows, cols in [(1, 2), (2, 1)]:
        assert_exact(pool2.run(run_model, name, rows, cols, True, timeout=500))
    assert_exact(pool2.run(run_model, name, 1, 2, False, timeout=500))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_four_ranks(pool4, name: str) -> None:
    assert_exact(pool4.run(run_model, name, 2, 2, True, timeout=500))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_model_deep_thin_blocks(pool4, name: str) -> None:
    assert_exact(pool4.run(run_model, name, 4, 1, True, timeout=500))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_model_one_rank(pool1, name: str) -> None:
    """A 1x1 mesh in a world of one (halo's single-rank paths) against plain torch, 3 SGD steps."""
    assert_exact(pool1.run(run_model, name, 1, 1, True, 3, 0.1, timeout=500))


@pytest.mark.timeout(600)
def test_optimizer_steps_match(pool4) -> None:
    """Three SGD steps on 2x2 leave the same weights and BN buffers as on one device."""
    assert_exact(pool4.run(run_model, "resnet18", 2, 2, True, 3, 0.1, timeout=500))


def _checkpointed_classifier(name: str):
    from halo.models import build_classifier

    return build_classifier(name, 3, head="attention", checkpointing=True)


def run_checkpointed(name: str, rows: int, cols: int) -> dict[str, float]:
    import functools

    return check_equivalence(functools.partial(_checkpointed_classifier, name), rows, cols, 64 * rows, 64 * max(cols, 2),
                             train=True)


@pytest.mark.timeout(600)
def test_activation_checkpointing_is_exact(pool4) -> None:
    """Recomputing trunk stages in backward redoes the halo exchanges: still the one-device numbers."""
    assert_exact(pool4.run(run_checkpointed, "resnet18", 2, 2, timeout=500))


@pytest.mark.timeout(600)
def test_checkpointed_stage_ending_in_batch_norm(pool2) -> None:
    """EfficientNet's stages end in a batch norm: the recompute stops once the last saved tensor
    is back, so running statistics must be updated before saving, as torch's kernel does
    (they were updated once where one device updates twice: running mean off by 0.47)."""
    assert_exact(pool2.run(run_checkpointed, "efficientnet_b0", 1, 2, timeout=500))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_overlapped_convolutions_are_exact(pool4, name: str) -> None:
    assert_exact(pool4.run(run_model, name, 2, 2, True, 1, 0.0, True, timeout=500))


def run_autocast_bf16(rows: int, cols: int) -> dict[str, object]:
    """ResNet-18 under CPU bfloat16 autocast, sharded and in one process, against float64.

    bfloat16 is not exact (8 mantissa bits), so the sharded run is held to the one-process
    run's own error: both are measured against the same network in float64.
    """
    import copy

    import torch

    import halo
    from distributed import shared_mesh
    from equivalence import rel_err

    mesh = shared_mesh(rows, cols)
    torch.manual_seed(0)
    plain = MODELS["resnet18"]()
    truth, model = copy.deepcopy(plain).double(), copy.deepcopy(plain)
    halo.parallelize(model, mesh)
    x = torch.randn(1, 3, 64 * rows, 64 * cols, generator=torch.Generator().manual_seed(1))
    y_truth = truth(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain = plain(x)
        y_halo = model(halo.scatter(x, mesh))
    y_halo.float().sum().backward()
    buffers = {n: b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))}
    plain_buffers = dict(plain.named_buffers())
    return {
        "dtypes": (str(y_plain.dtype), str(y_halo.dtype)),
        "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()}),
        "buffer_dtypes": sorted({str(b.dtype) for b in buffers.values()}),
        "finite": all(bool(p.grad.isfinite().all()) for p in model.parameters()),
        "logits": (rel_err(y_plain, y_truth), rel_err(y_halo, y_truth)),
        "buffers": [(rel_err(plain_buffers[n], b_t), rel_err(buffers[n], b_t))
                    for n, b_t in truth.named_buffers() if n in buffers],
    }


@pytest.mark.timeout(300)
def test_autocast_bfloat16(pool2, pool4) -> None:
    """Mixed precision (bfloat16 activations, float32 parameters and batch-norm statistics)
    runs through every halo layer, with the dtypes plain torch gives and errors of the
    size plain torch's own bfloat16 run has against float64."""
    for pool, (rows, cols) in ((pool2, (1, 2)), (pool2, (2, 1)), (pool4, (2, 2))):
        res = pool.run(run_autocast_bf16, rows, cols, timeout=250)[0]  # ranks return the same
        assert res["dtypes"] == ("torch.bfloat16", "torch.bfloat16")
        assert res["grad_dtypes"] == ["torch.float32"] and res["buffer_dtypes"] == ["torch.float32"]
        assert res["finite"]
        plain, sharded = res["logits"]
        assert sharded <= 2 * plain + 2**-7, (rows, cols, res["logits"])
        for plain, sharded in res["buffers"]:
            assert sharded <= 2 * plain + 2**-7, (rows, cols, res["buffers"])
