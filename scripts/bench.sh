#!/usr/bin/env bash
# vmha's benchmarks, one command: detection and recovery on real TCG VMs (failures injected at
# a random, seeded phase of the probe cycle), the cost of watching 10/100/500 VMs (a fake QEMU
# with a real qemu-ga), host-loss failover and self-fencing on the three-host test bed, the
# controller's 1,000-host simulation (criterion), and app kills with the VM's watch on and off
# at 1 s and 10 s intervals with the CPU that checking and watching cost, and an honest VM's
# probe next to hostile guest agents before and after the guest channel's hardening (`--only
# hostile`: vmha-qemu's qga_hostile bench, built by cargo from this tree and from the
# --hostile-before commit's library; not in --smoke). Writes
# docs/BENCHMARKS.md (generated: do not edit) and the raw samples in docs/bench/. The full run
# takes over an hour; it boots VMs, an etcd cluster and 500 fake VMs: run it alone (on a shared
# machine: under the heavy-test lock, `flock /tmp/vmha-heavy.lock scripts/bench.sh`). Needs root
# (QEMU, network namespaces).
#
# usage: scripts/bench.sh [--smoke] [vmha bench options]   (honours CARGO_TARGET_DIR)
#   --smoke   a quick run for CI (tiny N, 2 runs, no simulation; debug build), written to
#             $CARGO_TARGET_DIR/bench-smoke/ instead of docs/; its figures mean nothing
#   options   e.g. --runs 30 --intervals 1,2 --scale 10,100 --window 60 --failover-runs 10
#             --watch-intervals 1,10 --only detect,scale,watch,hostile --seed 7
#             --hostile-before daeae6e; see `vmha bench --help`
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

smoke=false
for a in "$@"; do [[ $a == --smoke ]] && smoke=true; done
if ! command -v cargo >/dev/null; then export PATH=$HOME/.cargo/bin:$PATH; fi
target=${CARGO_TARGET_DIR:-target}

extra=()
if $smoke; then
	# The test suite's build (scripts/test.sh runs this smoke run): built once for both.
	step "build (debug, as the tests: cargo test --workspace --no-run --features libvirt)"
	cargo test --workspace --no-run --features libvirt
	bin=$target/debug
	extra=(--out "$target/bench-smoke" --workdir /tmp/vmha-bench-smoke)
else
	step "dependencies"
	./scripts/install-deps.sh
	step "build (release)"
	cargo build --release -p vmha -p vmhad
	bin=$target/release
fi

step "test guest image"
guest=$(./scripts/build-guest-image.sh | tail -n 1)

# 500 VMs hold two sockets each in vmhad, plus the agents' pipes.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

step "vmha bench $*"
exec "$bin/vmha" bench --vmhad "$bin/vmhad" --fake-qemu "$bin/vmha-fake-qemu" --guest "$guest" \
	"${extra[@]}" "$@"
