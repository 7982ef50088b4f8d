#!/usr/bin/env bash
# Ember set-up on a fresh Debian 12 machine, as root:
#   Debian packages -> .venv with ember (editable) -> guest images -> boot the test guest once.
# Safe to run again: every step is idempotent and the images are cached by content hash.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  # the guest kernel: Debian's source and what building it takes
  linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils patch
  # the root file system image
  debootstrap e2fsprogs
  # sandbox networking: namespaces, veth and TAP devices, the egress firewall
  iproute2 nftables
  # the peer the benchmarks compare against, and the venv
  qemu-system-x86 python3-venv python3-dev
  # the unit tests check the initramfs writer against the system's cpio
  cpio
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev,ray]'  # ray: tests/integration/test_ray.py
# An editable install compiles nothing, and a shell with PYTHONDONTWRITEBYTECODE set never
# will: each `ember run` would then compile its modules again (~50 ms of its ~0.3 s).
.venv/bin/python -m compileall -q src/ember > /dev/null

.venv/bin/ember image build

echo "setup: booting the test guest (its console follows)"
.venv/bin/ember boot --kernel "$(.venv/bin/ember image path kernel)" \
  --initrd "$(.venv/bin/ember image path initrd)"

echo "setup: building the default sandbox template (boot, warm the agent, snapshot)"
.venv/bin/ember template build
echo "setup: building the networked template (for Sandbox(network=...))"
.venv/bin/ember template build --network
