#!/usr/bin/env bash
# A local Debian base image with Python 3.11, for machines that cannot pull the official
# Flower images: debootstrap a minimal bookworm and `docker import` it as kta-flwr-base.
# Run as root; needs debootstrap and a reachable Debian mirror (DEBIAN_MIRROR).
set -euo pipefail
tag="${1:-kta-flwr-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import - "$tag"
echo "built $tag"
