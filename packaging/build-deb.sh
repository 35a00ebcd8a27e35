#!/usr/bin/env bash
# Builds the Debian package of vmha with plain dpkg-deb (no cargo-deb to install): one release
# build of vmhad and vmha, their man pages and shell completions generated from the binaries
# (`--gen-docs`), the systemd unit, the tmpfiles.d entry and the default configuration.
#
# usage: packaging/build-deb.sh [OUTDIR]     (default: dist/ in the repository, whose older
#                                            vmha_*.deb it replaces; honours
#                                            CARGO_TARGET_DIR) — prints the .deb's path last
# VMHA_DEB_VERSION=V overrides the package version (default: the workspace's, from Cargo.toml),
# e.g. to build a newer package of the same tree for an upgrade test.
set -euo pipefail

out=$(realpath -m "${1:-$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../dist}")
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
	export PATH=$HOME/.cargo/bin:$PATH
fi
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")

log() { echo "build-deb: $*" >&2; }

cargo build --release --locked -p vmhad -p vmha
rm -f "$out"/vmha_*.deb # an older build would make `dpkg -i dist/vmha_*.deb` ambiguous
bin=$target/release

version=${VMHA_DEB_VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)}
[[ -n $version ]] || {
	log "no version in Cargo.toml"
	exit 1
}
arch=$(dpkg --print-architecture)

root=$(mktemp -d "${TMPDIR:-/tmp}/vmha-deb.XXXXXX")
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"

# Binaries, stripped of their line tables (a few MB each).
install -d "$root/usr/bin"
for b in vmhad vmha; do
	install -m 0755 "$bin/$b" "$root/usr/bin/$b"
	strip --strip-unneeded "$root/usr/bin/$b"
done

# Man pages and completions, from the binaries themselves.
docs=$root/gen
"$bin/vmhad" --gen-docs "$docs"
"$bin/vmha" --gen-docs "$docs"
install -d "$root/usr/share/man/man1" "$root/usr/share/man/man8"
for page in "$docs"/man/*; do
	section=${page##*.}
	gzip -9n <"$page" >"$root/usr/share/man/man$section/$(basename "$page").gz"
done
install -d "$root/usr/share/bash-completion/completions" \
	"$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
for b in vmhad vmha; do
	install -m 0644 "$docs/completions/$b.bash" "$root/usr/share/bash-completion/completions/$b"
	install -m 0644 "$docs/completions/_$b" "$root/usr/share/zsh/vendor-completions/_$b"
	install -m 0644 "$docs/completions/$b.fish" "$root/usr/share/fish/vendor_completions.d/$b.fish"
done
rm -rf "$docs"

# The service: unit, runtime dir, configuration (conffiles), documentation.
install -D -m 0644 packaging/vmhad.service "$root/usr/lib/systemd/system/vmhad.service"
install -D -m 0644 packaging/vmha.tmpfiles "$root/usr/lib/tmpfiles.d/vmha.conf"
install -D -m 0644 packaging/vmha.toml "$root/etc/vmha/vmha.toml"
install -D -m 0644 packaging/vmhad.default "$root/etc/default/vmhad"
install -d "$root/usr/share/doc/vmha"
install -m 0644 README.md docs/config.md docs/packaging.md "$root/usr/share/doc/vmha/"
cat >"$root/usr/share/doc/vmha/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vmha

Files: *
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT

# Control files. The C library version the binaries need, from their symbol versions.
glibc=$(objdump -T "$root/usr/bin/vmhad" "$root/usr/bin/vmha" | grep -o 'GLIBC_[0-9.]*' |
	sed 's/GLIBC_//' | sort -V | tail -n1)
install -d "$root/DEBIAN"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" \
	-e "s/@SHLIBS@/libc6 (>= $glibc), libgcc-s1/" \
	-e "s/@SIZE@/$(du -sk --exclude=DEBIAN "$root" | cut -f1)/" \
	packaging/debian/control.in >"$root/DEBIAN/control"
install -m 0644 packaging/debian/conffiles "$root/DEBIAN/conffiles"
for s in postinst prerm postrm; do
	install -m 0755 "packaging/debian/$s" "$root/DEBIAN/$s"
done

mkdir -p "$out"
deb=$out/vmha_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
log "built $deb"
echo "$deb"
