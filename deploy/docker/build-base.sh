#!/usr/bin/env bash
# A local base image for the Dockerfile, built from Debian packages alone, for machines that can reach a
# Debian mirror but not Docker Hub: debootstrap a minimal bookworm (python3 3.11, venv, CA certificates)
# into a directory, tar it and `docker import` it. Then:
#   docker build --build-arg PYTHON_IMAGE=predgate-base:bookworm -t predgate:cpu .
#
# Usage (as root): deploy/docker/build-base.sh [--force]
#   --force / FORCE=1   rebuild even if the image exists (the default skips: the base changes rarely)
#   BASE_IMAGE          tag of the imported image              (predgate-base:bookworm)
#   SUITE               Debian release                         (bookworm: python3 is 3.11, as the project)
#   DEBIAN_MIRROR       mirror debootstrap downloads from      (http://deb.debian.org/debian)
#   BASE_TARBALL        also keep the root filesystem tarball here (default: a temporary file, removed)
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-predgate-base:bookworm}
SUITE=${SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
FORCE=${FORCE:-0}
[ "${1:-}" = "--force" ] && FORCE=1

if [ "$FORCE" != 1 ] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "build-base: $BASE_IMAGE exists; skipping (--force to rebuild)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "build-base: debootstrap needs root (run with sudo)" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    echo "build-base: debootstrap is missing: apt-get install -y debootstrap" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/predgate-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
tarball=${BASE_TARBALL:-$work/rootfs.tar}

# minbase: essential + apt only; python3-venv brings ensurepip's wheels, so the image's venv gets pip
# without Debian's externally-managed system pip (PEP 668).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$rootfs" "$DEBIAN_MIRROR"

# Nothing the image needs at run time: downloaded packages, package lists, logs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/* "$rootfs"/tmp/*
# The mirror debootstrap used (an apt-get inside a derived image then works where that mirror is reachable).
echo "deb $DEBIAN_MIRROR $SUITE main" >"$rootfs/etc/apt/sources.list"

tar --numeric-owner -C "$rootfs" -cf "$tarball" .
docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/usr/bin/python3"]' \
    --message "debootstrap --variant=minbase $SUITE (python3, python3-venv, ca-certificates)" \
    "$tarball" "$BASE_IMAGE"
docker image inspect --format "build-base: $BASE_IMAGE {{.Id}} {{.Size}} bytes" "$BASE_IMAGE"
