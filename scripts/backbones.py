"""Which backbones halo shards exactly: every torchvision classification model and timm's CNN families.

Each model is built with 3 classes, parallelized on a 1x2 mesh of two gloo ranks, and run
against the same network on one process with the full image (``tests/equivalence.py``):
float64 and every gradient and buffer below 1e-9 up to 50M parameters; larger models one
forward in float32 against their own one-process float32 forward (rel. 1e-4), and those over
150M parameters only as far as ``parallelize`` (their families are proven on smaller members).
A model ends as exact, refused (``HaloNotSupportedError`` / ``HaloShapeError``, with the
module it names), or as a failure: wrong numbers or any other exception.

    python scripts/backbones.py            # print the table
    python scripts/backbones.py --write    # and write it into README.md between the markers

``tests/test_zoo.py`` runs the same sweep (marked slow) and checks README's table against it.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- backbones:begin -->", "<!-- backbones:end -->"
FLOAT64_MAX_PARAMS = 50_000_000
RUN_MAX_PARAMS = 150_000_000
FLOAT32_TOL = 1e-4

#: timm models swept: one or more per CNN family, and the families halo refuses.
TIMM_MODELS = (
    "resnet18", "resnet18d", "resnet26t", "seresnext26d_32x4d", "ecaresnet26t", "skresnet18", "resnest14d",
    "res2net50_14w_8s", "efficientnet_b0", "tf_efficientnet_b0", "tf_efficientnet_lite0", "mixnet_s",
    "mobilenetv3_small_100", "tf_mobilenetv3_small_100", "mobilenetv2_050", "lcnet_050", "mnasnet_small",
    "regnetx_002", "regnety_002", "cspresnet50", "cspdarknet53", "densenet121", "resnetv2_50x1_bit",
    "convnext_atto", "dla34", "dpn48b", "ghostnet_100", "rexnet_100", "repvgg_a0", "vgg11", "xception41",
    "hrnet_w18_small", "inception_v3", "nf_resnet26", "vit_tiny_patch16_224", "efficientvit_b0", "mobileone_s0",
)

#: how a model name maps to the family row of the table
_TV_FAMILY = [
    (r"^resnet\d", "ResNet"), (r"^resnext", "ResNeXt"), (r"^wide_resnet", "Wide ResNet"),
    (r"^mobilenet_v2", "MobileNet V2"), (r"^mobilenet_v3", "MobileNet V3"), (r"^mnasnet", "MNASNet"),
    (r"^efficientnet_v2", "EfficientNet V2"), (r"^efficientnet", "EfficientNet"), (r"^regnet", "RegNet"),
    (r"^densenet", "DenseNet"), (r"^convnext", "ConvNeXt"), (r"^shufflenet", "ShuffleNet V2"),
    (r"^squeezenet", "SqueezeNet"), (r"^alexnet", "AlexNet"), (r"^vgg", "VGG"), (r"^googlenet", "GoogLeNet"),
    (r"^inception", "Inception V3"), (r"^vit", "ViT"), (r"^swin", "Swin"), (r"^maxvit", "MaxViT"),
]


def family(source: str, name: str) -> str:
    if source == "timm":
        return _timm_family(name)
    for pattern, fam in _TV_FAMILY:
        if re.match(pattern, name):
            return fam
    return name


def _timm_family(name: str) -> str:
    """timm's module that defines the model (``timm.models.<module>``): its family."""
    import timm

    fn = timm.models._registry._model_entrypoints[name]  # noqa: SLF001 - the registry has no public lookup
    return fn.__module__.rsplit(".", 1)[-1]


def _build(source: str, name: str, size: tuple[int, int] | None = None):
    if source == "timm":
        import timm

        kwargs = {}
        if size is not None and timm.models.get_pretrained_cfg(name).fixed_input_size:
            kwargs["img_size"] = size  # ViTs check the size they were built for
        model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    else:
        import torchvision

        model = torchvision.models.get_model(name, num_classes=3)
    return model


def _params(source: str, name: str) -> int:
    import torch

    try:
        with torch.device("meta"):
            model = _build(source, name)
    except (NotImplementedError, RuntimeError):  # builders that compute with tensors (RegNet)
        model = _build(source, name)
    return sum(p.numel() for p in model.parameters())


def _module_names(source: str, name: str) -> set[str]:
    """The model's module paths, from a copy built on the meta device (no memory: ViT-H has 630M parameters)."""
    import torch

    try:
        with torch.device("meta"):
            model = _build(source, name)
    except (NotImplementedError, RuntimeError):  # builders that compute with tensors (RegNet)
        model = _build(source, name)
    return {n for n, _ in model.named_modules()}


def _refuse_on_meta(source: str, name: str, mesh) -> None:
    """Raise the refusal ``parallelize`` gives a copy of the model built on the meta device.

    Most refusals come from the walk over the modules (a kernel that does not tile, a
    size-dependent pooling, attention), which needs no weights: a refused ViT-H or VGG costs
    no real build and no forward. Anything else the meta copy cannot do (builders that
    compute with tensors, parametrisations that copy data) leaves the verdict to the real build.
    """
    import torch

    import halo
    from halo.errors import HaloNotSupportedError, HaloShapeError

    try:
        with torch.device("meta"):
            model = _build(source, name)
        halo.parallelize(model, mesh)
    except (HaloNotSupportedError, HaloShapeError):
        raise
    except Exception:  # noqa: BLE001 - the meta copy could not tell: the real build decides
        return


