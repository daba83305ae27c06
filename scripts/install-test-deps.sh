#!/bin/sh
# Installs the system packages the test suite runs for real (nginx, redis-server, caddy) when they are
# missing. Idempotent: when every program is already there it does nothing and needs no root.
#
# Daemons the packages would start system-wide on their default ports (nginx on :80, redis on :6379,
# caddy on :80) are stopped and disabled again when this script installed them: the tests start their
# own instances on free loopback ports, in temporary directories.
#
# Usage: scripts/install-test-deps.sh            (make test calls it)
set -eu

# program:package pairs; add a line for another system program the tests need.
wanted="
nginx:nginx
redis-server:redis-server
caddy:caddy
openssl:openssl
"

missing=""
for pair in $wanted; do
    program=${pair%%:*}
    package=${pair#*:}
    if ! command -v "$program" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$program" ]; then
        missing="$missing $package"
    fi
done

[ -z "$missing" ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: missing$missing, and no apt-get here; install them with your package manager" >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1; then
    as_root="sudo"
else
    echo "install-test-deps: missing$missing; run as root or install sudo" >&2
    exit 1
fi

echo "install-test-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086  # word splitting of the package list is intended
if ! $as_root apt-get install -y --no-install-recommends $missing; then
    # A fresh machine or container often has no package lists yet.
    $as_root apt-get update
    $as_root apt-get install -y --no-install-recommends $missing
fi

# Stop what the packages may have started system-wide (only on a running systemd).
if [ -d /run/systemd/system ]; then
    for package in $missing; do
        case $package in
            nginx | redis-server | caddy) $as_root systemctl disable --now "$package" >/dev/null 2>&1 || true ;;
        esac
    done
fi
