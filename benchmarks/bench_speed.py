"""Benchmark 3: parallel efficiency of P ranks (one thread each) against one process with one thread.

The same global image and model; one step is forward + backward (batch 1, float32,
training-mode batch norm). Efficiency is ``t_1 / (P t_P)`` with ``t_1`` the median step
of plain torch in one process and ``t_P`` the median step of the slowest rank. Goal on
this CPU: >= 0.85 at 2 ranks for ResNet-18 at 512 x 512 and larger. Also reported: halo on
a 1x1 mesh against plain torch (the cost of the halo layers themselves); a control (two
plain processes at once, no communication: ``t_1 / t_concurrent`` is the efficiency this
machine allows two busy ranks); plain torch on one block-sized image (the efficiency if
synchronising were free); per step, how often the ranks synchronise and how long a rank is
blocked in halo waits; the idle cost of one synchronisation; and every halo run again with
``overlap`` on (the inside of each convolution computed while its halo travels, the weight
gradient while the input gradient's halo travels back).

Usage::

    python benchmarks/bench_speed.py            # resnet18 at 512, 768, 1024, 2048 (~25 min); writes RESULTS.md
    python benchmarks/bench_speed.py --quick    # resnet18 at 64 x 64, 1 step, prints only
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, parser, run_ranks, sync_latency, timed_steps, report  # noqa: E402

__all__ = ["main"]


MIMIC_ALL = "+ the halo run's synchronisations, no halo arithmetic"
MIMIC_STATS = "+ batch-norm synchronisations only"


def _row(size: int, mesh: str, p: int, res: list[dict], one: dict, overlap: str, method: str) -> dict:
    """A table row from every rank's :func:`timed_steps` (slowest rank's step, worst of the rest)."""
    return {"size": size, "mesh": mesh, "P": p, "step": res[0]["step"],
            "wait": max(r["wait"] for r in res), "post": max(r["post"] for r in res),
            "main_cpu": max(r["main_cpu"] for r in res), "other_cpu": max(r["other_cpu"] for r in res),
            "spread": res[0]["spread"], "after": res[0]["after"],
            "queued_main": max(r["queued_main"] for r in res), "queued_other": max(r["queued_other"] for r in res),
            "syncs": res[0]["syncs"], "eff": one["step"] / (p * res[0]["step"]), "overlap": overlap, "method": method}


def measure(name: str, size: int, meshes: list[tuple[int, int]], steps: int, batch: int) -> list[dict]:
    """One-process reference, the control, halo 1x1, and per mesh: plain torch on one block
    (the compute-only ceiling), on two ranks the same block synchronising as halo does (all
    of halo's synchronisations, then batch norm's only), halo with overlap off and on, and
    halo assembling every extended block."""
    one = run_ranks(timed_steps, 1, name, 1, 1, size, size, batch, steps, False)[0]
    out = [{"size": size, "mesh": "one process", "P": 1, **one, "eff": 1.0, "overlap": "-", "method": "-"}]
    # Control: two plain processes on the whole image at once, no communication. Their
    # slowdown is what the machine itself costs two busy ranks (shared cores, memory).
    both = run_ranks(timed_steps, 2, name, 1, 1, size, size, batch, steps, False)[0]
    out.append({"size": size, "mesh": "2 x one process, concurrent (control)", "P": 1, **both,
                "eff": one["step"] / both["step"], "overlap": "-", "method": "-"})
    print(f"{name} {size} machine ceiling for 2 busy processes: {out[-1]['eff']:.3f}", flush=True)
    for rows, cols in [(1, 1), *meshes]:
        p = rows * cols
        if p > 1:  # plain torch on a block-sized image: what P ranks would take with free communication
            alone = run_ranks(timed_steps, 1, name, 1, 1, size // rows, size // cols, batch, steps, False)[0]
            out.append({"size": size, "mesh": f"plain torch on one {rows}x{cols} block, no communication", "P": p,
                        **alone, "eff": one["step"] / (p * alone["step"]), "overlap": "-", "method": "-"})
            if p == 2:  # the same block computation, synchronising as halo does (every sync, or statistics only)
                for mimic, label in (("all", MIMIC_ALL), ("statistics", MIMIC_STATS)):
                    res = run_ranks(timed_steps, p, name, rows, cols, size // rows, size // cols, batch, steps, False,
                                    None, None, mimic)
                    out.append(_row(size, f"plain torch on one {rows}x{cols} block {label}", p, res, one, "-", "-"))
        for ov, method in ((False, "auto"), (True, "auto"), (False, "assemble")):
            if p == 1 and method != "auto":
                continue
            res = run_ranks(timed_steps, p, name, rows, cols, size, size, batch, steps, True, ov, method)
            row = _row(size, f"{rows}x{cols}", p, res, one, "on" if ov else "off", method)
            out.append(row)
            print(f"{name} {size} {row['mesh']} overlap={row['overlap']} method={method}: step {row['step']:.3f} s, "
                  f"efficiency {row['eff']:.3f}, {row['syncs']} syncs, halo wait {row['wait']:.3f} s", flush=True)
    return out


def table(name: str, rows: list[dict]) -> str:
    header = ["model", "image", "mesh", "P", "overlap", "convolution", "step s", "efficiency t1/(P tP)", "syncs / step",
              "main-thread CPU s", "comm-thread CPU s", "halo wait s / step", "halo post s / step"]
    return markdown_table(header, [
        [name, f"{r['size']}x{r['size']}", r["mesh"], r["P"], r["overlap"], r["method"], f"{r['step']:.3f}", f"{r['eff']:.3f}",
         r["syncs"], f"{r['main_cpu']:.3f}", f"{r['other_cpu']:.3f}", f"{r['wait']:.3f}", f"{r['post']:.3f}"]
        for r in rows])


def floor_text(latency: dict[str, float], rows: list[dict]) -> str:
    """Where each halo step's time goes beyond plain torch on one block (overlap off)."""
    lines = [f"Idle synchronisation between two ranks (median of 200): batch-norm all-gather "
             f"{latency['gather'] * 1e3:.2f} ms, p2p strip swap {latency['p2p'] * 1e3:.2f} ms. Overhead of each "
             "halo run (overlap off) over plain torch on one block of the same size:"]
    for r in rows:
        if r["P"] == 1 or r["overlap"] != "off" or r["method"] != "auto":
            continue
        block = next(b for b in rows if b["size"] == r["size"]
                     and b["mesh"] == f"plain torch on one {r['mesh']} block, no communication")
        extra = r["step"] - block["step"]
        lines.append(
            f"- {r['size']}x{r['size']} {r['mesh']}: {r['step']:.3f} s = {block['step']:.3f} s + {extra:.3f} s, "
            f"{extra / max(r['syncs'], 1) * 1e3:.1f} ms per synchronisation ({r['syncs']} per step). Main thread: "
            f"{r['main_cpu'] - block['main_cpu']:+.3f} s CPU, blocked {r['step'] - r['main_cpu']:.3f} s; "
            f"gloo's threads: {r['other_cpu']:.3f} s CPU on the same cores. Synchronisations: the ranks arrive "
            f"{r['spread']:.3f} s apart in all (imbalance), and {r['after']:.3f} s pass after the last arrives "
            f"({r['after'] / max(r['syncs'], 1) * 1e3:.2f} ms each). Runnable but waiting for a CPU: main thread "
            f"{r['queued_main']:.3f} s, gloo's threads {r['queued_other']:.3f} s (plain torch on one block: "
            f"{block['queued_main']:.3f} s).")
    ceilings = ["", "What synchronising itself costs on this machine: the plain block computation on two ranks, "
                "first with every synchronisation of the halo run (same calls, same message sizes, no halo "
                "arithmetic), then with only those of batch norm (as if every halo exchange travelled with a "
                "batch-norm reduction: the fewest an exact training-mode batch-norm network has). Efficiency, "
                "with syncs per step:"]
    for r in rows:
        if r["P"] != 2 or r["overlap"] != "off" or r["method"] != "auto":
            continue
        prefix = f"plain torch on one {r['mesh']} block "
        same = [b for b in rows if b["size"] == r["size"] and b["mesh"] in (prefix + MIMIC_ALL, prefix + MIMIC_STATS)]
        if len(same) == 2:
            every, stats = same
            ceilings.append(
                f"- {r['size']}x{r['size']} {r['mesh']}: halo {r['eff']:.3f} ({r['syncs']}); plain block with the same "
                f"synchronisations {every['eff']:.3f} ({every['syncs']}); with batch norm's only {stats['eff']:.3f} "
                f"({stats['syncs']}); with none {next(b['eff'] for b in rows if b['size'] == r['size'] and b['mesh'] == prefix[:-1] + ', no communication'):.3f}.")
    return "\n".join(lines + (ceilings if len(ceilings) > 2 else []))


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the table rows."""
    ap = parser(__doc__)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 768, 1024, 2048])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--four", action="store_true", help="also 2x2 (oversubscribes a 2-core machine)")
    a = ap.parse_args(argv)
    meshes = [(1, 2), (2, 1)] + ([(2, 2)] if a.four else [])
    sizes, steps = ([64], 1) if a.quick else (a.sizes, a.steps)
    latency = run_ranks(sync_latency, 2, 20 if a.quick else 200)[0]
    rows = [r for s in sizes for r in measure(a.model, s, [(1, 2)] if a.quick else meshes, steps, a.batch)]
    text = table(a.model, rows) + "\n\n" + floor_text(latency, rows)
    report("bench_speed", text, quick=a.quick, argv=argv, intro=(
        "## 3. Parallel efficiency\n\nForward + backward, batch "
        f"{a.batch}, float32, median of {steps} steps after one warm-up, one thread per process. "
        "`t1` is plain torch in one process; halo rows are the slowest rank. *Syncs* counts the times "
        "per step a rank waits for others (p2p batches and collectives). *Halo wait* is the time a rank "
        "is blocked in p2p `wait()` per step; *post* is the time spent posting `batch_isend_irecv`. "
        "*Main-thread CPU* is the CPU time of the rank's Python thread in the step (the rest of the "
        "step it is blocked); *comm-thread CPU* is the CPU time of its other threads (gloo's), "
        "taken from the same two cores. "
        "The control row runs two plain one-process jobs at once (t1 / t_concurrent: what the machine "
        "allows two busy processes). The *plain torch on one block* rows run one process on an image "
        "the size of one block, with no communication: the efficiency P ranks would reach if "
        "synchronising were free; the *+ synchronisations* rows run that block on two ranks that "
        "synchronise as the halo run does (all of its synchronisations, or batch norm's only; no halo "
        "arithmetic). *Overlap on* convolves each block while its halo travels "
        "(forward) and runs its convolution backward while the halo gradients travel back. "
        "*Convolution* `auto` (the default) convolves a block with zero padding and recomputes only its "
        "border bands where the block has at least as many elements per band as the weight, and "
        "assembles the halo-extended block elsewhere; `assemble` builds the extended block in every "
        "convolution (three block-sized copies per convolution and step).\n\n"))
    return rows


if __name__ == "__main__":
    main()
