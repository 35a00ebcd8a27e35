//! Tests of the testbed itself. They need root (network namespaces) and fail without it, but
//! boot no VMs: each takes a few seconds at most (an etcd cluster needs ~1-4 s to elect).
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmha_testbed::{DoubleRunChecker, Proc, Signal, Testbed, cleanup_stale};

const SHORT: Duration = Duration::from_millis(500);

/// Polls `check` every 50 ms until it holds; panics naming `what` after `timeout`.
fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a TCP connection opens within 3 s (generous: CI may be busy).
fn reachable(tb: &Testbed, from: Option<&str>, to: SocketAddr) -> bool {
    tb.connect(from, to, Duration::from_secs(3)).is_ok()
}

/// Whether a TCP connection fails to open within 0.5 s.
fn unreachable(tb: &Testbed, from: Option<&str>, to: SocketAddr) -> bool {
    tb.connect(from, to, SHORT).is_err()
}

fn command<const N: usize>(program: &str, args: [&str; N]) -> Command {
    let mut command = Command::new(program);
    command.args(args);
    command
}

fn netns_list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn link_list() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| Some(l.split(": ").nth(1)?.split('@').next()?.to_owned()))
        .collect()
}

/// The state letter of a process, `None` if it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// A process that is gone, or a zombie waiting for its parent (PID 1 reaps orphans slowly).
fn dead(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some('Z' | 'X'))
}

fn assert_nothing_left(namespaces: &[String], interfaces: &[String], dir: &Path) {
    let (ns_now, links_now) = (netns_list(), link_list());
    for ns in namespaces {
        assert!(!ns_now.contains(ns), "namespace {ns} left over");
    }
    for link in interfaces {
        assert!(!links_now.contains(link), "interface {link} left over");
    }
    assert!(!dir.exists(), "{} left over", dir.display());
}

