#!/usr/bin/env bash
# Installs the system packages the test suite needs (real servers and a real browser), only when missing.
set -euo pipefail
packages=()
need() { command -v "$1" >/dev/null 2>&1 || packages+=("$2"); }
# Each feature's tests add the servers they start here, as: need <command> <debian-package>
# (nginx and redis-server live in /usr/sbin, which a non-root PATH may lack)
PATH="$PATH:/usr/sbin:/sbin"
need nginx nginx                 # tests/test_deploy.py, tests/test_proxies.py: the shipped nginx site
need redis-server redis-server   # shared limits across relay instances
need caddy caddy                 # the shipped Caddyfile
need openssl openssl             # a throwaway certificate for the TLS half of the nginx site
need chromium chromium           # the chat page's browser tests (Playwright, never `playwright install`) and tests/test_sse_browser.py
need npm npm                     # builds the chat page's bundle (scripts/build-web.sh)
need systemd-analyze systemd      # tests/test_deploy.py: `systemd-analyze verify` on the shipped unit
# the usage ledger's PostgreSQL tests (tests/test_ledger.py): initdb/pg_ctl live in /usr/lib/postgresql/N/bin
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || packages+=(postgresql)
if ((${#packages[@]})); then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  echo "installing system packages for the tests: ${packages[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi
# The packages may start system-wide daemons on their default ports (nginx and caddy on :80, redis on
# :6379); the tests start their own on free loopback ports, so stop and disable what was just installed.
if ((${#packages[@]})) && [ -d /run/systemd/system ]; then
  for package in "${packages[@]}"; do
    case $package in
      nginx | redis-server | caddy | postgresql) $sudo_cmd systemctl disable --now "$package" >/dev/null 2>&1 || true ;;
    esac
  done
fi
