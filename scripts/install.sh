#!/usr/bin/env bash
# Idempotent set-up: the interpreter (see _python.sh: PYTHON, the active virtual environment, or
# the repository's .venv, created here), then torch's CPU wheel first (an unpinned torch would pull
# GBs of CUDA packages), then foleyserve itself with the service and test extras.
#
# FOLEYSERVE_INSTALL_DRY_RUN=1 prints the pip commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh

say() { echo "install.sh: $*" >&2; }

# Debian and Ubuntu ship the venv module without ensurepip unless python3-venv is installed.
can_make_venvs() { "$BASE_PYTHON" -c 'import venv, ensurepip' 2>/dev/null; }

install_python3_venv() {
    # Same policy as install-system.sh: use apt-get only as root or with passwordless sudo.
    local apt_get=${FOLEYSERVE_APT_GET:-apt-get}  # overridable so tests never touch the system
    command -v "$apt_get" >/dev/null 2>&1 || return 1
    local as_root=()
    if [ "${EUID:-$(id -u)}" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || return 1
        as_root=(sudo -n)
    fi
    local version
    version=$("$BASE_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    say "installing python3-venv (python$version-venv) so that foleyserve gets its own .venv"
    local apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive "$apt_get")
    "${apt[@]}" install -y -q --no-install-recommends python3-venv "python$version-venv" \
        || { "${apt[@]}" update -q && "${apt[@]}" install -y -q --no-install-recommends python3-venv "python$version-venv"; }
}

make_venv() {
    if ! can_make_venvs; then
        install_python3_venv >&2 || true
        if ! can_make_venvs; then
            say "error: $BASE_PYTHON cannot create a virtual environment (its venv/ensurepip module is missing)."
            say "On Debian/Ubuntu run:  sudo apt install python3-venv   then run this command again."
            say "Or point PYTHON at the python of a virtual environment you made:  PYTHON=/path/to/venv/bin/python bash $0"
            exit 1
        fi
    fi
    say "creating a virtual environment in $VENV (set PYTHON=... to use another interpreter)"
    # --clear: a half-made .venv (an interrupted first run) is rebuilt, not trusted.
    "$BASE_PYTHON" -m venv --clear "$VENV"
}

if [ -n "$VENV" ] && ! "$PY" -c 'import sys' 2>/dev/null; then
    make_venv
fi

stamp=""
if [ -n "$VENV" ]; then
    # Our own venv records what it was installed from, so a rerun with nothing changed is instant.
    stamp="$VENV/.foleyserve-installed"
    want=$(cat pyproject.toml "$0" | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        exit 0
    fi
fi

pip=("$PY" -m pip install -q --disable-pip-version-check)
if [ "${FOLEYSERVE_INSTALL_DRY_RUN:-0}" = 1 ]; then
    echo "${pip[*]} torch==2.13.0"
    echo "${pip[*]} -e .[serve,test]"
    exit 0
fi
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[serve,test]"
[ -z "$stamp" ] || echo "$want" >"$stamp"
