#!/usr/bin/env bash
# A Python base image built from Debian's own packages with debootstrap, for machines that
# reach Debian's archive but no container registry (air-gapped builders, this project's CI).
# It offers what the Dockerfile needs of python:3.11-slim: `python` (3.11) with venv, and CA
# certificates, including the host's extra ones (a TLS-inspecting proxy's) so pip works.
#
#   k8s/tools/debian-base.sh            prints the image name; builds it only when missing
#   CONTAINER_ENGINE=podman|docker      default: docker when its daemon answers, else podman
#
# The tag is a hash of this recipe and of the extra certificates, so a changed recipe builds
# a new base and an unchanged one is reused. Needs root (debootstrap) and the debootstrap package.
set -euo pipefail

SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES="python3,python3-venv,ca-certificates"
EXTRA_CERTS_DIR="${EXTRA_CERTS_DIR:-/usr/local/share/ca-certificates}"
if [ -z "${CONTAINER_ENGINE:-}" ]; then
  # docker when its daemon answers, else podman (a docker client alone cannot import).
  if docker info >/dev/null 2>&1; then CONTAINER_ENGINE=docker; else CONTAINER_ENGINE="$(command -v podman || true)"; fi
fi
ENGINE="$CONTAINER_ENGINE"

[ -n "$ENGINE" ] || { echo "debian-base: no docker or podman on PATH (set CONTAINER_ENGINE)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debian-base: debootstrap is required (apt-get install debootstrap)" >&2; exit 1; }

recipe_hash() {
  {
    cat "${BASH_SOURCE[0]}"
    echo "$SUITE $MIRROR $PACKAGES"
    find "$EXTRA_CERTS_DIR" -name '*.crt' -type f -print0 2>/dev/null | sort -z | xargs -0r cat
  } | sha256sum | cut -c1-12
}

IMAGE="localhost/chorus-python-base:${SUITE}-$(recipe_hash)"
if "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE"
  exit 0
fi

ROOTFS="$(mktemp -d "${TMPDIR:-/tmp}/chorus-rootfs.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
echo "debian-base: debootstrap $SUITE into $ROOTFS" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >&2
# What the official slim images also leave out: package caches, docs, manuals, translations.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/*
ln -sf /usr/bin/python3 "$ROOTFS/usr/local/bin/python"
if compgen -G "$EXTRA_CERTS_DIR/*.crt" >/dev/null; then
  cp "$EXTRA_CERTS_DIR"/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
  chroot "$ROOTFS" update-ca-certificates >/dev/null
fi
tar -C "$ROOTFS" -c . | "$ENGINE" import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "$IMAGE"
