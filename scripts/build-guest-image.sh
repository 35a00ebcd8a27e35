#!/bin/bash
# Builds the vmha test guest: the Debian kernel + a gzip'd cpio initramfs with
# busybox (init as PID 1), qemu-ga and its libraries, the virtio modules and
# the demo apps (/opt/demo/app). See docs/guest-image.md.
#
# usage: scripts/build-guest-image.sh [OUTDIR]      (default: <repo>/.cache/guest)
#
# Writes OUTDIR/{vmlinuz,initrd.img,cmdline,manifest,stamp}. Rebuilds only when
# the stamp (hash of this script, scripts/guest/*, package versions, kernel
# version and the binaries used) differs. Logs go to stderr; the last line on
# stdout is OUTDIR (absolute). Env: GUEST_KERNEL_VERSION picks a kernel from
# /boot (default: the newest with modules installed).
set -euo pipefail
umask 022
export LC_ALL=C

SELF=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPTS=$(dirname "$SELF")
REPO=$(dirname "$SCRIPTS")
GUEST=$SCRIPTS/guest
PACKAGES=(qemu-guest-agent busybox-static linux-image-amd64 cpio procps)
QGA=/usr/sbin/qemu-ga
BUSYBOX=/bin/busybox
# GNU coreutils timeout (Essential in Debian) replaces busybox's applet so a
# timed-out probe looks as on ordinary guests: exit 124 (busybox: signal 15).
GNU_TIMEOUT=/usr/bin/timeout
# procps pidwait: vmha's watcher waits on the apps' processes with it (no CPU while
# waiting) where a guest has it, as Debian 12 guests do.
PIDWAIT=/usr/bin/pidwait
BASE_CMDLINE="console=ttyS0 quiet"

log() { echo "build-guest-image: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

OUTDIR=${1:-$REPO/.cache/guest}
mkdir -p "$OUTDIR" || die "cannot create $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd -P)

# --- packages (apt only when something is missing) -------------------------
installed() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }
ensure_packages() {
	local missing=() p
	for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}; run as root to install them"
	log "installing ${missing[*]}"
	local apt=(apt-get -y -q --no-install-recommends -o DPkg::Lock::Timeout=900 install "${missing[@]}")
	if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >&2; then
		DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=900 update >&2 || true
		DEBIAN_FRONTEND=noninteractive "${apt[@]}" >&2 || die "apt-get install ${missing[*]} failed"
	fi
}
ensure_packages

