"""The typed config: types and keys are checked when Hydra composes, before anything runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from halo.train import CONF_DIR


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("override,key", [
    ("train.epochs=three", "train.epochs"),
    ("mesh.rows=two", "mesh.rows"),
    ("train.lr=fast", "train.lr"),
    ("data.tissue.margin=wide", "data.tissue.margin"),
    ("train.checkpointing=maybe", "train.checkpointing"),
])
def test_a_wrong_type_is_refused_at_composition_naming_the_key(override: str, key: str) -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        _compose(override)
    text = f"{err.value} {err.value.__cause__}"
    assert key.split(".")[-1] in text and override.split("=")[1] in text, text


@pytest.mark.parametrize("override", ["train.epoch=3", "data.tissue.margni=0.1", "mesh.depth=2"])
def test_an_unknown_key_is_refused(override: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        _compose(override)
    assert override.split("=")[0].split(".")[-1] in f"{err.value} {err.value.__cause__}"


@pytest.mark.parametrize("override,key,allowed", [
    ("train.optimizer=adam", "train.optimizer", "adamw"),
    ("train.schedule=linear", "train.schedule", "onecycle"),
    ("train.trunk=half", "train.trunk", "frozen"),
    ("mode=eval", "mode", "predict"),
    ("dist.backend=mpi", "dist.backend", "gloo"),
    ("head.name=lse", "head.name", "attention"),
])
def test_a_choice_outside_its_values_is_refused_before_running(override: str, key: str, allowed: str) -> None:
    from halo.train.config import check

    with pytest.raises(ValueError) as err:
        check(_compose(override))
    assert key in str(err.value) and allowed in str(err.value) and override.split("=")[1] in str(err.value)


@pytest.mark.parametrize("overrides,needle", [
    (["blocks=[1,2]"], "is for mode=predict"),
    (["mode=predict", "blocks=[2]"], "must be [rows, cols]"),
    (["mode=predict", "blocks=[0,2]"], "both >= 1"),
    (["data.canvas=-32"], "data.canvas"),
])
def test_values_that_do_not_fit_together_are_refused(overrides: list[str], needle: str) -> None:
    from halo.train.config import check

    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        check(_compose(*overrides))
    check(_compose("mode=predict", "blocks=[2,2]", "data.canvas=64"))  # and these do


def test_every_data_option_is_reachable_and_reaches_the_data_path() -> None:
    from halo.train.config import augment_options, tissue_options
    from halo.data import Augment, TissueOptions

    cfg = _compose("data.tissue.margin=0.07", "data.tissue.enabled=false", "data.augment.hed_sigma=0.2",
                   "data.augment.rot90=false", "data.stain_normalize=true")
    tissue = tissue_options(cfg.data)
    assert isinstance(tissue, TissueOptions) and tissue.margin == 0.07 and tissue.enabled is False
    augment = augment_options(cfg.data)
    assert isinstance(augment, Augment) and augment.hed_sigma == 0.2 and augment.rot90 is False
    assert cfg.data.stain_normalize is True
    # every field of the data path's option classes has a config key of the same name and default
    defaults = _compose().data
    for cls, node in ((TissueOptions, defaults.tissue), (Augment, defaults.augment)):
        for f in dataclasses.fields(cls):
            assert f.name in node, f"{cls.__name__}.{f.name} cannot be set from config"
            assert node[f.name] == f.default, (cls.__name__, f.name)
    assert _compose("data.augment.enabled=false").data.augment.enabled is False


def test_every_field_is_documented_in_one_line() -> None:
    from halo.train.config import SCHEMAS

    for schema in SCHEMAS:
        for f in dataclasses.fields(schema):
            doc = f.metadata.get("doc", "")
            assert doc and "\n" not in doc, f"{schema.__name__}.{f.name} has no one-line doc"


def test_the_experiment_presets_compose() -> None:
    presets = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
    assert "resnet50_2x2" in presets
    cfg = _compose("experiment=resnet50_2x2")
    assert (cfg.model.name, cfg.mesh.rows, cfg.mesh.cols, cfg.train.checkpointing) == ("resnet50", 2, 2, True)


@pytest.mark.parametrize("overrides,missing", [
    (["data=csv"], "data.classes, data.csv"),
    (["data=csv", "data.csv=cohort.csv"], "data.classes"),
    (["data=csv", "data.classes=[normal,tumour]"], "data.csv"),
    (["data=csv", "mode=predict", "checkpoint=best.pt"], "data.csv"),
])
def test_a_missing_value_is_refused_before_running_naming_the_keys(overrides: list[str], missing: str) -> None:
    """``data=csv`` leaves ``data.csv`` and ``data.classes`` to the command line: without them the run
    is refused before it starts (not an OmegaConf traceback from deep in the engine); prediction takes
    the classes from its checkpoint."""
    from halo.train.config import check

    with pytest.raises(ValueError) as err:
        check(_compose(*overrides))
    assert f"missing: {missing}" in str(err.value), err.value
    assert "data.classes=[" in str(err.value) or "data.classes" not in missing
    check(_compose("data=csv", "data.csv=cohort.csv", "data.classes=[normal,tumour]"))
    check(_compose("data=csv", "data.csv=cohort.csv", "mode=predict", "checkpoint=best.pt"))


@pytest.mark.parametrize("override,key,hint", [
    ("+train.epoch=1", "train.epoch", "train.epochs"),
    ("+data.tissue.margni=0.1", "data.tissue.margni", "data.tissue.margin"),
    ("+mesh.depth=2", "mesh.depth", None),
])
def test_a_key_added_with_plus_outside_the_schema_is_refused(override: str, key: str, hint: str | None) -> None:
    """Hydra's advice for an unknown key is to add it with ``+``; the typed config then holds a key
    nothing reads (``+train.epoch=1`` trained the default 8 epochs): refused, with the likely key."""
    from halo.train.config import check

    with pytest.raises(ValueError) as err:
        check(_compose(override))
    assert f"{key} is not a key of" in str(err.value), err.value
    assert hint is None or f"did you mean {hint}?" in str(err.value), err.value
    check(_compose("+head.options.k=3", "+launcher.additional_parameters.exclusive=true"))  # open mappings


def test_a_bad_choice_is_named_before_missing_values() -> None:
    """``mode=pred`` is a typo of a choice: say that, not that the training cohort is missing."""
    from halo.train.config import check

    with pytest.raises(ValueError, match="mode='pred' is not one of train, predict"):
        check(_compose("data=csv", "mode=pred"))


@pytest.mark.timeout(120)
def test_a_refused_config_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(CONF_DIR).parent
    out = subprocess.run([sys.executable, "-m", "halo.train", "data=csv", "mesh=1x1"], cwd=tmp_path, timeout=100,
                         env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    assert "halo-train: missing: data.classes, data.csv" in out.stderr, out.stderr


def test_halo_submit_refuses_a_bad_config_before_queueing(tmp_path: Path, capsys) -> None:
    from launch.submit import submit

    assert submit(_compose("data=csv", "launcher=local"), tmp_path / "run") == 2
    assert "halo-submit: missing: data.classes, data.csv" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing queued, no run directory


@pytest.mark.parametrize("classes,needle", [
    ("[tumour]", "data.classes=[tumour] names 1 class: a slide classifier needs at least 2"),
    ("[normal,tumour,necrosis]", "data.classes names 3 classes (normal, tumour, necrosis) but model.num_classes=2: "
                                 "add model.num_classes=3"),
])
def test_classes_and_num_classes_are_checked_before_running(classes: str, needle: str) -> None:
    from halo.train.config import check

    with pytest.raises(ValueError) as err:
        check(_compose("data=csv", "data.csv=c.csv", f"data.classes={classes}"))
    assert needle in str(err.value), err.value
    check(_compose("data=csv", "data.csv=c.csv", "data.classes=[a,b,c]", "model.num_classes=3"))
