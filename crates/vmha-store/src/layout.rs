//! The key layout: where vmha keeps what in the cluster store.
//!
//! ```text
//! /vmha/<cluster>/hosts/<host>              membership record, bound to the host's lease
//! /vmha/<cluster>/vms/<vm>/owner            ownership record: compare-and-swap only, bound to the
//!                                           owner host's lease
//! /vmha/<cluster>/vms/<vm>/state            reported VM group state (latest report)
//! /vmha/<cluster>/vms/<vm>/admin            the controller's admin record: desired state,
//!                                           frozen, clears (no lease)
//! /vmha/<cluster>/vms/<vm>/settings         run-time settings, written by the owner (no lease)
//! /vmha/<cluster>/agents/<host>/state       a host's own persisted state (budget counters,
//!                                           faults, plan in flight, next event number)
//! /vmha/<cluster>/controller/state          the controller's persisted state
//! /vmha/<cluster>/events/<host>/<20 digits> each host's event stream, oldest first in key order
//! /vmha/<cluster>/requests/<target>/<id>    commands forwarded to a host, or to `@controller`
//! /vmha/<cluster>/replies/<id>              their answers
//! /vmha/<cluster>/config                    the cluster configuration (TOML), when stored
//! /vmha/<cluster>/election/<name>/<lease>   election candidates (see `crate::election`)
//! ```

/// Errors building keys.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// A cluster, host, VM or election name that cannot be one key segment.
    #[error(
        "invalid {what} name {name:?}: must be non-empty and contain no '/' or control characters"
    )]
    InvalidName {
        /// What the name names ("cluster", "host", "vm", "election").
        what: &'static str,
        /// The offending name.
        name: String,
    },
}

/// Which record of a VM a key under `vms/` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRecord {
    /// `vms/<vm>/owner`.
    Owner,
    /// `vms/<vm>/state`.
    State,
    /// `vms/<vm>/admin`.
    Admin,
    /// `vms/<vm>/settings`.
    Settings,
}

/// Who carries out a forwarded command (`requests/<target>/…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// The elected cluster controller (`requests/@controller/…`; `@` is in no host name).
    Controller,
    /// A host by name.
    Host(&'a str),
}

/// Segment of [`Target::Controller`].
const CONTROLLER_TARGET: &str = "@controller";

/// The keys of one cluster. Every key it builds starts with [`Layout::root`]; names are checked
/// to be single key segments, so no name can reach into another record's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: String,
}

fn segment<'a>(what: &'static str, name: &'a str) -> Result<&'a str, LayoutError> {
    if name.is_empty() || name.contains('/') || name.chars().any(char::is_control) {
        Err(LayoutError::InvalidName {
            what,
            name: name.to_owned(),
        })
    } else {
        Ok(name)
    }
}

impl Layout {
    /// The layout of cluster `cluster` (root `/vmha/<cluster>/`).
    pub fn new(cluster: &str) -> Result<Self, LayoutError> {
        let cluster = segment("cluster", cluster)?;
        Ok(Layout {
            root: format!("/vmha/{cluster}/"),
        })
    }

    /// `/vmha/<cluster>/`: the prefix of every key of this cluster.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Prefix of the membership records.
    pub fn hosts_prefix(&self) -> String {
        format!("{}hosts/", self.root)
    }

    /// Membership record of `host`.
    pub fn host(&self, host: &str) -> Result<String, LayoutError> {
        Ok(format!("{}{}", self.hosts_prefix(), segment("host", host)?))
    }

