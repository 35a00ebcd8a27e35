#!/usr/bin/env bash
# The Debian package, end to end, as root on this machine (systemd need not be PID 1): follows
# the README's "Install from the package" section as written (its marked code blocks are run
# verbatim), then checks what was installed, `systemd-analyze verify`s the unit, runs the
# installed vmhad with the default configuration and asks it with the installed vmha, checks the
# unit's hardening with `systemd-analyze security --offline` against docs/packaging.md, upgrades
# to a newer build (the edited configuration and the state kept), removes (state kept) and
# purges it (state gone, and every file the package listed, and the unit's enablement).
#
# Never leaves the package installed; a package or a vmhad left by an earlier, interrupted run
# is removed first. Runs one at a time (a lock), as it installs system-wide.
#
# usage: scripts/test-package.sh      (as root; honours CARGO_TARGET_DIR)
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

PIDFILE=/tmp/vmha-package-test.vmhad.pid
NEXT=/tmp/vmha-package-test.next
UNIT=/usr/lib/systemd/system/vmhad.service
WANTS=/etc/systemd/system/multi-user.target.wants/vmhad.service
step() { printf '\n==> package: %s\n' "$*" >&2; }
fail() {
	echo "test-package: FAILED: $*" >&2
	exit 1
}
[[ $(id -u) -eq 0 ]] || fail "must run as root (it installs the package)"

exec 9>/tmp/vmha-package-test.lock
flock 9

# The vmhad this test started (now or in an interrupted earlier run): only that one.
stop_our_vmhad() {
	[[ -f $PIDFILE ]] || return 0
	local pid
	pid=$(cat "$PIDFILE")
	if [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == /usr/bin/vmhad* ]]; then
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 100); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$PIDFILE"
}
purge_package() {
	if dpkg-query -W -f='${db:Status-Abbrev}' vmha 2>/dev/null | grep -q '^[ir]'; then
		dpkg -P vmha >&2
	fi
}
cleanup() {
	stop_our_vmhad
	purge_package
	rm -rf "$NEXT"
}
trap cleanup EXIT

