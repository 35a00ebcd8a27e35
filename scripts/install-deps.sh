#!/usr/bin/env bash
# Installs what building and testing vmha needs on Debian 12. Idempotent: apt-get runs only
# when a package is missing (one `apt-get update` first), and Rust is only checked.
#
# usage: scripts/install-deps.sh
set -euo pipefail

PACKAGES=(
	build-essential pkg-config protobuf-compiler # build
	curl ca-certificates                         # rustup, when no Rust is installed
	qemu-system-x86 qemu-guest-agent             # the qemu driver and the test guest's agent
	busybox-static linux-image-amd64 cpio procps # the test guest image
	etcd-server                                  # the multi-host cluster store
	chromium                                     # the web page's headless-browser test
	systemd jq                                   # the package test: systemd-analyze, systemd-tmpfiles; jq
	libvirt-dev libvirt-daemon-system            # the libvirt driver (build, and its tests' libvirtd)
)
# Edition 2024 needs Rust 1.85; the workspace's rust-version says the same.
RUST_MIN=1.85

log() { echo "install-deps: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

installed() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }

command -v dpkg-query >/dev/null || die "this script is for Debian 12 (no dpkg-query found)"

missing=()
for p in "${PACKAGES[@]}"; do
	installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
	sudo=()
	if [[ $(id -u) -ne 0 ]]; then
		command -v sudo >/dev/null || die "missing packages (${missing[*]}) and not root: run as root or install sudo"
		sudo=(sudo)
	fi
	log "installing: ${missing[*]}"
	"${sudo[@]}" apt-get update
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
else
	log "system packages: all present"
fi

# --- Rust -------------------------------------------------------------------
# rustup installs into ~/.cargo/bin, which a non-login shell may not have on PATH.
if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
	export PATH=$HOME/.cargo/bin:$PATH
fi
rustup_hint="install Rust with rustup (Debian 12's own cargo is too old for edition 2024):
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
    . \"\$HOME/.cargo/env\"
then run this again."
if ! command -v cargo >/dev/null; then
	# A fresh Debian 12: install the stable toolchain with rustup.
	log "cargo not found: installing Rust with rustup"
	curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal \
		--component rustfmt,clippy ||
		die "installing rustup failed; $rustup_hint"
	export PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null || die "cargo not found; $rustup_hint"

version=$(rustc --version | awk '{print $2}')
if [[ $(printf '%s\n%s\n' "$RUST_MIN" "$version" | sort -V | head -n1) != "$RUST_MIN" ]]; then
	die "rustc $version is older than $RUST_MIN; $rustup_hint"
fi
for component in rustfmt clippy; do
	if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
		command -v rustup >/dev/null || die "cargo $component is missing and rustup is not installed; $rustup_hint"
		log "adding the $component component"
		rustup component add "$component"
	fi
done
log "rust: rustc $version, rustfmt and clippy present"
