"""Blockwise prediction (``halo.predict_blockwise``) against the full-image forward and the sharded model.

float64, eval mode, relative error < 1e-9 on the logits, the stitched feature map and the
head's map: ResNet-18 (torchvision's, at width 8) and MobileNet V2 (torchvision's, width
0.25, one block per stage) on grids 1x2, 2x1, 2x2 and 3x3 (unequal blocks), images large
enough that interior blocks are cut on both sides; the sharded model on a 2x2 mesh with
the blocks dealt over 4 ranks (fewer than the 9 blocks, and more than 2); the margins
against hand-computed receptive fields; refusals naming the module; and the largest
input the trunk ever sees.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

import halo
from distributed import shared_mesh
from equivalence import TOL, rel_err
from halo.blockwise import block_cuts, trunk_margins
from halo.errors import HaloNotSupportedError, HaloShapeError
from halo.models import SlideClassifier, build_classifier, build_trunk
from halo.nn import GatedAttentionHead


def resnet18(width: int = 8) -> nn.Module:
    """torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2]) with ``width`` channels in its first stage."""
    m = torchvision.models.resnet18(num_classes=3)
    m.inplanes = width
    m.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    m.bn1 = nn.BatchNorm2d(width)
    m.layer1 = m._make_layer(BasicBlock, width, 2)
    m.layer2 = m._make_layer(BasicBlock, 2 * width, 2, stride=2)
    m.layer3 = m._make_layer(BasicBlock, 4 * width, 2, stride=2)
    m.layer4 = m._make_layer(BasicBlock, 8 * width, 2, stride=2)
    m.fc = nn.Linear(8 * width, 3)
    return m


def mobilenet_v2() -> nn.Module:
    """torchvision's MobileNet V2 at width 0.25 with one inverted residual per stage (stride 32)."""
    setting = [[1, 16, 1, 1], [6, 24, 1, 2], [6, 32, 1, 2], [6, 64, 1, 2], [6, 96, 1, 1], [6, 160, 1, 2],
               [6, 320, 1, 1]]
    return torchvision.models.mobilenet_v2(num_classes=3, width_mult=0.25, inverted_residual_setting=setting)


BACKBONES = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
# image sizes where the 3x3 grid has interior blocks cut on both sides (margins 224 / 96 px)
SIZES = {"resnet18": (640, 768), "mobilenet_v2": (256, 320)}
GRIDS = [(1, 2), (2, 1), (2, 2), (3, 3)]


def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Running statistics and affine parameters away from the identity, so eval-mode batch norm
    is a real per-channel map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return model


def classifier(name: str, seed: int = 0) -> SlideClassifier:
    """An eval-mode float64 slide classifier: ``name``'s trunk, a gated-attention head."""
    torch.manual_seed(seed)
    if name.startswith("halo_tiny"):
        model = build_classifier(name, 3, head="attention", head_options={"hidden": 16})
    else:
        trunk, channels = build_trunk(BACKBONES[name]())
        model = SlideClassifier(trunk, GatedAttentionHead(channels, 3, hidden=16))
    return randomize_norms(model, seed + 1).double().eval()


