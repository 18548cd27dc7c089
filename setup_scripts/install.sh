#!/usr/bin/env bash
# Install spinediff and its dependencies into .venv in the clone (idempotent: seconds when up to date).
#
# nnunetv2 brings torch, batchgenerators, dynamic-network-architectures, SimpleITK and nibabel;
# monai brings the noise schedulers and metrics. The first run takes a few minutes (~6 GB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "[spinediff] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.spinediff-installed"
wanted=$(cat pyproject.toml setup_scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && "$VENV/bin/python" -c "import spinediff, nnunetv2, monai" 2>/dev/null; then
  echo "[spinediff] environment up to date ($VENV)"
else
  echo "[spinediff] installing spinediff and dependencies into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
  echo "$wanted" > "$stamp"
fi

# Headless Chromium renders the HTML report to a screenshot in the report test (optional elsewhere).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  if [ "${SPINEDIFF_SKIP_CHROMIUM:-0}" != "1" ]; then
    echo "[spinediff] installing Debian chromium (headless report rendering)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[spinediff] chromium could not be installed; the report screenshot test will be skipped"
  fi
fi
