"""``python -m halo.train``: the same as ``halo-train``."""

from halo.train import main

main()
