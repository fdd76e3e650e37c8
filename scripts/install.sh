#!/usr/bin/env bash
# Idempotent set-up: torch's CPU wheel first (an unpinned torch would pull GBs of CUDA packages),
# then foleyserve itself with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
