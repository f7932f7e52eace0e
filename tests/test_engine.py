"""The engine in one process (world 1, gloo): what a run reads, writes and warns about."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from halo.train.data import group_steps

ROOT = Path(__file__).resolve().parent.parent


# -- which slide each image group reads at each step ------------------------------------------
@pytest.mark.parametrize("slides,groups", [(1, 3), (2, 3), (4, 3), (5, 3), (6, 3), (7, 2), (3, 1), (1, 8)])
def test_every_group_runs_the_same_steps_and_each_slide_counts_once(slides: int, groups: int) -> None:
    order = [10 + i for i in range(slides)]
    plan = [group_steps(order, groups, g) for g in range(groups)]
    steps = {len(p) for p in plan}
    assert steps == {-(-slides // groups)}, plan  # the same number of collectives on every group
    weighted = sorted(i for p in plan for i, w in p if w > 0)
    assert weighted == order, plan  # every slide once with weight, the padding with weight 0
    assert all(w in (0.0, 1.0) for p in plan for _, w in p)


def test_no_slides_no_steps() -> None:
    assert group_steps([], 3, 1) == []


# -- a whole run in one process ---------------------------------------------------------------------
def _write_cohort(root: Path, splits: dict[str, str], same_names: bool = False) -> Path:
    """Four small slides (two per class) with the given split per slide; two folders if ``same_names``."""
    from halo.data.synth import make_slide

    rows = []
    for i, (name, split) in enumerate(splits.items()):
        label = "tumour" if i % 2 else "normal"
        folder = root / (f"site{i % 2}" if same_names else "slides")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"slide_{i // 2}" if same_names else name
        tif, _, _ = make_slide(folder, stem, seed=3, index=i, tumour=bool(i % 2), size=(256, 256), mpp=0.5, levels=2)
        rows.append({"slide": str((folder / tif).relative_to(root)), "label": label, "split": split})
    out = root / "cohort.csv"
    with open(out, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=["slide", "label", "split"])
        wr.writeheader()
        wr.writerows(rows)
    return out


def _run(csv_path: str, run_dir: str, extra: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from halo.train import CONF_DIR, run

    overrides = ["data=csv", f"data.csv={csv_path}", "data.classes=[normal,tumour]", "data.mpp=1.0", "mesh=1x1",
                 "train.epochs=1", "train.progress=false", "train.threads=1", "data.augment.enabled=false", *extra]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("halo.train")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        summary = run(cfg, run_dir=run_dir, overrides=overrides)  # as halo-train's command line: given explicitly
    finally:
        logger.removeHandler(handler)
    return {"summary": summary, "log": records}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.timeout(300)
def test_run_records_what_it_read_and_predicts_the_test_rows(pool1, tmp_path: Path) -> None:
    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "val", "e": "test", "f": "test"})
    run_dir = tmp_path / "run"
    out = pool1.run(_run, str(cohort), str(run_dir), [])[0]
    records = {r["key"]: r for r in _rows(run_dir / "slides.csv")}
    assert set(records) == {f"slides/{n}" for n in "abcdef"}, records
    for r in records.values():
        assert r["level"] == "1" and float(r["mpp"]) == pytest.approx(1.0), r
        assert r["reader"] and r["vendor"], r
        assert int(r["padded_height"]) % 16 == 0 and int(r["padded_width"]) % 16 == 0, r  # halo_tiny: stride 16
        assert 0.0 < float(r["tissue_fraction"]) <= 1.0, r
        assert float(r["read_seconds"]) > 0, r
        w, h = int(r["region_width"]), int(r["region_height"])
        assert 0 < w <= 256 and 0 < h <= 256, r
    assert {records[k]["split"] for k in records} == {"train", "val", "test"}
    test_rows = _rows(run_dir / "test_predictions.csv")
    assert sorted(r["slide"] for r in test_rows) == ["slides/e", "slides/f"]
    assert "test" in out["summary"] and "auc" in out["summary"]["test"]
    assert any("slides/s" in line for line in out["log"]), out["log"]


@pytest.mark.timeout(300)
def test_a_cohort_without_validation_warns_and_keeps_best(pool1, tmp_path: Path) -> None:
    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "train", "d": "train"})
    run_dir = tmp_path / "run"
    out = pool1.run(_run, str(cohort), str(run_dir), [])[0]
    warned = [line for line in out["log"] if "no validation" in line]
    assert len(warned) == 1, out["log"]
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["best_epoch"] == 1


@pytest.mark.timeout(300)
def test_two_slides_with_one_file_name_give_two_predictions(pool1, tmp_path: Path) -> None:
    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "val"}, same_names=True)
    run_dir = tmp_path / "run"
    pool1.run(_run, str(cohort), str(run_dir), [])
    rows = _rows(run_dir / "predictions.csv")
    assert sorted(r["slide"] for r in rows) == ["site0/slide_1", "site1/slide_1"], rows
    maps = sorted(p.name for p in (run_dir / "heatmaps").glob("*.png"))
    assert len(maps) == 2, maps


@pytest.mark.timeout(300)
def test_one_slide_over_three_image_groups_trains_and_validates(tmp_path: Path) -> None:
    """World 3, mesh 1x1: the old schedule gave the third group no step, and the others waited
    for it in a collective until the timeout."""
    from distributed import ProcessPool

    cohort = _write_cohort(tmp_path, {"a": "train", "b": "val"})
    run_dir = tmp_path / "run"
    pool = ProcessPool(3)
    try:
        out = pool.run(_run, str(cohort), str(run_dir), ["train.epochs=2"], timeout=150)
    finally:
        pool.close()
    assert [o["summary"]["slides_seen"] for o in out] == [2, 2, 2]  # the slide once per epoch, not 3 times
    rows = _rows(run_dir / "predictions.csv")
    assert len(rows) == 1 and rows[0]["split"] == "val", rows


@pytest.mark.timeout(300)
def test_a_csv_without_split_trains_on_a_patient_level_split(pool1, tmp_path: Path) -> None:
    cohort = _write_cohort(tmp_path, {n: "" for n in "abcdefgh"})
    rows = _rows(cohort)
    patient = {"slides/a": "p1", "slides/c": "p1", "slides/b": "p2", "slides/d": "p2",
               "slides/e": "p3", "slides/g": "p3", "slides/f": "p4", "slides/h": "p4"}
    with open(cohort, "w", newline="") as fh:  # no split column at all, two slides per patient
        wr = csv.DictWriter(fh, fieldnames=["slide", "label", "patient"])
        wr.writeheader()
        for r in rows:
            wr.writerow({"slide": r["slide"], "label": r["label"], "patient": patient[r["slide"].removesuffix(".tif")]})
    run_dir = tmp_path / "run"
    out = pool1.run(_run, str(cohort), str(run_dir), ["data.val_fraction=0.5"])[0]
    assert any("patient-level stratified split" in line for line in out["log"]), out["log"]
    records = _rows(run_dir / "slides.csv")
    sides: dict[str, set[str]] = {}
    for r in records:
        sides.setdefault(patient[r["key"]], set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values()), sides  # no patient on both sides
    assert {s for v in sides.values() for s in v} == {"train", "val"}, sides
    val = sorted(r["slide"] for r in _rows(run_dir / "predictions.csv"))
    assert val == sorted(r["key"] for r in records if r["split"] == "val") and len(val) == 4, val
    assert out["summary"]["val_auc"] is not None


def _refused(csv_path: str, run_dir: str, extra: list[str]) -> str:
    from halo.errors import InputError

    try:
        _run(csv_path, run_dir, extra)
    except InputError as exc:
        return str(exc)
    raise AssertionError("the run was not refused as bad input")


@pytest.mark.timeout(300)
def test_training_into_a_used_directory_needs_resume_or_overwrite(pool1, tmp_path: Path) -> None:
    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "val"})
    run_dir = tmp_path / "run"
    pool1.run(_run, str(cohort), str(run_dir), [])
    stale = run_dir / "heatmaps" / "stale.png"
    stale.write_bytes(b"from an earlier run")
    message = pool1.run(_refused, str(cohort), str(run_dir), [])[0]
    assert str(run_dir) in message and "best.pt" in message and "train.overwrite=true" in message
    assert stale.is_file()
    pool1.run(_run, str(cohort), str(run_dir), ["train.overwrite=true"])
    assert not stale.exists() and (run_dir / "checkpoints" / "best.pt").is_file()


def test_checkpoint_rng_state_round_trips_every_generator(tmp_path: Path) -> None:
    import random

    import numpy as np
    import torch

    from halo.checkpoint import FORMAT, load_checkpoint, save_atomic
    from halo.train.checkpoint import rng_state as _rng_state
    from halo.train.checkpoint import set_rng_state as _set_rng_state

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_atomic({"format": FORMAT, "rng": [_rng_state()]}, tmp_path / "c.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    _set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"][0])  # loads with weights_only=True
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


# -- trunk modes ------------------------------------------------------------------------------------
def _run_keeping_params(csv_path: str, run_dir: str, extra: list[str]) -> dict:
    """``_run``, returning this rank's parameters when the run starts and at its last checkpoint."""
    from halo.train import checkpoint, job

    kept: dict[str, dict] = {}
    start, save = job.start, checkpoint.save

    def snapshot(model) -> dict:  # parameters and buffers (batch-norm statistics)
        return {n: p.detach().clone() for n, p in [*model.named_parameters(), *model.named_buffers()]}

    def spy_start(*args, **kwargs):
        j = start(*args, **kwargs)
        kept["start"] = snapshot(j.model)
        return j

    def spy_save(j, *args, **kwargs):
        kept["end"] = snapshot(j.model)  # the last call: after the last epoch
        kept["requires_grad"] = {n: p.requires_grad for n, p in j.model.named_parameters()}
        return save(j, *args, **kwargs)

    job.start, checkpoint.save = spy_start, spy_save
    try:
        out = _run(csv_path, run_dir, extra)
    finally:
        job.start, checkpoint.save = start, save
    return {**out, **kept}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", ["frozen", "freeze_stages", "unfreeze_at"])