    /// The host name of a membership key, if `key` is one.
    pub fn parse_host<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("hosts/")?;
        segment("host", rest).ok()
    }

    /// Prefix of every VM record.
    pub fn vms_prefix(&self) -> String {
        format!("{}vms/", self.root)
    }

    /// Ownership record of `vm`.
    pub fn vm_owner(&self, vm: &str) -> Result<String, LayoutError> {
        Ok(format!("{}{}/owner", self.vms_prefix(), segment("vm", vm)?))
    }

    /// Reported state of `vm`'s group.
    pub fn vm_state(&self, vm: &str) -> Result<String, LayoutError> {
        Ok(format!("{}{}/state", self.vms_prefix(), segment("vm", vm)?))
    }

    /// The VM name and record kind of a key under [`Layout::vms_prefix`], if `key` is one.
    pub fn parse_vm<'k>(&self, key: &'k str) -> Option<(&'k str, VmRecord)> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("vms/")?;
        let (vm, record) = rest.split_once('/')?;
        let record = match record {
            "owner" => VmRecord::Owner,
            "state" => VmRecord::State,
            "admin" => VmRecord::Admin,
            "settings" => VmRecord::Settings,
            _ => return None,
        };
        Some((segment("vm", vm).ok()?, record))
    }

    /// Admin record of `vm`'s group.
    pub fn vm_admin(&self, vm: &str) -> Result<String, LayoutError> {
        Ok(format!("{}{}/admin", self.vms_prefix(), segment("vm", vm)?))
    }

    /// Run-time settings of `vm`'s group.
    pub fn vm_settings(&self, vm: &str) -> Result<String, LayoutError> {
        Ok(format!(
            "{}{}/settings",
            self.vms_prefix(),
            segment("vm", vm)?
        ))
    }

    /// The controller's persisted state.
    pub fn controller_state(&self) -> String {
        format!("{}controller/state", self.root)
    }

    /// The stored cluster configuration.
    pub fn config(&self) -> String {
        format!("{}config", self.root)
    }

    /// The host whose persisted state `key` is, if it is one.
    pub fn parse_agent_state<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("agents/")?;
        let host = rest.strip_suffix("/state")?;
        segment("host", host).ok()
    }

    /// Prefix of `host`'s event stream.
    pub fn host_events_prefix(&self, host: &str) -> Result<String, LayoutError> {
        Ok(format!(
            "{}{}/",
            self.events_prefix(),
            segment("host", host)?
        ))
    }

    /// Key of `host`'s event number `seq` (zero-padded to 20 digits: key order is number order).
    pub fn host_event(&self, host: &str, seq: u64) -> Result<String, LayoutError> {
        Ok(format!("{}{seq:020}", self.host_events_prefix(host)?))
    }

    /// The host and sequence number of a key of [`Layout::host_event`], if `key` is one.
    pub fn parse_host_event<'k>(&self, key: &'k str) -> Option<(&'k str, u64)> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("events/")?;
        let (host, digits) = rest.split_once('/')?;
        if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((segment("host", host).ok()?, digits.parse().ok()?))
    }

    fn target_segment<'t>(target: Target<'t>) -> Result<&'t str, LayoutError> {
        match target {
            Target::Controller => Ok(CONTROLLER_TARGET),
            Target::Host(h) => segment("host", h),
        }
    }

    /// Prefix of the commands forwarded to `target`.
    pub fn requests_prefix(&self, target: Target<'_>) -> Result<String, LayoutError> {
        Ok(format!(
            "{}requests/{}/",
            self.root,
            Self::target_segment(target)?
        ))
    }

    /// A command forwarded to `target` under request `id`.
    pub fn request(&self, target: Target<'_>, id: &str) -> Result<String, LayoutError> {
        Ok(format!(
            "{}{}",
            self.requests_prefix(target)?,
            segment("request", id)?
        ))
    }

    /// The target and request id of a key of [`Layout::request`], if `key` is one.
    pub fn parse_request<'k>(&self, key: &'k str) -> Option<(Target<'k>, &'k str)> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("requests/")?;
        let (target, id) = rest.split_once('/')?;
        let target = if target == CONTROLLER_TARGET {
            Target::Controller
        } else {
            Target::Host(segment("host", target).ok()?)
        };
        Some((target, segment("request", id).ok()?))
    }

    /// Prefix of the answers to forwarded commands.
    pub fn replies_prefix(&self) -> String {
        format!("{}replies/", self.root)
    }

    /// The answer to request `id`.
    pub fn reply(&self, id: &str) -> Result<String, LayoutError> {
        Ok(format!(
            "{}{}",
            self.replies_prefix(),
            segment("request", id)?
        ))
    }

    /// The request id of a key of [`Layout::reply`], if `key` is one.
    pub fn parse_reply<'k>(&self, key: &'k str) -> Option<&'k str> {
        let id = key.strip_prefix(&self.root)?.strip_prefix("replies/")?;
        segment("request", id).ok()
    }

    /// Persisted state of `host`'s agent.
    pub fn agent_state(&self, host: &str) -> Result<String, LayoutError> {
        Ok(format!(
            "{}agents/{}/state",
            self.root,
            segment("host", host)?
        ))
    }

    /// Prefix of the event log: every host's stream ([`Layout::host_events_prefix`]).
    pub fn events_prefix(&self) -> String {
        format!("{}events/", self.root)
    }

    /// The election `name` (e.g. "controller"): pass it to [`crate::ClusterStore::campaign`].
    pub fn election(&self, name: &str) -> Result<String, LayoutError> {
        Ok(format!(
            "{}election/{}",
            self.root,
            segment("election", name)?
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let l = Layout::new("prod").unwrap();
        assert_eq!(l.host("kvm1").unwrap(), "/vmha/prod/hosts/kvm1");
        assert_eq!(l.vm_owner("db01").unwrap(), "/vmha/prod/vms/db01/owner");
        assert_eq!(l.vm_state("db01").unwrap(), "/vmha/prod/vms/db01/state");
        assert_eq!(
            l.agent_state("kvm1").unwrap(),
            "/vmha/prod/agents/kvm1/state"
        );
        assert_eq!(
            l.host_event("kvm1", 42).unwrap(),
            "/vmha/prod/events/kvm1/00000000000000000042"
        );
        assert_eq!(
            l.election("controller").unwrap(),
            "/vmha/prod/election/controller"
        );
    }

    #[test]
    fn keys_parse_back() {
        let l = Layout::new("prod").unwrap();
        assert_eq!(l.parse_host("/vmha/prod/hosts/kvm1"), Some("kvm1"));
        assert_eq!(l.parse_host("/vmha/other/hosts/kvm1"), None);
        assert_eq!(
            l.parse_vm("/vmha/prod/vms/db01/owner"),
            Some(("db01", VmRecord::Owner))
        );
        assert_eq!(l.parse_vm("/vmha/prod/vms/db01/other"), None);
        assert_eq!(
            l.parse_host_event(&l.host_event("kvm1", u64::MAX).unwrap()),
            Some(("kvm1", u64::MAX))
        );
        assert_eq!(l.parse_host_event("/vmha/prod/events/kvm1/12"), None);
        assert_eq!(
            l.parse_host_event("/vmha/prod/events/00000000000000000012"),
            None,
            "a key of the old cluster-wide log is no event"
        );
        assert_eq!(
            l.parse_host_event("/vmha/prod/events/a/b/00000000000000000012"),
            None
        );
    }

    #[test]
    fn new_records_parse_back() {
        let l = Layout::new("prod").unwrap();
        assert_eq!(
            l.parse_vm(&l.vm_admin("db01").unwrap()),
            Some(("db01", VmRecord::Admin))
        );
        assert_eq!(
            l.parse_vm(&l.vm_settings("db01").unwrap()),
            Some(("db01", VmRecord::Settings))
        );
        let e = l.host_event("kvm1", 7).unwrap();
        assert_eq!(e, "/vmha/prod/events/kvm1/00000000000000000007");
        assert_eq!(l.parse_host_event(&e), Some(("kvm1", 7)));
        let r = l.request(Target::Controller, "kvm1-a-1").unwrap();
        assert_eq!(r, "/vmha/prod/requests/@controller/kvm1-a-1");
        assert_eq!(l.parse_request(&r), Some((Target::Controller, "kvm1-a-1")));
        let r = l.request(Target::Host("kvm2"), "kvm1-a-2").unwrap();
        assert_eq!(
            l.parse_request(&r),
            Some((Target::Host("kvm2"), "kvm1-a-2"))
        );
        assert_eq!(l.parse_reply(&l.reply("x").unwrap()), Some("x"));
        assert_eq!(
            l.parse_agent_state(&l.agent_state("kvm1").unwrap()),
            Some("kvm1")
        );
        assert!(l.request(Target::Host("a/b"), "x").is_err());
    }

    #[test]
    fn names_cannot_escape_their_segment() {
        let l = Layout::new("prod").unwrap();
        assert!(matches!(
            l.host("a/b"),
            Err(LayoutError::InvalidName { what: "host", .. })
        ));
        assert!(l.vm_owner("").is_err());
        assert!(l.agent_state("x\n").is_err());
        assert!(Layout::new("a/b").is_err());
    }
}
