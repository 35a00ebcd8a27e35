#!/usr/bin/env python3
"""Smoke test of the vmha test guest: boots it under TCG and drives qemu-ga.

usage: scripts/guest/smoke.py [OUTDIR]   (default: <repo>/.cache/guest)

Builds nothing: run scripts/build-guest-image.sh first. Boots the guest with
scripts/run-guest.sh in a temporary RUNDIR, then checks guest-sync-delimited,
guest-ping, the demo app interface through guest-exec, zombie reaping,
demo_apps= at boot (with the bzImage kernel), guest-shutdown -> QEMU exits,
and QMP system_powerdown (ACPI) -> QEMU exits. Prints timings; exits
non-zero on the first failed check (the console log is printed then).
"""

import base64
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RUN_GUEST = os.path.join(REPO, "scripts", "run-guest.sh")


class Fail(Exception):
    pass


class Qga:
    """Minimal QGA client: newline-delimited JSON over the chardev socket."""

    def __init__(self, path, timeout=5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Fail("qga socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def sync(self):
        """guest-sync-delimited: 0xFF, then discard until 0xFF + our id."""
        ident = random.randrange(1, 2**31)
        self.buf = b""
        self.sock.sendall(b"\xff" + json.dumps(
            {"execute": "guest-sync-delimited", "arguments": {"id": ident}}).encode() + b"\n")
        while True:
            line = self._line()
            if b"\xff" in line:
                line = line[line.rindex(b"\xff") + 1:]
            line = line.strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("return") == ident:
                return ident

    def cmd(self, execute, **arguments):
        req = {"execute": execute}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        msg = json.loads(self._line().lstrip(b"\xff"))
        if "error" in msg:
            raise Fail(f"{execute}: {msg['error']}")
        return msg["return"]

    def run(self, path, *args, timeout=20.0):
        """guest-exec + poll guest-exec-status; returns (exitcode, out, err)."""
        pid = self.cmd("guest-exec", path=path, arg=list(args),
                       **{"capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = self.cmd("guest-exec-status", pid=pid)
            if st["exited"]:
                out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
                return st.get("exitcode", -st.get("signal", 0) - 1000), out, err
            if time.monotonic() > deadline:
                raise Fail(f"guest-exec {path} {args}: not exited after {timeout}s")
            time.sleep(0.05)


def expect(what, got, want):
    if got != want:
        raise Fail(f"{what}: got {got!r}, want {want!r}")
    print(f"  ok  {what} -> {got!r}")


def boot(outdir, rundir, append="", kernel="vmlinux"):
    env = dict(os.environ, GUEST_APPEND=append, GUEST_KERNEL=kernel)
    t0 = time.monotonic()
    proc = subprocess.Popen([RUN_GUEST, outdir, rundir], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sock = os.path.join(rundir, "qga.sock")
    while not os.path.exists(sock):
        if proc.poll() is not None:
            raise Fail(f"qemu exited early: {proc.stderr.read().decode()}")
        if time.monotonic() - t0 > 10:
            raise Fail("qga socket never appeared")
        time.sleep(0.02)
    qga = Qga(sock, timeout=1.0)
    # No agent yet = nothing answers; keep re-syncing until it does.
    while True:
        try:
            qga.sync()
            qga.sock.settimeout(5.0)
            qga.cmd("guest-ping")
            break
        except (socket.timeout, TimeoutError):
            if time.monotonic() - t0 > 120:
                raise Fail("no guest-ping reply within 120 s")
            qga.sock.settimeout(1.0)
    return proc, qga, time.monotonic() - t0


def shutdown(proc, qga):
    t = time.monotonic()
    qga.sock.sendall(b'{"execute":"guest-shutdown"}\n')
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise Fail("QEMU still running 30 s after guest-shutdown")
    print(f"  ok  guest-shutdown -> QEMU exited rc={rc} after {time.monotonic() - t:.2f}s")
    expect("qemu exit code", rc, 0)


def acpi_powerdown(proc, qmp_path):
    qmp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qmp.connect(qmp_path)
    qmp.settimeout(10)
    f = qmp.makefile("rwb")
    json.loads(f.readline())  # greeting
    for cmd in ("qmp_capabilities", "system_powerdown"):
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        f.flush()
    t = time.monotonic()
    shutdown_event = None
    for line in f:
        msg = json.loads(line)
        if msg.get("event") == "SHUTDOWN":
            shutdown_event = msg["data"]
            break
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise Fail("QEMU still running 30 s after system_powerdown")
    expect("SHUTDOWN event after system_powerdown", shutdown_event,
           {"guest": True, "reason": "guest-shutdown"})
    print(f"  ok  system_powerdown -> QEMU exited rc={rc} after {time.monotonic() - t:.2f}s")
    expect("qemu exit code", rc, 0)


def main():
    outdir = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, ".cache", "guest"))
    rundir = tempfile.mkdtemp(prefix="vmha-guest-")
    proc = None
    try:
        print("boot 1: no demo apps")
        proc, qga, secs = boot(outdir, rundir)
        print(f"  ok  first guest-ping reply {secs:.2f}s after QEMU start")
        app = "/opt/demo/app"
        expect("check web before start", qga.run(app, "check", "web")[0], 3)
        rc, out, err = qga.run(app, "start", "web")
        expect("start web", (rc, out), (0, ""))
        expect("start web again (idempotent)", qga.run(app, "start", "web")[0], 0)
        expect("check web", qga.run(app, "check", "web")[0], 0)
        rc, out, _ = qga.run("/usr/bin/wget", "-q", "-O", "-", "http://127.0.0.1:8080/")
        expect("web serves index.html", (rc, "vmha demo web" in out), (0, True))
        pid = qga.run("/bin/cat", "/run/demo/web.pid")[1].strip()
        expect("kill web", qga.run(app, "kill", "web")[0], 0)
        expect("check web after kill", qga.run(app, "check", "web")[0], 3)
        time.sleep(0.5)
        rc, out, _ = qga.run("/bin/sh", "-c", f"cat /proc/{pid}/stat 2>/dev/null; ps -o pid,stat,args | grep ' Z ' | grep -v grep; true")
        expect(f"killed web (pid {pid}) reaped, no zombies", out.strip(), "")
        expect("break web", qga.run(app, "break", "web")[0], 0)
        rc, out, err = qga.run(app, "start", "web")
        expect("start broken web fails", (rc, "broken" in err), (1, True))
        expect("fix web", qga.run(app, "fix", "web")[0], 0)
        expect("start web after fix", qga.run(app, "start", "web")[0], 0)
        expect("start db", qga.run(app, "start", "db")[0], 0)
        expect("check db", qga.run(app, "check", "db")[0], 0)
        rc, out, _ = qga.run("/bin/sh", "-c", "ps -o pid,args | grep demo-db | grep -v grep")
        expect("db findable by name", (rc, "demo-db" in out), (0, True))
        expect("hang db", qga.run(app, "hang", "db")[0], 0)
        t = time.monotonic()
        rc, _, _ = qga.run("/usr/bin/timeout", "1", app, "check", "db")
        expect("check db hangs (GNU timeout 1 -> 124)", rc, 124)
        print(f"      timed-out check took {time.monotonic() - t:.2f}s")
        expect("fix db", qga.run(app, "fix", "db")[0], 0)
        expect("check db after fix", qga.run(app, "check", "db")[0], 0)
        t = time.monotonic()
        expect("stop db", qga.run(app, "stop", "db")[0], 0)
        print(f"      stop took {time.monotonic() - t:.2f}s")
        expect("check db after stop", qga.run(app, "check", "db")[0], 3)
        expect("stop db again", qga.run(app, "stop", "db")[0], 0)
        expect("bad name", qga.run(app, "start", "../x")[0], 2)
        t = time.monotonic()
        for _ in range(10):
            qga.run(app, "check", "web")
        print(f"      one guest-exec check round trip: {(time.monotonic() - t) / 10 * 1000:.0f} ms")
        shutdown(proc, qga)
        qga.close()

        print("boot 2: demo_apps=web,db, bzImage kernel (vmlinuz)")
        shutil.rmtree(rundir)
        os.mkdir(rundir)
        proc, qga, secs = boot(outdir, rundir, "demo_apps=web,db", kernel="vmlinuz")
        print(f"  ok  first guest-ping reply {secs:.2f}s after QEMU start")
        for name in ("web", "db"):
            deadline = time.monotonic() + 20
            while qga.run(app, "check", name)[0] != 0:
                if time.monotonic() > deadline:
                    raise Fail(f"demo_apps: {name} not running 20 s after agent start")
                time.sleep(0.5)
            print(f"  ok  {name} started at boot")
        shutdown(proc, qga)
        qga.close()

        print("boot 3: ACPI power button (QMP system_powerdown)")
        shutil.rmtree(rundir)
        os.mkdir(rundir)
        proc, qga, secs = boot(outdir, rundir)
        print(f"  ok  first guest-ping reply {secs:.2f}s after QEMU start")
        acpi_powerdown(proc, os.path.join(rundir, "qmp.sock"))
        print("all checks passed")
    except Fail as e:
        print(f"FAIL: {e}", file=sys.stderr)
        log = os.path.join(rundir, "console.log")
        if os.path.exists(log):
            sys.stderr.write(open(log, errors="replace").read()[-4000:])
        if proc and proc.poll() is None:
            proc.kill()
        sys.exit(1)
    finally:
        if proc and proc.poll() is None:
            proc.kill()
        shutil.rmtree(rundir, ignore_errors=True)


if __name__ == "__main__":
    main()