def test_trunk_modes_train_what_they_say_and_ranks_stay_equal(pool2, tmp_path: Path, mode: str) -> None:
    """Two image groups (world 2, mesh 1x1), so DDP must reduce every trained parameter."""
    cohort = _write_cohort(tmp_path, {n: s for n, s in zip("abcdef", ["train"] * 4 + ["val"] * 2)})
    extra = {"frozen": ["train.trunk=frozen"], "freeze_stages": ["train.freeze_stages=2"],
             "unfreeze_at": ["train.freeze_stages=2", "train.unfreeze_at=2", "train.trunk_lr_scale=0.5"]}[mode]
    out = pool2.run(_run_keeping_params, str(cohort), str(tmp_path / "run"), ["train.epochs=2", *extra], timeout=300)
    start, end = out[0]["start"], out[0]["end"]
    for name in end:  # every parameter equal on both ranks after training
        assert torch_equal(end[name], out[1]["end"][name]), name
    frozen = {"frozen": ("trunk.",), "freeze_stages": ("trunk.0.", "trunk.1."), "unfreeze_at": ()}[mode]
    for name in end:
        moved = not torch_equal(start[name], end[name])
        if name.startswith(frozen):
            assert not moved, f"{name} is frozen but changed"
        elif name.startswith(("head.", "trunk.")) and name.endswith("weight"):
            assert moved, f"{name} should have trained"
    if mode == "unfreeze_at":
        assert any("unfrozen" in line and "DDP rebuilt" in line for line in out[0]["log"]), out[0]["log"]
        assert all(out[0]["requires_grad"].values())


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_frozen_stages_keep_no_activations_and_stay_in_eval() -> None:
    import torch

    from halo.models import build_classifier

    def saved(model) -> int:
        count = [0]

        def pack(t):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(1, 3, 64, 64)).sum().backward()
        return count[0]

    torch.manual_seed(0)
    model = build_classifier("halo_tiny", 2, head="mean").train()
    full = saved(model)
    model.zero_grad(set_to_none=True)
    model.freeze(len(model.trunk))
    model.train()
    assert all(not m.training for stage in model.trunk for m in stage.modules()) and model.head.training
    assert saved(model) < full / 20  # only the head's saved tensors remain
    assert all(p.grad is None for p in model.trunk.parameters())
    with pytest.raises(ValueError, match="the trunk has"):
        model.freeze(len(model.trunk) + 1)


