#!/usr/bin/env bash
# Idempotent: installs the Debian packages foleyserve's tests and service use (chromium for the
# browser tests, redis-server for the shared cache, postgresql for the scale-out job store) only
# when their binaries are missing.
# On a machine where we cannot use apt-get (not Debian, or not root and no passwordless sudo) it
# warns and exits 0: those tests then skip, and nothing else depends on these packages.
set -uo pipefail

# Overridable so tests can point at fake binaries; the defaults are where Debian puts them.
CHROMIUM_BIN=${FOLEYSERVE_CHROMIUM_BIN:-/usr/bin/chromium}
REDIS_BIN=${FOLEYSERVE_REDIS_SERVER_BIN:-/usr/bin/redis-server}
# Debian puts initdb under a versioned folder; any version will do.
PG_GLOB=${FOLEYSERVE_POSTGRES_GLOB:-/usr/lib/postgresql/*/bin/initdb}

missing=()
[ -x "$CHROMIUM_BIN" ] || missing+=(chromium)
[ -x "$REDIS_BIN" ] || missing+=(redis-server)
compgen -G "$PG_GLOB" >/dev/null || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0

warn() { echo "install-system.sh: warning: $*" >&2; }

if ! command -v apt-get >/dev/null 2>&1; then
    warn "apt-get is not available; install ${missing[*]} yourself (the tests that need them will skip)"
    exit 0
fi

as_root=()
if [ "${EUID:-$(id -u)}" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        warn "not root and no passwordless sudo; install ${missing[*]} yourself (the tests that need them will skip)"
        exit 0
    fi
fi

apt_install() {
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

echo "install-system.sh: installing ${missing[*]}" >&2
# The package lists are often already fresh; only refresh them when the first try fails.
if ! apt_install; then
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q && apt_install || {
        echo "install-system.sh: error: apt-get could not install ${missing[*]}" >&2
        exit 1
    }
fi
