#!/bin/sh
# Stand-in for docker.io/library/python:3.11-slim-bookworm, built from Debian packages
# (no registry reachable). Debian bookworm's python3 is 3.11.2; python3-venv gives
# `python3 -m venv` with pip (ensurepip). Nothing is pulled: the result is a local image.
set -eu
BASE_IMAGE=${BASE_IMAGE:-docker.io/library/python:3.11-slim-bookworm}
mmdebstrap --variant=minbase \
  --include=python3,python3-venv,ca-certificates,netbase,tzdata \
  --aptopt='Acquire::Check-Valid-Until "false"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  bookworm - \
  'deb http://deb.debian.org/debian bookworm main' \
  'deb http://deb.debian.org/debian bookworm-updates main' \
  'deb http://deb.debian.org/debian-security bookworm-security main' \
| podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$BASE_IMAGE"
podman image ls "$BASE_IMAGE"
podman run --rm --runtime runc --network host --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 \
  "$BASE_IMAGE" python3 -c 'import sys, ssl, venv; print(sys.version)'
