#!/usr/bin/env bash
# The multi-host demo: three hosts as network namespaces on this machine, a 3-member etcd, one
# vmhad per host, two VMs under TCG. A host is killed, a host is cut off the network, a host is
# drained for maintenance; every step is narrated from vmha's own events while a checker
# samples every 100 ms that no VM ever runs on two hosts. Ends with the measured failover
# times. Runs as root (network namespaces, QEMU).
#
# usage: scripts/cluster-demo.sh [--rounds N]     (honours CARGO_TARGET_DIR)
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "dependencies"
./scripts/install-deps.sh
if ! command -v cargo >/dev/null; then export PATH=$HOME/.cargo/bin:$PATH; fi

step "build (release)"
cargo build --release -p vmha -p vmhad
target=${CARGO_TARGET_DIR:-target}

step "test guest image"
guest=$(./scripts/build-guest-image.sh | tail -n 1)

step "cluster demo"
exec "$target/release/vmha" demo --cluster --vmhad "$target/release/vmhad" --guest "$guest" "$@"
