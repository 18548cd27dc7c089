#!/usr/bin/env bash
# Install what is needed, then run the main job: `spinediff demo` on the built-in synthetic phantom.
# Extra arguments go to `spinediff demo` (e.g. --quick, -o OUT).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash setup_scripts/install.sh
exec .venv/bin/spinediff demo "$@"
