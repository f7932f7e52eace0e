"""What a run ends with and says: which epoch is best, resuming and warm starts, bad input, logs.

Found by a new user (world 1 and 2, gloo, tiny slides, one to four epochs).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from test_engine import _predict, _refused, _rows, _run, _write_cohort

REPO = Path(__file__).resolve().parent.parent


# -- a reference run: one epoch, one-cycle, 2 train and 2 validation slides ------------------------------
def _run_spying(csv_path: str, run_dir: str, extra: list[str]) -> dict:
    """``_run``, keeping every validation evaluation's rows, and the model's state when the run starts."""
    import halo.train.evaluate as evaluate_module
    from halo.train import job as job_module

    calls: list[dict] = []
    evaluate, start = evaluate_module.evaluate, job_module.start
    kept: dict = {}

    def spy(job, source, ds, heatmaps):
        metrics, rows = evaluate(job, source, ds, heatmaps)
        if ds.split == "val":
            calls.append({"heatmaps": heatmaps, "rows": sorted((r["slide"], r["probs"]) for r in rows)})
        return metrics, rows

    def spy_start(*args, **kwargs):
        j = start(*args, **kwargs)
        kept["start"] = {n: p.detach().clone() for n, p in [*j.model.named_parameters(), *j.model.named_buffers()]}
        return j

    evaluate_module.evaluate, job_module.start = spy, spy_start
    try:
        out = _run(csv_path, run_dir, extra)
    finally:
        evaluate_module.evaluate, job_module.start = evaluate, start
    return {**out, "calls": calls, **kept}


@pytest.fixture(scope="module")
def ref(pool1, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ref")
    cohort = _write_cohort(root, {"a": "train", "b": "train", "c": "val", "d": "val"})
    run_dir = root / "run"
    out = pool1.run(_run_spying, str(cohort), str(run_dir), ["train.heatmaps=false"])[0]
    return {**out, "cohort": cohort, "run_dir": run_dir, "root": root}


# -- 1. best.pt: AUC ties go to the lower validation loss, then to the later epoch ------------------------
def test_slide_metrics_hold_the_log_loss() -> None:
    import numpy as np
    from sklearn.metrics import log_loss

    from halo.evaluate import slide_metrics

    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    out = slide_metrics([0, 1, 1], probs, 2)
    assert out["loss"] == pytest.approx(log_loss([0, 1, 1], probs, labels=[0, 1]))


def test_auc_over_the_classes_validation_holds() -> None:
    """Three classes, validation holds two: AUC is the one-vs-rest mean over those two (sklearn
    warned "Only one class is present in y_true" and gave NaN), and the warning names the absent one."""
    import warnings

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from halo.evaluate import slide_metrics

    y = [0, 0, 1, 1, 0]
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.7, 0.2], [0.3, 0.4, 0.3], [0.5, 0.1, 0.4]])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = slide_metrics(y, probs, 3, classes=["normal", "tumour", "necrosis"])
    want = np.mean([roc_auc_score(np.equal(y, c), probs[:, c]) for c in (0, 1)])
    assert out["auc"] == pytest.approx(want), out
    assert [str(w.message) for w in seen] == [
        "validation holds no slide of class necrosis: AUC is the one-vs-rest mean over the 2 classes it holds"]


AUCS = [0.9, 1.0, 1.0, 1.0]
LOSSES = [0.2, 0.5, 0.5, 0.6]


def _run_with_tied_aucs(csv_path: str, run_dir: str, extra: list[str]) -> dict:
    """``_run`` whose per-epoch validation AUC and loss are :data:`AUCS` and :data:`LOSSES`."""
    import halo.train.evaluate as evaluate_module

    evaluate = evaluate_module.evaluate
    seen = [0]

    def stub(job, source, ds, heatmaps):
        metrics, rows = evaluate(job, source, ds, heatmaps)
        if ds.split == "val" and seen[0] < len(AUCS):
            metrics = {**metrics, "auc": AUCS[seen[0]], "loss": LOSSES[seen[0]]}
            seen[0] += 1
        return metrics, rows

    evaluate_module.evaluate = stub
    try:
        return _run(csv_path, run_dir, extra)
    finally:
        evaluate_module.evaluate = evaluate


@pytest.mark.timeout(400)
def test_auc_ties_are_broken_by_validation_loss_then_by_the_later_epoch(pool1, tmp_path: Path) -> None:
    """Four validation slides gave AUC 1.0 in every epoch: best.pt was epoch 1, untrained."""
    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "val"})
    run_dir = tmp_path / "run"
    out = pool1.run(_run_with_tied_aucs, str(cohort), str(run_dir),
                    [f"train.epochs={len(AUCS)}", "train.heatmaps=false"])[0]
    summary = out["summary"]
    # epoch 2 beats 1 on AUC (despite its loss), 3 ties 2 on both (the later wins), 4 has a higher loss
    assert summary["best_epoch"] == 3, summary
    assert summary["final_epoch"] == 3 and summary["val_auc"] == 1.0, summary
    from halo.checkpoint import load_checkpoint

    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["state"]["best_epoch"] == 3
    metrics = _rows(run_dir / "metrics.csv")
    assert "val_loss" in metrics[0] and float(metrics[0]["val_loss"]) > 0, metrics[0]
    assert json.loads((run_dir / "summary.json").read_text())["final_epoch"] == 3


# -- 4. the epoch log line, and validation not predicted twice ------------------------------------------
def test_the_epoch_line_gives_training_and_validation_times(ref) -> None:
    line = next(line for line in ref["log"] if line.startswith("epoch 1:"))
    assert re.search(r"epoch 1: 2 slides, train \d+\.\d s \(.* slides/s\), validation \d+\.\d s", line), line
    seconds = float(_rows(ref["run_dir"] / "metrics.csv")[0]["seconds"])
    train_s, val_s = (float(x) for x in re.findall(r"(?:train|validation) (\d+\.\d) s", line))
    assert train_s + val_s == pytest.approx(seconds, abs=0.5), (line, seconds)


def test_best_as_last_epoch_reuses_its_validation_predictions(ref) -> None:
    calls = ref["calls"]
    assert len(calls) == 1, [c["heatmaps"] for c in calls]  # the epoch's, not a second pass at the end
    assert ref["summary"]["best_epoch"] == ref["summary"]["final_epoch"] == 1
    written = {r["slide"]: float(r["prob_tumour"]) for r in _rows(ref["run_dir"] / "predictions.csv")}
    assert written == {s: pytest.approx(p[1], abs=1e-6) for s, p in calls[0]["rows"]}


@pytest.mark.timeout(300)
def test_a_final_evaluation_with_heatmaps_equals_the_last_epochs(pool1, tmp_path: Path) -> None:
    """Why reusing is safe: the best (= last) weights predict validation again exactly as in the epoch."""
    cohort = _write_cohort(tmp_path, {"a": "train", "b": "train", "c": "val", "d": "val"})
    out = pool1.run(_run_spying, str(cohort), str(tmp_path / "run"), ["train.heatmaps=true"])[0]
    assert [c["heatmaps"] for c in out["calls"]] == [False, True]
    assert out["calls"][0]["rows"] == out["calls"][1]["rows"]


# -- 2. resuming into another schedule: advice that can be followed, and warm starts ----------------------
@pytest.mark.timeout(300)
def test_resume_advice_for_a_onecycle_run_is_followable(pool1, ref) -> None:
    cohort, run_dir = str(ref["cohort"]), str(ref["run_dir"])
    longer = pool1.run(_refused, cohort, run_dir, ["train.epochs=2", "train.resume=true", "train.heatmaps=false"])[0]
    assert "train.epochs=1" in longer and "train.epochs=2" in longer, longer
    assert "train.schedule=constant" not in longer, longer  # refused for a one-cycle run: no advice to try it
    assert "model.weights=" in longer and "last.pt" in longer, longer
    other = pool1.run(_refused, cohort, run_dir, ["train.schedule=constant", "train.resume=true",
                                                  "train.heatmaps=false"])[0]
    assert "no fixed number of (" not in other and "train.schedule=onecycle" in other, other
    assert "model.weights=" in other, other
    done = pool1.run(_run, cohort, run_dir, ["train.resume=true", "train.heatmaps=false"])[0]
    line = next(line for line in done["log"] if "nothing to resume" in line)
    assert "train.schedule=constant" not in line and "model.weights=" in line, line


@pytest.mark.timeout(300)
def test_a_new_run_starts_from_a_checkpoints_weights(pool1, ref) -> None:
    from halo.checkpoint import load_checkpoint

    best = ref["run_dir"] / "checkpoints" / "best.pt"
    want = load_checkpoint(best)["model_state"]
    out = pool1.run(_run_spying, str(ref["cohort"]), str(ref["root"] / "warm"),
                    [f"model.weights={best}", "train.epochs=2", "train.heatmaps=false"])[0]
    got = out["start"]
    assert any(k.startswith("head.") for k in got) and any(k.startswith("trunk.") for k in got)
    for name, value in got.items():
        assert torch_equal(value, want[name]), name
    assert any("initialised from" in line and "trunk and head" in line for line in out["log"]), out["log"]
    # another class count: the trunk is taken, the head starts afresh, and the log says so
    out = pool1.run(_run_spying, str(ref["cohort"]), str(ref["root"] / "warm3"),
                    [f"model.weights={best}", "data.classes=[normal,tumour,other]", "model.num_classes=3",
                     "train.heatmaps=false"])[0]
    for name, value in out["start"].items():
        if name.startswith("trunk."):
            assert torch_equal(value, want[name]), name
    note = [line for line in out["log"] if "initialised from" in line]
    assert note and "trunk only" in note[0] and "num_classes" in note[0], out["log"]
    # another backbone: refused, naming both
    message = pool1.run(_refused, str(ref["cohort"]), str(ref["root"] / "warm_other"),
                        [f"model.weights={best}", "model.name=halo_tiny_8"])[0]
    assert "halo_tiny" in message and "halo_tiny_8" in message, message


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# -- 3. a mesh that does not divide the world: bad input, said once, exit 2 -------------------------------
@pytest.mark.timeout(300)
def test_a_mesh_that_does_not_divide_the_world_is_bad_input(pool1, ref) -> None:
    message = pool1.run(_refused, str(ref["cohort"]), str(ref["root"] / "mesh"), ["mesh=2x1"])[0]
    assert "mesh.rows x mesh.cols = 2 x 1" in message and "world size 1" in message, message
    assert "mesh=1x1" in message and "--nproc-per-node 2" in message, message
    assert not (ref["root"] / "mesh").exists()


@pytest.mark.timeout(200)
def test_python_m_halo_train_on_one_process_with_the_default_mesh(tmp_path: Path) -> None:
    from launch_helpers import PY, run_cmd

    rc, out, _ = run_cmd([PY, "-m", "halo.train", f"hydra.run.dir={tmp_path / 'r'}"], 180)
    assert rc == 2, out
    assert "halo: rank" not in out and "Traceback" not in out, out
    assert out.count("does not divide the world size 1") == 1, out


PROBE = """
import sys, time
sys.path.insert(0, {repo!r})
import torch.distributed as dist
from halo.errors import InputError
from launch.env import init_distributed
from launch.failure import guard

