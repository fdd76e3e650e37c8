#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow cases included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
