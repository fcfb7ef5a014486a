#!/bin/sh
# Install buildgate from this checkout: pystemd's build dependencies (apt), a
# venv in /opt/buildgate, and /usr/local/bin/buildgate. Idempotent.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
prefix=${BUILDGATE_PREFIX:-/opt/buildgate}

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run it as root (sudo ./install.sh)" >&2
    exit 77
fi
if command -v apt-get >/dev/null 2>&1; then
    missing=""
    for pkg in gcc pkg-config libsystemd-dev python3-venv python3-dev; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        echo "install.sh: apt-get install$missing"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    fi
else
    echo "install.sh: no apt-get here: make sure gcc, pkg-config and the libsystemd headers are installed" >&2
fi
if [ ! -x "$prefix/bin/python" ]; then
    python3 -m venv "$prefix"
fi
"$prefix/bin/pip" install -q --upgrade "$here"
ln -sf "$prefix/bin/buildgate" /usr/local/bin/buildgate
echo "install.sh: $(/usr/local/bin/buildgate --version) installed in $prefix"
