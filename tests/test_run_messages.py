"""What a new user reads (issue 17): halo-plan's defaults are halo-train's, sizes are H x W,
every per-slide problem names the slide one way, and the training log says what happened."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
import warnings
from pathlib import Path

import pytest

from data_fixtures import noise_slide_image, write_csv, write_slide


def _train_cfg(*overrides: str):
    """halo-train's composed config (conf/config.yaml, the schema), as ``halo-train`` composes it."""
    from hydra import compose, initialize_config_dir

    from halo.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


# -- 1. halo-plan's defaults are halo-train's ------------------------------------------------------
def test_plan_defaults_are_the_composed_training_config() -> None:
    """halo-plan plans your slides, which halo-train reads with data=csv: with no flags, its mesh,
    mpp, level, head, classes and checkpointing are that composed config's."""
    from halo.plan import parse_args

    cfg = _train_cfg("data=csv")
    for source in (["--slide", "x.tif"], ["--csv", "c.csv"], ["--image", "64", "64"]):
        a = parse_args(["--model", "halo_tiny", *source])
        assert tuple(a.mesh) == (cfg.mesh.rows, cfg.mesh.cols), a
        assert a.head == cfg.head.name and a.num_classes == cfg.model.num_classes, a
        assert a.checkpointing == cfg.train.checkpointing, a
        if source[0] != "--image":  # --image takes its pixels as given; mpp only reports the field
            assert a.mpp == cfg.data.mpp and a.level == cfg.data.level, a
    plain = _train_cfg()
    assert (plain.mesh.rows, plain.mesh.cols) == (cfg.mesh.rows, cfg.mesh.cols)
    # an explicit flag still wins, and --mpp none is data.mpp=null (every slide at --level)
    a = parse_args(["--model", "halo_tiny", "--slide", "x.tif", "--mesh", "1", "1", "--mpp", "none", "--level", "2"])
    assert tuple(a.mesh) == (1, 1) and a.mpp is None and a.level == 2