# -- streaming evaluation ---------------------------------------------------------------------------
def _run_watching_maps(csv_path: str, run_dir: str, extra: list[str]) -> dict:
    """``_run``, checking at each heatmap written that no earlier slide's map is still alive."""
    import gc
    import weakref

    import halo.train.evaluate as evaluate_module

    alive_at_write: list[int] = []
    refs: list = []
    save = evaluate_module.save_heatmap

    def spy(path, plan, score, **kw):
        gc.collect()
        alive_at_write.append(sum(r() is not None for r in refs))
        refs.append(weakref.ref(score.base if score.base is not None else score))
        return save(path, plan, score, **kw)

    evaluate_module.save_heatmap = spy
    try:
        out = _run(csv_path, run_dir, extra)
    finally:
        evaluate_module.save_heatmap = save
    gc.collect()
    return {**out, "alive_at_write": alive_at_write, "alive_after": sum(r() is not None for r in refs)}


@pytest.mark.timeout(300)
def test_validation_keeps_no_heatmap_once_written(pool1, tmp_path: Path) -> None:
    cohort = _write_cohort(tmp_path, {n: s for n, s in zip("abcdefgh", ["train"] * 2 + ["val"] * 6)})
    out = pool1.run(_run_watching_maps, str(cohort), str(tmp_path / "run"), [])[0]
    assert len(out["alive_at_write"]) == 6, out["alive_at_write"]  # one heatmap per validation slide
    assert out["alive_at_write"] == [0] * 6 and out["alive_after"] == 0, out  # memory flat in the slide count
    assert len(list((tmp_path / "run" / "heatmaps").glob("*.png"))) == 6


