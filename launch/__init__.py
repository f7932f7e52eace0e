"""How halo's processes start: torchrun, SLURM (srun, sbatch, submitit), MPI or one process.

`launch.env` maps the launcher's environment to a `DistEnv` (rank, world size,
local rank, rendezvous address) and initialises ``torch.distributed``;
`launch.failure` ends the whole job, non-zero and naming the lost rank, when one
rank dies or hangs; `launch.train.start` is the one start-up path of every halo-train
process (torchrun, mpiexec, srun, submitit), and `launch.submit` submits jobs. `launch`
calls `halo.train`'s public functions; nothing in `halo` imports `launch`:

    from launch import init_distributed, guard, shutdown
    env = init_distributed(backend="auto", timeout_s=cfg.dist.timeout_s)
    with guard(env):
        halo.train.run(cfg, run_dir)
    shutdown()
"""

from launch.env import DistEnv, discover, expand_nodelist, init_distributed, shutdown, slurm_restarts
from launch.failure import guard, run_guarded

__all__ = ["DistEnv", "discover", "expand_nodelist", "guard", "init_distributed", "run_guarded", "shutdown",
           "slurm_restarts"]
