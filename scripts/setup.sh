#!/usr/bin/env bash
# One-shot set-up for a fresh Debian machine as root: system packages, then .venv from pyproject.toml.
# Idempotent: a stamp file skips the apt step once it has succeeded with the same package list.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc make git
  iproute2 ethtool iptables nftables kmod procps psmisc
  iperf3 tcpdump tshark iputils-ping curl netcat-openbsd
  etcd-server etcd-client
  wireguard-go wireguard-tools
)

stamp=.venv/.apt-$(printf '%s ' "${APT_PACKAGES[@]}" | sha1sum | cut -c1-12)
if [ ! -e "$stamp" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: system packages need root (run as root, or install: ${APT_PACKAGES[*]})" >&2
    exit 2
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
  # Debian's etcd-server package starts a system etcd on 127.0.0.1:2379; tests start their own on free ports.
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
hash=$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -e ".venv/.pip-$hash" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  rm -f .venv/.pip-*
  touch ".venv/.pip-$hash"
fi
touch "$stamp"