# -- checkpoints: resume in every trunk mode, and load on another mesh -------------------------------
def _final_weights(run_dir: str) -> dict:
    from halo.checkpoint import load_checkpoint

    return load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")["model_state"]


def _epoch_of_last(run_dir: str) -> int:
    from halo.checkpoint import load_checkpoint

    return load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")["state"]["epoch"]


def _run_stopping_after_one_epoch(csv_path: str, run_dir: str, extra: list[str]) -> None:
    """``_run``, killed (an exception) right after the first epoch's checkpoint is written."""
    from halo.train import checkpoint

    save = checkpoint.save

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt("stopped after the first epoch's checkpoint")

    checkpoint.save = save_then_stop
    try:
        _run(csv_path, run_dir, extra)
    except KeyboardInterrupt:
        return
    finally:
        checkpoint.save = save
    raise AssertionError("the run did not reach its first checkpoint")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", ["full", "frozen", "freeze_stages", "unfreeze_at"])
def test_a_resumed_run_equals_the_uninterrupted_one_in_every_trunk_mode(pool1, tmp_path: Path, mode: str) -> None:
    """Two epochs in one go, and the same run stopped after its first checkpoint then resumed: the
    same weights, bit for bit, and the same losses.

    ``unfreeze_at=2`` unfreezes at the resumed epoch, so the rebuilt DDP and parameter groups
    must come back from the checkpoint as they were (the trunk's learning rates included).
    """
    cohort = _write_cohort(tmp_path, {n: s for n, s in zip("abcdef", ["train"] * 4 + ["val"] * 2)})
    extra = {"full": [], "frozen": ["train.trunk=frozen"], "freeze_stages": ["train.freeze_stages=2"],
             "unfreeze_at": ["train.freeze_stages=2", "train.unfreeze_at=2", "train.trunk_lr_scale=0.5"]}[mode]
    extra = ["train.epochs=2", *extra, "data.augment.enabled=true", "train.heatmaps=false"]  # augmentation draws
    once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
    pool1.run(_run, str(cohort), once, extra)
    pool1.run(_run_stopping_after_one_epoch, str(cohort), twice, extra)
    assert pool1.run(_epoch_of_last, twice)[0] == 1
    out = pool1.run(_run, str(cohort), twice, [*extra, "train.resume=true"])[0]
    assert any("resumed from" in line for line in out["log"]), out["log"]
    a, b = pool1.run(_final_weights, once)[0], pool1.run(_final_weights, twice)[0]
    assert a.keys() == b.keys()
    for name in a:
        assert torch_equal(a[name], b[name]), f"{mode}: {name} differs after resuming"
    m1, m2 = _rows(Path(once) / "metrics.csv"), _rows(Path(twice) / "metrics.csv")
    assert [r["train_loss"] for r in m1] == [r["train_loss"] for r in m2] and len(m1) == 2