def test_plan_with_defaults_plans_the_region_training_reads_and_says_so(tmp_path: Path, capsys) -> None:
    """Planned with defaults, a 0.5 mpp slide is read where halo-train reads it by default
    (data.mpp=1.0: level 1) on halo-train's default mesh, and the output says which."""
    from halo.plan import main

    cfg = _train_cfg("data=csv")
    path = write_slide(tmp_path / "a.tif", noise_slide_image(512, 256), mpp=0.5)
    assert main(["--model", "halo_tiny", "--slide", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["mesh"] == [cfg.mesh.rows, cfg.mesh.cols] and got["mpp"] == cfg.data.mpp, got
    assert got["level"] == cfg.data.level and got["slides"][0]["level"] == 1, got
    assert main(["--model", "halo_tiny", "--slide", str(path)]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert f"{cfg.mesh.rows} x {cfg.mesh.cols} mesh" in head and "halo-train's default" in head, head
    assert f"{cfg.data.mpp:g} mpp (data.mpp" in head, head
    assert main(["--model", "halo_tiny", "--image", "64", "128"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert f"mesh {cfg.mesh.rows} x {cfg.mesh.cols} (halo-train's default)" in head, head


# -- 2. sizes are H x W ------------------------------------------------------------------------------
def test_a_slide_too_small_for_the_grid_states_its_size_h_x_w(tmp_path: Path) -> None:
    from halo.data import ManifestError, SlideDataset

    write_slide(tmp_path / "a.tif", noise_slide_image(96, 40), mpp=0.5, levels=1)  # 40 rows, 96 columns
    write_csv(tmp_path / "c.csv", [{"slide": "a.tif", "label": "normal", "split": "train"}])
    with pytest.raises(ManifestError) as err:
        SlideDataset(tmp_path / "c.csv", ["normal", "tumour"], grid=(2, 2), multiple=32, mpp=None, level=0)
    [problem] = err.value.problems
    assert "40 x 96 (H x W)" in problem and "at least 64 x 64 (H x W)" in problem, problem


def test_slide_errors_state_sizes_h_x_w(tmp_path: Path) -> None:
    """openslide's sizes are (width, height); what a message says is H x W, labelled."""
    from halo.data import SlideReadError, SlideTooSmallError, plan_region

    path = write_slide(tmp_path / "a.tif", noise_slide_image(96, 40), mpp=0.5, levels=1)
    with pytest.raises(SlideTooSmallError) as err:
        plan_region(path, grid=(2, 2), multiple=32, level=0, tissue=None)
    assert "40 x 96 (H x W)" in str(err.value) and "at least 64 x 64 (H x W)" in str(err.value), err.value
    read = SlideReadError(path, 1, (8, 4), (32, 16), "broken tile", frame="level 1")
    assert "size 16 x 32 (H x W)" in str(read) and "(x, y)=(8, 4)" in str(read), read
    assert (read.location, read.size) == ((8, 4), (32, 16))  # the attributes stay openslide's (x, y), (w, h)


# -- 3. one way to name a slide ----------------------------------------------------------------------
def test_two_problems_of_different_kinds_name_line_key_and_path(tmp_path: Path) -> None:
    from halo.data import ManifestError, SlideDataset, slide_ref

    write_slide(tmp_path / "a.tif", noise_slide_image(128, 128), mpp=0.5, levels=1)
    write_csv(tmp_path / "c.csv", [{"slide": "a.tif", "label": "cat", "split": "train"},
                                   {"slide": "b.tif", "label": "normal", "split": "train"}])
    with pytest.raises(ManifestError) as err:
        SlideDataset(tmp_path / "c.csv", ["normal", "tumour"], grid=(1, 1), multiple=16, mpp=None, level=0)
    a, b = err.value.problems
    assert slide_ref(2, "a", str(tmp_path / "a.tif")) == f"line 2, slide 'a' ({tmp_path / 'a.tif'})"
    assert a.startswith(f"line 2, slide 'a' ({tmp_path / 'a.tif'}): label 'cat'"), a
    assert b.startswith(f"line 3, slide 'b' ({tmp_path / 'b.tif'}): file not found"), b


def test_a_slide_skipped_or_fatal_mid_run_is_named_the_same_way(tmp_path: Path, caplog) -> None:
    from halo.data import SlideDataset, SlideReadError, slide_ref

    write_slide(tmp_path / "a.tif", noise_slide_image(128, 128), mpp=0.5, levels=1)
    write_csv(tmp_path / "c.csv", [{"slide": "a.tif", "label": "normal", "split": "train"}])
    where = slide_ref(2, "a", str(tmp_path / "a.tif"))
    err = SlideReadError(tmp_path / "a.tif", 0, (0, 0), (16, 16), "broken tile")
    strict = SlideDataset(tmp_path / "c.csv", ["normal", "tumour"], grid=(1, 1), multiple=16, mpp=None, level=0,
                          strict=True)
    with pytest.raises(SlideReadError) as raised:
        strict.mark_failed(0, err)
    assert str(raised.value).startswith(f"{where}: SlideReadError: read failed"), raised.value
    lax = SlideDataset(tmp_path / "c.csv", ["normal", "tumour"], grid=(1, 1), multiple=16, mpp=None, level=0,
                       record_dir=tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", logger="halo.data"):
        warnings.simplefilter("always")
        lax.mark_failed(0, SlideReadError(tmp_path / "a.tif", 0, (0, 0), (16, 16), "broken tile"))
    assert not [c for c in caught if issubclass(c.category, RuntimeWarning)]  # logged, without a source line
    [w] = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert where in w and "skipped" in w and "broken tile" in w, w
    with open(tmp_path / "run" / "skipped_slides.csv", newline="") as fh:
        [row] = list(csv.DictReader(fh))
    assert (row["slide"], row["path"], row["csv_line"]) == ("a", str(tmp_path / "a.tif"), "2"), row


# -- 4. the training log ----------------------------------------------------------------------------
def test_progress_without_a_terminal_logs_plain_lines(caplog) -> None:
    """Not a TTY: no bars, a plain line at most every ``every_s`` seconds (and at the end);
    ``bars=True`` forces tqdm even then."""
    from halo.train.loop import Progress

    log = logging.getLogger("halo.train")
    clock = iter([0.0, 10.0, 31.0, 40.0, 62.0, 63.0])
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="halo.train"):
        p = Progress(total=5, desc="epoch 3", file=out, every_s=30.0, clock=lambda: next(clock))
        for _ in range(5):
            p.update(last_slide_loss=0.5)
        p.close()
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert out.getvalue() == "", out.getvalue()
    assert lines[-1].endswith("s elapsed, last slide loss 0.500"), lines  # not "loss": the epoch's is another
    assert [line.split(",")[0] for line in lines] == ["epoch 3: 2/5 slides", "epoch 3: 4/5 slides",
                                                      "epoch 3: 5/5 slides"], lines
    forced = io.StringIO()
    p = Progress(total=2, desc="epoch 1", file=forced, bars=True)
    p.update(loss=0.1)
    p.update(loss=0.1)
    p.close()
    assert "epoch 1" in forced.getvalue() and "\r" in forced.getvalue() and "2/2" in forced.getvalue()


def _run_capturing(csv_path: str, run_dir: str, extra: list[str]) -> dict:
    """``test_engine._run`` with stderr captured (a file, not a TTY, as under SLURM)."""
    from test_engine import _run

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out = _run(csv_path, run_dir, extra)
    return {**out, "stderr": err.getvalue()}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> dict:
    """Two ranks (two image groups): one epoch with the first trunk stage frozen until epoch 2,
    then resumed to two epochs, with progress on (the default) and stderr not a TTY. About 35 s:
    the tests that use it are ``slow`` (``after_resume`` in tests/conftest.py's SLOW_TESTS)."""
    from distributed import ProcessPool
    from test_engine import _write_cohort

    root = tmp_path_factory.mktemp("resumed")
    cohort = _write_cohort(root, {"a": "train", "b": "train", "c": "val", "d": "val"})
    run_dir = root / "run"
    common = ["train.schedule=constant", "train.freeze_stages=1", "train.unfreeze_at=2", "train.heatmaps=false"]
    pool = ProcessPool(2)
    try:
        first = pool.run(_run_capturing, str(cohort), str(run_dir), common, timeout=240)
        second = pool.run(_run_capturing, str(cohort), str(run_dir),
                          [*common, "train.epochs=2", "train.resume=true", "train.progress=true"], timeout=240)
    finally:
        pool.close()
    with open(run_dir / "metrics.csv", newline="") as fh:
        metrics = list(csv.DictReader(fh))
    return {"first": first, "second": second, "run_dir": run_dir, "metrics": metrics,
            "summary": json.loads((run_dir / "summary.json").read_text())}


@pytest.mark.timeout(600)
def test_after_resume_the_log_says_the_trunk_state(resumed) -> None:
    rank0 = resumed["second"][0]["log"]
    said = [line for line in rank0 if "unfrozen" in line]
    assert len(said) == 1 and "epoch 2" in said[0] and "train.unfreeze_at" in said[0], rank0


@pytest.mark.timeout(600)
def test_after_resume_resumed_from_is_printed_once(resumed) -> None:
    lines = [(rank, line) for rank, out in enumerate(resumed["second"]) for line in out["log"]
             if line.startswith("resumed from")]
    assert len(lines) == 1 and lines[0][0] == 0, lines


@pytest.mark.timeout(600)
def test_after_resume_metrics_counts_are_ints_and_train_seconds_is_a_column(resumed) -> None:
    rows = resumed["metrics"]
    assert [r["epoch"] for r in rows] == ["1", "2"], rows
    for r in rows:
        assert r["val_n"] == "2", r
        assert 0 < float(r["train_seconds"]) <= float(r["seconds"]), r
    assert resumed["summary"]["final"]["n"] == 2 and isinstance(resumed["summary"]["final"]["n"], int)


@pytest.mark.timeout(600)
def test_after_resume_summary_has_each_ranks_peak_memory(resumed) -> None:
    peak = resumed["summary"]["peak_memory_bytes"]
    assert peak["kind"] == "cpu_rss", peak
    assert len(peak["per_rank"]) == 2 and all(isinstance(b, int) and b > 2**20 for b in peak["per_rank"]), peak
    assert resumed["second"][1]["summary"]["peak_memory_bytes"] == peak  # every rank returns the gathered list


@pytest.mark.timeout(600)
def test_after_resume_progress_draws_no_bars_into_a_log_file(resumed) -> None:
    err = resumed["second"][0]["stderr"]
    assert "\r" not in err and "slide/s" not in err and "it/s" not in err, err[-2000:]
    assert any(re.match(r"epoch 2: 1/1 slides", line) for line in resumed["second"][0]["log"]), \
        resumed["second"][0]["log"]
