"""timm backbones, sharded, against one process: float64, rel. error < 1e-9, or refused.

Image sizes keep every block a multiple of the total stride 32 and the final feature map
at least 2 x 4 per image (train-mode batch norm over fewer values amplifies rounding).
"""

from __future__ import annotations

import pytest

from equivalence import assert_exact, check_equivalence

timm = pytest.importorskip("timm")

# name: (create_model kwargs, image unit per rank): deep 5x5 convs at stride 32 need 64
TIMM_MODELS: dict[str, tuple[dict, int]] = {
    "resnet18": ({}, 32),
    "resnet18d": ({}, 32),
    "efficientnet_b0": ({}, 64),
    "mobilenetv3_small_100": ({}, 64),
    "regnetx_002": ({}, 32),
    "cspresnet50": ({}, 32),
    "densenet121": ({}, 32),
}


def build_timm(name: str):
    kwargs = TIMM_MODELS[name][0]
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)


def image_size(name: str, rows: int, cols: int) -> tuple[int, int]:
    """At least 2 x 4 final features per image, a multiple of the unit per rank."""
    unit = TIMM_MODELS[name][1]
    least_h, least_w = 64, 128
    return unit * max(rows, -(-least_h // unit)), unit * max(cols, -(-least_w // unit))


def run_timm(name: str, rows: int, cols: int, train: bool = True) -> dict[str, float]:
    import functools

    h, w = image_size(name, rows, cols)
    return check_equivalence(functools.partial(build_timm, name), rows, cols, h, w, train=train)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
@pytest.mark.parametrize("mesh", ["1x2", "2x1"])
def test_timm_two_ranks(pool2, name: str, mesh: str) -> None:
    rows, cols = map(int, mesh.split("x"))
    assert_exact(pool2.run(run_timm, name, rows, cols, timeout=800))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_timm_four_ranks(pool4, name: str) -> None:
    assert_exact(pool4.run(run_timm, name, 2, 2, timeout=800))


@pytest.mark.timeout(300)
def test_timm_eval_mode(pool2) -> None:
    assert_exact(pool2.run(run_timm, "efficientnet_b0", 1, 2, False, timeout=250))


# -- timm backbones as halo-train's model.name=timm:<name> ---------------------------------


def test_timm_trunk_is_forward_features_in_stages() -> None:
    import torch

    from halo.models import build_classifier

    model = build_classifier("timm:efficientnet_b0", 2, head="mean")
    backbone = timm.create_model("efficientnet_b0", pretrained=False)
    # one stage per reduction timm reports, the last holding conv_head and bn2
    assert len(model.trunk) == len(backbone.feature_info)
    assert isinstance(model.trunk[-1][-1], timm.layers.BatchNormAct2d)
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = model.features(x)
    assert features.shape == (1, backbone.num_features, 2, 3)


def test_timm_unknown_name_is_refused() -> None:
    from halo.models import build_classifier

    with pytest.raises(ValueError, match="'not_a_model' is not a timm model"):
        build_classifier("timm:not_a_model", 2)
    # a ViT checks its input size against the one it was built for: refused, naming it
    with pytest.raises(ValueError, match="vit_tiny_patch16_224 cannot be used as a slide trunk"):
        build_classifier("timm:vit_tiny_patch16_224", 2)


def test_timm_weights_load_with_their_own_keys(tmp_path) -> None:
    """A timm state dict (any class count in its classifier) loads into the trunk unchanged."""
    import torch

    from halo.models import build_classifier

    for classes in (1000, 5):
        source = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=classes)
        path = tmp_path / f"weights_{classes}.pt"
        torch.save(source.state_dict(), path)
        model = build_classifier("timm:mobilenetv3_small_100", 2, head="mean", weights=path)
        want = source.state_dict()
        trunk = dict(model.trunk.named_parameters())
        assert len(trunk) > 0
        first_conv = model.trunk[0][0].weight
        assert torch.equal(first_conv, want["conv_stem.weight"])
        # the trunk is everything before global pooling: all but conv_head and the classifier
        assert sum(p.numel() for p in trunk.values()) == sum(
            v.numel() for k, v in source.named_parameters() if not k.startswith(("conv_head", "classifier")))
    other = tmp_path / "resnet.pt"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), other)
    with pytest.raises(ValueError, match="does not fit timm:mobilenetv3_small_100"):
        build_classifier("timm:mobilenetv3_small_100", 2, weights=other)


def _timm_slide_classifier():
    from halo.models import build_classifier

    return build_classifier("timm:efficientnet_b0", 3, head="attention", checkpointing=True)


def run_timm_classifier(rows: int, cols: int) -> dict[str, float]:
    return check_equivalence(_timm_slide_classifier, rows, cols, 64 * max(rows, 1), 64 * max(cols, 2))


@pytest.mark.timeout(600)
def test_timm_slide_classifier_with_checkpointing_is_exact(pool4) -> None:
    """halo-train's model (a timm trunk in stages, checkpointed, and an attention head) on 2x2."""
    assert_exact(pool4.run(run_timm_classifier, 2, 2, timeout=500))
