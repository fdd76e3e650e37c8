#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow cases included. The browser and Redis
# tests need Debian's chromium and redis-server, installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system.sh
bash scripts/install.sh
source scripts/_python.sh
exec "$PY" -m pytest -q "$@"
