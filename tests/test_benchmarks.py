"""The benchmark scripts run end to end in their ``--quick`` mode (the scripts work; timings are not checked).

Each quick run takes 15-30 s on an idle 2-core machine; the timeouts leave room for a loaded one.
Their ranks fork from a server that has imported torch once (``HALO_BENCH_FORKSERVER=1``,
see ``benchmarks/_common.py``): the full runs spawn every rank afresh, for their RSS figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

# script -> a line its quick run must print
SCRIPTS = {
    "bench_memory.py": "saved x P / one process",
    "bench_traffic.py": "measured / theory",
    "bench_speed.py": "efficiency t1/(P tP)",
    "bench_budget.py": "largest square image",
    "bench_alternatives.py": "DTensor",
    "bench_plan.py": "activation_bytes_per_rank",
    "bench_read.py": "read_block MB/s",
    "bench_gpu.py": "halo / plain",
    "bench_conv.py": "bands / assemble",
    "plot_fine_foci.py": "AUC focus vs normal",
    "bench_blockwise.py": "max abs diff features",
    "bench_100k_read.py": "(peak - before) / block",
    "bench_study.py": "estimated full run",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_quick_mode(script: str) -> None:
    path = BENCH / script
    if not path.exists():
        pytest.skip(f"{script} is not written yet")
    results = BENCH / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    proc = subprocess.run([sys.executable, str(path), "--quick"], capture_output=True, text=True, timeout=280,
                          env={**os.environ, "HALO_BENCH_FORKSERVER": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert SCRIPTS[script] in proc.stdout, proc.stdout[-4000:]
    if script == "bench_study.py":  # every figure of its table is measured: none may be nan
        table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
        assert table and not [line for line in table if "nan" in [c.strip() for c in line.split("|")]], (
            "a figure of the study's table is nan (not measured):\n" + "\n".join(table))
    after = results.read_text() if results.exists() else None
    assert after == before, "--quick must not rewrite RESULTS.md"


@pytest.mark.timeout(300)
def test_mimic_synchronises_as_the_halo_run_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_speed's ceiling rows are plain torch on one block plus halo's synchronisations:
    as many per step as the halo run has, or batch norm's and global pooling's only."""
    monkeypatch.syspath_prepend(str(BENCH))  # the spawned ranks import timed_steps from there too
    monkeypatch.setenv("HALO_BENCH_FORKSERVER", "1")
    from _common import run_ranks, timed_steps

    halo = run_ranks(timed_steps, 2, "resnet18", 1, 2, 64, 64, 1, 1, True, timeout=240)
    every = run_ranks(timed_steps, 2, "resnet18", 1, 2, 64, 32, 1, 1, False, None, None, "all", timeout=240)
    stats = run_ranks(timed_steps, 2, "resnet18", 1, 2, 64, 32, 1, 1, False, None, None, "statistics", timeout=240)
    assert every[0]["syncs"] == halo[0]["syncs"] > 0
    # ResNet-18: 20 batch norms and global pooling, each once forward and once backward
    assert stats[0]["syncs"] == 2 * (20 + 1)


@pytest.mark.timeout(300)
def test_peak_live_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_memory's peak of live tensors: halo on one rank holds exactly what plain torch holds;
    on two ranks each holds less than one process, and at least what autograd saved."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("HALO_BENCH_FORKSERVER", "1")
    from _common import measure_step, run_ranks

    plain = run_ranks(measure_step, 1, "resnet18", 1, 1, 64, 64, 1, False, True, timeout=240)[0]
    one = run_ranks(measure_step, 1, "resnet18", 1, 1, 64, 64, 1, True, True, timeout=240)[0]
    two = run_ranks(measure_step, 2, "resnet18", 1, 2, 64, 64, 1, True, True, timeout=240)
    assert (one["peak"], one["peak_temp"]) == (plain["peak"], plain["peak_temp"])
    assert plain["saved"] <= plain["peak"]
    for rank in two:
        assert rank["saved"] <= rank["peak"] < plain["peak"]
        assert 0 < rank["peak_temp"] < rank["peak"]