@pytest.mark.timeout(300)
def test_resuming_with_another_schedule_length_is_refused(pool1, tmp_path: Path) -> None:
    """A one-cycle schedule is planned over epochs x steps: resuming a 1-epoch run with
    train.epochs=2 would fail deep in torch (``Tried to step 5 times``) after an epoch's work."""
    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "val"})
    run_dir = str(tmp_path / "run")
    pool1.run(_run, str(cohort), run_dir, ["train.epochs=1", "train.heatmaps=false"])
    message = pool1.run(_refused, str(cohort), run_dir, ["train.epochs=2", "train.resume=true"])[0]
    assert "onecycle" in message and "train.epochs=1" in message and "train.epochs=2" in message, message
    assert "model.weights=" in message and "last.pt" in message, message  # a warm start, which works (test_outcomes)


def _predict(csv_path: str, run_dir: str, checkpoint: str, mesh: str, extra: list[str] = ()) -> dict:
    import os

    import torch.distributed as dist

    os.environ["HALO_RUN_ID"] = f"mesh{mesh}_world{dist.get_world_size()}_{len(extra)}"  # predict/<id>/ per call
    rows, cols = mesh.split("x")
    return _run(csv_path, run_dir, ["mode=predict", f"checkpoint={checkpoint}", f"mesh.rows={rows}",
                                    f"mesh.cols={cols}", "train.heatmaps=false", *extra])


