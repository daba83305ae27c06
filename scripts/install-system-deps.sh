#!/usr/bin/env bash
# Installs the system packages the test suite needs (real servers and a real browser), only when missing.
set -euo pipefail
packages=()
need() { command -v "$1" >/dev/null 2>&1 || packages+=("$2"); }
# Each feature's tests add the servers they start here, as: need <command> <debian-package>
if ((${#packages[@]})); then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  echo "installing system packages for the tests: ${packages[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi
