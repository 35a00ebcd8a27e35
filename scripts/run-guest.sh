#!/bin/bash
# Boots the vmha test guest under TCG (foreground; exits when the guest powers off).
#
# usage: scripts/run-guest.sh OUTDIR RUNDIR [extra qemu args...]
#   OUTDIR  output of scripts/build-guest-image.sh (vmlinuz, initrd.img, cmdline)
#   RUNDIR  created if missing; gets console.log, qga.sock, qmp.sock, qemu.pid
#   env GUEST_APPEND  extra kernel parameters, e.g. "demo_apps=web,db"
#   env GUEST_KERNEL  kernel file name in OUTDIR: vmlinux (default when present:
#                     uncompressed, PVH boot, ~2x faster under TCG) or vmlinuz
#
# The command line is exactly the one documented in docs/guest-image.md.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OUTDIR RUNDIR [extra qemu args...]" >&2; exit 2; }
OUTDIR=$1
RUNDIR=$2
shift 2
kernel=${GUEST_KERNEL:-vmlinux}
[ -s "$OUTDIR/$kernel" ] || kernel=vmlinuz
for f in "$kernel" initrd.img cmdline; do
	[ -s "$OUTDIR/$f" ] || { echo "run-guest: $OUTDIR/$f missing (run scripts/build-guest-image.sh)" >&2; exit 1; }
done
mkdir -p "$RUNDIR"
rm -f "$RUNDIR/qga.sock" "$RUNDIR/qmp.sock"
append="$(cat "$OUTDIR/cmdline")${GUEST_APPEND:+ $GUEST_APPEND}"
exec qemu-system-x86_64 \
	-accel tcg -m 256 -smp 1 -nodefaults -display none \
	-serial "file:$RUNDIR/console.log" \
	-kernel "$OUTDIR/$kernel" -initrd "$OUTDIR/initrd.img" \
	-append "$append" \
	-device virtio-serial-pci \
	-chardev "socket,path=$RUNDIR/qga.sock,server=on,wait=off,id=qga0" \
	-device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
	-qmp "unix:$RUNDIR/qmp.sock,server=on,wait=off" \
	-pidfile "$RUNDIR/qemu.pid" \
	"$@"
