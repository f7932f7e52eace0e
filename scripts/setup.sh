#!/usr/bin/env bash
# Create (or refresh) the project environment in .venv.
#   bash scripts/setup.sh        python packages only (training)
#   bash scripts/setup.sh test   plus the system packages the tests use (SLURM, munge, MariaDB)
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.halo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    # torch first and pinned: a bare range would pull a newer multi-GB build.
    .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
if [ "${1:-}" = "test" ]; then
    bash slurm/install.sh
fi
