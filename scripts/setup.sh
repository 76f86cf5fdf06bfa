#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 machine: apt packages, .venv, pinned PyPI packages.
# EXTRAS (default "dev") picks the pyproject extras; `make weights` adds "train".
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev}

# chromium + chromium-driver: the playground page's headless-browser test (tests/test_serve_page.py)
APT_PKGS="verilator gcc-riscv64-unknown-elf libevent-dev libjson-c-dev zlib1g-dev openfpgaloader r-cran-janeaustenr chromium chromium-driver"
missing=""
for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing apt packages:$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.setup-stamp
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $EXTRAS"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  echo "setup: installing Python packages into .venv (extras: $EXTRAS)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[$EXTRAS]"
  echo "$want" >> "$stamp"
fi
echo "setup: ok"