env = init_distributed(backend="gloo", timeout_s=60)
with guard(env):
    dist.barrier()
    if env.rank == 1:
        time.sleep(3)  # this rank finds the same bad input later (a slower checkpoint load)
    raise InputError("halo-train: the same bad input on every rank")
"""


@pytest.mark.timeout(200)
def test_bad_input_on_every_rank_ends_quietly_on_two_ranks(tmp_path: Path) -> None:
    """Rank 0 printed and left; torchrun then terminated rank 1, which reported a crash."""
    from launch_helpers import TORCHRUN, run_cmd

    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(repo=str(REPO)))
    rc, out, _ = run_cmd([*TORCHRUN, str(script)], 150)
    assert rc != 0, out
    assert out.count("the same bad input on every rank") == 1, out
    assert "halo: rank" not in out and "Terminated" not in out and 'probe.py", line' not in out, out
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", out)) == {"2"}, out  # torchrun's report: every rank 2


# -- 5. what predict says --------------------------------------------------------------------------------
def test_the_result_line_of_predict_says_what_it_did() -> None:
    from launch.train import result_line

    line = result_line({"mode": "predict", "checkpoint": "c.pt", "slides": 6, "labelled": 4, "unlabelled": 2,
                        "metrics": {"auc": 0.75, "balanced_accuracy": 0.5}, "run_dir": "runs/x/predict/1"})
    assert line == {"mode": "predict", "run_dir": "runs/x/predict/1", "slides": 6, "labelled": 4, "auc": 0.75}
    line = result_line({"mode": "predict", "slides": 2, "labelled": 0, "metrics": {}, "run_dir": "d"})
    assert line == {"mode": "predict", "run_dir": "d", "slides": 2, "labelled": 0}
    assert result_line({"run_dir": "r", "val_auc": 0.5, "best_epoch": 1}) == {"run_dir": "r", "val_auc": 0.5}


@pytest.mark.timeout(300)
def test_predict_logs_its_layout(pool2, ref) -> None:
    best = str(ref["run_dir"] / "checkpoints" / "best.pt")
    groups = pool2.run(_predict, str(ref["cohort"]), str(ref["run_dir"]), best, "1x1")[0]
    assert any("2 image groups of 1x1 (data parallel)" in line for line in groups["log"]), groups["log"]
    wide = pool2.run(_predict, str(ref["cohort"]), str(ref["run_dir"]), best, "1x2")[0]
    assert any("1 image group of 1x2 (each slide over 2 ranks)" in line for line in wide["log"]), wide["log"]
    blocks = pool2.run(_predict, str(ref["cohort"]), str(ref["run_dir"]), best, "1x1", ["blocks=[1,2]"])[0]
    assert any("predicting block by block (blocks=[1, 2]) on each rank" in line for line in blocks["log"]), \
        blocks["log"]


def test_layout_in_the_training_log(ref) -> None:
    assert any("1 image group of 1x1" in line for line in ref["log"]), ref["log"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
