"""Benchmark 6: on a GPU, the cost of the halo layers on a 1x1 mesh, and bfloat16 step time.

One rank (NCCL on CUDA) runs a training step (forward + backward, batch 1) of plain torch
and of the same network through ``halo.parallelize`` on a 1x1 mesh, in float32 and under
bfloat16 autocast (activations bfloat16, parameters and batch-norm statistics float32,
as ``train.bf16`` does). Reported: median step time (CUDA-synchronised), halo / plain,
float32 / bfloat16 speed-up, CUDA peak memory, and the achieved FLOP/s (``FlopCounterMode``'s
count of one step over the median step time) as a fraction of the device's dense peak from
``halo.plan.GPUS`` (bf16 tensor cores under autocast, TF32 for float32, cuDNN's default): the
figure ``halo-plan --time --achieved-fraction F --achieved-fraction-measured`` takes. Without a CUDA device the same
measurement runs on the CPU, is labelled so, and is printed only (RESULTS.md section 6
is for a GPU).

Usage::

    python benchmarks/bench_gpu.py            # on a GPU: resnet18 and resnet50 at 1024, 2048
    python benchmarks/bench_gpu.py --quick    # resnet18 at 64 x 64, 1 step, prints only
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import _setup, markdown_table, parser, report, run_ranks  # noqa: E402

__all__ = ["main", "gpu_steps"]


def gpu_steps(name: str, size: int, batch: int, steps: int, sharded: bool, bf16: bool) -> dict[str, float]:
    """Median step seconds and peak bytes of one training step on this rank's device."""
    import resource

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model, x, _ = _setup(name, 1, 1, size, size, batch, sharded)
    model, x = model.to(device), x.to(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: cuDNN algorithm search, allocator
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from torch.utils.flop_counter import FlopCounterMode

    from halo.plan import GPUS, gpu_for_device

    with FlopCounterMode(display=False) as counter:  # one more step, untimed: its FLOPs
        step()
    sync()
    median = sorted(times)[len(times) // 2]
    flops = counter.get_total_flops()
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    preset = gpu_for_device(device_name) if cuda else None
    math = "bf16" if bf16 else ("tf32" if torch.backends.cudnn.allow_tf32 else "fp32")
    peak_flops = GPUS[preset].peak[math] if preset is not None else None
    achieved = flops / median
    return {"step": median, "peak": peak, "device": device_name, "flops": flops, "achieved": achieved,
            "preset": preset, "math": math, "peak_flops": peak_flops,
            "fraction": achieved / peak_flops if peak_flops else None}


def measure(name: str, size: int, steps: int, batch: int, backend: str, threads: int) -> list[dict]:
    rows = []
    for bf16 in (False, True):
        res = {sharded: run_ranks(gpu_steps, 1, name, size, batch, steps, sharded, bf16, backend=backend,
                                  threads=threads)[0] for sharded in (False, True)}
        rows.append({"name": name, "size": size, "dtype": "bfloat16 autocast" if bf16 else "float32",
                     "plain": res[False], "halo": res[True]})
        plain, sharded = res[False]["step"], res[True]["step"]
        print(f"{name} {size} {rows[-1]['dtype']}: plain {plain:.4f} s, halo 1x1 {sharded:.4f} s "
              f"({sharded / plain:.3f}x) on {res[False]['device']}", flush=True)
        h = res[True]
        where = (f"fraction {h['fraction']:.3f} of the {h['preset']} dense {h['math']} peak "
                 f"({h['peak_flops'] / 1e12:.1f} TFLOP/s): halo-plan --time --gpu {h['preset']} "
                 f"--achieved-fraction {h['fraction']:.3f} --achieved-fraction-measured"
                 if h["fraction"] is not None else "no peak known for this device (halo.plan.GPUS)")
        print(f"  achieved (halo 1x1): {h['flops'] / 1e12:.3f} TFLOP per step, {h['achieved'] / 1e12:.2f} TFLOP/s; "
              f"{where}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    fp32 = {(r["name"], r["size"]): r for r in rows if r["dtype"] == "float32"}
    header = ["model", "image", "dtype", "plain step s", "halo 1x1 step s", "halo / plain",
              "speed-up vs float32 (plain)", "speed-up vs float32 (halo)", "peak MB plain", "peak MB halo",
              "achieved TFLOP/s (halo)", "fraction of dense peak (halo)"]
    out = []
    for r in rows:
        base = fp32[(r["name"], r["size"])]
        plain, sharded = r["plain"]["step"], r["halo"]["step"]
        out.append([r["name"], f"{r['size']}x{r['size']}", r["dtype"], f"{plain:.4f}", f"{sharded:.4f}",
                    f"{sharded / plain:.3f}", f"{base['plain']['step'] / plain:.2f}",
                    f"{base['halo']['step'] / sharded:.2f}", f"{r['plain']['peak'] / 2**20:.0f}",
                    f"{r['halo']['peak'] / 2**20:.0f}", f"{r['halo']['achieved'] / 1e12:.2f}",
                    "n/a" if r["halo"]["fraction"] is None
                    else f"{r['halo']['fraction']:.3f} of {r['halo']['math']} {r['halo']['peak_flops'] / 1e12:.0f}"])
    return markdown_table(header, out)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the table rows."""
    ap = parser(__doc__)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    backend, threads = ("nccl", 1) if cuda else ("gloo", os.cpu_count() or 1)
    models, sizes, steps = (["resnet18"], [64], 1) if a.quick else (a.models, a.sizes, a.steps)
    rows = [r for m in models for s in sizes for r in measure(m, s, steps, a.batch, backend, threads)]
    where = rows[0]["plain"]["device"]
    text = table(rows)
    if not cuda:
        text += "\n\nNo CUDA device: measured on the CPU (all cores), printed only."
    report("bench_gpu", text, quick=a.quick or not cuda, argv=argv, intro=(
        f"## 6. On a GPU: halo on a 1x1 mesh against plain torch, and bfloat16\n\nOne rank on {where} (NCCL), "
        f"forward + backward, batch {a.batch}, median of {steps} CUDA-synchronised steps after two warm-ups. "
        "*halo / plain* is the cost of the halo layers themselves (no neighbours: the edge fill replaces "
        "padding, batch norm runs torch's kernels). *bfloat16 autocast* keeps parameters and batch-norm "
        "statistics in float32, as `train.bf16` does. Peak memory is `torch.cuda.max_memory_allocated`. "
        "*Achieved* is `FlopCounterMode`'s FLOPs of one step over the median step time; its fraction of the "
        "device's dense peak (`halo.plan.GPUS`) is what `halo-plan --time --achieved-fraction` takes.\n\n"))
    return rows


if __name__ == "__main__":
    main()