def image(height: int, width: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def full_forward(model: SlideClassifier, x: torch.Tensor) -> dict[str, torch.Tensor]:
    features = model.features(x)
    logits = model.head(features)
    return {"logits": logits, "features": features, "map": model.head.last_map.clone()}


def errors(out, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    return {"logits": rel_err(out.logits, ref["logits"]), "features": rel_err(out.features, ref["features"]),
            "map": rel_err(out.head_map, ref["map"])}


def assert_below(errs: dict[str, float], what: str) -> None:
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, f"{what}: relative errors above {TOL}: {bad} (all: {errs})"


# ----------------------------------------------------------------------------- against one process


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def reference(request):
    name = request.param
    model = classifier(name)
    x = image(*SIZES[name])
    return name, model, x, full_forward(model, x)


@pytest.mark.timeout(600)
def test_matches_full_forward(reference) -> None:
    """Logits, stitched feature map and attention map equal the full-image forward, every grid."""
    name, model, x, ref = reference
    shapes: list[tuple[int, int]] = []
    probe = (2 * 64, 3 * 64)  # trunk_margins' probe: 2 lcm(T, 64) x 3 lcm(T, 64)

    def record(_m, args) -> None:  # SlideClassifier.features calls the stages, not the trunk itself
        if args[0].device.type != "meta" and tuple(args[0].shape[-2:]) != probe:
            shapes.append(tuple(args[0].shape[-2:]))

    hook = model.trunk[0].register_forward_pre_hook(record)
    try:
        for grid in GRIDS:
            shapes.clear()
            out = halo.predict_blockwise(model, x, grid=grid)
            assert_below(errors(out, ref), f"{name} grid {grid}")
            # the trunk saw the blocks (the margin probe aside), each at most block + margins
            m = out.margins
            blocks = [(b - a, d - c) for a, b in zip(out.row_cuts, out.row_cuts[1:])
                      for c, d in zip(out.col_cuts, out.col_cuts[1:])]
            assert len(shapes) == len(blocks) == len(out.inputs)
            for (h, w), (bh, bw) in zip(shapes, blocks):
                assert h <= bh + m.top + m.bottom and w <= bw + m.left + m.right
    finally:
        hook.remove()
    # the 3x3 grid's blocks are unequal, and its middle column is cut on both sides
    rows, cols = block_cuts(x.shape[2], 3, 32), block_cuts(x.shape[3], 3, 32)
    assert len({b - a for a, b in zip(rows, rows[1:])}) > 1 or len({b - a for a, b in zip(cols, cols[1:])}) > 1
    x0, x1 = max(0, cols[1] - out.margins.left), min(x.shape[3], cols[2] + out.margins.right)
    assert 0 < x0 and x1 < x.shape[3]


@pytest.mark.timeout(300)
def test_explicit_cuts_batch_and_border_blocks() -> None:
    """Explicit, very unequal cuts (a block of one output row), two images, a deep interior block."""
    model = classifier("halo_tiny_8")
    x = image(320, 352, seed=3, batch=2)
    ref = full_forward(model, x)
    out = halo.predict_blockwise(model, x, grid=([0, 16, 160, 320], [0, 112, 128, 240, 352]))
    assert_below(errors(out, ref), "explicit cuts")
    assert out.features.shape == (2, 32, 20, 22)
    # block (1, 1): rows 16:160 (no margin above the image top), cols 112:128, cut on both sides
    assert out.inputs[5] == (0, 160 + 32, 112 - 48, 128 + 32)


@pytest.mark.timeout(300)
def test_layers_local_in_eval_mode() -> None:
    """Reflect and replicate padding, asymmetric "same" and TF-SAME padding (timm's Conv2dSame),
    dilation, pooling with and without padding counted, power pooling, a channels-last layer
    norm and channel concatenation: all local, all cropped exactly."""
    timm_layers = pytest.importorskip("timm.layers")

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect")
            self.pad = nn.ReplicationPad2d((1, 1, 1, 1))
            self.b = nn.Conv2d(6, 6, 3)
            self.c = nn.Conv2d(6, 6, 4, padding="same")
            self.d = timm_layers.create_conv2d(6, 8, 3, stride=2, padding="same")  # Conv2dSame, pads (0, 1)
            self.norm = nn.LayerNorm(8)
            self.e = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
            self.pool1 = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
            self.pool2 = nn.MaxPool2d(3, 2, 1)
            self.lp = nn.LPPool2d(2, 1)
            self.f = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            x = torch.relu(self.a(x))
            x = self.c(self.b(self.pad(x)))
            x = self.d(x)
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            x = torch.cat([self.e(x), x], 1)
            x = self.pool2(self.pool1(x))
            return self.f(self.lp(x.abs() + 1e-3))

    assert type(Mixed().d).__name__ == "Conv2dSame"
    torch.manual_seed(0)
    model = SlideClassifier(nn.Sequential(Mixed()), GatedAttentionHead(8, 3, hidden=4)).double().eval()
    x = image(96, 128, seed=5)
    ref = full_forward(model, x)
    margins = trunk_margins(model)
    # reflect 1, replicate 1 + valid 0, same (1, 2), SAME s2 (0, 1), dilated 2 at grid 2, pools 1 at 2 and 4
    assert margins.stride == 8
    assert margins.reach[0] == 1 + 1 + 1 + 0 + 2 * 2 + 1 * 2 + 1 * 4
    for grid in [(2, 2), (3, 3), (1, 4)]:
        assert_below(errors(halo.predict_blockwise(model, x, grid=grid), ref), f"mixed layers {grid}")


# ----------------------------------------------------------------------------- margins and memory


def test_margins_from_the_model() -> None:
    """Receptive-field bounds by hand: halo_tiny (8 3x3 convs, every other of stride 2) and ResNet-18."""
    tiny = trunk_margins(classifier("halo_tiny_8"))
    # before: 1 px of padding per conv, on grids 1, 2, 2, 4, 4, 8, 8, 16; after: 1 px only for stride 1
    assert tiny.stride == 16 and tiny.reach == (45, 30, 45, 30) and tiny.pixels == (48, 32, 48, 32)
    r18 = trunk_margins(classifier("resnet18"))
    # stem 3 + pool 2; layer1 4 x 4; layer2 4 + 3 x 8; layer3 8 + 3 x 16; layer4 16 + 3 x 32
    assert r18.stride == 32 and r18.reach == (217, 186, 217, 186) and r18.pixels == (224, 192, 224, 192)
    assert len(r18.calls) == 20 + 1  # 17 3x3 / 7x7 convs, 3 downsampling 1x1 convs and the max pool


@pytest.mark.timeout(300)
def test_smaller_margins_would_be_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test is sensitive: one stride less of margin on each side changes the feature map."""
    import halo.blockwise as hb

    model = classifier("halo_tiny_8")
    x = image(256, 320, seed=1)
    ref = full_forward(model, x)
    real = hb.trunk_margins

    def short(*args, **kwargs):
        m = real(*args, **kwargs)
        return dataclasses.replace(m, top=m.top - m.stride, bottom=m.bottom - m.stride, left=m.left - m.stride,
                                   right=m.right - m.stride)

    monkeypatch.setattr(hb, "trunk_margins", short)
    out = hb.predict_blockwise(model, x, grid=(3, 3))
    assert rel_err(out.features, ref["features"]) > 1e-6


@pytest.mark.timeout(300)
def test_reader_reads_only_extended_blocks() -> None:
    """With a reader, nothing larger than a block plus its margins is ever read (nor fed to the
    trunk), the reads tile the image, and the result equals the full forward."""
    model = classifier("halo_tiny_8")
    full = image(512, 576, seed=2)
    ref = full_forward(model, full)
    reads: list[tuple[int, int, int, int]] = []
    fed: list[tuple[int, int]] = []

    def read(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        reads.append((y0, y1, x0, x1))
        return full[:, :, y0:y1, x0:x1].clone()

    def record(_m, args) -> None:  # not the stride's meta probe nor the margins' 128 x 192 probe
        if args[0].device.type != "meta" and tuple(args[0].shape[-2:]) != (128, 192):
            fed.append(tuple(args[0].shape[-2:]))

    hook = model.trunk[0].register_forward_pre_hook(record)
    try:
        out = halo.predict_blockwise(model, read, size=(512, 576), grid=(4, 4))
    finally:
        hook.remove()
    assert_below(errors(out, ref), "reader")
    m = out.margins
    assert reads == out.inputs and len(reads) == len(fed) == 16
    for h, w in fed:
        assert h <= 128 + m.top + m.bottom < 512 and w <= 144 + m.left + m.right < 576
    assert out.largest_input == (128 + m.top + m.bottom, 144 + m.left + m.right)


@pytest.mark.timeout(300)
def test_region_reader_on_a_slide(tmp_path) -> None:
    """``region_reader`` reads a real pyramidal TIFF block by block: the same prediction as on
    ``read_full`` of the same plan."""
    import halo.data as hd
    from data_fixtures import noise_slide_image, write_slide
    from halo.blockwise import region_reader

    path = write_slide(tmp_path / "s.tiff", noise_slide_image(300, 260, seed=4), levels=1)
    plan = hd.plan_region(path, grid=(2, 2), multiple=16, level=0, tissue=hd.TissueOptions(enabled=False))
    model = classifier("halo_tiny_8")
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)

    def transform(x: torch.Tensor) -> torch.Tensor:
        return x.double() - mean

    full = transform(torch.from_numpy(hd.read_full(plan)).permute(2, 0, 1)[None].float().div_(255))
    ref = full_forward(model, full)
    out = halo.predict_blockwise(model, region_reader(plan, transform), grid=(3, 3))
    assert_below(errors(out, ref), "region reader")


# ----------------------------------------------------------------------------- refusals


def _refused(model: nn.Module, needles: list[str], size: tuple[int, int] = (64, 96), exc=HaloNotSupportedError):
    with pytest.raises(exc) as info:
        halo.predict_blockwise(model, torch.randn(1, 3, *size, dtype=next(model.parameters()).dtype), grid=(2, 2))
    msg = str(info.value)
    missing = [n for n in needles if n not in msg]
    assert not missing, f"message lacks {missing}: {msg}"
    return msg


def test_refuses_training_mode() -> None:
    model = classifier("halo_tiny_8").train()
    _refused(model, ["trunk.0.1", "BatchNorm2d", "training mode", "model.eval()"])


def test_refuses_batch_norm_without_running_statistics() -> None:
    model = classifier("halo_tiny_8")
    model.trunk[1][1] = nn.BatchNorm2d(16, track_running_stats=False).double().eval()
    _refused(model, ["trunk.1.1", "batch_norm", "training mode"])


def test_refuses_global_ops_inside_the_trunk() -> None:
    """Squeeze-excitation: torchvision's module (EfficientNet) and a functional mean over (H, W)."""
    torch.manual_seed(0)
    trunk, c = build_trunk(torchvision.models.efficientnet_b0(num_classes=3))
    effnet = SlideClassifier(trunk, GatedAttentionHead(c, 3, hidden=4)).eval()
    _refused(effnet, ["trunk.1.0.block.1.avgpool", "adaptive_avg_pool2d", "global op"])

    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

        def forward(self, x):
            x = self.conv(x)
            return x * torch.sigmoid(x.mean((2, 3), keepdim=True))

    model = SlideClassifier(nn.Sequential(SE()), GatedAttentionHead(4, 3, hidden=4)).eval()
    _refused(model, ["trunk.0", "mean", "global op"])


@pytest.mark.parametrize("layer, needles", [
    (lambda: nn.GroupNorm(2, 4), ["trunk.1", "group_norm"]),
    (lambda: nn.Upsample(scale_factor=2), ["trunk.1", "interpolate"]),
    (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), ["trunk.1", "circular"]),
    (lambda: nn.MaxPool2d(3, 2, 1, return_indices=True), ["trunk.1", "indices"]),
])
def test_refuses_non_local_layers(layer, needles) -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), layer(), nn.Conv2d(4, 4, 1))
    model = SlideClassifier(trunk, GatedAttentionHead(4, 3, hidden=4)).eval()
    exc = (HaloNotSupportedError, HaloShapeError)
    _refused(model, needles, exc=exc)


