#!/usr/bin/env bash
# Sets up what moat's tests need on Debian 12 / Raspberry Pi OS (bookworm):
# the DNS software the integration tests run as real peers, and a virtualenv with moat.
# Run from the repository root. Uses sudo when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# dig/kdig (clients), nsd + knot (authoritative upstreams and RPZ primaries),
# unbound + dnsmasq (comparison points), dnsperf (load), dnsdist (fleet front),
# prometheus (promtool checks the alert rules), chromium (renders the HTML report);
# podman/buildah/runc/catatonit/debootstrap/qemu-user-static/docker-compose/systemd for the
# platform tests (the Docker image, the systemd unit in a container, arm64 under qemu).
PACKAGES=(python3 python3-venv python3-dev build-essential bind9-dnsutils knot-dnsutils nsd
          knot unbound dnsmasq-base dnsperf dnsdist prometheus chromium iproute2 procps curl
          systemd podman buildah runc catatonit debootstrap qemu-user-static docker-compose)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
# Debian starts these daemons on install where systemd runs; the tests start their own.
for svc in nsd knot unbound dnsdist prometheus; do
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
done

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,fast,dev]'
