"""``halo-plan --time``: printed assumptions, how the estimate scales, and the synchronisations it
counts from the model against those an instrumented gloo run of the same step makes."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import halo
import halo.nn._collectives as collectives
from data_fixtures import noise_slide_image, write_csv, write_slide
from distributed import shared_mesh
from halo.models import build_classifier
from halo.plan import (DEFAULT_ACHIEVED_FRACTION, GPUS, TimeAssumptions, estimate_time, gpu_for_device, main,
                       plan_model, step_syncs, trace_model)

BASE = ["--model", "halo_tiny", "--image", "256", "256", "--mesh", "2", "2", "--time"]


def _json(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_prints_every_assumption(capsys) -> None:
    assert main([*BASE, "--gpu", "h100-sxm", "--cohort", "100", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    for text in ("tf32 peak 494.7 TFLOP/s dense", "NVIDIA H100 datasheet",
                 f"{DEFAULT_ACHIEVED_FRACTION:g} of peak (ASSUMED, not measured)", "3600 Gb/s (450 GB/s)",
                 "400 Gb/s (50 GB/s)", "latency 5 us", "latency 10 us", "no overlap of communication with compute "
                 "(an upper bound)", "ring: all-gather P-1 steps", "not counted", "counted from the model",
                 "compute", "halo exchange", "BN / pool / head syncs", "gradient all-reduce", "total per step",
                 "per epoch", "100 steps for 100 slides", "3 epoch(s)"):
        assert text in out, (text, out)
    assert main(["--model", "halo_tiny", "--image", "256", "256", "--time", "--achieved-fraction", "0.55",
                 "--achieved-fraction-measured", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "0.55 of peak (measured)" in out and "bf16 peak 989.4" in out and "h100-sxm (default)" in out, out
    assert "give --cohort N" in out


@pytest.fixture(scope="module")
def tiny_2x2():
    """halo_tiny on 2 x 2 at 256 x 256: its plan, its synchronisations and --time's default assumptions."""
    torch.manual_seed(0)
    model = build_classifier("halo_tiny", 2, head="max")
    traced = trace_model(model)
    p = plan_model(model, name="halo_tiny", image=(256, 256), mesh=(2, 2), traced=traced)
    syncs = step_syncs(p, model, stride=traced.stride)
    gpu = GPUS["h100-sxm"]
    a = TimeAssumptions(gpu="h100-sxm", gpu_name=gpu.name, math="tf32", peak_flops=gpu.peak["tf32"],
                        peak_source=gpu.source, achieved_fraction=DEFAULT_ACHIEVED_FRACTION,
                        achieved_fraction_measured=False, intra_gbps=gpu.intra_gbps, inter_gbps=gpu.inter_gbps,
                        latency_us=(5.0, 10.0), gpus_per_node=8, data=1, accumulate=1, overlap=False)
    return p, syncs, a, (model, traced.stride)


def test_time_scales_as_the_model_says(tiny_2x2, capsys) -> None:
    p, syncs, a, syncs_model = tiny_2x2
    cli = _json(capsys, *BASE, "--cohort", "10")["time"]
    base = estimate_time(p, syncs, a, cohort=10)
    assert cli["compute_s"] == base["compute_s"] and cli["halo"] == base["halo"]  # the CLI's defaults are these
    assert cli["assumptions"]["achieved_fraction"] == a.achieved_fraction and cli["assumptions"]["math"] == "tf32"

    def t(**changes) -> dict:
        return estimate_time(p, syncs, dataclasses.replace(a, **changes), cohort=10)

    double = t(achieved_fraction=2 * a.achieved_fraction)
    assert double["compute_s"] == pytest.approx(base["compute_s"] / 2)
    assert double["communication_s"] == pytest.approx(base["communication_s"])
    free = t(latency_us=(0.0, 0.0), intra_gbps=float("inf"), inter_gbps=float("inf"))
    assert free["communication_s"] == 0 and free["total_s_per_step"] == pytest.approx(free["compute_s"])
    assert free["compute_s"] == pytest.approx(p.flops_per_rank / (a.peak_flops * a.achieved_fraction))
    assert free["compute_s"] > 0
    assert base["communication_s"] > 0 and base["halo"]["seconds"] > 0 and base["sync_s"] > 0
    assert base["total_s_per_step"] == pytest.approx(base["compute_s"] + base["halo"]["seconds"] + base["sync_s"]
                                                     + base["grad_allreduce"]["seconds"])
    assert base["s_per_epoch"] == pytest.approx(10 * base["total_s_per_step"])
    over = t(overlap=True)
    assert over["total_s_per_step"] == pytest.approx(max(base["compute_s"], base["communication_s"]))
    # no latency: halving both links doubles every byte term
    full, half = t(latency_us=(0.0, 0.0)), t(latency_us=(0.0, 0.0), intra_gbps=a.intra_gbps / 2,
                                             inter_gbps=a.inter_gbps / 2)
    assert half["communication_s"] == pytest.approx(2 * full["communication_s"])
    # no bandwidth term: the halo costs one latency per message of the busiest rank
    lat = t(intra_gbps=float("inf"), inter_gbps=float("inf"))
    assert lat["halo"]["seconds"] == pytest.approx(lat["halo"]["messages_per_step"] * 5e-6)
    model, stride = syncs_model
    data = estimate_time(p, step_syncs(p, model, stride=stride, data=2), dataclasses.replace(a, data=2), cohort=10)
    assert data["steps_per_epoch"] == 5 and data["world_size"] == 8
    ckpt = _json(capsys, *BASE, "--checkpointing")["time"]
    assert ckpt["compute_s"] == pytest.approx(4 / 3 * base["compute_s"], rel=1e-6)


