//! Test support for multi-host end-to-end tests of vmha: Linux network namespaces act as
//! hypervisor hosts, a real etcd cluster runs across them, and faults (killed hosts, cut
//! networks, killed etcd members) are one call away. Needs root; meant as a dev-dependency.
//!
//! A [`Testbed`] owns, for its whole life:
//! - a bridge in the root network namespace holding the first address of a private /24 in
//!   `10.213.0.0/16`, so the test process reaches every host;
//! - one network namespace per host, joined to the bridge by a veth pair, with its own address
//!   on that /24 and `lo` up; no default route, so a host can only reach its own testbed;
//! - optionally an etcd cluster, member `i` running inside host `i`'s namespace;
//! - a temporary directory with one log file per process and per-host work directories.
//!
//! Every name and subnet is unique per testbed (a slot claimed with a lock file under
//! `/run/vmha-testbed`), so testbeds in several threads or processes (cargo-nextest) never
//! touch each other, and leftovers of a crashed run are removed by the next [`Testbed::new`]
//! (or [`cleanup_stale`]). Dropping a testbed, also while a test panics, kills every process
//! in its namespaces and removes everything it created.
//!
//! [`DoubleRunChecker`] samples `/proc` in the background and records every moment a VM's
//! QEMU lives on more than one host.
//!
//! Every call blocks (starting or restarting etcd waits for its health, up to 30 s): from an
//! async test, call it through `tokio::task::spawn_blocking` or from a multi-threaded runtime.
//! Under cargo-nextest, tests using a testbed belong in the serial `heavy` test group (see the
//! workspace's `.config/nextest.toml`): put them in a `tests/*.rs` binary of a crate that has
//! this crate as a dev-dependency and they are in it.
//!
//! ```no_run
//! use std::process::Command;
//! use vmha_testbed::{DoubleRunChecker, Testbed};
//!
//! let tb = Testbed::new(&["h1", "h2", "h3"], 3)?;
//! let endpoints = tb.etcd_endpoints(); // http://10.213.S.2:2379, …
//! let mut daemon = Command::new("vmhad");
//! daemon.arg("--etcd").arg(endpoints.join(","));
//! let vmhad = tb.spawn("h1", daemon)?;
//! let checker = DoubleRunChecker::start(
//!     vec!["vm1".into()],
//!     vec![("h1".into(), tb.host_dir("h1").join("run"))],
//! );
//! tb.cut("h1")?; // h1 loses its network, etcd included
//! // … assertions; on failure print vmhad.log()
//! checker.assert_never_double();
//! # Ok::<(), anyhow::Error>(())
//! ```

mod checker;
mod etcd;
mod netns;
mod proc;
pub mod run_state;
mod testbed;

pub use checker::{DoubleRunChecker, Violation, vm_placement};
pub use nix::sys::signal::Signal;
pub use proc::Proc;
pub use testbed::{Testbed, cleanup_stale};
