"""Benchmark 3: parallel efficiency of P ranks (one thread each) against one process with one thread.

The same global image and model; one step is forward + backward (batch 1, float32,
training-mode batch norm). Efficiency is ``t_1 / (P t_P)`` with ``t_1`` the median step
of plain torch in one process and ``t_P`` the median step of the slowest rank. Goal on
this CPU: >= 0.85 at 2 ranks for ResNet-18 at 512 x 512 and larger. Also reported: halo on
a 1x1 mesh against plain torch (the cost of the halo layers themselves), the time a rank
spends blocked in halo waits, a control (two plain processes at once, no communication:
``t_1 / t_concurrent`` is the efficiency this machine allows two busy ranks), and, where ``HaloConv2d`` has an ``overlap`` switch, the
same run with the interior computed while the halo travels.

Usage::

    python benchmarks/bench_speed.py            # resnet18 at 512, 768, 1024; writes RESULTS.md
    python benchmarks/bench_speed.py --quick    # resnet18 at 64 x 64, 1 step, prints only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_ranks, timed_steps, write_section  # noqa: E402

__all__ = ["main"]


def _has_overlap() -> bool:
    from halo.nn.conv import HaloConv2d

    return hasattr(HaloConv2d, "overlap")


def measure(name: str, size: int, meshes: list[tuple[int, int]], steps: int, batch: int) -> list[dict]:
    """One-process reference, halo 1x1, and each mesh (with overlap off and on where available)."""
    one = run_ranks(timed_steps, 1, name, 1, 1, size, size, batch, steps, False)[0]
    out = [{"size": size, "mesh": "one process", "P": 1, **one, "eff": 1.0, "overlap": "-"}]
    # Control: two plain processes on the whole image at once, no communication. Their
    # slowdown is what the machine itself costs two busy ranks (shared cores, memory).
    both = run_ranks(timed_steps, 2, name, 1, 1, size, size, batch, steps, False)[0]
    out.append({"size": size, "mesh": "2 x one process, concurrent (control)", "P": 1, **both,
                "eff": one["step"] / both["step"], "overlap": "-"})
    print(f"{name} {size} machine ceiling for 2 busy processes: {out[-1]['eff']:.3f}", flush=True)
    variants = [None] if not _has_overlap() else [False, True]
    for rows, cols in [(1, 1), *meshes]:
        p = rows * cols
        for ov in variants:
            res = run_ranks(timed_steps, p, name, rows, cols, size, size, batch, steps, True, ov)
            wait = max(r["wait"] for r in res)
            post = max(r["post"] for r in res)
            row = {"size": size, "mesh": f"{rows}x{cols}", "P": p, "step": res[0]["step"], "wait": wait, "post": post,
                   "eff": one["step"] / (p * res[0]["step"]), "overlap": "-" if ov is None else ("on" if ov else "off")}
            out.append(row)
            print(f"{name} {size} {row['mesh']} overlap={row['overlap']}: step {row['step']:.3f} s, "
                  f"efficiency {row['eff']:.3f}, halo wait {wait:.3f} s", flush=True)
    return out


def table(name: str, rows: list[dict]) -> str:
    lines = ["| model | image | mesh | P | overlap | step s | efficiency t1/(P tP) | halo wait s / step | "
             "halo post s / step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {name} | {r['size']}x{r['size']} | {r['mesh']} | {r['P']} | {r['overlap']} | {r['step']:.3f} | "
                     f"{r['eff']:.3f} | {r['wait']:.3f} | {r['post']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the table rows."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes for CI; prints, does not write RESULTS.md")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 768, 1024])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--four", action="store_true", help="also 2x2 (oversubscribes a 2-core machine)")
    a = ap.parse_args(argv)
    meshes = [(1, 2), (2, 1)] + ([(2, 2)] if a.four else [])
    sizes, steps = ([64], 1) if a.quick else (a.sizes, a.steps)
    rows = [r for s in sizes for r in measure(a.model, s, [(1, 2)] if a.quick else meshes, steps, a.batch)]
    text = table(a.model, rows)
    print(text)
    if not a.quick:
        body = ("## 3. Parallel efficiency\n\nForward + backward, batch "
                f"{a.batch}, float32, median of {steps} steps after one warm-up, one thread per process. "
                "`t1` is plain torch in one process; halo rows are the slowest rank. *Halo wait* is the time "
                "a rank is blocked in p2p `wait()` per step (exchange not hidden by compute); *post* is the "
                "time spent posting `batch_isend_irecv`. The control row runs two plain one-process jobs at "
                "once; its efficiency column is t1 / t_concurrent, the ceiling this machine allows.\n\n" + text)
        write_section("bench_speed", body, argv if argv is not None else sys.argv[1:])
    return rows


if __name__ == "__main__":
    main()