def check_model(source: str, name: str) -> dict:
    """One model's verdict on this rank of a 1x2 world: run on every rank (gloo)."""
    import copy
    import functools

    import torch

    import halo
    from halo.errors import HaloNotSupportedError, HaloShapeError

    sys.path.insert(0, str(ROOT / "tests"))
    from distributed import shared_mesh
    from equivalence import TOL, check_equivalence, rel_err

    mesh = shared_mesh(1, 2)
    params = _params(source, name)
    row = {"source": source, "name": name, "family": family(source, name), "params": params}
    start = time.perf_counter()
    try:
        _refuse_on_meta(source, name, mesh)
        if params > RUN_MAX_PARAMS:
            halo.parallelize(_build(source, name), mesh)
            row.update(verdict="accepted", how="parallelize only (size)", error=None)
        else:
            for unit in (64, 128, 256):  # the smallest image whose blocks the deepest halo fits
                size = (unit, 2 * unit)
                try:
                    if params <= FLOAT64_MAX_PARAMS:
                        build = functools.partial(_build, source, name, size)
                        try:
                            errors = check_equivalence(build, 1, 2, *size)
                            how = f"float64 {unit}x{2 * unit}"
                        except ValueError as e:  # batch norm after global pooling needs two images
                            if "more than 1 value per channel" not in str(e):
                                raise
                            errors = check_equivalence(build, 1, 2, *size, batch=2)
                            how = f"float64 2x{unit}x{2 * unit}"
                        worst = max(errors.values())
                    else:
                        torch.manual_seed(0)
                        ref = _build(source, name, size).eval()
                        model = halo.parallelize(copy.deepcopy(ref), mesh)
                        x = torch.randn(1, 3, unit, 2 * unit, generator=torch.Generator().manual_seed(1))
                        with torch.no_grad():
                            worst = rel_err(model(halo.scatter(x, mesh)), ref(x))
                        how = f"float32 forward {unit}x{2 * unit}"
                    break
                except HaloShapeError as e:
                    if "halo of" not in str(e) or unit == 256:
                        raise
            tol = TOL if how.startswith("float64") else FLOAT32_TOL
            row.update(verdict="exact" if worst < tol else "WRONG", how=how, error=worst)
    except (HaloNotSupportedError, HaloShapeError) as e:
        # a refusal names the module: its first word is a module path of the model, or <model>
        path = str(e).split(" ")[0]
        named = path == "<model>" or path in _module_names(source, name)
        row.update(verdict="refused", how=type(e).__name__, error=None, reason=str(e), names_module=named)
    except Exception as e:  # noqa: BLE001 - any other exception is a failure to report
        row.update(verdict="CRASH", how=type(e).__name__, error=None, reason=f"{type(e).__name__}: {e}")
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def all_models() -> list[tuple[str, str]]:
    import torchvision

    return [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)] + [
        ("timm", n) for n in TIMM_MODELS
    ]


def check_models(models: list[tuple[str, str]]) -> list[dict]:
    return [check_model(source, name) for source, name in models]


def _reason(row: dict) -> str:
    """The refusal's first clause, without the module path and shapes (the same for a family's members)."""
    text = row.get("reason", "")
    text = re.sub(r"^\S+ \(([\w.]+)\)", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)
    text = re.sub(r"^\S+ calls", "calls", text)
    text = re.sub(r" of shape \([\d, ]*\)( \(spatial dims \([\d, ]*\)\))?", "", text)
    return text.split(";")[0].split(". ")[0][:140]


def table(rows: list[dict]) -> str:
    """Markdown: one line per (source, family): the verdict, models, and the reason for refusals."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["source"], row["family"]), []).append(row)
    lines = ["| source | family | halo | models swept | why |", "|---|---|---|---|---|"]
    for (source, fam), members in sorted(groups.items()):
        verdicts = sorted({m["verdict"] for m in members})
        names = ", ".join(m["name"] for m in members)
        why = "; ".join(sorted({_reason(m) for m in members if m["verdict"] == "refused"}))
        lines.append(f"| {source} | {fam} | {' / '.join(verdicts)} | {names} | {why} |")
    return "\n".join(lines)


def readme_table(readme: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md has no {BEGIN} ... {END} section")
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def _sweep_in_two_ranks(models) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from distributed import ProcessPool

    pool = ProcessPool(2)
    try:
        return pool.run(check_models, models, timeout=3600)[0]
    finally:
        pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "scripts"))
    import backbones  # the pool's workers import the check by this module name

    rows = _sweep_in_two_ranks(backbones.all_models())
    for row in rows:
        print(f"{row['source']:12} {row['name']:28} {row['verdict']:8} {row['how']:28} {row['seconds']:6} s "
              f"{row.get('error') or ''} {row.get('reason', '')[:100]}")
    text = table(rows)
    print(text)
    if args.write:
        path = ROOT / "README.md"
        readme = path.read_text()
        readme_table(readme)  # the markers are there
        head, rest = readme.split(BEGIN, 1)
        path.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return 1 if any(r["verdict"] in ("WRONG", "CRASH") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
