"""Benchmark 4: the largest square image that trains within a fixed per-rank memory budget.

For one process (plain torch) and halo on 2 (1x2) and 4 (2x2) ranks, with activation
checkpointing off and on, halo-plan finds the largest side (a multiple of 32 x mesh rows
and columns) whose activations + float32 parameters, gradients and AdamW states fit the
budget. Without checkpointing the answer is then measured: the bytes autograd saves at
that side (one forward on real gloo ranks) must fit, and the plan at the next side up
must not. With checkpointing (each trunk stage recomputed in backward, as
``train.checkpointing`` does) the measured bytes are those of the checkpointed forward
(stage inputs, head) plus the most one stage saves when recomputed
(``halo.plan.measure_checkpointed_bytes`` on the slide classifier).

Usage::

    python benchmarks/bench_budget.py --budget-mb 400     # writes RESULTS.md
    python benchmarks/bench_budget.py --quick             # 40 MB budget, prints only
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import _setup, markdown_table, parser, run_ranks, report  # noqa: E402

__all__ = ["main", "largest_side", "forward_saved", "checkpointed_saved"]

SETUPS = [("one process", (1, 1), False), ("halo 1x2", (1, 2), True), ("halo 2x2", (2, 2), True)]


def _plan(model: str, side: int, mesh: tuple[int, int], halo_layers: bool, checkpointing: bool):
    from halo.plan import plan

    return plan(model, (side, side), mesh, halo_layers=halo_layers, checkpointing=checkpointing)


def _need(p) -> int:
    return p.activation_bytes_per_rank + p.param_bytes + p.grad_bytes + p.optimizer_bytes


def largest_side(model: str, budget: int, mesh: tuple[int, int], halo_layers: bool, checkpointing: bool) -> int:
    """The largest side, in steps of ``32 * lcm(rows, cols)``, whose plan fits ``budget`` (0 if none)."""
    step = 32 * max(mesh)
    side = 0
    while _need(_plan(model, side + step, mesh, halo_layers, checkpointing)) <= budget:
        side += step
    return side


def forward_saved(model: str, rows: int, cols: int, side: int, sharded: bool) -> int:
    """Bytes autograd saves on this rank for one forward at ``side`` x ``side``."""
    from halo.plan import measure_saved_bytes

    net, x, _ = _setup(model, rows, cols, side, side, 1, sharded)
    return measure_saved_bytes(lambda: net(x), list(net.parameters()) + list(net.buffers()))


def checkpointed_saved(model: str, rows: int, cols: int, side: int, sharded: bool) -> int:
    """Bytes autograd keeps on this rank at the peak of a stage-checkpointed step at ``side`` x ``side``."""
    import torch

    import halo
    from halo.models import build_classifier
    from halo.plan import measure_checkpointed_bytes

    _, x, _ = _setup(model, 1, 1, side, side, 1, False)
    torch.manual_seed(0)
    net = build_classifier(model, 2, head="mean", checkpointing=True)
    if sharded:
        mesh = halo.SpatialMesh(rows, cols)
        net, x = halo.parallelize(net, mesh), halo.scatter(x, mesh)
    return measure_checkpointed_bytes(net, x)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the table rows."""
    ap = parser(__doc__, quick="tiny budget for CI; prints, does not write RESULTS.md")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--budget-mb", type=float, default=400.0, help="per-rank budget, MB (1e6 bytes)")
    a = ap.parse_args(argv)
    model, budget = ("resnet18", 250e6) if a.quick else (a.model, a.budget_mb * 1e6)
    setups = SETUPS[:2] if a.quick else SETUPS
    rows = []
    for label, mesh, sharded in setups:
        for ckpt in (False, True):
            side = largest_side(model, int(budget), mesh, sharded, ckpt)
            p = _plan(model, side, mesh, sharded, ckpt)
            row = {"setup": label, "ckpt": ckpt, "side": side, "planned": _need(p), "measured": None}
            if side:
                saved = run_ranks(checkpointed_saved if ckpt else forward_saved, mesh[0] * mesh[1], model, *mesh,
                                  side, sharded)
                row["measured"] = max(saved) + p.param_bytes + p.grad_bytes + p.optimizer_bytes
            rows.append(row)
            print(f"{label} checkpointing={ckpt}: largest square image {side} x {side}", flush=True)
    base = {r["ckpt"]: r["side"] for r in rows if r["setup"] == "one process"}
    cells = []
    for r in rows:
        ratio = (r["side"] / base[r["ckpt"]]) ** 2 if base.get(r["ckpt"]) else float("nan")
        meas = "-" if r["measured"] is None else f"{r['measured'] / 1e6:.0f}"
        cells.append([r["setup"], "on" if r["ckpt"] else "off", f"{r['side']} x {r['side']}", f"{ratio:.2f}",
                      f"{r['planned'] / 1e6:.0f}", meas])
    text = markdown_table(["setup", "checkpointing", "largest square image",
                           "pixels x one process (same checkpointing)", "planned MB / rank", "measured MB / rank"],
                          cells)
    report("bench_budget", text, quick=a.quick, argv=argv, intro=(
        f"## 4. Largest image within {budget / 1e6:.0f} MB per rank\n\n{model}, batch 1, float32; the budget "
        "holds activations saved for backward plus float32 parameters, gradients and two AdamW states "
        "(no CUDA workspace on CPU). *Measured* adds the bytes autograd saved in one real forward at that "
        "side (slowest rank) to the same parameter state; with checkpointing (each trunk stage recomputed "
        "in backward, as `train.checkpointing` does), the checkpointed forward's saved bytes plus the most "
        "one stage saves when recomputed.\n\n"))
    return rows


if __name__ == "__main__":
    main()
