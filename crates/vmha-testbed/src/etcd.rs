//! The testbed's etcd cluster: member `i` runs inside host `i`'s namespace.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::proc::{Proc, tail};
use crate::testbed::Testbed;

/// etcd's client port.
const CLIENT_PORT: u16 = 2379;
/// etcd's peer port.
const PEER_PORT: u16 = 2380;
/// How long members may take to become healthy.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one health probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One etcd member's state.
#[derive(Debug)]
pub(crate) struct Member {
    data_dir: PathBuf,
    process: Option<Proc>,
    last_log: Option<PathBuf>,
}

impl Member {
    /// The pid if the member's process still runs.
    pub(crate) fn running_pid(&mut self) -> Option<u32> {
        let process = self.process.as_mut()?;
        process.is_running().then(|| process.pid())
    }

    /// Kills (if needed) and reaps the member's process.
    pub(crate) fn reap(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill_and_wait();
        }
    }
}

impl Testbed {
    /// Starts a fresh `members`-member cluster and waits until every member is healthy.
    pub(crate) fn start_etcd_cluster(&mut self, members: usize) -> Result<()> {
        *self.etcd.get_mut().unwrap_or_else(|e| e.into_inner()) = (0..members)
            .map(|i| Member {
                data_dir: self.dir().join("etcd").join(&self.hosts[i].name),
                process: None,
                last_log: None,
            })
            .collect();
        let started = Instant::now();
        {
            let mut state = self.lock_etcd();
            for i in 0..members {
                self.start_member(&mut state, i, "new")?;
            }
            let all: Vec<usize> = (0..members).collect();
            self.wait_members_healthy(&mut state, &all, HEALTHY_TIMEOUT)?;
        }
        self.etcd_startup = Some(started.elapsed());
        Ok(())
    }

    fn start_member(&self, state: &mut [Member], i: usize, cluster_state: &str) -> Result<()> {
        let host = &self.hosts[i];
        let addr = host.addr;
        let peer_url = format!("http://{addr}:{PEER_PORT}");
        let initial_cluster = self.hosts[..state.len()]
            .iter()
            .map(|h| format!("{}=http://{}:{PEER_PORT}", h.name, h.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut command = Command::new("etcd");
        // Flags win over ETCD_* variables anyway, but a stray one could add settings.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(key);
            }
        }
        command
            .arg("--name")
            .arg(&host.name)
            .arg("--data-dir")
            .arg(&state[i].data_dir)
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args([
                "--listen-client-urls",
                &format!("http://{addr}:{CLIENT_PORT},http://127.0.0.1:{CLIENT_PORT}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://{addr}:{CLIENT_PORT}"),
            ])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", &self.etcd_token])
            .args(["--initial-cluster-state", cluster_state])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            // Pre-vote: a member that was cut off does not disrupt the leader when it returns.
            .arg("--pre-vote")
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        let process = self
            .spawn(&host.name, command)
            .with_context(|| format!("starting etcd member {i} on host {}", host.name))?;
        state[i].last_log = Some(process.log_path().to_owned());
        state[i].process = Some(process);
        Ok(())
    }

