#!/usr/bin/env bash
# Build a minimal Debian base image with Python from Debian's mirror (debootstrap + docker import).
# For air-gapped sites and CI machines that cannot pull python:*-slim from Docker Hub.
# Usage: deploy/build-base-image.sh [TAG]   (default codeloop/base:bookworm)
# Env: SUITE (bookworm), MIRROR (the apt mirror this machine uses), FORCE=1 to rebuild.
set -euo pipefail
tag="${1:-codeloop/base:bookworm}"
suite="${SUITE:-bookworm}"
if [ -z "${MIRROR:-}" ]; then
  # Reuse the mirror apt is already configured with, so no host is named here.
  MIRROR=$( (cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true) \
           | grep -oE '^(URIs:|deb) +[^ ]+' | grep -v security | head -n1 | awk '{print $2}')
fi
if [ -z "${FORCE:-}" ] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag already present (FORCE=1 to rebuild)"; exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install -y debootstrap" >&2; exit 1; }
root=$(mktemp -d /tmp/codeloop-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "==> debootstrap $suite from $MIRROR (a few minutes)"
debootstrap --variant=minbase \
  --include=python3,python3-pip,python3-venv,ca-certificates,tini \
  "$suite" "$root" "$MIRROR" | grep -E '^I: (Retrieving|Validating|Extracting|Installing|Configuring) (Release|base|packages)|^I: Base system' || true
[ -x "$root/usr/bin/python3" ] || { echo "debootstrap failed: no python3 in rootfs" >&2; exit 1; }
ln -sf /usr/bin/python3 "$root/usr/bin/python"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
echo "==> docker import -> $tag"
tar -C "$root" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 PIP_BREAK_SYSTEM_PACKAGES=1' \
  -c 'CMD ["python3"]' - "$tag"
echo "==> built $tag"
