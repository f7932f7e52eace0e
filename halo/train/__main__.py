"""``python -m halo.train``: the same as ``halo-train``.

Process discovery and the failure guard belong to `launch` (`launch.train`); this script is
the only file under ``halo/`` that imports it, so that ``torchrun -m halo.train`` and
``mpiexec python -m halo.train`` keep working. No module of the ``halo`` package imports ``launch``.
"""

from launch.train import main

main()