# --- inputs -----------------------------------------------------------------
pick_kernel() {
	if [ -n "${GUEST_KERNEL_VERSION:-}" ]; then
		echo "$GUEST_KERNEL_VERSION"
		return
	fi
	local f v best=
	for f in /boot/vmlinuz-*; do
		[ -e "$f" ] || continue
		v=${f#/boot/vmlinuz-}
		[ -r "/lib/modules/$v/modules.dep" ] || continue
		best=$(printf '%s\n%s\n' "$best" "$v" | sed '/^$/d' | sort -V | tail -n1)
	done
	echo "$best"
}
KVER=$(pick_kernel)
[ -n "$KVER" ] || die "no /boot/vmlinuz-* with /lib/modules/<version>/modules.dep (is linux-image-amd64 installed?)"
VMLINUZ=/boot/vmlinuz-$KVER
MODDIR=/lib/modules/$KVER
[ -r "$VMLINUZ" ] || die "$VMLINUZ not readable"
[ -r "$MODDIR/modules.dep" ] || die "$MODDIR/modules.dep missing"
[ -x "$QGA" ] || die "$QGA missing"
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing"
[ -d "$GUEST/rootfs" ] || die "$GUEST/rootfs missing"

# Shared libraries of qemu-ga, dynamic loader included (absolute paths).
[ -x "$GNU_TIMEOUT" ] && "$GNU_TIMEOUT" --version 2>/dev/null | grep -q coreutils || GNU_TIMEOUT=
[ -x "$PIDWAIT" ] || die "$PIDWAIT missing (is procps installed?)"
QGA_LIBS=$(ldd "$QGA" ${GNU_TIMEOUT:+"$GNU_TIMEOUT"} "$PIDWAIT" |
	awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' | grep -v ':$' | sort -u)
[ -n "$QGA_LIBS" ] || die "ldd $QGA found no libraries"
grep -q 'ld-linux' <<<"$QGA_LIBS" || die "ldd $QGA did not name the dynamic loader"

# Module list: names from modules.list, each preceded by its dependencies
# (modules.dep order reversed = load order). Fills MODS (paths relative to
# MODDIR, in load order) and BUILTIN/SKIPPED (names).
declare -A SEEN=()
MODS=()
BUILTIN=()
SKIPPED=()
dep_line() { # name -> "path: deps" line of modules.dep, or nothing
	local n1=$1 n2=${1//_/-}
	grep -E "(^|/)(${n1}|${n2})\.ko(\.(xz|zst|gz))?:" "$MODDIR/modules.dep" | head -n1 || true
}
is_builtin() {
	local n1=$1 n2=${1//_/-}
	[ -r "$MODDIR/modules.builtin" ] && grep -qE "(^|/)(${n1}|${n2})\.ko$" "$MODDIR/modules.builtin"
}
add_module_path() { # path relative to MODDIR
	local path=$1 line deps i
	[ -n "${SEEN[$path]:-}" ] && return 0
	SEEN[$path]=1
	line=$(grep -E "^${path//./\\.}:" "$MODDIR/modules.dep" | head -n1 || true)
	[ -n "$line" ] || die "$path not in $MODDIR/modules.dep"
	read -r -a deps <<<"${line#*:}"
	for ((i = ${#deps[@]} - 1; i >= 0; i--)); do add_module_path "${deps[i]}"; done
	MODS+=("$path")
}
while read -r name; do
	name=${name%%#*}
	name=${name//[[:space:]]/}
	[ -n "$name" ] || continue
	optional=
	case "$name" in *\?) optional=1 name=${name%\?} ;; esac
	line=$(dep_line "$name")
	if [ -n "$line" ]; then
		add_module_path "${line%%:*}"
	elif is_builtin "$name"; then
		BUILTIN+=("$name")
	elif [ -n "$optional" ]; then
		SKIPPED+=("$name")
	else
		die "kernel $KVER has no module or built-in '$name'"
	fi
done <"$GUEST/modules.list"

# --- stamp --------------------------------------------------------------------
versions() {
	local p
	for p in "${PACKAGES[@]}" "linux-image-$KVER"; do
		printf '%s=%s\n' "$p" "$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo unknown)"
	done
	echo "kernel=$KVER"
}
input_files() {
	echo "$SELF"
	find "$GUEST" \( -type f -o -type l \) | sort
	echo "$VMLINUZ"
	echo "$BUSYBOX"
	echo "$QGA"
	[ -z "$GNU_TIMEOUT" ] || echo "$GNU_TIMEOUT"
	echo "$PIDWAIT"
	echo "$QGA_LIBS"
	local m
	for m in "${MODS[@]}"; do echo "$MODDIR/$m"; done
}
STAMP=$(
	{
		echo "vmha-guest-image v1"
		versions
		echo "base-cmdline=$BASE_CMDLINE"
		mapfile -t files < <(input_files)
		stat -c '%a %n' "${files[@]}"
		sha256sum "${files[@]}"
	} | sha256sum | cut -d' ' -f1
)

up_to_date() {
	[ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initrd.img" ] && [ -s "$OUTDIR/cmdline" ] &&
		[ "$(cat "$OUTDIR/stamp" 2>/dev/null)" = "$STAMP" ]
}
if up_to_date; then
	log "up to date ($OUTDIR, kernel $KVER)"
	echo "$OUTDIR"
	exit 0
fi

# extract_vmlinux BZIMAGE OUT: the uncompressed ELF kernel inside a bzImage
# (like the kernel's scripts/extract-vmlinux). With CONFIG_PVH, QEMU boots it
# straight through its PVH entry point: no in-guest decompression, which under
# TCG halves the boot time.
extract_vmlinux() {
	local img=$1 out=$2 magic cmd off
	while read -r magic cmd; do
		command -v "${cmd%% *}" >/dev/null || continue
		# shellcheck disable=SC2013 # offsets are single words
		for off in $(grep -aboP "$magic" "$img" | cut -d: -f1); do
			tail -c +$((off + 1)) "$img" | $cmd >"$out" 2>/dev/null || true
			if [ "$(head -c4 "$out" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
				return 0
			fi
		done
	done <<-'EOF'
		\xfd7zXZ\x00 xz -dc --single-stream
		\x28\xb5\x2f\xfd zstd -dcq
		\x1f\x8b\x08 gzip -dc
		\x5d\x00\x00\x00 xz -dc --format=lzma
	EOF
	rm -f "$out"
	return 1
}

# --- build (serialised; re-check under the lock) ----------------------------
[ "$(id -u)" = 0 ] || die "building needs root (device nodes in the initramfs)"
exec 9>"$OUTDIR/.lock"
flock 9
if up_to_date; then
	log "up to date ($OUTDIR, built by a concurrent run)"
	echo "$OUTDIR"
	exit 0
fi

log "building guest image: kernel $KVER, into $OUTDIR"
rm -rf "$OUTDIR"/.build.* # left by a run that was SIGKILLed (we hold the lock)
WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM HUP
ROOT=$WORK/root
mkdir -p "$ROOT"
cd "$ROOT"

mkdir -p bin sbin usr/bin usr/sbin usr/local/bin usr/local/sbin lib lib64 \
	etc/vmha proc sys dev run tmp root var/lib var/log var/tmp lib/modules/vmha
chmod 1777 tmp var/tmp
chmod 700 root
ln -s ../run var/run
mknod -m 600 dev/console c 5 1
mknod -m 666 dev/null c 1 3

# busybox and its applet links (absolute targets, paths from --list-full).
cp "$BUSYBOX" bin/busybox
"$BUSYBOX" --list-full | while read -r applet; do
	[ "$applet" = bin/busybox ] && continue
	mkdir -p "$(dirname "$applet")"
	ln -sf /bin/busybox "$applet"
done
ln -sf /bin/busybox init

# qemu-ga (and GNU timeout, pidwait) with every shared library, at the paths ldd names.
mkdir -p "$(dirname "${QGA#/}")"
cp "$QGA" "${QGA#/}"
if [ -n "$GNU_TIMEOUT" ]; then
	rm -f "${GNU_TIMEOUT#/}"
	cp "$GNU_TIMEOUT" "${GNU_TIMEOUT#/}"
fi
mkdir -p "$(dirname "${PIDWAIT#/}")"
rm -f "${PIDWAIT#/}"
cp "$PIDWAIT" "${PIDWAIT#/}"
while read -r lib; do
	mkdir -p "$(dirname "${lib#/}")"
	cp -L "$lib" "${lib#/}"
done <<<"$QGA_LIBS"
printf '%s\n' /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib /usr/lib >etc/ld.so.conf
ldconfig -r "$ROOT" 2>/dev/null || log "warning: ldconfig -r failed; relying on the loader's default paths"

# Kernel modules, decompressed, in load order.
: >etc/vmha/modules
for m in "${MODS[@]}"; do
	base=$(basename "$m")
	base=${base%.xz}
	base=${base%.zst}
	base=${base%.gz}
	case "$m" in
	*.ko.xz) xz -dc "$MODDIR/$m" >"lib/modules/vmha/$base" ;;
	*.ko.zst) zstd -q -dc "$MODDIR/$m" >"lib/modules/vmha/$base" ;;
	*.ko.gz) gzip -dc "$MODDIR/$m" >"lib/modules/vmha/$base" ;;
	*) cp "$MODDIR/$m" "lib/modules/vmha/$base" ;;
	esac
	echo "/lib/modules/vmha/$base" >>etc/vmha/modules
done

# Our files last: they win over applet links (e.g. /sbin/shutdown).
cp -a --remove-destination "$GUEST/rootfs/." .
find "$GUEST/rootfs" -type f | while read -r f; do
	if [ "$(head -c2 "$f")" = '#!' ]; then chmod 755 "${f#"$GUEST"/rootfs/}"; fi
done
echo "$KVER" >etc/vmha/kernel-version
echo "$STAMP" >etc/vmha/stamp

# Sanity: the things PID 1 and the agent need are there.
for f in init bin/sh sbin/init etc/inittab etc/init.d/rcS usr/sbin/qemu-ga \
	usr/local/sbin/qga-start sbin/shutdown opt/demo/app "${PIDWAIT#/}"; do
	[ -e "$f" ] || die "image lacks /$f"
done
[ -s etc/vmha/modules ] || [ ${#MODS[@]} -eq 0 ] || die "module list empty"

find . -mindepth 1 -exec touch -h -d @0 {} +
find . -mindepth 1 -printf '%P\n' | sort |
	cpio --quiet -o -H newc -R 0:0 --reproducible >"$WORK/initrd.cpio"
gzip -9 -n -c "$WORK/initrd.cpio" >"$WORK/initrd.img"
cd "$WORK"
cp "$VMLINUZ" "$WORK/vmlinuz"
HAVE_VMLINUX=
if grep -q '^CONFIG_PVH=y' "/boot/config-$KVER" 2>/dev/null; then
	if extract_vmlinux "$WORK/vmlinuz" "$WORK/vmlinux"; then
		HAVE_VMLINUX=1
	else
		log "warning: could not extract vmlinux from $VMLINUZ; only vmlinuz is provided"
	fi
fi
echo "$BASE_CMDLINE" >"$WORK/cmdline"
{
	echo "# vmha test guest image; stamp $STAMP"
	versions
	echo "modules=$(printf '%s ' "${MODS[@]##*/}")"
	echo "builtin=${BUILTIN[*]:-}"
	echo "skipped-optional=${SKIPPED[*]:-}"
	echo "gnu-timeout=${GNU_TIMEOUT:-no (busybox applet)}"
	echo "pidwait=$PIDWAIT"
	echo "libs=$(tr '\n' ' ' <<<"$QGA_LIBS")"
	echo "initrd-bytes=$(stat -c %s "$WORK/initrd.img")"
	if [ -n "$HAVE_VMLINUX" ]; then echo "vmlinux=yes (PVH boot)"; else echo "vmlinux=no"; fi
} >"$WORK/manifest"
echo "$STAMP" >"$WORK/stamp"

# Install: drop the stamp first so an interrupted install is rebuilt next time;
# each file is replaced by an atomic rename; the stamp goes last.
rm -f "$OUTDIR/stamp"
[ -n "$HAVE_VMLINUX" ] || rm -f "$OUTDIR/vmlinux"
for f in vmlinuz ${HAVE_VMLINUX:+vmlinux} initrd.img cmdline manifest stamp; do
	mv -f "$WORK/$f" "$OUTDIR/$f"
done
log "built $(stat -c %s "$OUTDIR/initrd.img") byte initrd; modules: ${MODS[*]##*/}${BUILTIN[*]:+; built-in: ${BUILTIN[*]}}"
echo "$OUTDIR"
