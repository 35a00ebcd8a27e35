//! Which `[[host]]` of the configuration this daemon is.

use vmha_model::{Config, Name};

/// Why no host could be selected.
#[derive(Debug, thiserror::Error)]
pub enum HostSelectError {
    /// `--host` names no `[[host]]`.
    #[error("--host {0}: no such [[host]] in the configuration (known: {1})")]
    Unknown(String, String),
    /// Several hosts and none matches the hostname.
    #[error("the configuration has several hosts ({0}); say which one this is with --host")]
    Ambiguous(String),
}

/// The explicit `--host`, else the only host, else the host named like this machine.
pub fn select(config: &Config, explicit: Option<&str>) -> Result<Name, HostSelectError> {
    let known = || {
        config
            .hosts
            .iter()
            .map(|h| h.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(name) = explicit {
        return config
            .host(name)
            .map(|h| h.name.clone())
            .ok_or_else(|| HostSelectError::Unknown(name.to_string(), known()));
    }
    if let [only] = config.hosts.as_slice() {
        return Ok(only.name.clone());
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    config
        .host(hostname.trim())
        .map(|h| h.name.clone())
        .ok_or_else(|| HostSelectError::Ambiguous(known()))
}
