//! The file schema as written by people: every key optional where a default exists, spans
//! kept for error messages. Only `resolve` turns it into a [`crate::Config`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{Accel, Cache, DiskFormat, OnGuestLoss, Placement, Policy, Tie, TokenRole};
use crate::name::Name;

/// A duration written as a string ("2s", "500ms").
#[derive(Debug, Clone, Copy)]
pub(crate) struct DurationValue(pub(crate) Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DurationValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration string with a unit, such as \"2s\" or \"500ms\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<DurationValue, E> {
                crate::duration::parse(s)
                    .map(DurationValue)
                    .map_err(|e| E::custom(format!("invalid duration \"{s}\": {e}")))
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) cluster: Spanned<RawCluster>,
    #[serde(default)]
    pub(crate) host: Vec<Spanned<RawHost>>,
    #[serde(default)]
    pub(crate) api: Option<RawApi>,
    #[serde(default)]
    pub(crate) vm: Vec<Spanned<RawVm>>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum StoreKind {
    Embedded,
    Etcd,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub(crate) name: Spanned<Name>,
    pub(crate) store: Option<Spanned<StoreKind>>,
    pub(crate) state_dir: Option<Spanned<PathBuf>>,
    pub(crate) runtime_dir: Option<Spanned<PathBuf>>,
    pub(crate) endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) ttl: Option<Spanned<DurationValue>>,
    pub(crate) fence_margin: Option<Spanned<DurationValue>>,
    pub(crate) startup_wait: Option<Spanned<DurationValue>>,
    pub(crate) migrate: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHost {
    pub(crate) name: Spanned<Name>,
    pub(crate) address: Option<String>,
    pub(crate) memory_mb: Option<Spanned<i64>>,
    pub(crate) watchdog: Option<Spanned<PathBuf>>,
    pub(crate) watchdog_timeout: Option<Spanned<DurationValue>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApi {
    #[serde(default)]
    pub(crate) listen: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) token: Vec<Spanned<RawToken>>,
    pub(crate) tls_cert: Option<Spanned<PathBuf>>,
    pub(crate) tls_key: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawToken {
    pub(crate) name: Spanned<Name>,
    pub(crate) role: TokenRole,
    pub(crate) secret_file: Spanned<PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum DriverKind {
    Qemu,
    Libvirt,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVm {
    pub(crate) name: Spanned<Name>,
    pub(crate) driver: Option<Spanned<DriverKind>>,
    pub(crate) hosts: Spanned<Vec<Spanned<Name>>>,
    pub(crate) policy: Option<Spanned<Policy>>,
    pub(crate) tie: Option<Tie>,
    pub(crate) vm_restart_limit: Option<Spanned<i64>>,
    pub(crate) vm_restart_window: Option<Spanned<DurationValue>>,
    pub(crate) stop_timeout: Option<Spanned<DurationValue>>,
    pub(crate) guest_timeout: Option<Spanned<DurationValue>>,
    pub(crate) boot_timeout: Option<Spanned<DurationValue>>,
    pub(crate) on_guest_loss: Option<OnGuestLoss>,
    pub(crate) placement: Option<Placement>,
    pub(crate) failback: Option<bool>,
    pub(crate) migrate: Option<Spanned<bool>>,
    pub(crate) shared_storage: Option<bool>,
    pub(crate) watch: Option<bool>,
    pub(crate) watch_period: Option<Spanned<DurationValue>>,
    #[serde(default)]
    pub(crate) requires: Vec<Spanned<Name>>,
    pub(crate) qemu: Option<Spanned<RawQemu>>,
    pub(crate) libvirt: Option<Spanned<RawLibvirt>>,
    #[serde(default)]
    pub(crate) app: Vec<Spanned<RawApp>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQemu {
    pub(crate) memory_mb: Option<Spanned<i64>>,
    pub(crate) cpus: Option<Spanned<i64>>,
    pub(crate) accel: Option<Accel>,
    pub(crate) kernel: Option<Spanned<PathBuf>>,
    pub(crate) initrd: Option<Spanned<PathBuf>>,
    pub(crate) append: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) extra_args: Vec<String>,
    pub(crate) emulator: Option<Spanned<PathBuf>>,
    pub(crate) disk: Option<Spanned<PathBuf>>,
    pub(crate) disks: Option<Spanned<Vec<Spanned<RawDisk>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDisk {
    pub(crate) path: Spanned<PathBuf>,
    pub(crate) format: Option<DiskFormat>,
    pub(crate) cache: Option<Cache>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLibvirt {
    pub(crate) domain: Option<String>,
    pub(crate) uri: Option<String>,
    pub(crate) xml: Option<std::path::PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApp {
    pub(crate) name: Spanned<Name>,
    pub(crate) priority: Option<Spanned<i64>>,
    pub(crate) check: Spanned<Vec<String>>,
    pub(crate) start: Spanned<Vec<String>>,
    pub(crate) stop: Option<Spanned<Vec<String>>>,
    pub(crate) interval: Option<Spanned<DurationValue>>,
    pub(crate) timeout: Option<Spanned<DurationValue>>,
    pub(crate) restart_limit: Option<Spanned<i64>>,
    pub(crate) restart_window: Option<Spanned<DurationValue>>,
    pub(crate) stable_after: Option<Spanned<DurationValue>>,
    pub(crate) probe_failures: Option<Spanned<i64>>,
    pub(crate) critical: Option<bool>,
    pub(crate) pid_file: Option<Spanned<String>>,
    pub(crate) process: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) requires: Vec<Spanned<Name>>,
}
