#!/usr/bin/env bash
# The vmha demo on the embedded store. Placeholder until the host daemon (vmhad) lands: it
# installs what is missing, builds, and checks and shows the example configuration the live
# demo will run.
#
# usage: scripts/demo.sh          (honours CARGO_TARGET_DIR)
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "dependencies"
./scripts/install-deps.sh
if ! command -v cargo >/dev/null; then export PATH=$HOME/.cargo/bin:$PATH; fi

step "build"
cargo build --workspace --bins

echo
echo "The live demo (a VM whose apps fail and recover: app restart → VM restart) arrives"
echo "with the host-daemon (vmhad) issue. Meanwhile, the configuration it will run:"

step "vmha config validate examples/single-host.toml"
cargo run --quiet -p vmha -- config validate examples/single-host.toml

step "vmha config show examples/single-host.toml   (every default filled in)"
cargo run --quiet -p vmha -- config show examples/single-host.toml
