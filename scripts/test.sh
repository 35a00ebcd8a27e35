#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing, builds the test guest,
# then formatting, lints, the shipped example configurations, a benchmark smoke run and the
# Debian package (as root: built, installed, run, removed), and every test.
#
# usage: scripts/test.sh          (honours CARGO_TARGET_DIR)
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

# Each step says when it started (UTC), so a run's log shows where its time went.
step() { printf '\n==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

step "dependencies"
./scripts/install-deps.sh
# install-deps may have found cargo in ~/.cargo/bin only.
if ! command -v cargo >/dev/null; then export PATH=$HOME/.cargo/bin:$PATH; fi

if [[ -x scripts/build-guest-image.sh ]]; then
	step "test guest image"
	./scripts/build-guest-image.sh >/dev/null
fi

# Every driver is built and tested: the libvirt driver is a cargo feature of vmhad and vmha.
FEATURES=(--features libvirt)

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings (without, then with the libvirt driver)"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets "${FEATURES[@]}" -- -D warnings

# One debug build of the tests and binaries, with every driver: the steps below run these
# binaries, and the doc tests and the tests reuse the build (a build with other features or
# targets would compile the shared dependencies again).
target=${CARGO_TARGET_DIR:-target}
step "cargo test --workspace --no-run ${FEATURES[*]}"
cargo test --workspace --no-run "${FEATURES[@]}"

step "example configurations"
"$target/debug/vmha" config validate examples/*.toml

# The benchmark code must not rot: a smoke run (tiny N, 2 runs; boots VMs and a test bed, as
# root only), written to $CARGO_TARGET_DIR/bench-smoke/. No timing is asserted.
if [[ $(id -u) -eq 0 ]]; then
	step "benchmark smoke run (scripts/bench.sh --smoke)"
	./scripts/bench.sh --smoke
else
	step "benchmark smoke run: skipped (needs root)"
fi

# Installs the package system-wide (and purges it again): as root only, as in CI.
if [[ $(id -u) -eq 0 ]]; then
	step "the Debian package (scripts/test-package.sh)"
	./scripts/test-package.sh
else
	step "the Debian package: skipped (needs root)"
fi

# Artifacts of an earlier run must not pass for this run's (checked at the end).
rm -f "$target"/artifacts/web-page*.png

if cargo nextest --version >/dev/null 2>&1; then
	step "cargo test --workspace --doc"
	cargo test --workspace --doc "${FEATURES[@]}"
	step "cargo nextest run --workspace ${FEATURES[*]}"
	cargo nextest run --workspace "${FEATURES[@]}"
else
	step "cargo test --workspace ${FEATURES[*]}"
	cargo test --workspace --no-fail-fast "${FEATURES[@]}"
fi

# The browser test saves screenshots as artifacts: they must exist; their paths are printed.
artifacts=$target/artifacts
step "test artifacts in $artifacts"
for f in web-page.png web-page-phone.png; do
	if [[ ! -s $artifacts/$f ]]; then
		echo "missing test artifact: $artifacts/$f (written by vmhad's web_page test)" >&2
		exit 1
	fi
	echo "$artifacts/$f"
done
step "done"
