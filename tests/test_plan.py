"""halo-plan's arithmetic against what autograd saves, what the exchange sends and the FLOPs torch
counts, on small cases."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import halo
from data_fixtures import corrupt_tiles, noise_slide_image, write_csv, write_slide
from distributed import counting_sends, shared_mesh
from halo.data import SlideDataset
from halo.models import build_classifier, total_stride
from halo.plan import main, measure_checkpointed_bytes, measure_saved_bytes, plan, plan_model

TOL = 0.10  # the goal; on these cases the arithmetic is exact


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=2)


def _pools() -> torch.nn.Module:
    """Every pooling kind halo shards: max, average with and without counting the padding."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        nn.Conv2d(8, 8, 3, padding=1), nn.AvgPool2d(3, 2, 1), nn.Conv2d(8, 8, 1), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )


def measure_rank(name: str, rows: int, cols: int, height: int, width: int, batch: int) -> tuple[int, int, int, int]:
    """On one rank: bytes autograd saves for the forward, bytes this rank sends in one step, and
    the forward's and the whole step's FLOPs as torch's ``FlopCounterMode`` counts them
    (convolutions and matrix products, halo's border bands included)."""
    mesh = shared_mesh(rows, cols)
    model = halo.parallelize(_pools() if name == "pools" else _model(name), mesh)
    image = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    x = halo.scatter(image, mesh)
    out: list[torch.Tensor] = []
    exclude = list(model.parameters()) + list(model.buffers())
    with counting_sends() as sent:
        with FlopCounterMode(display=False) as forward:
            saved = measure_saved_bytes(lambda: out.append(model(x)) or out[0], exclude)
        with FlopCounterMode(display=False) as backward:
            out[0].sum().backward()
    fwd = forward.get_total_flops()
    return saved, sent[0], fwd, fwd + backward.get_total_flops()


