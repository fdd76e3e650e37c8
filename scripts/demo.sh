#!/usr/bin/env bash
# Set up (if needed) and run the main job: Foley for the bundled sample clip with the demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/_python.sh
exec "$PY" -m foleyserve demo "$@"