def test_json_has_every_figure_and_assumption(capsys) -> None:
    out = _json(capsys, *BASE, "--gpu", "a100-80gb", "--cohort", "7", "--epochs", "2", "--gpus-per-node", "2")
    t = out["time"]
    for key in ("compute_s", "halo", "syncs", "sync_s", "grad_allreduce", "communication_s", "total_s_per_step",
                "total_s_per_step_no_overlap", "total_s_per_step_overlap", "steps_per_epoch", "s_per_epoch",
                "total_s", "collectives_per_step", "world_size", "nodes", "flops_per_rank"):
        assert key in t, key
    a = t["assumptions"]
    for key in ("gpu", "peak_flops", "achieved_fraction", "achieved_fraction_measured", "intra_gbps", "inter_gbps",
                "latency_us", "gpus_per_node", "data", "overlap", "overlap_note", "node_placement", "math"):
        assert key in a, key
    assert a["peak_flops"] == GPUS["a100-80gb"].peak["tf32"] and a["achieved_fraction_measured"] is False
    assert t["nodes"] == 2 and t["spatial_group_link"] == "inter" and t["total_s"] == pytest.approx(2 * t["s_per_epoch"])
    assert t["halo"]["messages_by_link"]["inter"] > 0  # 2 GPUs a node: row neighbours are on the other node
    assert out["gpu_memory_bytes"] == 80e9 and out["fits"] in (True, False)
    plain = _json(capsys, *BASE[:-1], "--gpu", "h200")
    assert plain["gpu_memory_bytes"] == 141e9 and "time" not in plain  # the preset's memory; no --time


def test_one_node_halo_stays_on_nvlink(tiny_2x2) -> None:
    """A 2 x 2 mesh on one 8-GPU node: every message within the node; 1 GPU a node: every one across."""
    p, syncs, a, _ = tiny_2x2
    one = estimate_time(p, syncs, a)
    assert one["nodes"] == 1 and one["halo"]["messages_by_link"]["inter"] == 0 and one["world_link"] == "intra"
    spread = estimate_time(p, syncs, dataclasses.replace(a, gpus_per_node=1))
    assert spread["halo"]["messages_by_link"]["intra"] == 0 and spread["world_link"] == "inter"
    assert spread["halo"]["seconds"] > one["halo"]["seconds"] and spread["sync_s"] > one["sync_s"]
    two = estimate_time(p, syncs, dataclasses.replace(a, gpus_per_node=2))  # each row of the mesh on a node
    links = two["halo"]["messages_by_link"]
    assert links["intra"] == links["inter"] > 0 and two["spatial_group_link"] == "inter"


def test_bad_time_arguments(capsys) -> None:
    for args, text in ((["--cohort", "5"], "apply with --time"), (["--time", "--achieved-fraction", "1.5"], "(0, 1]"),
                       (["--time", "--latency-us", "1", "2", "3"], "one or two values")):
        with pytest.raises(SystemExit):
            main(["--model", "halo_tiny", "--image", "64", "64", *args])
        assert text in capsys.readouterr().err, args
    with pytest.raises(SystemExit):
        main(["--model", "halo_tiny", "--slide", "x.tif", "--time", "--cohort", "5"])
    assert "--cohort applies to --image" in capsys.readouterr().err
    assert gpu_for_device("NVIDIA H100 80GB HBM3") == "h100-sxm" and gpu_for_device("NVIDIA H200") == "h200"
    assert gpu_for_device("NVIDIA A100-SXM4-40GB") == "a100-40gb" and gpu_for_device("Tesla T4") is None