# The code block after `<!-- package-test: NAME -->` in the README.
readme_block() {
	awk -v marker="<!-- package-test: $1 -->" '
		$0 == marker { found = 1; next }
		found && /^```/ { if (inside) exit; inside = 1; next }
		inside { print }
	' README.md
}
# Runs a README block line by line, echoing each command.
run_block() {
	local block
	block=$(readme_block "$1")
	[[ -n $block ]] || fail "no '$1' block in README.md"
	while IFS= read -r line; do
		[[ -z ${line// /} ]] && continue
		echo "+ $line" >&2
		bash -euo pipefail -c "$line" || fail "README '$1': $line"
	done <<<"$block"
}

step "leftovers of an earlier run"
cleanup

step "README: install"
run_block install

step "what the package installed"
for f in /usr/bin/vmhad /usr/bin/vmha /usr/lib/systemd/system/vmhad.service \
	/usr/lib/tmpfiles.d/vmha.conf /etc/vmha/vmha.toml /etc/default/vmhad \
	/usr/share/man/man8/vmhad.8.gz /usr/share/man/man1/vmha.1.gz \
	/usr/share/man/man1/vmha-status.1.gz /usr/share/bash-completion/completions/vmha \
	/usr/share/bash-completion/completions/vmhad /usr/share/zsh/vendor-completions/_vmha \
	/usr/share/fish/vendor_completions.d/vmha.fish /usr/share/doc/vmha/config.md; do
	[[ -f $f ]] || fail "$f not installed"
done
grep -qx /etc/vmha/vmha.toml /var/lib/dpkg/info/vmha.conffiles || fail "vmha.toml is no conffile"
[[ $(stat -c %a /var/lib/vmha) == 700 ]] || fail "/var/lib/vmha is not 0700"
[[ $(stat -c %a /run/vmha) == 700 ]] || fail "/run/vmha is not 0700"
zcat /usr/share/man/man1/vmha.1.gz | grep -q 'status' || fail "vmha.1 does not list status"
dpkg-query -W -f='${Depends}\n' vmha | grep -q 'qemu-system-x86, qemu-guest-agent' ||
	fail "Depends lacks qemu"
# Enabled as debhelper does on a first install (not started: no VM configured yet).
enabled() { [[ -L $WANTS && $(readlink -f "$WANTS") == "$(readlink -f "$UNIT")" ]]; }
enabled || fail "vmhad.service not enabled ($WANTS)"

step "systemd-analyze verify"
# It also looks up the unit's man pages (Documentation=), with `man` when there is one.
man=(--man=no)
command -v man >/dev/null && man=()
systemd-analyze verify "${man[@]}" "$UNIT"

step "hardening: systemd-analyze security --offline, against docs/packaging.md"
# The exposure systemd computes stays at most what it is with the options of the table (7.7, a
# ceiling: dropping a light option may not move it). Each option the table sets is in the unit
# as written and systemd reads it as set (ProtectSystem=full: "very limited write access");
# each option the table leaves out on purpose is not in the unit.
systemd-analyze security --offline=true --threshold=77 "$UNIT" >/dev/null ||
	fail "the unit's exposure rose above 7.7: $(systemd-analyze security --offline=true "$UNIT" | tail -n1)"
security=$(systemd-analyze security --offline=true --json=short "$UNIT")
table=$(awk '/^### Hardening/ { f = 1; next } /^##/ { f = 0 } f && /^\| `/' docs/packaging.md)
mapfile -t set_options < <(grep -E '^\|[^|]*\| yes \|' <<<"$table" | cut -d'|' -f2 | grep -o '`[A-Za-z]*=[^`]*`' | tr -d '`')
mapfile -t unset_options < <(grep -E '\| \*\*no\*\* \|' <<<"$table" | cut -d'|' -f2 | grep -o '`[A-Za-z]*`' | tr -d '`')
((${#set_options[@]} >= 13 && ${#unset_options[@]} >= 7)) ||
	fail "docs/packaging.md's hardening table not found (set: ${set_options[*]}; unset: ${unset_options[*]})"
for option in "${set_options[@]}"; do
	name=${option%%=*}
	grep -qx "$option" "$UNIT" || fail "$option (docs/packaging.md) is not in the unit"
	entry=$(jq -c --arg n "$name=" '.[] | select(.name == $n)' <<<"$security")
	case $option in
	ProtectSystem=full)
		[[ $(jq -r .description <<<"$entry") == *"very limited write access"* ]] ||
			fail "systemd does not read $option as set: $entry"
		;;
	*) [[ $(jq -r .set <<<"$entry") == true ]] || fail "systemd does not read $option as set: $entry" ;;
	esac
	echo "  $option: set" >&2
done
for name in "${unset_options[@]}"; do
	! grep -q "^$name=" "$UNIT" || fail "$name is set in the unit, docs/packaging.md says it must not be"
	echo "  $name: not set" >&2
done

step "README: run vmhad in the foreground, ask it with vmha"
# The block's `vmhad … &` line runs in the background of this test (it records the pid); the
# next line waits until that vmhad answers (a hang guard, not a timing).
fg=$(readme_block foreground)
start=$(grep -m1 '^vmhad .*&$' <<<"$fg") || fail "no 'vmhad … &' line in the foreground block"
echo "+ $start" >&2
bash -c "${start%&} & echo \$! >$PIDFILE; wait" >/tmp/vmha-package-test.vmhad.log 2>&1 &
runner=$!
for i in $(seq 600); do
	[[ -S /var/lib/vmha/vmhad.sock ]] && vmha status >/dev/null 2>&1 && break
	if ! kill -0 "$(cat $PIDFILE 2>/dev/null || echo 0)" 2>/dev/null && ((i > 20)); then
		cat /tmp/vmha-package-test.vmhad.log >&2
		fail "the installed vmhad exited"
	fi
	((i < 600)) || fail "the installed vmhad never answered"
	sleep 0.1
done
while IFS= read -r line; do
	[[ $line == vmhad\ * || -z ${line// /} ]] && continue
	echo "+ $line" >&2
	out=$(bash -euo pipefail -c "$line") || fail "README 'foreground': $line"
	echo "$out"
done <<<"$fg"
vmha status | grep -q host1 || fail "vmha status does not show host1"

step "SIGTERM: a clean exit"
stop_our_vmhad
wait "$runner" || fail "the installed vmhad exited with $? on SIGTERM"
grep -q 'leaving VMs running' /tmp/vmha-package-test.vmhad.log || fail "vmhad did not stop cleanly"

step "upgrade to a newer version: the edited configuration and the state kept"
[[ -f /var/lib/vmha/store.redb ]] || fail "no embedded store after a run"
old_version=$(dpkg-query -W -f='${Version}' vmha)
new_version=$old_version+upgrade1
rm -rf "$NEXT"
VMHA_DEB_VERSION=$new_version packaging/build-deb.sh "$NEXT" >&2
echo "# changed by the operator" >>/etc/vmha/vmha.toml
state=$(md5sum </var/lib/vmha/store.redb)
# No --force-conf*: the package's conffile did not change, so dpkg keeps the operator's
# version without asking (stdin closed: a question would fail the test, not hang it).
dpkg -i "$NEXT"/vmha_"$new_version"_*.deb </dev/null >&2
[[ $(dpkg-query -W -f='${Version}' vmha) == "$new_version" ]] ||
	fail "still $(dpkg-query -W -f='${Version}' vmha) after the upgrade to $new_version"
grep -q '^# changed by the operator$' /etc/vmha/vmha.toml || fail "upgrade replaced the configuration"
for f in /etc/vmha/vmha.toml.dpkg-dist /etc/vmha/vmha.toml.dpkg-new /etc/vmha/vmha.toml.dpkg-old; do
	[[ ! -e $f ]] || fail "upgrade left $f"
done
dpkg-query -W -f='${Conffiles}\n' vmha | grep -q '^ /etc/vmha/vmha.toml [0-9a-f]\{32\}$' ||
	fail "vmha.toml no longer a conffile after the upgrade"
[[ $(md5sum </var/lib/vmha/store.redb) == "$state" ]] || fail "upgrade changed the state"
enabled || fail "upgrade dropped the unit's enablement"
vmha config validate /etc/vmha/vmha.toml
rm -rf "$NEXT"

step "README: remove, then purge"
block=$(readme_block remove)
grep -qx 'dpkg -r vmha' <<<"$block" && grep -qx 'dpkg -P vmha' <<<"$block" ||
	fail "the remove block does not say dpkg -r vmha, then dpkg -P vmha"
# What the package installed, for the leftover check after the purge.
mapfile -t listed < <(dpkg -L vmha)
((${#listed[@]} > 20)) || fail "dpkg -L vmha lists only ${#listed[@]} paths"
echo "+ dpkg -r vmha" >&2
dpkg -r vmha >&2
[[ ! -e /usr/bin/vmhad ]] || fail "vmhad still installed after dpkg -r"
[[ -f /etc/vmha/vmha.toml && -f /var/lib/vmha/store.redb ]] ||
	fail "dpkg -r removed the configuration or the state"
echo "+ dpkg -P vmha" >&2
dpkg -P vmha >&2
[[ ! -e /etc/vmha/vmha.toml ]] || fail "purge left the configuration"
[[ ! -e /var/lib/vmha ]] || fail "purge left the state"
! dpkg-query -W vmha >/dev/null 2>&1 || fail "vmha still known to dpkg after purge"
# Nothing left of what the package listed but directories other packages own too.
for path in "${listed[@]}"; do
	[[ $path == /. ]] && continue
	[[ -e $path || -L $path ]] || continue
	if [[ -d $path && ! -L $path ]] && dpkg -S "$path" >/dev/null 2>&1; then
		continue
	fi
	fail "purge left $path"
done
[[ ! -e $WANTS && ! -L $WANTS ]] || fail "purge left $WANTS"
[[ ! -L /etc/systemd/system/vmhad.service ]] || fail "purge left the unit masked"

echo "test-package: 1 passed, 0 failed"
