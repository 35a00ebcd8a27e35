#!/usr/bin/env bash
# The vmha demo on the embedded store: one host (this machine), two VMs under TCG. vmhad starts
# them and their apps, then failures are injected one by one and vmha's reaction is narrated
# from its own event stream: app restart in the guest, a faulted low-priority app left alone,
# a VM restart when the top app fails for good, an intentionally offline app, a killed QEMU.
# Ends with the measured detection and recovery times. Runs as root (QEMU, /tmp scratch dir).
#
# usage: scripts/demo.sh          (honours CARGO_TARGET_DIR)
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

step "demo"
exec "$target/release/vmha" demo --vmhad "$target/release/vmhad" --guest "$guest" --workdir /tmp/vmha-demo
