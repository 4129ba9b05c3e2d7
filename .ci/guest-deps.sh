#!/usr/bin/env bash
# Installs what the real-guest tests (tests/guest/) need, each only when missing:
# qemu-system-x86_64 (TCG), a kernel and a static busybox for the test's initramfs, and e2fsprogs
# to build and check ext4. On bookworm qemu-system-x86 must come from bookworm-backports: from the
# default suite it pulls qemu 7.2 and removes the qemu-utils 10 the tests use.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
compgen -G '/boot/vmlinuz-*' >/dev/null || need+=(linux-image-amd64)
command -v mkfs.ext4 >/dev/null && command -v e2fsck >/dev/null || need+=(e2fsprogs)
command -v xz >/dev/null || need+=(xz-utils)
[ ${#need[@]} -gt 0 ] || exit 0

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
target=()
if [ "$codename" = bookworm ]; then
  target=(-t bookworm-backports)
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # Same mirror and keyring as the existing Debian source.
    src=/etc/apt/sources.list.d/debian.sources
    uri=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' "$src" 2>/dev/null || true)
    key=$(awk '/^Signed-By:/ {print $2; exit}' "$src" 2>/dev/null || true)
    {
      echo "Types: deb"
      echo "URIs: ${uri:-http://deb.debian.org/debian}"
      echo "Suites: bookworm-backports"
      echo "Components: main"
      echo "Signed-By: ${key:-/usr/share/keyrings/debian-archive-keyring.gpg}"
    } >/etc/apt/sources.list.d/bookworm-backports.sources
  fi
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${target[@]}" "${need[@]}"
