#!/usr/bin/env bash
# Install what is needed, then run the whole test suite and the linter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash setup_scripts/install.sh
export nnUNet_n_proc_DA=0 MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/ruff check spinediff tests benchmarks studies
.venv/bin/python -m pytest tests "$@"