def test_refuses_sizes_and_models() -> None:
    model = classifier("halo_tiny_8")
    _refused(model, ["W = 100", "multiple of the trunk's total stride 16"], size=(64, 100), exc=HaloShapeError)
    with pytest.raises(HaloShapeError, match="must rise from 0 to 64"):
        halo.predict_blockwise(model, image(64, 64), grid=([0, 24, 64], 1))
    ceil = SlideClassifier(nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(2, 2, ceil_mode=True)),
                           GatedAttentionHead(4, 3, hidden=4)).eval()
    assert isinstance(trunk_margins(ceil), halo.blockwise.Margins)  # even sizes: ceil mode changes nothing
    with pytest.raises(TypeError, match="trunk"):
        halo.predict_blockwise(nn.Conv2d(3, 4, 1), image(16, 16))


# ----------------------------------------------------------------------------- the sharded model


def sharded_versus_blockwise(name: str, height: int, width: int) -> dict[str, float]:
    """On every rank of a 4-rank pool: the model sharded over a 2x2 mesh, then the unsharded model
    blockwise on 3x3 blocks dealt over the 4 ranks (and on 1x2 blocks: two ranks have none)."""
    mesh = shared_mesh(2, 2)
    model = classifier(name)
    sharded = halo.parallelize(copy.deepcopy(model), mesh).eval()
    x = image(height, width, seed=7)
    with torch.no_grad():
        logits = sharded(halo.scatter(x, mesh))
        head_map = halo.gather(sharded.head.last_map, mesh)
    errs: dict[str, float] = {}
    for grid in [(3, 3), (1, 2)]:
        out = halo.predict_blockwise(model, x, grid=grid, group=dist.group.WORLD)
        blocks = (len(out.row_cuts) - 1) * (len(out.col_cuts) - 1)
        assert len(out.inputs) == len(range(dist.get_rank(), blocks, dist.get_world_size()))
        errs[f"logits {grid}"] = rel_err(out.logits, logits)
        errs[f"map {grid}"] = rel_err(out.head_map, head_map)
    try:
        halo.predict_blockwise(sharded, x, grid=(2, 2))
    except HaloNotSupportedError as e:
        assert "halo.parallelize" in str(e) and "unsharded" in str(e)
    else:
        raise AssertionError("a sharded model was not refused")
    return errs


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_equals_sharded_prediction(pool4, name: str) -> None:
    """The "test equality against the sharded prediction" of issue 18: 2x2 mesh, 4 ranks."""
    for rank, errs in enumerate(pool4.run(sharded_versus_blockwise, name, *SIZES[name], timeout=540)):
        assert_below(errs, f"rank {rank}")
