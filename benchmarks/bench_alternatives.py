"""Benchmark 5: halo beside what a user would otherwise pick.

1. PyTorch DTensor's sharded convolution (``torch.distributed.tensor``, width sharding with
   ``Shard(3)``): for each conv kind of a ResNet, is the forward output right (local shards
   gathered), is the input gradient right, what placement does the output claim, and how
   long does one forward + backward take against ``HaloConv2d`` on the same 1x2 mesh.
2. One process with activation checkpointing (each trunk stage, a ResNet's stem and its four
   layers, recomputed in backward with non-reentrant ``torch.utils.checkpoint``, as halo's
   ``train.checkpointing`` does) against plain one process and halo on 1x2: step time, the
   peak of live tensors (torch's ``MemTracker``) and the peak-RSS increase.

Usage::

    python benchmarks/bench_alternatives.py            # writes RESULTS.md
    python benchmarks/bench_alternatives.py --quick    # tiny sizes, prints only
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import _peak_live_bytes, _rss, _setup, markdown_table, parser, run_ranks, report  # noqa: E402

__all__ = ["main", "dtensor_conv", "checkpointed_step"]

CONVS = [(3, 1, 1), (7, 2, 3), (3, 2, 1), (1, 2, 0), (1, 1, 0)]  # (kernel, stride, padding) in a ResNet


def _gather_w(t):
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=-1)


def _rel(a, b) -> float:
    if a.shape != b.shape:
        return float("nan")
    return ((a - b).abs().max() / b.abs().max()).item()


def dtensor_conv(channels: int, size: int, repeats: int) -> list[dict]:
    """On each rank of a 1x2 world: DTensor's and halo's conv against the full conv, float64."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import halo
    from halo.nn.conv import HaloConv2d

    dmesh = init_device_mesh("cpu", (2,))
    hmesh = halo.SpatialMesh(1, 2)
    out = []
    for k, s, p in CONVS:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(channels, channels, k, s, p).double()
        x = torch.randn(1, channels, size, size, dtype=torch.float64, requires_grad=True)
        conv(x).sum().backward()
        ref_y, ref_gx = conv(x).detach(), x.grad.clone()
        row = {"conv": f"{k}x{k} s{s} p{p}"}
        try:
            xd = distribute_tensor(x.detach(), dmesh, [Shard(3)]).requires_grad_(True)
            w = distribute_tensor(conv.weight.detach(), dmesh, [Replicate()]).requires_grad_(True)
            b = distribute_tensor(conv.bias.detach(), dmesh, [Replicate()]).requires_grad_(True)
            phase = "forward"
            y = F.conv2d(xd, w, b, s, p)
            row["placement"] = str(y.placements[0])
            row["dtensor_fwd"] = _rel(_gather_w(y.to_local().detach()), ref_y)
            phase = "backward"
            t0 = time.perf_counter()
            for _ in range(repeats):
                xd.grad = None
                y = F.conv2d(xd, w, b, s, p)
                y.to_local().sum().backward()
            row["dtensor_s"] = (time.perf_counter() - t0) / repeats
            row["dtensor_gx"] = "none" if xd.grad is None else _rel(_gather_w(xd.grad.to_local()), ref_gx)
        except Exception as e:  # noqa: BLE001 - reported in the table
            msg = f"{type(e).__name__} in {phase}: {str(e).splitlines()[0][:70]}"
            row.setdefault("placement", "-")
            row.setdefault("dtensor_fwd", msg)
            row.update(dtensor_s=float("nan"), dtensor_gx=msg if phase == "backward" else "-")
        hconv = HaloConv2d.from_module(conv, hmesh, "conv")
        xh = halo.scatter(x.detach(), hmesh).requires_grad_(True)
        t0 = time.perf_counter()
        for _ in range(repeats):
            xh.grad = None
            yh = hconv(xh)
            yh.sum().backward()
        row["halo_s"] = (time.perf_counter() - t0) / repeats
        row["halo_fwd"] = _rel(_gather_w(yh.detach()), ref_y)
        row["halo_gx"] = _rel(_gather_w(xh.grad), ref_gx)
        out.append(row)
    return out