def test_time_per_slide_and_over_the_csv(tmp_path: Path, capsys) -> None:
    """--time with --csv / --slide: each slide's step time is --image's for its padded region (the
    same model of time), and the epoch is the sum of the slides' step times (no --cohort)."""
    write_slide(tmp_path / "small.tif", noise_slide_image(256, 192, tissue=(10, 10, 230, 150)), mpp=0.5)
    write_slide(tmp_path / "big.tif", noise_slide_image(512, 384, seed=1, tissue=(8, 8, 490, 360)), mpp=0.5)
    csv_path = write_csv(tmp_path / "cohort.csv", [{"slide": "small.tif", "label": "normal"},
                                                   {"slide": "big.tif", "label": "tumour"}])
    args = ["--model", "halo_tiny", "--mesh", "2", "2", "--mpp", "0.5", "--time", "--gpu", "a100-80gb"]
    got = _json(capsys, *args, "--csv", str(csv_path), "--epochs", "3")
    slides = got["slides"]
    assert [s["slide"] for s in slides] == ["small", "big"]
    for s in slides:
        h, w = s["padded_hw"]
        image = _json(capsys, "--model", "halo_tiny", "--image", str(h), str(w), *args[2:7], "--time", "--gpu",
                      "a100-80gb")["time"]
        t = s["time"]
        for key in ("compute_s", "halo", "syncs", "grad_allreduce", "total_s_per_step", "assumptions"):
            assert t[key] == image[key], key
    steps = [s["time"]["total_s_per_step"] for s in slides]
    assert steps[1] > steps[0] > 0
    t = got["time"]
    assert t["cohort"] == 2 and t["steps_per_epoch"] == 2 and t["epochs"] == 3
    assert t["s_per_epoch"] == pytest.approx(sum(steps)) and t["total_s"] == pytest.approx(3 * sum(steps))
    assert t["assumptions"] == slides[0]["time"]["assumptions"]
    assert main([*args, "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    for text in ("time (--time): assumptions, all explicit", "a100-80gb", "of peak (ASSUMED, not measured)",
                 "not counted", "per epoch", "2 steps for 2 slides"):
        assert text in out, (text, out)
    per_slide = [line for line in out.splitlines() if "total per step" in line]
    assert len(per_slide) == 2 and per_slide[0].split()[0] == "small", out
    assert f"{steps[1]:.4f} s" in per_slide[1], per_slide
    one = _json(capsys, *args, "--slide", str(tmp_path / "big.tif"))
    assert one["slides"][0]["time"]["total_s_per_step"] == steps[1]
    assert one["time"]["s_per_epoch"] == pytest.approx(steps[1]) and one["time"]["cohort"] == 1


# -- the synchronisations the plan counts, against a real step on gloo ranks ---------------------

@contextmanager
def counting_syncs():
    """Every ``batch_isend_irecv`` call (a phase: its sends and their bytes) and every collective
    (op and this rank's bytes) halo posts inside the block, tagged with ``phase[0]``."""
    phase = ["forward"]
    events: list[tuple] = []
    real = {name: getattr(dist, name) for name in ("batch_isend_irecv", "all_gather", "all_reduce", "broadcast",
                                                    "all_gather_into_tensor", "reduce_scatter_tensor")}
    real_gather = collectives._all_gather

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def p2p(ops):
        sends = [op for op in ops if op.op is dist.isend]
        events.append((phase[0], "phase", len(sends), sum(nbytes(op.tensor) for op in sends)))
        return real["batch_isend_irecv"](ops)

    def wrap(name: str, arg: int):
        def call(*args, **kwargs):
            events.append((phase[0], name, nbytes(args[arg])))
            return real[name](*args, **kwargs)
        return call

    def gather_single(out, x, **kwargs):
        events.append((phase[0], "all_gather", nbytes(x)))
        return real_gather(out, x, **kwargs)

    patched = {"batch_isend_irecv": p2p, "all_gather": wrap("all_gather", 1), "all_reduce": wrap("all_reduce", 0),
               "broadcast": wrap("broadcast", 0), "all_gather_into_tensor": wrap("all_gather", 1),
               "reduce_scatter_tensor": wrap("reduce_scatter", 1)}
    for name, fn in patched.items():
        setattr(dist, name, fn)
    collectives._all_gather = gather_single
    try:
        yield phase, events
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
        collectives._all_gather = real_gather


def real_step_syncs(name: str, head: str, rows: int, cols: int, h: int, w: int, checkpointing: bool) -> list[tuple]:
    """One training step of the slide classifier on this rank, every halo phase and collective."""
    torch.manual_seed(0)
    mesh = shared_mesh(rows, cols)
    model = halo.parallelize(build_classifier(name, 2, head=head, checkpointing=checkpointing), mesh).train()
    x = halo.scatter(torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1)), mesh)
    with counting_syncs() as (phase, events):
        out = model(x)
        phase[0] = "backward"
        out.sum().backward()
    return events