@pytest.mark.timeout(400)
def test_a_checkpoint_predicts_the_same_on_another_mesh_and_world_size(pool1, pool2, tmp_path: Path) -> None:
    """Trained on one process (mesh 1x1), predicted on two ranks as two 1x1 image groups: the same
    probabilities (written to 6 decimals). As one 1x2 group, slides are padded to multiples of
    32 pixels instead of 16 (blocks are multiples of the stride): the log says predictions can
    differ and that mesh 1x1 pads as training did. A run trained with ``data.canvas=32`` pads
    every slide the same on 1x1 and 1x2, and predicts the same on both."""
    cohort = _write_cohort(tmp_path, {n: s for n, s in zip("abcdef", ["train"] * 4 + ["val"] * 2)})
    run_dir, fixed = tmp_path / "run", tmp_path / "fixed"
    pool1.run(_run, str(cohort), str(run_dir), ["train.heatmaps=false"])
    best = str(run_dir / "checkpoints" / "best.pt")
    one = pool1.run(_predict, str(cohort), str(run_dir), best, "1x1")[0]
    wide = pool2.run(_predict, str(cohort), str(run_dir), best, "1x2")[0]
    groups = pool2.run(_predict, str(cohort), str(run_dir), best, "1x1")[0]

    def probs(out: dict) -> dict[str, float]:
        rows = _rows(Path(out["summary"]["run_dir"]) / "predictions.csv")
        return {r["slide"]: float(r["prob_tumour"]) for r in rows}

    p1, p3 = probs(one), probs(groups)
    assert len(p1) == 6 and p1.keys() == p3.keys() == probs(wide).keys()
    for key in p1:
        assert p3[key] == pytest.approx(p1[key], rel=1e-5, abs=2e-6), key
    assert not any("trained on mesh" in line for line in one["log"] + groups["log"])
    note = [line for line in wide["log"] if "trained on mesh 1x1" in line]
    assert note and "multiples of 16" in note[0] and "multiples of 32" in note[0], wide["log"]
    assert "mesh.rows=1 mesh.cols=1 pads as in training" in note[0], note

    # trained with a canvas that fits both meshes: 1x2 pads as 1x1 did, and predicts the same
    pool1.run(_run, str(cohort), str(fixed), ["train.heatmaps=false", "data.canvas=32"])
    best = str(fixed / "checkpoints" / "best.pt")
    one_c = pool1.run(_predict, str(cohort), str(fixed), best, "1x1", ["data.canvas=32"])[0]
    wide_c = pool2.run(_predict, str(cohort), str(fixed), best, "1x2", ["data.canvas=32"])[0]
    q1, q2 = probs(one_c), probs(wide_c)
    for key in q1:
        assert q2[key] == pytest.approx(q1[key], rel=1e-5, abs=2e-6), key
    assert not any("trained on mesh" in line for line in wide_c["log"]), wide_c["log"]
    one, wide, groups = one["summary"], wide["summary"], groups["summary"]
    assert len({one["run_dir"], wide["run_dir"], groups["run_dir"]}) == 3  # each into its own predict/<id>/


@pytest.mark.timeout(400)
def test_blockwise_prediction_on_fewer_ranks_equals_the_sharded_one(pool1, pool2, tmp_path: Path) -> None:
    """``blocks=[1, 2]`` on one process, and on two processes taking whole slides each, predicts
    what a 1x2 mesh predicts (the same padding, every layer local in eval mode), heatmaps too."""
    cohort = _write_cohort(tmp_path, {n: s for n, s in zip("abcdef", ["train"] * 4 + ["val"] * 2)})
    run_dir = tmp_path / "run"
    pool1.run(_run, str(cohort), str(run_dir), ["train.heatmaps=false", "head=attention"])
    best = str(run_dir / "checkpoints" / "best.pt")
    heat = ["train.heatmaps=true", "head=attention"]
    sharded = pool2.run(_predict, str(cohort), str(run_dir), best, "1x2", heat)[0]
    alone = pool1.run(_predict, str(cohort), str(run_dir), best, "1x1", [*heat, "blocks=[1,2]"])[0]
    pair = pool2.run(_predict, str(cohort), str(run_dir), best, "1x1", [*heat, "blocks=[1,2]"])[0]

    def probs(out: dict) -> dict[str, float]:
        rows = _rows(Path(out["summary"]["run_dir"]) / "predictions.csv")
        return {r["slide"]: float(r["prob_tumour"]) for r in rows}

    want = probs(sharded)
    assert len(want) == 6
    for out in (alone, pair):
        assert out["summary"]["blockwise"] and out["summary"]["grid"] == [1, 2]
        got = probs(out)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=2e-6), key
        maps = sorted(p.name for p in (Path(out["summary"]["run_dir"]) / "heatmaps").glob("*.png"))
        assert len(maps) == 6, maps
        padded = {r["key"]: (r["padded_height"], r["padded_width"])
                  for r in _rows(Path(out["summary"]["run_dir"]) / "slides.csv")}
        assert padded == {r["key"]: (r["padded_height"], r["padded_width"])
                          for r in _rows(Path(sharded["summary"]["run_dir"]) / "slides.csv")}


