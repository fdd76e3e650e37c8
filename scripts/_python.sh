# Sourced by install.sh, demo.sh and test.sh (from the repository root): sets PY, the Python that
# foleyserve is installed into and run with, and VENV, the virtual environment we manage (empty
# when we manage none).
#
# - PYTHON, when set, is used as given (CI passes its own virtual environment's interpreter).
# - A python3 that already runs inside a virtual environment is used as it is.
# - Otherwise the repository's own .venv: a stock Debian/Ubuntu python3 is "externally managed"
#   (PEP 668) and refuses `pip install`, and we would not want to change it anyway.
BASE_PYTHON=${FOLEYSERVE_BASE_PYTHON:-python3}
VENV=""
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif "$BASE_PYTHON" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)' 2>/dev/null; then
    PY=$(command -v "$BASE_PYTHON")
else
    VENV=${FOLEYSERVE_VENV:-$PWD/.venv}
    PY=$VENV/bin/python
fi