def checkpointed_step(name: str, size: int, steps: int, checkpoint: bool) -> dict:
    """Plain torch in one process, trunk stages optionally checkpointed: median step, peak RSS increase,
    and the peak of live tensors other than the model state (``_common._peak_live_bytes``)."""
    import resource

    import torch

    from halo.models import build_classifier

    _, x, _ = _setup(name, 1, 1, size, size, 1, False)
    torch.manual_seed(0)
    model = build_classifier(name, 2, head="mean", checkpointing=checkpoint)
    before = _rss()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, _ = _peak_live_bytes(model, x)
    return {"step": sorted(times)[len(times) // 2], "rss": max(rss - before, 0), "peak": peak}


def _fmt(v) -> str:
    return f"{v:.1e}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns both tables' rows."""
    ap = parser(__doc__, quick="tiny sizes for CI; prints, does not write RESULTS.md")
    ap.add_argument("--size", type=int, default=512, help="image side for the whole-model comparison")
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    channels, conv_size, repeats, size, steps = (4, 16, 1, 64, 1) if a.quick else (64, 128, 5, a.size, a.steps)
    convs = run_ranks(dtensor_conv, 2, channels, conv_size, repeats)[0]
    lines = [f"DTensor Shard(3) vs HaloConv2d on 1x2, {channels} channels, {conv_size}x{conv_size}, float64 "
             "(relative errors of gathered shards against one process):", "",
             markdown_table(
                 ["conv", "DTensor output placement", "DTensor fwd err", "DTensor input-grad err",
                  "DTensor s (fwd+bwd)", "halo fwd err", "halo input-grad err", "halo s (fwd+bwd)"],
                 [[r["conv"], r["placement"], _fmt(r["dtensor_fwd"]), _fmt(r["dtensor_gx"]), f"{r['dtensor_s']:.4f}",
                   _fmt(r["halo_fwd"]), _fmt(r["halo_gx"]), f"{r['halo_s']:.4f}"] for r in convs])]
    from _common import measure_step, timed_steps

    plain = run_ranks(checkpointed_step, 1, "resnet18", size, steps, False)[0]
    ck = run_ranks(checkpointed_step, 1, "resnet18", size, steps, True)[0]
    sharded = run_ranks(timed_steps, 2, "resnet18", 1, 2, size, size, 1, steps)[0]
    sharded_mem = run_ranks(measure_step, 2, "resnet18", 1, 2, size, size, 1, True, True)
    from halo.plan import plan

    halo_act = plan("resnet18", (size, size), (1, 2)).activation_bytes_per_rank
    plain_act = plan("resnet18", (size, size), halo_layers=False).activation_bytes_per_rank
    ck_act = plan("resnet18", (size, size), halo_layers=False, checkpointing=True).activation_bytes_per_rank
    lines += ["", f"ResNet-18 at {size}x{size}, batch 1, float32, one thread per process:", "",
              markdown_table(
                  ["setup", "processes", "step s", "peak live tensors MB / process",
                   "peak RSS increase MB / process", "planned activations MB / process"],
                  [["one process", 1, f"{plain['step']:.3f}", f"{plain['peak'] / 1e6:.0f}",
                    f"{plain['rss'] / 1e6:.0f}", f"{plain_act / 1e6:.0f}"],
                   ["one process + checkpointing", 1, f"{ck['step']:.3f}", f"{ck['peak'] / 1e6:.0f}",
                    f"{ck['rss'] / 1e6:.0f}", f"{ck_act / 1e6:.0f}"],
                   ["halo 1x2", 2, f"{sharded['step']:.3f}", f"{max(r['peak'] for r in sharded_mem) / 1e6:.0f}",
                    f"{max(r['rss'] for r in sharded_mem) / 1e6:.0f}", f"{halo_act / 1e6:.0f}"]])]
    lines += ["", "*Peak live tensors*: the most memory tensors other than parameters, buffers and gradients "
              "hold at once in a step (torch's `MemTracker`; the larger rank for halo), as in section 1. "
              "*Peak RSS increase* also holds gradients and the allocator's slack."]
    text = "\n".join(lines)
    report("bench_alternatives", text, quick=a.quick, argv=argv, intro=(
        "## 5. Alternatives\n\nDTensor rows: `F.conv2d` on a `Shard(3)` input with replicated weights "
        "(torch's `_tp_conv.py`); errors are of the local shards gathered along W, because the output's "
        "claimed placement is not what the shards hold where it says `Replicate()`. `none` means no input "
        "gradient came back.\n\n"))
    return {"convs": convs, "plain": plain, "checkpointed": ck, "halo": sharded}


if __name__ == "__main__":
    main()
