"""Slide classifiers: a torchvision or timm backbone trunk and a head over the sharded feature map.

``build_classifier(name, num_classes, head=..., weights=None)`` returns a
:class:`SlideClassifier`, an ordinary one-device model that :func:`halo.parallelize`
shards. The trunk is the backbone without its pooling and classifier, as an
``nn.Sequential`` of stages (the unit of activation checkpointing); the head pools the
whole slide (mean, max, gated attention, top-k instances) and classifies.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

__all__ = ["SlideClassifier", "build_trunk", "build_classifier", "init_from_checkpoint", "tiny_backbone", "HEADS",
           "total_stride"]


def tiny_backbone(width: int = 16, num_classes: int = 1000) -> nn.Module:
    """A small ResNet-like CNN (stride 16) for CPU runs: ``halo_tiny`` in configs."""

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )

    features = nn.Sequential(
        block(3, width, 2), block(width, 2 * width, 2), block(2 * width, 4 * width, 2), block(4 * width, 4 * width, 2)
    )
    model = nn.Sequential()
    model.features = features
    model.classifier = nn.Linear(4 * width, num_classes)
    return model


def _classifier_input(model: nn.Module) -> int:
    """Channels the backbone's classifier takes: its first Linear after the trunk."""
    for attr in ("fc", "classifier", "head", "heads"):
        part = getattr(model, attr, None)
        if isinstance(part, nn.Module):
            linears = [m for m in part.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[0].in_features
    raise ValueError(f"{type(model).__name__} has no Linear classifier to take the feature width from")


def _is_timm(model: nn.Module) -> bool:
    return hasattr(model, "pretrained_cfg") and hasattr(model, "forward_features") and hasattr(model, "feature_info")


def _timm_trunk(model: nn.Module) -> tuple[nn.Sequential, int]:
    """``model.forward_features`` as stages: the top-level children it calls, in call order,
    with each container of several ``feature_info`` stages (``blocks``, ``stages``,
    ``features``) opened, grouped so that each stage ends at a ``feature_info`` module (one
    stage per reduction, as timm counts them; what follows the last joins it). Checked on a probe image, bit for bit, against
    ``forward_features`` itself: a model whose features are more than its children in order
    (a functional op between them) is refused, not cut wrongly."""
    features = [info["module"] for info in model.feature_info]
    called: list[tuple[str, nn.Module]] = []
    hooks = [child.register_forward_pre_hook(lambda m, _a, name=name: called.append((name, m)))
             for name, child in model.named_children()]
    probe = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                expected = model.forward_features(probe)
            except Exception as e:  # noqa: BLE001 - e.g. ViT's fixed input size: not a trunk halo can shard
                name = model.pretrained_cfg.get("architecture", type(model).__name__)
                raise ValueError(
                    f"timm model {name} cannot be used as a slide trunk: its forward_features fails on a 64 x 64 "
                    f"image ({type(e).__name__}: {e}); halo needs a convolutional trunk that takes any image size "
                    f"(README's backbone table lists the families halo shards)"
                ) from e
            for h in hooks:
                h.remove()
            pieces: list[tuple[str, nn.Module]] = []
            for name, child in called:
                opened = [c for c in child.named_children() if f"{name}.{c[0]}" in features]
                if isinstance(child, nn.Sequential) and len(opened) > 1:
                    pieces += [(f"{name}.{n}", c) for n, c in child.named_children()]
                else:
                    pieces.append((name, child))
            # a stage ends at each feature_info module (one per reduction); what follows the last joins it
            stages: list[list[nn.Module]] = [[]]
            for name, piece in pieces:
                stages[-1].append(piece)
                if name in features:
                    stages.append([])
            tail = stages.pop()
            if stages:
                stages[-1] += tail
            else:
                stages = [tail]
            trunk = nn.Sequential(*(nn.Sequential(*stage) for stage in stages))
            got = trunk(probe)
    finally:
        for h in hooks:
            h.remove()  # a second remove is a no-op
        model.train(training)
    name = model.pretrained_cfg.get("architecture", type(model).__name__)
    if len({id(m) for _, m in called}) != len(called) or got.shape != expected.shape or not torch.equal(got, expected):
        raise ValueError(
            f"cannot cut timm model {name} into trunk stages: its forward_features is more than its children "
            f"{[n for n, _ in called]} run in order; use a torchvision model or another timm family"
        )
    return trunk, int(expected.shape[1])


def build_trunk(model: nn.Module) -> tuple[nn.Sequential, int]:
    """The convolutional trunk of a torchvision or timm classifier as stages, and its output channels.

    timm models: ``forward_features`` cut into the stages timm's ``feature_info`` names
    (see :func:`_timm_trunk`), so checkpointing and the planner work per stage.
    """
    if _is_timm(model):
        return _timm_trunk(model)
    channels = _classifier_input(model)
    tv = getattr(sys.modules.get("torchvision"), "models", None)  # not imported: no torchvision model (halo_tiny)

    def kind(name: str) -> bool:
        return tv is not None and isinstance(model, getattr(tv, name))

    if kind("ResNet"):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return nn.Sequential(stem, model.layer1, model.layer2, model.layer3, model.layer4), channels
    if kind("RegNet"):
        return nn.Sequential(model.stem, *model.trunk_output), channels
    if kind("DenseNet"):
        return nn.Sequential(*model.features, nn.ReLU()), channels
    if kind("ShuffleNetV2"):
        return nn.Sequential(nn.Sequential(model.conv1, model.maxpool), model.stage2, model.stage3, model.stage4,
                             model.conv5), channels
    if kind("MNASNet"):
        return nn.Sequential(*model.layers), channels
    if hasattr(model, "features") and isinstance(model.features, nn.Sequential):
        return nn.Sequential(*model.features), channels
    raise ValueError(
        f"do not know where the trunk of {type(model).__name__} ends; supported: ResNet/ResNeXt/Wide ResNet, "
        f"RegNet, DenseNet, ShuffleNet V2, MNASNet, MobileNet V2/V3, EfficientNet, ConvNeXt, VGG, timm:<name> "
        f"and models with a `features` Sequential"
    )


def total_stride(trunk: nn.Module, probe: int = 4096) -> int:
    """The trunk's output stride: input size over output size, measured on meta tensors.

    Not the product of every stride: residual shortcuts repeat the main path's stride. The
    probe allocates nothing (weights and buffers are replaced by meta stand-ins for the call)
    and leaves the trunk's weights and running statistics as they are.
    """
    state = {k: torch.empty_like(v, device="meta")
             for k, v in itertools.chain(trunk.named_parameters(), trunk.named_buffers())}
    with torch.no_grad():
        out = functional_call(trunk, state, (torch.empty(1, 3, probe, probe, device="meta"),))
    h, w = out.shape[-2:]
    if probe % h or probe % w or h != w:
        raise ValueError(f"the trunk maps {probe} x {probe} to {h} x {w}: not a whole output stride")
    return probe // h


class SlideClassifier(nn.Module):
    """Trunk stages, then a slide-level head.

    Parameters
    ----------
    trunk:
        Stages mapping ``(N, 3, H, W)`` to ``(N, C, H / s, W / s)``.
    head:
        Pools the feature map of the whole slide and returns ``(N, num_classes)``.
    checkpointing:
        Recompute each trunk stage in backward instead of keeping its activations.
    """

    def __init__(self, trunk: nn.Sequential, head: nn.Module, checkpointing: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.checkpointing = checkpointing
        self.frozen_stages = 0
        self.initialised_from: str | None = None  # what build_classifier loaded from a halo checkpoint

    def freeze(self, stages: int) -> None:
        """Freeze the first ``stages`` trunk stages (0: none, ``len(trunk)``: the whole trunk).

        A frozen stage has ``requires_grad=False`` parameters, stays in eval mode (batch norm
        uses its running statistics and updates nothing) and runs without autograd, so it keeps
        no activations for backward: only the layer being computed is live. A DDP wrapper built
        before a change does not reduce the parameters it changes: build a new one.
        """
        n = int(stages)
        if not 0 <= n <= len(self.trunk):
            raise ValueError(f"cannot freeze {n} stages: the trunk has {len(self.trunk)} (0 to {len(self.trunk)})")
        self.frozen_stages = n
        for i, stage in enumerate(self.trunk):
            for p in stage.parameters():
                p.requires_grad_(i >= n)
        self.train(self.training)

    def train(self, mode: bool = True) -> SlideClassifier:
        super().train(mode)
        for stage in list(self.trunk)[: self.frozen_stages]:
            stage.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for i, stage in enumerate(self.trunk):
            if i < self.frozen_stages:
                with torch.no_grad():
                    x = stage(x)
            elif self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _heads() -> dict[str, Callable[..., nn.Module]]:
    from halo.nn import heads

    return {
        "mean": heads.MeanHead,
        "max": heads.MaxHead,
        "attention": heads.GatedAttentionHead,
        "topk": heads.TopKHead,
    }


HEADS = ("mean", "max", "attention", "topk")


def _backbone(name: str) -> nn.Module:
    if name == "halo_tiny":
        return tiny_backbone()
    if name.startswith("halo_tiny"):
        return tiny_backbone(width=int(name.rsplit("_", 1)[1]))
    if name.startswith("timm:"):
        import timm

        arch = name[len("timm:"):]
        if not timm.is_model(arch):
            raise ValueError(f"unknown model.name={name!r}: {arch!r} is not a timm model (see timm.list_models())")
        return timm.create_model(arch, pretrained=False)  # weights come from model.weights, never a hub
    import torchvision  # here only: halo_tiny needs none of its 2 s of import

    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError as e:
        raise ValueError(
            f"unknown model.name={name!r}: use a torchvision classification model name "
            f"(resnet18, resnet50, efficientnet_b0, ...), timm:<name> (timm:efficientnet_b0) or halo_tiny[_WIDTH]"
        ) from e


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the backbone's own classifier, which the slide head replaces."""
    if _is_timm(model):
        names = model.pretrained_cfg.get("classifier") or ()
        return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))
    return "fc.", "classifier."


