"""The benchmark scripts run end to end in their ``--quick`` mode (the scripts work; timings are not checked).

Each quick run takes 15-30 s on an idle 2-core machine; the timeouts leave room for a loaded one.
"""

from __future__ import annotations

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
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_quick_mode(script: str) -> None:
    path = BENCH / script
    if not path.exists():
        pytest.skip(f"{script} is not written yet")
    results = BENCH / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    proc = subprocess.run([sys.executable, str(path), "--quick"], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert SCRIPTS[script] in proc.stdout, proc.stdout[-4000:]
    after = results.read_text() if results.exists() else None
    assert after == before, "--quick must not rewrite RESULTS.md"