/// POSTs JSON to etcd's v3 gRPC gateway; returns the whole response.
fn etcd_post(endpoint: &str, path: &str, body: &str) -> std::io::Result<String> {
    let addr: SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

// Base64 of the key and values used below (no dependency for three constants).
const KEY_B64: &str = "dm1oYQ=="; // "vmha"
const V1_B64: &str = "djE="; // "v1"
const V2_B64: &str = "djI="; // "v2"

/// Puts `value` under the test key through `endpoint`, retrying while the cluster elects.
fn etcd_put(endpoint: &str, value_b64: &str) {
    let body = format!(r#"{{"key":"{KEY_B64}","value":"{value_b64}"}}"#);
    let mut last = String::new();
    eventually(Duration::from_secs(15), "etcd put", || {
        match etcd_post(endpoint, "/v3/kv/put", &body) {
            Ok(r) if r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200") => true,
            Ok(r) => {
                last = r;
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    let _ = last;
}

/// The base64 value of the test key read (linearizably) through `endpoint`.
fn etcd_get(endpoint: &str) -> Option<String> {
    let body = format!(r#"{{"key":"{KEY_B64}"}}"#);
    let response = etcd_post(endpoint, "/v3/kv/range", &body).ok()?;
    let value = response.split("\"value\":\"").nth(1)?;
    Some(value.split('"').next()?.to_owned())
}

#[test]
fn hosts_reach_each_other_and_the_root_namespace_reaches_them() {
    let tb = Testbed::new(&["h1", "h2", "h3"], 0).unwrap();
    assert_eq!(tb.hosts(), ["h1", "h2", "h3"]);
    let subnet_prefix = tb.subnet().trim_end_matches("0/24").to_owned();
    for host in tb.hosts() {
        assert!(tb.addr(host).to_string().starts_with(&subnet_prefix));
        // A host reaches its own testbed only: no default route.
        let routes = Command::new("ip")
            .args(["-n", tb.netns(host), "route"])
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&routes.stdout).contains("default"));
    }
    let listeners: Vec<(&str, TcpListener)> = tb
        .hosts()
        .into_iter()
        .map(|h| (h, tb.listen(h, 0).unwrap()))
        .collect();
    for (to, listener) in &listeners {
        let addr = listener.local_addr().unwrap();
        assert!(reachable(&tb, None, addr), "root -> {to}");
        for from in tb.hosts() {
            assert!(reachable(&tb, Some(from), addr), "{from} -> {to}");
        }
    }
    let root = TcpListener::bind((tb.root_addr(), 0)).unwrap();
    for from in tb.hosts() {
        assert!(
            reachable(&tb, Some(from), root.local_addr().unwrap()),
            "{from} -> root"
        );
    }
}

#[test]
fn spawned_processes_run_in_their_host_namespace_and_log() {
    let tb = Testbed::new(&["a", "b"], 0).unwrap();

    // /proc/net shows the namespace of the reading process.
    let mut cat = tb.spawn("a", command("cat", ["/proc/net/dev"])).unwrap();
    assert!(cat.wait().unwrap().success());
    let log = cat.log();
    assert!(log.starts_with("# vmha-testbed: on a:"), "{log}");
    assert!(log.contains("eth0:") && log.contains("lo:"), "{log}");
    assert!(!log.contains("vmtb"), "root interfaces visible:\n{log}");

    // The pid is the program's own, inside the namespace.
    let mut sleep = tb.spawn("b", command("sleep", ["300"])).unwrap();
    assert_eq!(sleep.host(), "b");
    // (The kernel renames the process a moment after spawn() returns: poll.)
    eventually(Duration::from_secs(2), "comm is sleep", || {
        std::fs::read_to_string(format!("/proc/{}/comm", sleep.pid())).unwrap() == "sleep\n"
    });
    assert!(tb.host_pids("b").unwrap().contains(&sleep.pid()));
    assert!(!tb.host_pids("a").unwrap().contains(&sleep.pid()));

    // A process on one host talks to another host.
    let listener = tb.listen("b", 0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!("echo hello >/dev/tcp/{}/{port}", tb.addr("b"));
    let mut client = tb.spawn("a", command("bash", ["-c", &script])).unwrap();
    let status = client.wait().unwrap();
    assert!(status.success(), "{}", client.log());
    listener.set_nonblocking(true).unwrap();
    let (mut conn, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), tb.addr("a"));
    conn.set_nonblocking(false).unwrap();
    let mut got = String::new();
    conn.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello\n");

    // stdout and stderr both land in the log; exit codes come through.
    let mut noisy = tb
        .spawn(
            "a",
            command("sh", ["-c", "echo to-out; echo to-err >&2; exit 3"]),
        )
        .unwrap();
    assert_eq!(noisy.wait().unwrap().code(), Some(3));
    let log = noisy.log();
    assert!(
        log.contains("to-out\n") && log.contains("to-err\n"),
        "{log}"
    );
    assert!(noisy.log_path().starts_with(tb.dir()));
    assert_eq!(noisy.log_tail(1), "to-err");

    // SIGTERM, wait_timeout, and a second signal after reaping is a no-op.
    assert!(sleep.is_running());
    sleep.terminate().unwrap();
    let status = sleep.wait_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(status.signal(), Some(15));
    assert!(!sleep.is_running());
    sleep.kill().unwrap();

    // Errors: a missing program, an unknown host.
    let err = tb
        .spawn("a", Command::new("/nonexistent/prog"))
        .unwrap_err();
    assert!(format!("{err:#}").contains("/nonexistent/prog"), "{err:#}");
    assert!(tb.spawn("nohost", command("true", [])).is_err());
    assert!(tb.kill_host("nohost").is_err());
}

#[test]
fn three_member_etcd_is_healthy_replicates_and_survives_a_member_restart() {
    let tb = Testbed::new(&["e1", "e2", "e3"], 3).unwrap();
    eprintln!(
        "3-member etcd healthy {:?} after start",
        tb.etcd_startup_time().unwrap()
    );
    let endpoints = tb.etcd_endpoints();
    assert_eq!(endpoints.len(), 3);
    assert_eq!(tb.etcd_member_count(), 3);
    for (i, endpoint) in endpoints.iter().enumerate() {
        let host = tb.etcd_host(i);
        assert_eq!(*endpoint, format!("http://{}:2379", tb.addr(host)));
        eventually(
            Duration::from_secs(10),
            &format!("member {i} healthy"),
            || tb.etcd_healthy(i),
        );
        let pid = tb.etcd_pid(i).unwrap();
        assert_eq!(tb.host_pids(host).unwrap(), [pid]);
    }

    etcd_put(&endpoints[0], V1_B64);
    assert_eq!(etcd_get(&endpoints[2]).as_deref(), Some(V1_B64));

    tb.kill_etcd(1).unwrap();
    assert_eq!(tb.etcd_pid(1), None);
    assert!(!tb.etcd_healthy(1));
    assert!(tb.host_pids("e2").unwrap().is_empty());
    tb.kill_etcd(1).unwrap(); // already dead: a no-op
    // Two of three keep the quorum.
    tb.wait_etcd_healthy(Duration::from_secs(15)).unwrap();
    etcd_put(&endpoints[0], V2_B64);

    tb.restart_etcd(1).unwrap();
    eventually(Duration::from_secs(10), "member 1 healthy", || {
        tb.etcd_healthy(1)
    });
    assert_eq!(etcd_get(&endpoints[1]).as_deref(), Some(V2_B64));
    assert!(tb.etcd_log(1).contains("etcd"), "{}", tb.etcd_log(1));
    assert!(tb.kill_etcd(3).is_err());
}

#[test]
fn single_member_etcd_restarts_on_its_data() {
    let tb = Testbed::new(&["solo"], 1).unwrap();
    eprintln!(
        "1-member etcd healthy {:?} after start",
        tb.etcd_startup_time().unwrap()
    );
    let endpoint = tb.etcd_endpoints().remove(0);
    etcd_put(&endpoint, V1_B64);
    tb.kill_etcd(0).unwrap();
    assert!(!tb.etcd_healthy(0));
    let addr: SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
    assert!(unreachable(&tb, None, addr));
    let restarted = Instant::now();
    tb.restart_etcd(0).unwrap();
    eprintln!(
        "1-member etcd healthy {:?} after restart",
        restarted.elapsed()
    );
    eventually(Duration::from_secs(10), "member 0 healthy", || {
        tb.etcd_healthy(0)
    });
    assert_eq!(etcd_get(&endpoint).as_deref(), Some(V1_B64));
}

#[test]
fn a_cut_host_is_unreachable_until_restored() {
    let tb = Testbed::new(&["c1", "c2", "c3"], 3).unwrap();
    let listeners: Vec<TcpListener> = ["c1", "c2", "c3"]
        .iter()
        .map(|h| tb.listen(h, 0).unwrap())
        .collect();
    let [l1, l2, l3] = [0, 1, 2].map(|i| listeners[i].local_addr().unwrap());
    assert!(!tb.is_cut("c1"));

    tb.cut("c1").unwrap();
    assert!(tb.is_cut("c1"));
    assert!(!tb.is_cut("c2"));
    assert!(unreachable(&tb, None, l1), "root -> c1");
    assert!(unreachable(&tb, Some("c2"), l1), "c2 -> c1");
    assert!(unreachable(&tb, Some("c1"), l2), "c1 -> c2");
    assert!(reachable(&tb, None, l2), "root -> c2");
    assert!(reachable(&tb, Some("c2"), l3), "c2 -> c3");
    // The cut host still reaches itself.
    assert!(reachable(&tb, Some("c1"), l1), "c1 -> c1");
    // Its etcd member runs on but is unreachable; the other two keep the quorum.
    assert!(tb.etcd_pid(0).is_some());
    assert!(!tb.etcd_healthy(0));
    tb.wait_etcd_healthy(Duration::from_secs(15)).unwrap();
    tb.cut("c1").unwrap(); // idempotent

    tb.restore("c1").unwrap();
    assert!(!tb.is_cut("c1"));
    eventually(Duration::from_secs(5), "root -> c1 after restore", || {
        reachable(&tb, None, l1)
    });
    eventually(Duration::from_secs(5), "c2 -> c1 after restore", || {
        reachable(&tb, Some("c2"), l1)
    });
    assert!(reachable(&tb, Some("c1"), l3), "c1 -> c3 after restore");
    eventually(
        Duration::from_secs(15),
        "etcd member 0 healthy again",
        || tb.etcd_healthy(0),
    );
}

#[test]
fn kill_host_leaves_no_process_in_the_namespace() {
    let tb = Testbed::new(&["k1", "k2"], 1).unwrap();
    let etcd = tb.etcd_pid(0).unwrap();
    // A "daemon" with children, and a grandchild that escaped into its own session.
    let script = "sleep 300 & sleep 300 & setsid sh -c 'sleep 300 & wait' & wait";
    let mut daemon = tb.spawn("k1", command("sh", ["-c", script])).unwrap();
    let mut bystander = tb.spawn("k2", command("sleep", ["300"])).unwrap();
    eventually(Duration::from_secs(5), "daemon tree started", || {
        tb.host_pids("k1").unwrap().len() >= 6
    });

    let killed = tb.kill_host_processes("k1", true).unwrap();
    assert!(killed >= 5, "killed {killed}");
    assert_eq!(tb.host_pids("k1").unwrap(), [etcd]);
    eventually(Duration::from_secs(10), "etcd healthy", || {
        tb.etcd_healthy(0)
    });
    let status = daemon
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap();
    assert_eq!(status.signal(), Some(9));

    let _again = tb.spawn("k1", command("sleep", ["300"])).unwrap();
    assert!(tb.kill_host("k1").unwrap() >= 2);
    assert!(tb.host_pids("k1").unwrap().is_empty());
    assert_eq!(tb.etcd_pid(0), None);
    assert!(!tb.etcd_healthy(0));
    assert_eq!(tb.kill_host("k1").unwrap(), 0);

    // The other host is untouched.
    assert!(bystander.is_running());
    assert_eq!(tb.host_pids("k2").unwrap(), [bystander.pid()]);

    // The host can be used again.
    tb.restart_etcd(0).unwrap();
    eventually(Duration::from_secs(10), "etcd healthy", || {
        tb.etcd_healthy(0)
    });
}

#[test]
fn two_testbeds_at_once_do_not_interfere() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Testbed::new(&["x", "y"], 1));
        let b = s.spawn(|| Testbed::new(&["x", "y"], 1));
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    assert_ne!(a.subnet(), b.subnet());
    for ns in a.namespaces() {
        assert!(!b.namespaces().contains(&ns));
    }
    for link in a.interfaces() {
        assert!(!b.interfaces().contains(&link));
    }
    assert_ne!(a.dir(), b.dir());

    let (bx_listener, by_listener) = (b.listen("x", 0).unwrap(), b.listen("y", 0).unwrap());
    let (bx, by) = (
        bx_listener.local_addr().unwrap(),
        by_listener.local_addr().unwrap(),
    );
    // A host of one testbed cannot reach a host of the other (no route at all).
    assert!(unreachable(&a, Some("x"), by));

    let mut b_proc = b.spawn("x", command("sleep", ["300"])).unwrap();
    a.cut("x").unwrap();
    a.kill_host("x").unwrap();
    assert!(!b.is_cut("x"));
    assert!(b_proc.is_running());
    assert!(reachable(&b, None, bx) && reachable(&b, Some("y"), bx));
    eventually(Duration::from_secs(10), "b's etcd healthy", || {
        b.etcd_healthy(0)
    });

    let (a_namespaces, a_interfaces, a_dir) = (a.namespaces(), a.interfaces(), a.dir().to_owned());
    a.teardown().unwrap();
    assert_nothing_left(&a_namespaces, &a_interfaces, &a_dir);
    let (ns_now, links_now) = (netns_list(), link_list());
    for ns in b.namespaces() {
        assert!(ns_now.contains(&ns), "{ns} of the other testbed is gone");
    }
    for link in b.interfaces() {
        assert!(
            links_now.contains(&link),
            "{link} of the other testbed is gone"
        );
    }
    assert!(b_proc.is_running());
    eventually(Duration::from_secs(10), "b's etcd healthy", || {
        b.etcd_healthy(0)
    });
    assert!(reachable(&b, Some("y"), bx));
}

/// Starts a fake QEMU for `vm` on `host`: `sleep` whose argv[0] reads like vmhad's QEMU
/// command line naming `<runtime>/<vm>/qmp.sock`.
fn fake_qemu(tb: &Testbed, host: &str, runtime: &Path, vm: &str) -> Proc {
    let qmp = runtime.join(vm).join("qmp.sock");
    let mut sleep = Command::new("sleep");
    sleep
        .arg0(format!(
            "qemu-system-x86_64 -name {vm} -qmp unix:{},server=on,wait=off",
            qmp.display()
        ))
        .arg("300");
    tb.spawn(host, sleep).unwrap()
}

#[test]
fn double_run_checker_sees_double_runs_counts_stopped_and_ignores_zombies() {
    let tb = Testbed::new(&["h1", "h2"], 0).unwrap();
    let rt1 = tb.host_dir("h1").join("run");
    let rt2 = tb.host_dir("h2").join("run");
    let vms = vec!["vm1".to_owned(), "vm2".to_owned()];
    let mut checker = DoubleRunChecker::start(
        vms.clone(),
        vec![("h1".into(), rt1.clone()), ("h2".into(), rt2.clone())],
    );
    let wait = |n| assert!(checker.wait_samples(n, Duration::from_secs(5)));

    // One VM on one host: fine.
    let vm1_h1 = fake_qemu(&tb, "h1", &rt1, "vm1");
    wait(2);
    assert_eq!(checker.last_sample()["vm1"], ["h1"]);
    assert!(checker.last_sample()["vm2"].is_empty());
    checker.assert_never_double();

    // A zombie never counts: vm2 dies on h2 (unreaped) before it starts on h1.
    let mut vm2_h2 = fake_qemu(&tb, "h2", &rt2, "vm2");
    vm2_h2.kill().unwrap();
    eventually(Duration::from_secs(5), "zombie", || {
        proc_state(vm2_h2.pid()) == Some('Z')
    });
    let mut vm2_h1 = fake_qemu(&tb, "h1", &rt1, "vm2");
    wait(3);
    assert_eq!(proc_state(vm2_h2.pid()), Some('Z'));
    assert_eq!(checker.last_sample()["vm2"], ["h1"]);
    assert!(
        checker.violations().is_empty(),
        "{:?}",
        checker.violations()
    );

    // vm1 on both hosts: a violation.
    let vm1_h2 = fake_qemu(&tb, "h2", &rt2, "vm1");
    eventually(Duration::from_secs(5), "vm1 double run detected", || {
        !checker.violations().is_empty()
    });
    let v = &checker.violations()[0];
    assert_eq!(v.vm, "vm1");
    assert_eq!(v.hosts, ["h1", "h2"]);
    assert_eq!(
        v.processes,
        [
            ("h1".to_owned(), vm1_h1.pid()),
            ("h2".to_owned(), vm1_h2.pid())
        ]
    );

    // A stopped QEMU still holds the disk: it counts.
    vm2_h1.signal(Signal::SIGSTOP).unwrap();
    eventually(Duration::from_secs(5), "stopped", || {
        proc_state(vm2_h1.pid()) == Some('T')
    });
    let _vm2_h2_again = fake_qemu(&tb, "h2", &rt2, "vm2");
    eventually(Duration::from_secs(5), "vm2 double run detected", || {
        checker.violations().iter().any(|v| v.vm == "vm2")
    });

    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        checker.assert_never_double();
    }))
    .unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("VM vm1 ran on h1 and h2"), "{message}");
    assert!(message.contains("VM vm2 ran on h1 and h2"), "{message}");

    assert!(checker.samples() >= 6);
    checker.stop();
    let samples = checker.samples();
    std::thread::sleep(DoubleRunChecker::INTERVAL * 3);
    assert_eq!(checker.samples(), samples);
    checker.stop(); // idempotent

    // Another VM on these hosts: clean.
    let clean = DoubleRunChecker::start(
        vec!["vm3".into()],
        vec![("h1".into(), rt1), ("h2".into(), rt2)],
    );
    assert!(clean.wait_samples(2, Duration::from_secs(5)));
    clean.assert_never_double();
}

