"""A tiny distributed program for the launch tests.

Initialises through `launch.env.init_distributed`, all-reduces a few times under
`launch.failure.guard`, and prints (and with ``--out DIR`` writes
``DIR/rank<R>.json``) what it saw. Failure injection: ``--die-rank R --die-after N``
makes rank R ``os._exit(1)`` (or ``--die-signal KILL`` SIGKILL itself) before
step N; ``--hang-rank R`` makes rank R sleep forever before step ``--die-after``.

    torchrun --standalone --nproc-per-node 2 tests/scripts/dist_probe.py --steps 5
    mpiexec -n 2 python tests/scripts/dist_probe.py
    srun -n 2 python tests/scripts/dist_probe.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch.env import init_distributed, shutdown  # noqa: E402
from launch.failure import guard  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--step-s", type=float, default=0.2, help="sleep between steps")
    p.add_argument("--timeout-s", type=float, default=float(os.environ.get("HALO_DIST_TIMEOUT_S", 60)))
    p.add_argument("--die-rank", type=int, default=-1)
    p.add_argument("--die-after", type=int, default=3)
    p.add_argument("--die-signal", choices=["exit", "KILL"], default="exit")
    p.add_argument("--hang-rank", type=int, default=-1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    env = init_distributed(backend="gloo", timeout_s=args.timeout_s)
    print(f"probe: rank {env.rank} of {env.world_size} local {env.local_rank} "
          f"via {env.source} at {env.master_addr}:{env.master_port}", flush=True)
    with guard(env):
        total = 0.0
        for step in range(args.steps):
            if step == args.die_after and env.rank == args.die_rank:
                print(f"probe: rank {env.rank} dies at step {step}", flush=True)
                if args.die_signal == "KILL":
                    os.kill(os.getpid(), signal.SIGKILL)
                os._exit(1)
            if step == args.die_after and env.rank == args.hang_rank:
                print(f"probe: rank {env.rank} hangs at step {step}", flush=True)
                while True:
                    time.sleep(1)
            t = torch.tensor([float(env.rank + 1)])
            dist.all_reduce(t)
            total = float(t.item())
            time.sleep(args.step_s)
        expected = env.world_size * (env.world_size + 1) / 2
        if total != expected:
            raise RuntimeError(f"all_reduce gave {total}, expected {expected}")
        result = {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
                  "source": env.source, "sum": total, "host": os.uname().nodename}
        print("probe-result " + json.dumps(result), flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"rank{env.rank}.json").write_text(json.dumps(result))
        dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
