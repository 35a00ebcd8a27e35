#!/bin/sh
# scripts/bench-checks.sh — CPU cost of app checks on one TCG guest.
#
#   scripts/bench-checks.sh VMHAD [APPS] [INTERVAL] [SECONDS] [EXTRA_VM_TOML]
#
# Starts VMHAD (a vmhad binary) with one VM of the test guest (.cache/guest) and APPS demo apps
# (default 3) checked every INTERVAL (default 1s), waits until they are online and settled,
# then measures for SECONDS (default 60) the CPU time (utime + stime from /proc/PID/stat) of
# vmhad and of the VM's QEMU process, and the checks run (from vmhad's status counters when it
# has them, else APPS × SECONDS / INTERVAL). Prints per-check figures. EXTRA_VM_TOML is added to
# the [[vm]] table (e.g. a watch setting). Boots a VM: run under the heavy-test lock:
#   flock /tmp/vmha-heavy.lock scripts/bench-checks.sh target/release/vmhad
set -eu
VMHAD=$1
APPS=${2:-3}
INTERVAL=${3:-1s}
SECONDS_=${4:-60}
EXTRA=${5:-}
GUEST=$(realpath "${GUEST:-.cache/guest}")
W=$(mktemp -d /tmp/vmha-bench.XXXXXX)
HZ=$(getconf CLK_TCK)
cleanup() {
	[ -n "${PID:-}" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
	rm -rf "$W"
}
trap cleanup EXIT INT TERM
{
	cat <<TOML
[cluster]
name = "bench"
store = "embedded"
state_dir = "$W/state"
runtime_dir = "$W/run"

[[host]]
name = "h1"

[[vm]]
name = "bench"
hosts = ["h1"]
boot_timeout = "90s"
$EXTRA

[vm.qemu]
memory_mb = 256
cpus = 1
accel = "auto"
kernel = "$GUEST/vmlinux"
initrd = "$GUEST/initrd.img"
append = "console=ttyS0 quiet"
TOML
	i=1
	while [ "$i" -le "$APPS" ]; do
		cat <<TOML

[[vm.app]]
name = "a$i"
interval = "$INTERVAL"
timeout = "2s"
check = ["/opt/demo/app", "check", "a$i"]
start = ["/opt/demo/app", "start", "a$i"]
stop = ["/opt/demo/app", "stop", "a$i"]
TOML
		i=$((i + 1))
	done
} >"$W/vmha.toml"
VMHA_LOG=${VMHA_LOG:-warn} "$VMHAD" --config "$W/vmha.toml" --stop-vms-on-exit 2>"$W/vmhad.log" &
PID=$!
SOCK=$W/state/vmhad.sock
status() { curl -s --unix-socket "$SOCK" http://x/v1/status; }
n=0
until [ "$(status | jq '[.agent.vms[0].apps[]? | select(.state == "online")] | length' 2>/dev/null)" = "$APPS" ]; do
	n=$((n + 1))
	[ $n -lt 600 ] || { echo "apps not online in 120 s; log:" >&2; tail "$W/vmhad.log" >&2; exit 1; }
	sleep 0.2
done
sleep 5 # let start-up probes settle
QPID=$(cat "$W/run/bench/qemu.pid")
ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
counters() { status | jq -r '[.guest_io.probes // "", .guest_io.checks // "", .guest_io.watchers // "", .guest_io.watch_polls // ""] | @tsv'; }
v0=$(ticks "$PID"); q0=$(ticks "$QPID"); c0=$(counters)
sleep "$SECONDS_"
v1=$(ticks "$PID"); q1=$(ticks "$QPID"); c1=$(counters)
set -- $(awk -v a="$c0" -v b="$c1" -v apps="$APPS" -v s="$SECONDS_" -v i="$INTERVAL" 'BEGIN {
	split(a, x, "\t"); split(b, y, "\t");
	if (y[2] != "") { print y[2] - x[2], y[1] - x[1], y[3] - x[3], y[4] - x[4], "counted"; exit }
	ms = i; if (ms ~ /ms$/) { sub(/ms$/, "", ms) } else if (ms ~ /h$/) { sub(/h$/, "", ms); ms *= 3600000 } else { sub(/s$/, "", ms); ms *= 1000 }
	print apps * s * 1000 / ms, "?", "?", "?", "estimated" }')
awk -v v=$((v1 - v0)) -v q=$((q1 - q0)) -v hz="$HZ" -v c="$1" -v p="$2" -v w="$3" -v wp="$4" -v how="$5" -v s="$SECONDS_" -v apps="$APPS" -v i="$INTERVAL" 'BEGIN {
	printf "%d apps every %s, %d s: %s checks (%s) in %s guest-execs; watchers %s, watcher polls %s\n", apps, i, s, c, how, p, w, wp
	per = c > 0 ? c : 1
	printf "vmhad CPU: %.0f ms (%.3f ms per check)\n", v * 1000 / hz, v * 1000 / hz / per
	printf "QEMU CPU:  %.0f ms (%.1f ms per check, %.1f %% of a core)\n", q * 1000 / hz, q * 1000 / hz / per, q * 100 / hz / s
}'