/// Namespaces, interfaces, directory and an orphan pid of a testbed.
type Seen = (Vec<String>, Vec<String>, PathBuf, u32);

#[test]
fn teardown_leaves_nothing_also_after_a_panic() {
    // Explicit teardown.
    let tb = Testbed::new(&["t1", "t2"], 1).unwrap();
    let (namespaces, interfaces, dir) = (tb.namespaces(), tb.interfaces(), tb.dir().to_owned());
    let etcd = tb.etcd_pid(0).unwrap();
    let mut spawned = tb.spawn("t2", command("sleep", ["300"])).unwrap();
    let mut daemonizer = tb
        .spawn("t2", command("sh", ["-c", "sleep 300 & echo $!"]))
        .unwrap();
    daemonizer.wait().unwrap();
    let orphan: u32 = daemonizer.log().lines().last().unwrap().parse().unwrap();
    assert!(tb.host_pids("t2").unwrap().contains(&orphan));
    for ns in &namespaces {
        assert!(netns_list().contains(ns));
    }
    tb.teardown().unwrap();
    assert_nothing_left(&namespaces, &interfaces, &dir);
    assert!(dead(etcd), "etcd {etcd} survived");
    let status = spawned.wait_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(status.unwrap().signal(), Some(9));
    eventually(Duration::from_secs(5), "orphan killed", || dead(orphan));

    // Drop while a test panics.
    let seen: Mutex<Option<Seen>> = Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let tb = Testbed::new(&["p1"], 0).unwrap();
        let mut daemonizer = tb
            .spawn("p1", command("sh", ["-c", "sleep 300 & echo $!"]))
            .unwrap();
        daemonizer.wait().unwrap();
        let orphan: u32 = daemonizer.log().lines().last().unwrap().parse().unwrap();
        *seen.lock().unwrap() = Some((
            tb.namespaces(),
            tb.interfaces(),
            tb.dir().to_owned(),
            orphan,
        ));
        panic!("a failing test");
    });
    assert!(result.is_err());
    let (namespaces, interfaces, dir, orphan) = seen.lock().unwrap().take().unwrap();
    assert_nothing_left(&namespaces, &interfaces, &dir);
    eventually(Duration::from_secs(5), "orphan killed", || dead(orphan));
}