    fn wait_members_healthy(
        &self,
        state: &mut [Member],
        which: &[usize],
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pending: Vec<usize> = which.to_vec();
        let mut last_error = vec![String::new(); state.len()];
        loop {
            pending.retain(|&i| match health(self.hosts[i].addr) {
                Ok(true) => false,
                Ok(false) => {
                    "reports unhealthy".clone_into(&mut last_error[i]);
                    true
                }
                Err(e) => {
                    last_error[i] = e.to_string();
                    true
                }
            });
            if pending.is_empty() {
                return Ok(());
            }
            for &i in &pending {
                if state[i].running_pid().is_none() {
                    bail!(
                        "etcd member {i} on host {} is not running:\n{}",
                        self.hosts[i].name,
                        member_log_tail(&state[i])
                    );
                }
            }
            if Instant::now() >= deadline {
                let report: Vec<String> = pending
                    .iter()
                    .map(|&i| {
                        format!(
                            "member {i} on host {} ({}): {}\n{}",
                            self.hosts[i].name,
                            self.hosts[i].addr,
                            last_error[i],
                            member_log_tail(&state[i])
                        )
                    })
                    .collect();
                bail!("etcd not healthy after {timeout:?}:\n{}", report.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn check_member(&self, i: usize) -> Result<()> {
        let members = self.etcd_member_count();
        if i >= members {
            bail!("no etcd member {i}: the testbed has {members}");
        }
        Ok(())
    }

    /// How many etcd members the testbed has (running or not).
    pub fn etcd_member_count(&self) -> usize {
        self.lock_etcd().len()
    }

    /// The client URL of every etcd member, `http://ADDR:2379`, member `i` (on host `i`) at
    /// index `i`, whether it currently runs or not.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        let members = self.etcd_member_count();
        self.hosts[..members]
            .iter()
            .map(|h| format!("http://{}:{CLIENT_PORT}", h.addr))
            .collect()
    }

    /// The `[cluster]` and `[[host]]` sections of a vmha configuration for this testbed: cluster
    /// `name` on its etcd with `ttl` and `fence_margin` (TOML durations such as `"5s"`), every
    /// host at its testbed address. Append `[[vm]]` sections to make a whole configuration.
    pub fn cluster_toml(&self, name: &str, ttl: &str, fence_margin: &str) -> String {
        let endpoints: Vec<String> = self
            .etcd_endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        let mut toml = format!(
            "[cluster]\nname = \"{name}\"\nstore = \"etcd\"\nendpoints = [{}]\n\
             ttl = \"{ttl}\"\nfence_margin = \"{fence_margin}\"\n",
            endpoints.join(", ")
        );
        for h in &self.hosts {
            toml.push_str(&format!(
                "\n[[host]]\nname = \"{}\"\naddress = \"{}\"\n",
                h.name, h.addr
            ));
        }
        toml
    }

    /// The host running etcd member `i`: host `i`. Panics if there is no member `i`.
    pub fn etcd_host(&self, i: usize) -> &str {
        if let Err(e) = self.check_member(i) {
            panic!("{e:#}");
        }
        &self.hosts[i].name
    }

    /// The pid of etcd member `i` if it is running.
    pub fn etcd_pid(&self, i: usize) -> Option<u32> {
        self.lock_etcd().get_mut(i)?.running_pid()
    }

    /// Whether etcd member `i` answers `GET /health` with `"health":"true"` (it is up and sees
    /// a leader with a quorum) right now, probed from the root namespace with a 1 s timeout.
    pub fn etcd_healthy(&self, i: usize) -> bool {
        self.check_member(i).is_ok() && health(self.hosts[i].addr).unwrap_or(false)
    }

    /// Everything the latest process of etcd member `i` logged (empty if it never ran).
    pub fn etcd_log(&self, i: usize) -> String {
        self.lock_etcd()
            .get(i)
            .and_then(|m| m.last_log.as_ref())
            .and_then(|path| std::fs::read(path).ok())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// How long the initial cluster took from starting the members until every member was
    /// healthy (`None` without etcd).
    pub fn etcd_startup_time(&self) -> Option<Duration> {
        self.etcd_startup
    }

    /// Waits up to `timeout` until every running etcd member on a host that is not cut off
    /// reports healthy; fails (with the members' log tails) if one does not or is not running.
    pub fn wait_etcd_healthy(&self, timeout: Duration) -> Result<()> {
        let mut state = self.lock_etcd();
        let which: Vec<usize> = (0..state.len())
            .filter(|&i| state[i].running_pid().is_some() && !self.is_cut(&self.hosts[i].name))
            .collect();
        self.wait_members_healthy(&mut state, &which, timeout)
    }

    /// SIGKILLs etcd member `i` and reaps it; a no-op if it is not running. Does not wait for
    /// the rest of the cluster.
    pub fn kill_etcd(&self, i: usize) -> Result<()> {
        self.check_member(i)?;
        self.lock_etcd()[i].reap();
        Ok(())
    }

    /// Restarts etcd member `i` on its data directory with `--initial-cluster-state existing`
    /// (SIGKILLing it first if it still runs) and waits until it reports healthy, which needs
    /// a quorum of members running. If its host is cut off, returns once it is started
    /// without waiting. Same as `restart_etcd_members(&[i])`.
    pub fn restart_etcd(&self, i: usize) -> Result<()> {
        self.restart_etcd_members(&[i])
    }

    /// Restarts several etcd members at once (see [`Testbed::restart_etcd`]); waits until every
    /// one of them on a host that is not cut off is healthy. Use this to bring back a cluster
    /// that lost its quorum.
    pub fn restart_etcd_members(&self, members: &[usize]) -> Result<()> {
        for &i in members {
            self.check_member(i)?;
        }
        let mut state = self.lock_etcd();
        for &i in members {
            state[i].reap();
            self.start_member(&mut state, i, "existing")?;
        }
        let which: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&i| !self.is_cut(&self.hosts[i].name))
            .collect();
        self.wait_members_healthy(&mut state, &which, HEALTHY_TIMEOUT)
    }
}

fn member_log_tail(member: &Member) -> String {
    let log = member
        .last_log
        .as_ref()
        .and_then(|path| std::fs::read(path).ok())
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    tail(&log, 15)
}

/// Probes `GET /health` of the member at `addr`: `Ok(true)` for `"health":"true"`.
fn health(addr: Ipv4Addr) -> std::io::Result<bool> {
    let response = http_get(
        SocketAddr::from((addr, CLIENT_PORT)),
        "/health",
        PROBE_TIMEOUT,
    )?;
    Ok(response.contains("\"health\":\"true\""))
}

/// A minimal HTTP/1.0 GET: the whole response (status line, headers, body), at most 64 KiB.
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut response)?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}
