#!/usr/bin/env bash
# Install what the build and the tests need: npm packages always; when run as root on Debian/Ubuntu, the
# real NBD clients and reference servers the black-box tests drive. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(libnbd-bin nbdfuse nbdkit qemu-utils fio nbd-server nbd-client python3-libnbd fuse3 e2fsprogs util-linux mount openssl prometheus systemd)

missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install-deps: installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "install-deps: not root (or no apt-get); tests that need these will skip locally: ${missing[*]}" >&2
  fi
fi

if [ -f package-lock.json ]; then npm ci --no-fund --no-audit; else npm install --no-fund --no-audit; fi