def _compare(name: str, head: str, mesh: tuple[int, int], size: tuple[int, int], results: list[list[tuple]],
             checkpointing: bool = False) -> None:
    torch.manual_seed(0)
    model = build_classifier(name, 2, head=head, checkpointing=checkpointing)
    p = plan_model(model, name=name, image=size, mesh=mesh, checkpointing=checkpointing)
    syncs = step_syncs(p, model, stride=trace_model(model).stride)
    planned = Counter(("backward" if c.phase == "recompute" else c.phase, c.op, c.nbytes) for c in syncs.collectives)
    assert sum(1 for c in syncs.collectives if c.what == "batch_norm") > 0 and syncs.halo_exchanges > 0
    for rank, events in enumerate(results):
        row, col = divmod(rank, mesh[1])
        measured = Counter(e for e in events if e[1] != "phase")
        assert measured == planned, (rank, measured - planned, planned - measured)
        phases = [e for e in events if e[1] == "phase"]
        assert len(phases) == syncs.phases, (rank, len(phases), syncs.phases)
        messages, sent = syncs.rank_messages(mesh, row, col)
        assert (sum(e[2] for e in phases), sum(e[3] for e in phases)) == (messages, sent), rank
        assert sent == p.halo_bytes_at(row, col)


def real_steps_syncs(cases: list[tuple], rows: int, cols: int) -> list[list[tuple]]:
    """:func:`real_step_syncs` for each ``(name, head, h, w, checkpointing)``, in one task."""
    return [real_step_syncs(name, head, rows, cols, h, w, ckpt) for name, head, h, w, ckpt in cases]


def _check_cases(pool, mesh: tuple[int, int], cases: list[tuple]) -> None:
    results = pool.run(real_steps_syncs, cases, *mesh)  # per rank, per case
    for i, (name, head, h, w, ckpt) in enumerate(cases):
        _compare(name, head, mesh, (h, w), [per_rank[i] for per_rank in results], ckpt)


@pytest.mark.timeout(300)
def test_sync_counts_equal_a_real_run_on_1x2(pool2) -> None:
    """ResNet-18 with a max head on 1 x 2 (64 x 64): every collective (op, phase, bytes), every halo
    phase and message of a real gloo step is one the plan counts; with checkpointing the trunk's
    batch norms gather again in the recompute. The other heads on halo_tiny."""
    _check_cases(pool2, (1, 2), [("resnet18", "max", 64, 64, False), ("resnet18", "max", 64, 64, True),
                                 ("halo_tiny", "mean", 64, 64, False), ("halo_tiny", "attention", 64, 64, False),
                                 ("halo_tiny", "topk", 64, 64, False)])


@pytest.mark.timeout(300)
def test_sync_counts_equal_a_real_run_on_2x2(pool4) -> None:
    """ResNet-18 with a max head on 2 x 2 (64 x 64): row and column phases on every rank."""
    _check_cases(pool4, (2, 2), [("resnet18", "max", 64, 64, False)])


def test_counts_scale_with_the_world() -> None:
    """On a 1 x 1 mesh nothing is exchanged; batch norm still gathers when images run side by side."""
    torch.manual_seed(0)
    model = build_classifier("halo_tiny", 2, head="max")
    stride = trace_model(model).stride
    single = plan_model(model, name="halo_tiny", image=(64, 64))
    alone = step_syncs(single, model, stride=stride)
    assert alone.collectives == () and alone.halo_exchanges == 0 and alone.phases == 0
    side = step_syncs(single, model, stride=stride, data=4)
    assert {c.what for c in side.collectives} == {"batch_norm"} and side.halo_exchanges == 0
    a = TimeAssumptions(gpu="h100-sxm", gpu_name="x", math="tf32", peak_flops=1e15, peak_source="t",
                        achieved_fraction=0.5, achieved_fraction_measured=False, intra_gbps=8, inter_gbps=8,
                        latency_us=(0.0, 0.0), gpus_per_node=8, data=1, accumulate=1, overlap=False)
    t = estimate_time(single, alone, a, cohort=3)
    assert t["communication_s"] == 0 and t["total_s_per_step"] == t["compute_s"] and t["steps_per_epoch"] == 3
    t4 = estimate_time(single, side, dataclasses.replace(a, data=4, accumulate=2))
    grads = 2 * 3 / 4 * single.grad_bytes / 1e9  # ring all-reduce at 1 GB/s, every second step
    assert t4["grad_allreduce"]["seconds"] == pytest.approx(grads / 2)