# -- what a new user met (found by trying halo-train from a fresh clone) ------------------------------
def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run, less ``.hydra/`` (the latest invocation's config and overrides)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.relative_to(run_dir).parts[0] != ".hydra"}


@pytest.mark.timeout(300)
def test_resuming_a_finished_run_changes_nothing(pool1, tmp_path: Path) -> None:
    """It rewrote slides.csv with the validation slides only, and the predictions and heatmaps."""
    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "val"})
    run_dir = tmp_path / "run"
    first = pool1.run(_run, str(cohort), str(run_dir), [])[0]
    before = _files(run_dir)
    again = pool1.run(_run, str(cohort), str(run_dir), ["train.resume=true"])[0]
    assert _files(run_dir) == before
    assert any("nothing to resume" in line for line in again["log"]), again["log"]
    assert again["summary"] == json.loads(json.dumps(first["summary"]))


@pytest.mark.timeout(300)
def test_a_one_class_validation_set_keeps_best_pt_and_strict_json(pool1, tmp_path: Path) -> None:
    """AUC is undefined on one class: best.pt was never written, and summary.json held a bare NaN."""
    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "train", "e": "val"})
    run_dir = tmp_path / "run"  # validation: slides c and e, both 'normal' (even positions)
    out = pool1.run(_run, str(cohort), str(run_dir), ["train.epochs=2", "train.heatmaps=false"])[0]
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert out["summary"]["best_epoch"] == 2 and out["summary"]["val_auc"] is None
    json.loads((run_dir / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))


def _write_tiny_slide_cohort(root: Path) -> Path:
    from data_fixtures import noise_slide_image, write_slide

    cohort = _write_cohort(root, {"a": "train", "b": "train", "c": "val", "d": "val"})
    write_slide(root / "slides" / "tiny.tiff", noise_slide_image(32, 32, seed=1, tissue=(0, 0, 32, 32)), mpp=0.5,
                levels=1, tile=16)
    with open(cohort, "a") as fh:
        fh.write("slides/tiny.tiff,normal,train\n")
    return cohort


@pytest.mark.timeout(300)
def test_a_slide_of_one_output_cell_is_skipped_and_recorded_not_a_crash(pool1, tmp_path: Path) -> None:
    """16 x 16 pixels at the trunk's stride 16: batch norm in training crashed deep in torch
    ("Expected more than 1 value per channel") after the start-up checks had passed it."""
    cohort = _write_tiny_slide_cohort(tmp_path)
    run_dir = tmp_path / "run"
    pool1.run(_run, str(cohort), str(run_dir), ["train.heatmaps=false"])
    skipped = _rows(run_dir / "skipped_slides.csv")
    assert [Path(r["path"]).name for r in skipped] == ["tiny.tiff"], skipped
    assert "single 16-pixel cell" in skipped[0]["error"] and "data.canvas=32" in skipped[0]["error"]
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    # and data.canvas=32 trains on it
    pool1.run(_run, str(cohort), str(tmp_path / "canvas"), ["train.heatmaps=false", "data.canvas=32"])
    assert not (tmp_path / "canvas" / "skipped_slides.csv").exists()


@pytest.mark.timeout(300)
def test_model_and_checkpoint_mistakes_are_reported_once_as_bad_input(pool1, tmp_path: Path) -> None:
    """They were tracebacks with exit status 1, and left an empty run directory behind."""
    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "val"})
    message = pool1.run(_refused, str(cohort), str(tmp_path / "x1"), ["data.classes=[normal,tumour,other]"])[0]
    assert "add model.num_classes=3" in message, message
    message = pool1.run(_refused, str(cohort), str(tmp_path / "x2"), ["model.name=timm:resnet_nonexistent"])[0]
    assert "model.name=timm:resnet_nonexistent" in message and "cannot be built" in message, message
    assert not (tmp_path / "x2").exists()
    run_dir = tmp_path / "run"
    pool1.run(_run, str(cohort), str(run_dir), ["train.heatmaps=false"])
    message = pool1.run(_refused, str(cohort), str(run_dir), [
        "mode=predict", f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "head=attention"])[0]
    assert "another model" in message, message
