//! The key layout: where vmha keeps what in the cluster store.
//!
//! ```text
//! /vmha/<cluster>/hosts/<host>              membership record, bound to the host's lease
//! /vmha/<cluster>/vms/<vm>/owner            ownership record: compare-and-swap only, bound to the
//!                                           owner host's lease
//! /vmha/<cluster>/vms/<vm>/state            reported VM group state
//! /vmha/<cluster>/agents/<host>/state       a host agent's persisted state (admin flags,
//!                                           overrides, budget counters)
//! /vmha/<cluster>/events/<20-digit seq>     the event log, oldest first in key order
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
}

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
            _ => return None,
        };
        Some((segment("vm", vm).ok()?, record))
    }

    /// Persisted state of `host`'s agent.
    pub fn agent_state(&self, host: &str) -> Result<String, LayoutError> {
        Ok(format!(
            "{}agents/{}/state",
            self.root,
            segment("host", host)?
        ))
    }

    /// Prefix of the event log.
    pub fn events_prefix(&self) -> String {
        format!("{}events/", self.root)
    }

    /// Key of event number `seq` (zero-padded to 20 digits, so key order is number order).
    pub fn event(&self, seq: u64) -> String {
        format!("{}{seq:020}", self.events_prefix())
    }

    /// The sequence number of an event key, if `key` is one.
    pub fn parse_event(&self, key: &str) -> Option<u64> {
        let digits = key.strip_prefix(&self.root)?.strip_prefix("events/")?;
        if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
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
        assert_eq!(l.event(42), "/vmha/prod/events/00000000000000000042");
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
        assert_eq!(l.parse_event(&l.event(u64::MAX)), Some(u64::MAX));
        assert_eq!(l.parse_event("/vmha/prod/events/12"), None);
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
