#!/bin/bash
# Install what building, testing and the demo need on a Debian 12 machine (run as root).
# Idempotent and quick when everything is present: apt runs only for missing packages.
set -euo pipefail

packages=(
  # build the release and the Debian package
  make debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-venv lintian
  # build and check the RPM package (rpm brings rpmbuild and the python and systemd macros it can)
  rpm rpmlint
  # the agent's runtime dependencies (the venv uses them through system site-packages)
  python3-pystemd python3-pyroute2 python3-requests python3-kubernetes python3-systemd python3-yaml
  # the systemd test host
  systemd-container mmdebstrap openssl iproute2 util-linux
  # a btrfs /var/lib/machines for the reset tests (a loop-mounted image)
  btrfs-progs
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "setup-host: missing packages ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "setup-host: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