def _read_weights(path: str | os.PathLike[str]) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.weights={path!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_halo_checkpoint(state) -> bool:
    from halo.checkpoint import FORMAT

    return isinstance(state, dict) and state.get("format") == FORMAT


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike[str], name: str,
                          state: dict | None = None) -> None:
    """Load a state dict of the full backbone (torchvision or timm keys, unchanged) into ``backbone``.

    The backbone's classifier is replaced by the slide head, so its keys may be missing or
    of another class count; every trunk key must be there with its shape. ``state``: the
    file's contents when already read.
    """
    path = os.fspath(path)
    state = _read_weights(path) if state is None else state
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    head = _classifier_prefixes(backbone)
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    own = backbone.state_dict()
    wrong = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing, unexpected = backbone.load_state_dict(
        {k: v for k, v in state.items() if k not in own or v.shape == own[k].shape}, strict=False)
    trunk_missing = [k for k in missing if not k.startswith(head)]
    if trunk_missing or unexpected or wrong:
        raise ValueError(
            f"model.weights={path!r} does not fit {name}: missing {trunk_missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )


def init_from_checkpoint(model: SlideClassifier, ckpt: dict, path: str | os.PathLike[str], *, name: str, head: str,
                         num_classes: int, classes: list[str] | None = None) -> str:
    """Load a halo checkpoint's ``model_state`` into ``model`` (a warm start); says what was loaded.

    The checkpoint must be of the same backbone (``model.name``) with the same trunk shapes. With
    the same head, classes and head shapes, trunk and head are loaded; otherwise the trunk only,
    and the head keeps its fresh initial weights. ``classes`` (``data.classes``) are compared by name, in
    order, with the checkpoint config's ``data.classes`` (None, or a checkpoint without them: not compared).

    Raises
    ------
    ValueError
        Another backbone, or trunk shapes that differ.
    """
    from halo.checkpoint import signature

    path = os.fspath(path)
    theirs = ckpt.get("signature") or {}
    if theirs.get("model") != name:
        raise ValueError(f"model.weights={path!r} is a halo checkpoint of model.name={theirs.get('model')}, but this "
                         f"run builds model.name={name}: its weights load only into {theirs.get('model')}")
    state = ckpt["model_state"]
    ours = signature(model, name=name, head=head, num_classes=num_classes)["shapes"]
    shapes = {k: list(v.shape) for k, v in state.items()}
    trunk = [k for k in set(ours) | set(shapes) if k.startswith("trunk.")]
    wrong = sorted(k for k in trunk if ours.get(k) != shapes.get(k))
    if wrong:
        raise ValueError(f"model.weights={path!r} is a halo checkpoint of {name} whose trunk does not fit this one: "
                         f"parameters differ at {wrong[:5]}")
    differ = [f"{key} {theirs.get(key)!r} in the checkpoint, {now!r} here"
              for key, now in (("head", head), ("num_classes", int(num_classes))) if theirs.get(key) != now]
    before = ((ckpt.get("config") or {}).get("data") or {}).get("classes")
    if not differ and classes is not None and before is not None and list(before) != list(classes):
        differ.append(f"the classes differ: [{', '.join(map(str, before))}] in the checkpoint, "
                      f"[{', '.join(map(str, classes))}] here")
    head_keys = {k for k in set(ours) | set(shapes) if not k.startswith("trunk.")}
    if not differ and any(ours.get(k) != shapes.get(k) for k in head_keys):
        differ.append("head parameter shapes differ (head.options)")
    if differ:
        model.load_state_dict({k: v for k, v in state.items() if k.startswith("trunk.")}, strict=False)
        return (f"the trunk only (the head differs: {'; '.join(differ)}; it starts from fresh weights) from the halo "
                f"checkpoint {path}")
    model.load_state_dict(state)
    return f"trunk and head from the halo checkpoint {path} (epoch {(ckpt.get('state') or {}).get('epoch', '?')})"


def build_classifier(
    name: str,
    num_classes: int,
    *,
    head: str = "attention",
    head_options: dict | None = None,
    weights: str | os.PathLike[str] | None = None,
    checkpointing: bool = False,
    classes: list[str] | None = None,
) -> SlideClassifier:
    """A one-device slide classifier: ``name``'s trunk (with ``weights`` loaded) and a head.

    ``name`` is a torchvision classification model (``resnet50``), a timm model
    (``timm:efficientnet_b0``) or ``halo_tiny[_WIDTH]``. ``weights`` is a path to a state dict
    of the full backbone with its own keys (e.g. ImageNet weights saved with
    ``torch.save(model.state_dict())``, torchvision's or timm's), or a halo checkpoint
    (``best.pt``, ``last.pt``), whose trunk and head are loaded (:func:`init_from_checkpoint`;
    ``initialised_from`` of the model says what); nothing is downloaded.
    """
    backbone = _backbone(name)
    ckpt = None
    if weights:
        state = _read_weights(weights)
        if _is_halo_checkpoint(state):
            ckpt = state
        else:
            load_backbone_weights(backbone, weights, name, state)
    trunk, channels = build_trunk(backbone)
    heads = _heads()
    if head not in heads:
        raise ValueError(f"unknown head.name={head!r}; choose one of {sorted(heads)}")
    model = SlideClassifier(trunk, heads[head](channels, num_classes, **(head_options or {})), checkpointing)
    if ckpt is not None:
        model.initialised_from = init_from_checkpoint(model, ckpt, weights, name=name, head=head,
                                                      num_classes=num_classes, classes=classes)
    return model
