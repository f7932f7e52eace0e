"""One direction between the packages: ``launch`` starts processes and calls ``halo``; ``halo`` never imports ``launch``.

The only exception is the script ``halo/train/__main__.py`` (``python -m halo.train``, the
command line torchrun and mpiexec run), a two-line shim into `launch.train`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_halo_never_imports_launch() -> None:
    shim = ROOT / "halo" / "train" / "__main__.py"
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.split(".")[0] == "launch")
                 for p in (ROOT / "halo").rglob("*.py") if p != shim}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"halo modules import launch (a package cycle): {offenders}"
    assert _imports(shim) == {"launch.train"}, "python -m halo.train must only hand over to launch.train"


def test_launch_uses_halo_train_public_names_only() -> None:
    import halo.train

    for path in (ROOT / "launch").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "halo.train":
                for alias in node.names:
                    assert alias.name in halo.train.__all__, f"{path.name} imports halo.train.{alias.name}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("halo.train."):
                pytest.fail(f"{path.name} reaches into {node.module}: use halo.train's public functions")


def test_requeue_detection_lives_in_one_place() -> None:
    """Only `launch.env.slurm_restarts` reads ``SLURM_RESTART_COUNT`` (prose that names it does not count)."""
    def reads(path: Path) -> bool:
        return any(isinstance(n, ast.Constant) and n.value == "SLURM_RESTART_COUNT"
                   for n in ast.walk(ast.parse(path.read_text())))

    hits = [str(p.relative_to(ROOT)) for p in [*(ROOT / "halo").rglob("*.py"), *(ROOT / "launch").glob("*.py")]
            if reads(p)]
    assert hits == ["launch/env.py"], hits


@pytest.mark.parametrize("value, expected", [(None, 0), ("", 0), ("0", 0), ("2", 2), (" 1 ", 1), ("x", 0)])
def test_slurm_restarts(value: str | None, expected: int) -> None:
    from launch.env import slurm_restarts

    assert slurm_restarts({} if value is None else {"SLURM_RESTART_COUNT": value}) == expected


def test_resume_if_requeued(monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.train import resume_if_requeued

    cfg = OmegaConf.create({"mode": "train", "train": {"resume": False}})
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resume_if_requeued(cfg).train.resume is False
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_if_requeued(cfg).train.resume is True
    predict = OmegaConf.create({"mode": "predict", "train": {"resume": False}})
    assert resume_if_requeued(predict).train.resume is False  # prediction has nothing to resume


def test_run_needs_a_process_group() -> None:
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from halo.train import CONF_DIR, run

    assert not dist.is_initialized()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        run(cfg, "/nonexistent/run")


@pytest.mark.timeout(120)
def test_halo_and_a_halo_tiny_run_import_neither_torchvision_nor_timm() -> None:
    """Every launched rank imports halo: torchvision (with torch._dynamo) and timm cost seconds of
    start-up each, so they are imported only for models built from them; their layers are still
    swapped then (tests/test_layout.py: torchvision's and timm's ConvNeXt)."""
    import subprocess
    import sys

    code = """
import os, sys, tempfile
import torch.distributed as dist
import halo, halo.train, launch.train, launch.env
assert not {"torchvision", "timm"} & set(sys.modules), sorted({"torchvision", "timm"} & set(sys.modules))
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
from halo.models import build_classifier
model = halo.parallelize(build_classifier("halo_tiny", 2), halo.SpatialMesh(1, 1))
assert not {"torchvision", "timm"} & set(sys.modules), sorted({"torchvision", "timm"} & set(sys.modules))
import torchvision
from halo.parallelize import twins
from torchvision.models.convnext import LayerNorm2d
assert LayerNorm2d in twins()  # once torchvision is imported, its layers have their twins
dist.destroy_process_group()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