def _check(results: list[tuple[int, int, int, int]], name: str, rows: int, cols: int, h: int, w: int,
           batch: int) -> None:
    p = plan(name, (h, w), (rows, cols), batch=batch)
    for rank, (saved, _, fwd, step) in enumerate(results):
        assert abs(p.activation_bytes_per_rank - saved) <= TOL * saved, (rank, p.activation_bytes_per_rank, saved)
        # the plan adds about one FLOP per output of pointwise layers, which torch does not count
        assert abs(p.forward_flops_per_rank - fwd) <= TOL * fwd, (rank, p.forward_flops_per_rank, fwd)
        assert abs(p.flops_per_rank - step) <= TOL * step, (rank, p.flops_per_rank, step)
    mean_sent = sum(s for _, s, _, _ in results) / len(results)
    assert abs(p.halo_bytes_per_step_per_rank - mean_sent) <= 0.05 * max(mean_sent, 1), (p.halo_bytes_per_step_per_rank, mean_sent)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_plain_one_process(name: str, size: tuple[int, int]) -> None:
    model = _model(name)
    x = torch.randn(2, 3, *size)
    measured = measure_saved_bytes(lambda: model(x), list(model.parameters()) + list(model.buffers()))
    predicted = plan_model(_model(name), name=name, image=size, batch=2, halo_layers=False).activation_bytes_per_rank
    assert abs(predicted - measured) <= TOL * measured, (predicted, measured)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_one_by_one_mesh(pool1, name: str) -> None:
    _check(pool1.run(measure_rank, name, 1, 1, 96, 64, 2), name, 1, 1, 96, 64, 2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("grid", [(1, 2), (2, 1)])
def test_two_ranks(pool2, name: str, grid: tuple[int, int]) -> None:
    h, w = 64 * grid[0], 64 * grid[1]
    _check(pool2.run(measure_rank, name, *grid, h, w, 2), name, *grid, h, w, 2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_two_by_two(pool4, name: str) -> None:
    _check(pool4.run(measure_rank, name, 2, 2, 128, 192, 1), name, 2, 2, 128, 192, 1)


@pytest.mark.timeout(300)
def test_pooling_layers(pool1, pool4) -> None:
    """Sharded pooling saves only max-pool indices and the divisors that exclude padding."""
    for halo_layers in (False, True):  # plain torch keeps the pooling inputs; halo does not
        model = _pools()
        x = torch.randn(2, 3, 64, 64)
        measured = (measure_saved_bytes(lambda: model(x), list(model.parameters()) + list(model.buffers()))
                    if not halo_layers else pool1.run(measure_rank, "pools", 1, 1, 64, 64, 2)[0][0])
        predicted = plan_model(_pools(), name="pools", image=(64, 64), batch=2, halo_layers=halo_layers)
        assert predicted.activation_bytes_per_rank == measured, (halo_layers, predicted.activation_bytes_per_rank, measured)
    for grid in [(1, 2), (2, 1), (2, 2)]:
        h, w = 32 * grid[0], 32 * grid[1]
        results = pool4.run(measure_rank, "pools", *grid, h, w, 2)
        predicted = plan_model(_pools(), name="pools", image=(h, w), mesh=grid, batch=2)
        for rank, (saved, *_) in enumerate(results):
            assert predicted.activation_bytes_per_rank == saved, (grid, rank, predicted.activation_bytes_per_rank, saved)
        mean_sent = sum(sent for _, sent, *_ in results) / len(results)
        assert abs(predicted.halo_bytes_per_step_per_rank - mean_sent) <= 0.05 * max(mean_sent, 1), grid


def _checkpointed(name: str, rows: int, cols: int, height: int, width: int) -> int:
    """What halo-train's ``train.checkpointing`` keeps on this rank at its peak, by autograd's hooks."""
    model = build_classifier(name, 2, head="mean", checkpointing=True)
    image = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    if (rows, cols) != (1, 1):
        mesh = shared_mesh(rows, cols)
        model, image = halo.parallelize(model, mesh), halo.scatter(image, mesh)
    return measure_checkpointed_bytes(model, image)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_checkpointing_plans_what_training_recomputes(pool2, name: str) -> None:
    """``--checkpointing`` plans the segments halo-train checkpoints (a ResNet's stem and its four
    layers), for a torchvision model given by name as for the slide classifier itself."""
    torch.manual_seed(0)
    classifier = build_classifier(name, 2, head="mean", checkpointing=True)
    for mesh, measured in [((1, 1), [_checkpointed(name, 1, 1, 128, 96)]),
                           ((1, 2), pool2.run(_checkpointed, name, 1, 2, 128, 192))]:
        image = (128, 96 * mesh[1])
        kwargs = {"mesh": mesh, "batch": 2, "checkpointing": True, "halo_layers": mesh != (1, 1)}
        for planned in (plan_model(classifier, name=name, image=image, **kwargs), plan(name, image, **kwargs)):
            for rank, saved in enumerate(measured):
                assert planned.activation_bytes_per_rank == saved, (mesh, rank, planned.activation_bytes_per_rank, saved)


def test_halo_bytes_closed_form() -> None:
    """A 3x3 conv on a 2x2 mesh: rows then columns of the row-extended block, both ways."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 8, 3, padding=1))
    p = plan_model(model, name="toy", image=(64, 64), mesh=(2, 2), batch=1)
    first, second = p.layers[0], p.layers[2]
    rows = 0.5 * (1 + 1) * 32 * 4  # half the ranks send each one-row strip of 32 float32
    cols = 0.5 * (1 + 1) * 34 * 4  # columns of the 34-row extended block
    assert first.halo_bytes == 3 * (rows + cols)  # the image needs no gradient: forward only
    assert second.halo_bytes == 2 * 4 * (rows + cols)  # 4 channels, forward and backward
    assert p.halo_bytes_per_step_per_rank == 11 * (rows + cols)
    assert plan_model(model, name="toy", image=(64, 64), mesh=(1, 1)).halo_bytes_per_step_per_rank == 0


def test_scaling_and_fit() -> None:
    small = plan("resnet18", (256, 256), (1, 1))
    big = plan("resnet18", (512, 512), (1, 2))
    assert abs(big.activation_bytes_per_rank / small.activation_bytes_per_rank - 2) < 0.05
    assert big.flops_per_rank == pytest.approx(2 * small.flops_per_rank, rel=0.01)
    bf16 = plan("resnet18", (256, 256), dtype="bfloat16")
    assert bf16.activation_bytes_per_rank < 0.55 * small.activation_bytes_per_rank  # int64 pooling indices stay
    ckpt = plan("resnet18", (256, 256), checkpointing=True)
    assert ckpt.activation_bytes_per_rank < 0.6 * small.activation_bytes_per_rank
    assert plan("resnet18", (1000, 1000), gpu_memory=1e9).fits is False
    assert plan("resnet18", (1000, 1000)).padded_image == (1024, 1024)


def test_huge_slide_is_arithmetic_only(capsys) -> None:
    main(["--model", "resnet50", "--image", "100000", "100000", "--mesh", "8", "8",
          "--dtype", "bfloat16", "--batch", "1", "--mpp", "0.5", "--json"])
    out = json.loads(capsys.readouterr().out)
    for key in ("activation_bytes_per_rank", "halo_bytes_per_step_per_rank", "param_bytes", "flops_per_rank", "fits"):
        assert key in out
    assert out["block"] == [12512, 12512] and out["field_mm"] == [50.0, 50.0]
    assert out["activation_bytes_per_rank"] > 0 and out["halo_bytes_per_step_per_rank"] > 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dtype"):
        plan("resnet18", (64, 64), dtype="int8")
    with pytest.raises(ValueError, match="unknown model"):
        plan("not_a_model", (64, 64))
    with pytest.raises(ValueError, match="mesh"):
        plan_model(_model("resnet18"), name="r", image=(64, 64), mesh=(1, 2), halo_layers=False)


# -- halo-plan on what halo-train builds and reads ----------------------------------------------

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "slides"


def _run_main(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().out


def _engine_dataset(csv_path: Path, model: str, head: str, grid: tuple[int, int], mpp: float | None,
                    level: int | None = None) -> SlideDataset:
    """The dataset halo-train reads for ``data=csv``: ``Engine._dataset``'s arguments, with the
    multiple ``Engine`` takes from the model it builds."""
    multiple = total_stride(build_classifier(model, 2, head=head).trunk)
    return SlideDataset(csv_path, ["normal", "tumour"], grid=grid, multiple=multiple, mpp=mpp, level=level,
                        split=None, strict=False, root=None, record_dir=None, validate=False)


def _slide_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("  ")]


def _padded(line: str) -> tuple[int, int]:
    m = re.search(r"padded (\d+) x (\d+)", line)
    assert m, line
    return int(m[1]), int(m[2])


def test_slide_plans_the_region_training_reads(tmp_path: Path, capsys) -> None:
    """--slide prints the padded region (H x W) the training dataset plans for the same slide,
    model and mesh: level, mpp, padded size and block."""
    path = write_slide(tmp_path / "a.tif", noise_slide_image(900, 500, tissue=(120, 40, 610, 376)), mpp=0.5)
    write_csv(tmp_path / "cohort.csv", [{"slide": "a.tif", "label": "normal"}])
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--slide", str(path), "--mesh", "2", "1", "--mpp", "1.0")
    assert rc == 0, out
    [line] = _slide_lines(out)
    region = _engine_dataset(tmp_path / "cohort.csv", "halo_tiny", "max", (2, 1), 1.0).plan(0)
    h, w = region.shape()
    assert h != w  # the order is visible
    other = SlideDataset(tmp_path / "cohort.csv", ["normal", "tumour"], grid=(2, 1), multiple=32, mpp=1.0,
                         validate=False).plan(0)
    assert other.shape() != (h, w)  # halo_tiny's stride 16 pads less than a ResNet's 32 would
    assert _padded(line) == (h, w), (line, region.padded_size)
    bh, bw = region.block_shape()
    assert f"block {bh} x {bw}" in line and f"level {region.level} " in line and "1.000 mpp" in line, line
    assert region.level == 1 and "H x W" in out


def test_resnet50_region_is_the_smallest_multiple_on_a_2x2_grid(tmp_path: Path, capsys) -> None:
    """ResNet-50 (stride 32) on 2 x 2: the padded region is the smallest multiple of
    lcm(2, 2) * 32 = 64 that holds the region read, never a whole multiple more."""
    path = write_slide(tmp_path / "b.tif", noise_slide_image(700, 300, tissue=(50, 20, 500, 200)), mpp=0.5, levels=1)
    rc, out = _run_main(capsys, "--model", "resnet50", "--slide", str(path), "--mesh", "2", "2",
                        "--mpp", "0.5", "--tissue", "enabled=false", "--json")
    assert rc == 0, out
    [whole] = json.loads(out)["slides"]
    assert whole["padded_hw"] == [320, 704] and whole["block_hw"] == [160, 352], whole  # 300 x 700 read
    rc, out = _run_main(capsys, "--model", "resnet50", "--slide", str(path), "--mesh", "2", "2", "--mpp", "0.5",
                        "--json")
    [tissue] = json.loads(out)["slides"]
    for padded, content in zip(tissue["padded_hw"], tissue["tissue_hw"]):
        assert padded % 64 == 0 and content <= padded < content + 64, tissue
    assert tissue["tissue_hw"][1] > 500 and tissue["padded_hw"][0] < 320, tissue  # the tissue box, not the slide


def test_csv_prints_each_slide_and_the_smallest_square_mesh(tmp_path: Path, capsys) -> None:
    """--csv: one line per slide (paths relative to the CSV), then the smallest n x n mesh on which
    the largest slide fits the budget: n fits, n - 1 does not."""
    sub = tmp_path / "site"
    sub.mkdir()
    write_slide(sub / "small.tif", noise_slide_image(256, 256, tissue=(20, 20, 200, 180)), mpp=0.5)
    write_slide(sub / "big.tif", noise_slide_image(960, 960, seed=1, tissue=(10, 10, 930, 930)), mpp=0.5)
    csv_path = write_csv(tmp_path / "cohort.csv", [{"slide": "site/small.tif", "label": "normal"},
                                                   {"slide": "site/big.tif", "label": "tumour"}])
    peak = {}
    for n in (1, 2, 3):
        rc, out = _run_main(capsys, "--model", "halo_tiny", "--slide", str(sub / "big.tif"), "--mesh", str(n), str(n),
                            "--json")
        peak[n] = json.loads(out)["slides"][0]["total_bytes_per_rank"]
    assert peak[1] > peak[2] > peak[3]
    budget = (peak[2] + peak[3]) / 2 / 1e9  # 3 x 3 fits, 2 x 2 does not
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--csv", str(csv_path), "--gpu-memory", str(budget))
    assert rc == 0, out
    lines = _slide_lines(out)
    assert [line.split()[0] for line in lines] == ["site/small", "site/big"], out
    assert lines[0].endswith(" fits") and lines[1].endswith("does not fit"), lines
    last = out.splitlines()[-1]
    assert last.startswith("smallest square mesh for the largest slide (site/big") and ": 3 x 3," in last, last


def test_a_slide_that_cannot_be_planned_is_named_and_fails(tmp_path: Path, capsys) -> None:
    good = write_slide(tmp_path / "ok.tif", noise_slide_image(256, 256), mpp=0.5)
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--slide", str(good), str(tmp_path / "missing.tif"))
    assert rc == 1
    missing = tmp_path / "missing.tif"
    assert len(_slide_lines(out)) == 2 and f"  slide '{missing}': cannot plan: " in out, out


def _failed_line(out: str, path: Path) -> str:
    """The line naming ``path``: ``(path)`` after a CSV key, ``'path'`` for a --slide given by it."""
    [line] = [line for line in _slide_lines(out) if f"({path})" in line or f"slide '{path}':" in line]
    return line


def test_a_corrupt_slide_is_unreadable_not_too_small(tmp_path: Path, capsys) -> None:
    """A corrupt slide is reported as unreadable, with the reader's own error, even where it is also
    smaller than the grid or its thumbnail still reads (training's start-up check refuses it); the
    other slides are still planned, and the exit status is 1."""
    small = write_slide(tmp_path / "small_bad.tif", noise_slide_image(48, 48), mpp=0.5, levels=1)
    corrupt_tiles(small)  # 48 x 48: also smaller than 4 x 4 ranks x stride 16
    pyramid = write_slide(tmp_path / "pyramid_bad.tif", noise_slide_image(256, 256), mpp=0.5)
    corrupt_tiles(pyramid)  # level 0 garbage, the thumbnail's level intact
    truncated = write_slide(tmp_path / "truncated.tif", noise_slide_image(256, 256, seed=2), mpp=0.5)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n")
    good = write_slide(tmp_path / "good.tif", noise_slide_image(256, 256, seed=1), mpp=0.5)
    slides = [small, pyramid, truncated, text, good]
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--slide", *map(str, slides), "--mesh", "4", "4",
                        "--mpp", "0.5")
    assert rc == 1, out
    assert _slide_lines(out)[0].split()[0] == str(good) and _slide_lines(out)[0].endswith(" fits"), out
    for path, reader in ((small, "DeflateError"), (pyramid, "DeflateError"), (truncated, "file ends early"),
                         (text, "not a slide format OpenSlide reads")):
        line = _failed_line(out, path)
        assert "unreadable or corrupt" in line and reader in line, line
        assert "TooSmall" not in line and "smaller than" not in line, line
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--slide", *map(str, slides), "--mesh", "4", "4",
                        "--mpp", "0.5", "--json")
    got = json.loads(out)
    assert rc == 1 and [s["slide"] for s in got["slides"] if "error" not in s] == [str(good)]
    bad = {s["slide"]: s for s in got["slides"] if "error" in s}
    assert set(bad) == set(map(str, slides[:4])) and all(s["unreadable"] for s in bad.values()), bad
    assert "DeflateError" in bad[str(small)]["error"], bad


def test_a_csv_of_only_corrupt_slides_plans_nothing_and_fails(tmp_path: Path, capsys) -> None:
    bad = write_slide(tmp_path / "bad.tif", noise_slide_image(48, 48), mpp=0.5, levels=1)
    corrupt_tiles(bad)
    (tmp_path / "bad.svs").write_text("a text file\n")
    csv_path = write_csv(tmp_path / "cohort.csv", [{"slide": "bad.tif", "label": "normal"},
                                                   {"slide": "bad.svs", "label": "tumour"}])
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--csv", str(csv_path), "--mesh", "4", "4", "--mpp", "0.5")
    assert rc != 0, out
    lines = _slide_lines(out)
    assert len(lines) == 2 and all("unreadable or corrupt" in line for line in lines), out
    assert "line 2, slide 'bad.tif'" in lines[0] and "DeflateError" in lines[0], lines
    assert "line 3" in lines[1] and "not a slide format" in lines[1], lines
    assert "smallest square mesh" not in out


_BROKEN = {"openslide-python_unreadable.svs": "Bogus marker length",
           "histolab_broken.svs": "not a slide format OpenSlide reads",
           "openslide-python_unopenable.tiff": "Unsupported TIFF compression"}


@pytest.mark.skipif(not all((FIXTURES / n).is_file() for n in [*_BROKEN, "cmu-1-small-region.svs"]),
                    reason=f"real slide fixtures in {FIXTURES} are absent")
def test_real_broken_slides_are_unreadable(tmp_path: Path, capsys) -> None:
    """The real broken files of ../shared/fixtures/slides: each named, unreadable with the reader's
    error (openslide-python's unreadable.svs is 16 x 16, so also smaller than the grid at 1 mpp:
    it must not be reported as too small), and the real slide beside them still planned."""
    rows = [{"slide": str(FIXTURES / n), "label": "normal"} for n in [*_BROKEN, "cmu-1-small-region.svs"]]
    csv_path = write_csv(tmp_path / "cohort.csv", rows)
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--csv", str(csv_path), "--mesh", "2", "2", "--mpp", "2")
    assert rc == 1, out
    [good] = [line for line in _slide_lines(out) if "cmu-1-small-region" in line]
    assert good.endswith(" fits"), good
    for name, reader in _BROKEN.items():
        line = _failed_line(out, FIXTURES / name)
        assert "unreadable or corrupt" in line and reader in line and "smaller than" not in line, line


def test_model_halo_tiny_plans_what_training_builds(capsys) -> None:
    """--model halo_tiny plans halo-train's slide classifier (trunk and head): on one rank its
    activation bytes are what autograd saves for that model."""
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--head", "attention", "--image", "192", "128", "--batch", "2",
                        "--mesh", "1", "1", "--json")
    assert rc == 0
    got = json.loads(out)
    assert got["padded_image"] == [192, 128] and got["block"] == [192, 128]
    torch.manual_seed(0)
    model = build_classifier("halo_tiny", 2, head="attention").train()
    x = torch.randn(2, 3, 192, 128)
    measured = measure_saved_bytes(lambda: model(x), list(model.parameters()) + list(model.buffers()))
    assert abs(got["activation_bytes_per_rank"] - measured) <= 0.01 * measured, (got["activation_bytes_per_rank"], measured)
    assert got["param_bytes"] == 4 * sum(p.numel() for p in model.parameters())


def test_image_is_height_then_width(capsys) -> None:
    rc, out = _run_main(capsys, "--model", "resnet18", "--image", "64", "256", "--mesh", "2", "1", "--json")
    got = json.loads(out)
    assert got["image"] == [64, 256] and got["padded_image"] == [64, 256] and got["block"] == [32, 256], got
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--image HEIGHT WIDTH" in capsys.readouterr().out


@pytest.mark.parametrize("name,head", [("resnet18", "topk"), ("efficientnet_b0", "attention"),
                                       ("timm:efficientnet_b0", "max")])
def test_slide_classifiers_plan_what_autograd_saves(name: str, head: str) -> None:
    """Slide heads (their functional ops), squeeze-excitation and timm's BatchNormAct2d are planned
    from what autograd saves on the trace, scaled to the block: within 1 % on one process."""
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_classifier(name, 2, head=head).train()
    x = torch.randn(2, 3, 256, 192)
    measured = measure_saved_bytes(lambda: model(x), list(model.parameters()) + list(model.buffers()))
    planned = plan_model(model, name=name, image=(256, 192), batch=2, halo_layers=False).activation_bytes_per_rank
    assert abs(planned - measured) <= 0.01 * measured, (planned, measured)


def _classifier_rank(name: str, head: str, rows: int, cols: int, h: int, w: int) -> int:
    torch.manual_seed(0)
    mesh = shared_mesh(rows, cols)
    model = halo.parallelize(build_classifier(name, 2, head=head), mesh)
    x = halo.scatter(torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1)), mesh)
    return measure_saved_bytes(lambda: model(x), list(model.parameters()) + list(model.buffers()))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,head", [("halo_tiny", "attention"), ("timm:efficientnet_b0", "max")])
def test_slide_classifier_on_a_2x2_mesh(pool4, name: str, head: str) -> None:
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    planned = plan_model(build_classifier(name, 2, head=head), name=name, image=(256, 256), mesh=(2, 2))
    for rank, saved in enumerate(pool4.run(_classifier_rank, name, head, 2, 2, 256, 256)):
        assert abs(planned.activation_bytes_per_rank - saved) <= 0.01 * saved, (rank, planned.activation_bytes_per_rank, saved)


def test_a_layer_the_planner_cannot_plan_is_refused_by_name(capsys) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.ReLU())
    with pytest.raises(halo.HaloNotSupportedError, match=r"cannot plan 1 \(torch.nn.modules.normalization.GroupNorm\)"):
        plan_model(model, name="gn", image=(64, 64))
    rc = main(["--model", "convnext_tiny", "--image", "64", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"cannot plan trunk\.[\d.]+ \(torchvision\.models\.convnext\.LayerNorm2d\)", err), err


@pytest.mark.skipif(not (FIXTURES / "cmu-1-small-region.svs").is_file(),
                    reason=f"real slide fixture {FIXTURES / 'cmu-1-small-region.svs'} is absent")
def test_real_aperio_slide(tmp_path: Path, capsys) -> None:
    """CMU-1's small region (a real Aperio SVS, 2220 x 2967, 0.499 mpp): planned as training reads it."""
    path = FIXTURES / "cmu-1-small-region.svs"
    rc, out = _run_main(capsys, "--model", "resnet50", "--slide", str(path), "--mesh", "2", "2", "--mpp", "0.5",
                        "--json")
    assert rc == 0, out
    got = json.loads(out)
    [s] = got["slides"]
    write_csv(tmp_path / "cohort.csv", [{"slide": str(path), "label": "normal"}])
    region = _engine_dataset(tmp_path / "cohort.csv", "resnet50", "max", (2, 2), 0.5).plan(0)
    assert s["padded_hw"] == list(region.shape()) and s["level"] == region.level == 0, (s, region)
    assert s["mpp"] == pytest.approx(0.499, abs=1e-3)
    for padded, content in zip(s["padded_hw"], s["tissue_hw"]):
        assert padded % 64 == 0 and content <= padded < content + 64, s
    assert s["padded_hw"][0] > s["padded_hw"][1]  # portrait: 2967 rows, 2220 columns
    assert got["smallest_square_mesh"]["n"] == 1 and got["smallest_square_mesh"]["slide"] == str(path)


# -- --csv read as training reads it; --model's default; a slide named once ---------------------------------------


def _hospital_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str) -> Path:
    import csv

    with open(path, "w", newline="") as fh:
        wr = csv.writer(fh, delimiter=delimiter)
        wr.writerow(header)
        wr.writerows(rows)
    return path


def _training_dataset(csv_path: Path, grid: tuple[int, int], mpp: float | None, multiple: int = 16,
                      columns: dict[str, str] | None = None, classes: tuple[str, ...] = ("slide",)) -> SlideDataset:
    """The dataset halo-train's ``SlideSource.dataset`` builds for prediction (unlabelled rows welcome)."""
    return SlideDataset(csv_path, list(classes), grid=grid, multiple=multiple, mpp=mpp, level=None, split=None,
                        strict=False, root=None, record_dir=None, labels_required=False, derive_split=False,
                        columns=columns, report=False, validate=False)


def test_csv_reads_a_semicolon_hospital_export_as_training_does(tmp_path: Path, capsys) -> None:
    """A ``;``-delimited export with ``Patient ID;Slide Path;Diagnosis;Accession`` headers: the
    delimiter sniffed and the headers matched by halo.data.ALIASES, as training reads it; its
    diagnoses are not halo-plan's concern, and no message names a file the user did not write."""
    sub = tmp_path / "scans"
    sub.mkdir()
    write_slide(sub / "s1.tif", noise_slide_image(600, 400, tissue=(40, 30, 500, 300)), mpp=0.5)
    write_slide(sub / "s2.tif", noise_slide_image(300, 300, seed=1, tissue=(10, 10, 250, 250)), mpp=0.5)
    header = ["Patient ID", "Slide Path", "Diagnosis", "Accession"]
    rows = [["P1", "scans/s1.tif", "Adenocarcinoma", "A-1"], ["P2", "scans/s2.tif", "benign", "A-2"]]
    csv_path = _hospital_csv(tmp_path / "export.csv", header, rows, ";")
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--csv", str(csv_path), "--mesh", "2", "1", "--mpp", "1.0")
    assert rc == 0, out
    lines = _slide_lines(out)
    assert [line.split()[0] for line in lines] == ["scans/s1", "scans/s2"], out
    ds = _training_dataset(csv_path, (2, 1), 1.0, classes=("Adenocarcinoma", "benign"))
    for i, line in enumerate(lines):
        assert _padded(line) == ds.plan(i).shape(), (line, ds.plan(i).shape())


def test_csv_with_a_diagnosis_and_no_label_column_invents_none(tmp_path: Path, capsys) -> None:
    """The comma copy of that export, its slide header renamed ``slide``: ``Diagnosis`` is its label
    column, and halo-plan adds no ``label`` column of its own beside it (nor a temporary copy)."""
    write_slide(tmp_path / "s1.tif", noise_slide_image(600, 400, tissue=(40, 30, 500, 300)), mpp=0.5)
    rows = [["P1", "s1.tif", "Adenocarcinoma", "A-1"]]
    comma = _hospital_csv(tmp_path / "cohort.csv", ["Patient ID", "slide", "Diagnosis", "Accession"], rows, ",")
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--csv", str(comma), "--mesh", "2", "1", "--mpp", "1.0")
    assert rc == 0 and "halo-plan-" not in out, out
    [line] = _slide_lines(out)
    assert line.split()[0] == "s1" and _padded(line) == _training_dataset(
        comma, (2, 1), 1.0, classes=("Adenocarcinoma",)).plan(0).shape(), out


def test_csv_columns_option_and_messages_name_the_users_csv(tmp_path: Path, capsys) -> None:
    """``--columns COLUMN=HEADER`` is data.columns; a manifest problem names the user's own CSV and
    halo-plan's own option, never a temporary copy or data.columns."""
    write_slide(tmp_path / "a.tif", noise_slide_image(300, 300, tissue=(10, 10, 250, 250)), mpp=0.5)
    csv_path = _hospital_csv(tmp_path / "export.csv", ["MRN", "Image", "Final Dx"], [["1", "a.tif", "x"]], "\t")
    rc = main(["--model", "halo_tiny", "--csv", str(csv_path)])
    err = capsys.readouterr().err
    assert rc == 2 and str(csv_path) in err and "--columns slide=" in err, err
    assert "data.columns" not in err and "halo-plan-" not in err, err
    rc = main(["--model", "halo_tiny", "--csv", str(csv_path), "--columns", "slide=Nope"])
    err = capsys.readouterr().err
    assert rc == 2 and str(csv_path) in err and "--columns slide='Nope' names no column" in err and "data.columns" not in err, err
    with pytest.raises(SystemExit):
        main(["--model", "halo_tiny", "--csv", str(csv_path), "--columns", "colour=Image"])
    err = capsys.readouterr().err
    assert "--columns colour=Image" in err and "slide" in err, err
    two = _hospital_csv(tmp_path / "two.csv", ["slide", "Diagnosis", "label"], [["a.tif", "x", "y"]], ",")
    rc = main(["--model", "halo_tiny", "--csv", str(two)])
    err = capsys.readouterr().err
    assert rc == 2 and str(two) in err and "--columns label=<header>" in err and "halo-plan-" not in err, err


def test_csv_columns_names_the_headers_training_reads(tmp_path: Path, capsys) -> None:
    """``--columns slide=Image patient=MRN`` plans the region training reads with data.columns."""
    write_slide(tmp_path / "a.tif", noise_slide_image(300, 300, tissue=(10, 10, 250, 250)), mpp=0.5)
    csv_path = _hospital_csv(tmp_path / "export.csv", ["MRN", "Image", "Final Dx"], [["1", "a.tif", "x"]], "\t")
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--csv", str(csv_path), "--columns", "slide=Image",
                        "patient=MRN", "--mesh", "1", "1", "--mpp", "1.0")
    assert rc == 0, out
    [line] = _slide_lines(out)
    assert line.split()[0] == "a" and _padded(line) == _training_dataset(
        csv_path, (1, 1), 1.0, columns={"slide": "Image"}).plan(0).shape(), out


def test_model_defaults_to_halo_trains(tmp_path: Path, capsys) -> None:
    """Without --model, halo-train's model.name (halo_tiny), said to be its default."""
    from halo.plan import train_defaults

    assert train_defaults()["model"] == "halo_tiny"
    rc, out = _run_main(capsys, "--image", "128", "96", "--mesh", "1", "1")
    assert rc == 0, out
    assert out.startswith("halo_tiny (halo-train's default) with a "), out
    path = write_slide(tmp_path / "a.tif", noise_slide_image(300, 300, tissue=(10, 10, 250, 250)), mpp=0.5)
    rc, out = _run_main(capsys, "--slide", str(path), "--mpp", "1.0", "--json")
    got = json.loads(out)
    assert rc == 0 and got["model"] == "halo_tiny" and "model" in got["defaults_from_halo_train"], got
    rc, out = _run_main(capsys, "--slide", str(path), "--mpp", "1.0")
    assert out.startswith("halo-plan: halo_tiny (halo-train's default) with a "), out


def test_a_slide_given_by_its_path_is_named_once(tmp_path: Path, capsys, monkeypatch) -> None:
    """A --slide that cannot be planned is named by what was given; its path follows only when that
    says more (a relative path given)."""
    missing = tmp_path / "missing.tif"
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--slide", str(missing))
    assert rc == 1 and f"  slide '{missing}': cannot plan: " in out and f"({missing})" not in out, out
    monkeypatch.chdir(tmp_path)
    rc, out = _run_main(capsys, "--model", "halo_tiny", "--slide", "missing.tif")
    assert rc == 1 and f"  slide 'missing.tif' ({missing}): cannot plan: " in out, out
