"""Every torchvision classification model and timm's CNN families: exact or refused, never wrong.

Runs ``scripts/backbones.py``'s sweep on a 1x2 mesh (float64 against one process up to 50M
parameters) and checks README's table of families against it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import backbones  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_every_backbone_is_exact_or_refused_and_readme_says_which(pool2) -> None:
    rows = pool2.run(backbones.check_models, backbones.all_models(), timeout=1400)[0]
    bad = [r for r in rows if r["verdict"] not in ("exact", "refused", "accepted")]
    assert not bad, "wrong or crashed: " + "; ".join(
        f"{r['source']}:{r['name']} {r['verdict']} {r.get('error')} {r.get('reason', '')[:300]}" for r in bad)
    unnamed = [f"{r['name']}: {r['reason'][:200]}" for r in rows if r["verdict"] == "refused" and not r["names_module"]]
    assert not unnamed, "refusals that do not start with a module path: " + "; ".join(unnamed)
    assert backbones.readme_table((ROOT / "README.md").read_text()) == backbones.table(rows), (
        "README.md's backbone table is stale: run python scripts/backbones.py --write")


def test_table_groups_by_family() -> None:
    rows = [
        {"source": "torchvision", "name": "vgg11", "family": "VGG", "verdict": "refused",
         "reason": "avgpool (torch.nn.AdaptiveAvgPool2d): output_size=(7, 7) depends on the size; use 1"},
        {"source": "torchvision", "name": "vgg13", "family": "VGG", "verdict": "refused",
         "reason": "avgpool (torch.nn.AdaptiveAvgPool2d): output_size=(7, 7) depends on the size; use 1"},
        {"source": "timm", "name": "resnet18", "family": "resnet", "verdict": "exact"},
    ]
    text = backbones.table(rows)
    assert "| timm | resnet | exact | resnet18 |  |" in text
    assert "| torchvision | VGG | refused | vgg11, vgg13 | `AdaptiveAvgPool2d`: output_size=(7, 7) depends on the size |" in text