/// Runs this test binary's `helper_process` in `mode`; returns what it wrote.
fn run_helper(mode: &str, envs: &[(&str, &str)]) -> String {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out");
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_process", "--ignored", "--test-threads=1"])
        .env("VMHA_TESTBED_HELPER", mode)
        .env("VMHA_TESTBED_HELPER_OUT", &out)
        .envs(envs.iter().copied())
        .status()
        .unwrap();
    assert!(status.success(), "helper {mode}: {status}");
    std::fs::read_to_string(&out).unwrap()
}

/// Not a test: the child process of the tests below (does nothing unless they start it).
#[test]
#[ignore = "helper process of other tests"]
fn helper_process() {
    let Some(mode) = std::env::var_os("VMHA_TESTBED_HELPER") else {
        return;
    };
    let out = std::env::var_os("VMHA_TESTBED_HELPER_OUT").unwrap();
    match mode.to_str().unwrap() {
        "crash" => {
            let tb = Testbed::new(&["s1", "s2"], 1).unwrap();
            let mut daemonizer = tb
                .spawn("s2", command("sh", ["-c", "sleep 300 & echo $!"]))
                .unwrap();
            daemonizer.wait().unwrap();
            let orphan = daemonizer.log().lines().last().unwrap().to_owned();
            let etcd = tb.etcd_pid(0).unwrap();
            let state = format!(
                "{}\n{}\n{}\n{orphan} {etcd}\n",
                tb.namespaces().join(" "),
                tb.interfaces().join(" "),
                tb.dir().display()
            );
            std::fs::write(out, state).unwrap();
            // Die without any destructor running: the testbed is left behind.
            std::process::exit(0);
        }
        "keep" => {
            let tb = Testbed::new(&["k1"], 0).unwrap();
            let _ = tb.spawn("k1", command("true", [])).unwrap().wait();
            let state = format!("{}\n{}\n", tb.namespaces().join(" "), tb.dir().display());
            drop(tb);
            std::fs::write(out, state).unwrap();
        }
        "nonroot" => {
            let err = Testbed::new(&["n1"], 0).unwrap_err();
            std::fs::write(out, format!("{err:#}")).unwrap();
        }
        other => panic!("unknown helper mode {other}"),
    }
}

