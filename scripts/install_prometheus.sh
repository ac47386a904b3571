#!/usr/bin/env bash
# Installs Debian's prometheus package (prometheus + promtool) for the metrics tests, if missing.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "install Debian's 'prometheus' package (prometheus, promtool) to run the metrics tests" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package may start a system service; the tests start their own server on a free port.
if command -v service >/dev/null; then service prometheus stop >/dev/null 2>&1 || true; fi
command -v promtool >/dev/null
