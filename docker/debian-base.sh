#!/usr/bin/env bash
# A local stand-in for python:3.11-slim where no registry can be pulled from: Debian bookworm
# (the same release python:3.11-slim is built on) with python3 and venv, made by debootstrap from
# the Debian mirror apt already uses, imported as $DEBIAN_BASE_IMAGE. Needs root (debootstrap).
# Does nothing when the image exists (local container storage is the cache).
set -euo pipefail
IMAGE=${DEBIAN_BASE_IMAGE:-localhost/debian-py:bookworm}

if buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE exists"
  exit 0
fi
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || { echo "debian-base.sh: $tool is not installed" >&2; exit 1; }
done

mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
  mirror=${mirror:-$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}
  mirror=${mirror:-http://deb.debian.org/debian}
fi
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -cf "$rootfs.tar" .
trap 'rm -rf "$rootfs" "$rootfs.tar"' EXIT
container=$(buildah from scratch)
buildah add --quiet "$container" "$rootfs.tar" / >/dev/null  # a local tar is unpacked
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd /bin/bash "$container"
buildah commit --quiet --rm "$container" "$IMAGE" >/dev/null
echo "base image $IMAGE built"