fn words(line: Option<&str>) -> Vec<String> {
    line.unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn leftovers_of_a_crashed_run_are_cleaned_up() {
    let state = run_helper("crash", &[]);
    let mut lines = state.lines();
    let namespaces = words(lines.next());
    let interfaces = words(lines.next());
    let dir = PathBuf::from(lines.next().unwrap());
    let pids: Vec<u32> = words(lines.next())
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    // Another test's Testbed::new may be cleaning them up concurrently: only report.
    let left = namespaces.iter().all(|ns| netns_list().contains(ns));
    eprintln!("leftovers present after the crash: {left}");

    cleanup_stale().unwrap();
    eventually(Duration::from_secs(15), "stale testbed removed", || {
        let (ns_now, links_now) = (netns_list(), link_list());
        namespaces.iter().all(|ns| !ns_now.contains(ns))
            && interfaces.iter().all(|l| !links_now.contains(l))
            && !dir.exists()
    });
    for pid in pids {
        eventually(Duration::from_secs(5), "stale process killed", || dead(pid));
    }
}

#[test]
fn keep_env_keeps_the_directory_and_nothing_else() {
    let state = run_helper("keep", &[("VMHA_KEEP_TESTBED", "1")]);
    let mut lines = state.lines();
    let namespaces = words(lines.next());
    let dir = PathBuf::from(lines.next().unwrap());
    assert!(dir.join("logs").is_dir(), "{} not kept", dir.display());
    let ns_now = netns_list();
    assert!(namespaces.iter().all(|ns| !ns_now.contains(ns)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn not_root_is_a_clear_error() {
    // Run a copy of this binary as nobody (the target dir may not be readable for nobody).
    let copy_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(copy_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = copy_dir.path().join("testbed-tests");
    std::fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(out_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = out_dir.path().join("out");
    let mut helper = Command::new(&copy);
    helper
        .args(["--exact", "helper_process", "--ignored", "--test-threads=1"])
        .env("VMHA_TESTBED_HELPER", "nonroot")
        .env("VMHA_TESTBED_HELPER_OUT", &out)
        .current_dir(copy_dir.path())
        .uid(65534)
        .gid(65534);
    // A process another test thread forks while the copy is being written inherits the
    // writable fd for a moment (until its exec): exec then fails with ETXTBSY. Retry.
    let mut attempts = 0;
    let status = loop {
        match helper.status() {
            Err(e) if e.kind() == ErrorKind::ExecutableFileBusy && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            result => break result.unwrap(),
        }
    };
    assert!(status.success(), "{status}");
    let message = std::fs::read_to_string(&out).unwrap();
    assert!(message.contains("needs root"), "{message}");
}

#[test]
fn bad_arguments_are_rejected_before_anything_is_created() {
    let message =
        |hosts: &[&str], etcd: usize| format!("{:#}", Testbed::new(hosts, etcd).unwrap_err());
    assert!(message(&[], 0).contains("at least one host"));
    assert!(message(&["a", "a"], 0).contains("twice"));
    assert!(message(&["a b"], 0).contains("invalid host name"));
    assert!(message(&["a"], 3).contains("3 etcd members"));
}

#[test]
fn listener_sockets_live_in_the_host_namespace() {
    let tb = Testbed::new(&["n1"], 0).unwrap();
    // Binding the host's address works only inside its namespace.
    assert!(TcpListener::bind((tb.addr("n1"), 0)).is_err());
    let listener = tb.listen("n1", 0).unwrap();
    let err = tb
        .run_in("n1", || TcpListener::bind((tb.root_addr(), 0)).map(drop))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AddrNotAvailable);
    drop(listener);
}
