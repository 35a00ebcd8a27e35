//! Turns the raw file schema into a [`Config`], applying defaults and checking every rule.
//! This is the only way to build a `Config`.

use std::collections::{BTreeMap, HashMap};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::config::*;
use crate::defaults as d;
use crate::error::{ConfigError, ErrorKind, Source};
use crate::name::Name;
use crate::raw::*;

impl Config {
    /// Parses and checks a configuration. `file` is only used in error messages.
    pub fn from_toml_str(text: &str, file: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str_for(text, file, Drivers::ALL)
    }

    /// Parses and checks a configuration for a build that includes only the `drivers` given:
    /// a VM using another driver is an error ([`ErrorKind::Unsupported`]) at its `driver` key,
    /// with a hint naming the cargo feature that includes it.
    pub fn from_toml_str_for(
        text: &str,
        file: &str,
        drivers: Drivers,
    ) -> Result<Config, ConfigError> {
        let src = Source { file, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
        Resolver { src: &src, drivers }.config(raw)
    }

    /// Reads (see [`crate::file::read_text`]: a regular UTF-8 file of bounded size), parses
    /// and checks a configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = crate::file::read_text(path)?;
        Config::from_toml_str(&text, &path.display().to_string())
    }
}

/// The hypervisor drivers a build includes (`qemu` always).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drivers {
    /// The `libvirt` driver (cargo feature `libvirt` of vmhad and vmha).
    pub libvirt: bool,
}

impl Drivers {
    /// Every driver: what the configuration language allows.
    pub const ALL: Drivers = Drivers { libvirt: true };
}

struct Resolver<'a> {
    src: &'a Source<'a>,
    drivers: Drivers,
}

type R<T> = Result<T, ConfigError>;

impl Resolver<'_> {
    fn err(
        &self,
        span: Range<usize>,
        kind: ErrorKind,
        msg: String,
        hint: Option<String>,
    ) -> ConfigError {
        self.src.error(span, kind, msg, hint)
    }

    fn duration(
        &self,
        key: &str,
        value: Option<Spanned<DurationValue>>,
        default: Duration,
        range: RangeInclusive<Duration>,
    ) -> R<Duration> {
        let Some(v) = value else { return Ok(default) };
        crate::range::check_duration(key, v.get_ref().0, &range)
            .map_err(|e| self.out_of_range(v.span(), &e))
    }

    /// The diagnostic of a value outside its range: the value in the message, the range in
    /// the hint.
    fn out_of_range(&self, span: Range<usize>, e: &crate::range::OutOfRange) -> ConfigError {
        self.err(
            span,
            ErrorKind::OutOfRange,
            format!("`{}` = {} is out of range", e.key, e.value),
            Some(format!("allowed: {}", e.allowed)),
        )
    }

    fn integer(
        &self,
        key: &str,
        value: Option<Spanned<i64>>,
        default: u64,
        range: RangeInclusive<u64>,
    ) -> R<u64> {
        let Some(v) = value else { return Ok(default) };
        // A negative number is checked as an i128 so that the message shows it as written.
        let n = i128::from(*v.get_ref());
        let wide = i128::from(*range.start())..=i128::from(*range.end());
        crate::range::check_number(key, n, &wide)
            .map_err(|e| self.out_of_range(v.span(), &e))
            .map(|n| u64::try_from(n).unwrap_or(u64::MAX))
    }

    fn integer_u32(
        &self,
        key: &str,
        value: Option<Spanned<i64>>,
        default: u32,
        range: RangeInclusive<u32>,
    ) -> R<u32> {
        let wide = (*range.start()).into()..=(*range.end()).into();
        let n = self.integer(key, value, default.into(), wide)?;
        // In range of a u32 range, so it fits.
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Rejects a repeated name among `names` (what: "host", "VM", "app of VM db01", …).
    fn unique(&self, what: &str, scope: &str, names: &[&Spanned<Name>]) -> R<()> {
        let mut seen: HashMap<&str, ()> = HashMap::new();
        for n in names {
            if seen.insert(n.get_ref().as_str(), ()).is_some() {
                return Err(self.err(
                    n.span(),
                    ErrorKind::DuplicateName,
                    format!("duplicate {what} name `{}`{scope}", n.get_ref()),
                    Some(format!("each {what} needs its own name")),
                ));
            }
        }
        Ok(())
    }

    fn config(&self, raw: RawConfig) -> R<Config> {
        let cluster = self.cluster(raw.cluster)?;
        if raw.host.is_empty() {
            let start = self.src.first_content_offset();
            return Err(self.err(
                start..start,
                ErrorKind::Empty,
                "the configuration declares no host".into(),
                Some("add at least one [[host]] table with a `name`".into()),
            ));
        }
        self.unique(
            "host",
            "",
            &raw.host
                .iter()
                .map(|h| &h.get_ref().name)
                .collect::<Vec<_>>(),
        )?;
        if let (Store::Embedded, Some(second)) = (&cluster.store, raw.host.get(1)) {
            let second = &second.get_ref().name;
            return Err(self.err(
                second.span(),
                ErrorKind::Conflict,
                format!(
                    "host `{}` is a second host, but store = \"embedded\" serves a single host",
                    second.get_ref()
                ),
                Some(
                    "for a multi-host cluster set store = \"etcd\" with `endpoints` in [cluster]"
                        .into(),
                ),
            ));
        }
        let hosts = raw
            .host
            .into_iter()
            .map(|h| self.host(h.into_inner(), &cluster.store))
            .collect::<R<Vec<_>>>()?;
        let api = self.api(raw.api)?;
        self.unique(
            "VM",
            "",
            &raw.vm.iter().map(|v| &v.get_ref().name).collect::<Vec<_>>(),
        )?;
        let vm_names: Vec<String> = raw
            .vm
            .iter()
            .map(|v| v.get_ref().name.get_ref().to_string())
            .collect();
        let host_names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        let host_memory: HashMap<&str, Option<u64>> = hosts
            .iter()
            .map(|h| (h.name.as_str(), h.memory_mb))
            .collect();
        // VM-level requires: references, then cycles.
        let mut vm_edges: BTreeMap<String, Vec<Spanned<Name>>> = BTreeMap::new();
        for v in &raw.vm {
            let v = v.get_ref();
            self.references(
                "VM",
                &format!(" in `requires` of VM `{}`", v.name.get_ref()),
                &v.requires,
                &vm_names.iter().map(String::as_str).collect::<Vec<_>>(),
                "VM-level `requires` names other VMs",
            )?;
            vm_edges.insert(v.name.get_ref().to_string(), v.requires.clone());
        }
        self.acyclic("VM", &vm_edges)?;
        let vms = raw
            .vm
            .into_iter()
            .map(|v| self.vm(v, &host_names, &host_memory, cluster.migrate))
            .collect::<R<Vec<_>>>()?;
        Ok(Config {
            cluster,
            hosts,
            api,
            vms,
        })
    }

    fn cluster(&self, raw: Spanned<RawCluster>) -> R<Cluster> {
        let span = raw.span();
        let raw = raw.into_inner();
        let kind = raw
            .store
            .as_ref()
            .map_or(StoreKind::Embedded, |s| *s.get_ref());
        let store = match kind {
            StoreKind::Embedded => {
                for (key, present) in [
                    ("endpoints", raw.endpoints.as_ref().map(Spanned::span)),
                    ("ttl", raw.ttl.as_ref().map(Spanned::span)),
                    ("fence_margin", raw.fence_margin.as_ref().map(Spanned::span)),
                    ("startup_wait", raw.startup_wait.as_ref().map(Spanned::span)),
                ] {
                    if let Some(s) = present {
                        return Err(self.err(
                            s,
                            ErrorKind::Conflict,
                            format!("`{key}` only applies to store = \"etcd\""),
                            Some("remove it, or set store = \"etcd\"".into()),
                        ));
                    }
                }
                Store::Embedded
            }
            StoreKind::Etcd => {
                let Some(endpoints) = raw.endpoints else {
                    return Err(self.err(
                        raw.store.map_or(span, |s| s.span()),
                        ErrorKind::Missing,
                        "store = \"etcd\" needs `endpoints`".into(),
                        Some("e.g. endpoints = [\"http://10.0.0.1:2379\"]".into()),
                    ));
                };
                if endpoints.get_ref().is_empty() {
                    return Err(self.err(
                        endpoints.span(),
                        ErrorKind::Empty,
                        "`endpoints` is empty".into(),
                        Some("list at least one etcd client URL".into()),
                    ));
                }
                let mut urls = Vec::new();
                for e in endpoints.into_inner() {
                    let url = e.get_ref();
                    let rest = url
                        .strip_prefix("http://")
                        .or_else(|| url.strip_prefix("https://"));
                    if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                        return Err(self.err(
                            e.span(),
                            ErrorKind::BadValue,
                            format!("`endpoints` entry \"{url}\" is not an http(s) URL"),
                            Some("write it as \"http://HOST:2379\"".into()),
                        ));
                    }
                    urls.push(e.into_inner());
                }
                let ttl = self.duration("ttl", raw.ttl, d::TTL, d::TTL_RANGE)?;
                let margin_span = raw.fence_margin.as_ref().map(Spanned::span);
                let fence_margin = self.duration(
                    "fence_margin",
                    raw.fence_margin,
                    d::FENCE_MARGIN,
                    d::FENCE_MARGIN_RANGE,
                )?;
                if fence_margin >= ttl {
                    return Err(self.err(
                        margin_span.unwrap_or(span),
                        ErrorKind::OutOfRange,
                        format!(
                            "`fence_margin` ({}) must be shorter than `ttl` ({})",
                            crate::duration::format(fence_margin),
                            crate::duration::format(ttl)
                        ),
                        Some(
                            "a host fences itself `ttl - fence_margin` after its last renewal"
                                .into(),
                        ),
                    ));
                }
                let startup_wait = self.duration(
                    "startup_wait",
                    raw.startup_wait,
                    d::STARTUP_WAIT,
                    d::STARTUP_WAIT_RANGE,
                )?;
                Store::Etcd {
                    endpoints: urls,
                    ttl,
                    fence_margin,
                    startup_wait,
                }
            }
        };
        Ok(Cluster {
            name: raw.name.into_inner(),
            store,
            state_dir: self.opt_path("state_dir", raw.state_dir, d::STATE_DIR)?,
            runtime_dir: self.opt_path("runtime_dir", raw.runtime_dir, d::RUNTIME_DIR)?,
            migrate: raw.migrate.unwrap_or(d::MIGRATE),
        })
    }

    fn host(&self, raw: RawHost, store: &Store) -> R<Host> {
        let memory_mb = match raw.memory_mb {
            None => None,
            Some(m) => Some(self.integer("memory_mb", Some(m), 0, d::HOST_MEMORY_MB_RANGE)?),
        };
        let name = raw.name.into_inner();
        let (watchdog, watchdog_timeout) =
            self.watchdog(&name, raw.watchdog, raw.watchdog_timeout, store)?;
        Ok(Host {
            name,
            address: raw.address,
            memory_mb,
            watchdog,
            watchdog_timeout,
        })
    }

    /// A host's hardware watchdog: an absolute device path, and a timeout that on etcd resets a
    /// hung daemon's host before its lease can expire (so before other hosts start its VMs).
    fn watchdog(
        &self,
        host: &Name,
        device: Option<Spanned<PathBuf>>,
        timeout: Option<Spanned<DurationValue>>,
        store: &Store,
    ) -> R<(Option<PathBuf>, Duration)> {
        let Some(device) = device else {
            if let Some(t) = timeout {
                return Err(self.err(
                    t.span(),
                    ErrorKind::Conflict,
                    format!("`watchdog_timeout` needs `watchdog` (host `{host}` has no watchdog)"),
                    Some(
                        "add watchdog = \"/dev/watchdog\" to this host, or remove watchdog_timeout"
                            .into(),
                    ),
                ));
            }
            return Ok((None, d::WATCHDOG_TIMEOUT));
        };
        if !device.get_ref().is_absolute() {
            return Err(self.err(
                device.span(),
                ErrorKind::BadValue,
                format!(
                    "`watchdog` = \"{}\" is not an absolute path",
                    device.get_ref().display()
                ),
                Some(
                    "give the watchdog device's full path, e.g. watchdog = \"/dev/watchdog\""
                        .into(),
                ),
            ));
        }
        // Where a relation error points: the timeout when written, else the device (the
        // default timeout applies).
        let span = timeout
            .as_ref()
            .map_or_else(|| device.span(), Spanned::span);
        let written = timeout.is_some();
        let timeout = self.duration(
            "watchdog_timeout",
            timeout,
            d::WATCHDOG_TIMEOUT,
            d::WATCHDOG_TIMEOUT_RANGE,
        )?;
        if let Store::Etcd {
            ttl, fence_margin, ..
        } = store
        {
            // `fence_margin < ttl` was checked with [cluster].
            let limit = ttl.saturating_sub(*fence_margin);
            if timeout >= limit {
                let f = crate::duration::format;
                let raise = format!(
                    "raise `ttl` in [cluster] above {} (watchdog_timeout + fence_margin)",
                    f(timeout + *fence_margin)
                );
                let fix = if limit > *d::WATCHDOG_TIMEOUT_RANGE.start() {
                    format!("set watchdog_timeout below {}, or {raise}", f(limit))
                } else {
                    raise
                };
                return Err(self.err(
                    span,
                    ErrorKind::OutOfRange,
                    format!(
                        "`watchdog_timeout` of host `{host}` ({}{}) must be shorter than `ttl - fence_margin` ({} - {} = {})",
                        f(timeout),
                        if written { "" } else { ", the default" },
                        f(*ttl),
                        f(*fence_margin),
                        f(limit)
                    ),
                    Some(format!(
                        "a hung vmhad cannot fence itself: the watchdog resets its host `watchdog_timeout` after the last feed, and that must happen before its lease expires and other hosts start its VMs; {fix}"
                    )),
                ));
            }
        }
        Ok((Some(device.into_inner()), timeout))
    }

    fn api(&self, raw: Option<RawApi>) -> R<ApiConfig> {
        let Some(raw) = raw else {
            return Ok(ApiConfig::default());
        };
        let mut listen = Vec::new();
        for l in raw.listen {
            if l.get_ref().parse::<std::net::SocketAddr>().is_err() {
                return Err(self.err(
                    l.span(),
                    ErrorKind::BadValue,
                    format!(
                        "`listen` entry \"{}\" is not an IP:port address",
                        l.get_ref()
                    ),
                    Some("e.g. listen = [\"127.0.0.1:7070\"]".into()),
                ));
            }
            listen.push(l.into_inner());
        }
        self.unique(
            "API token",
            "",
            &raw.token
                .iter()
                .map(|t| &t.get_ref().name)
                .collect::<Vec<_>>(),
        )?;
        let tokens = raw
            .token
            .into_iter()
            .map(|t| {
                let t = t.into_inner();
                Ok(ApiToken {
                    name: t.name.into_inner(),
                    role: t.role,
                    secret_file: self.path("secret_file", t.secret_file)?,
                })
            })
            .collect::<R<Vec<_>>>()?;
        let (tls_cert, tls_key) = match (raw.tls_cert, raw.tls_key) {
            (Some(cert), Some(key)) => (
                Some(self.path("tls_cert", cert)?),
                Some(self.path("tls_key", key)?),
            ),
            (None, None) => (None, None),
            (Some(one), None) | (None, Some(one)) => {
                return Err(self.err(
                    one.span(),
                    ErrorKind::BadValue,
                    "`tls_cert` and `tls_key` go together: set both or neither".into(),
                    Some(
                        "tls_cert = \"/etc/vmha/api.crt\"\ntls_key = \"/etc/vmha/api.key\"".into(),
                    ),
                ));
            }
        };
        Ok(ApiConfig {
            listen,
            tokens,
            tls_cert,
            tls_key,
        })
    }

    /// Rejects a name in `refs` that is not in `known` (`what` names the kind, `scope` where).
    fn references(
        &self,
        what: &str,
        scope: &str,
        refs: &[Spanned<Name>],
        known: &[&str],
        hint: &str,
    ) -> R<()> {
        for r in refs {
            if !known.contains(&r.get_ref().as_str()) {
                let suggestion = crate::error::suggest(r.get_ref().as_str(), known)
                    .map(|s| format!("did you mean `{s}`? "))
                    .unwrap_or_default();
                return Err(self.err(
                    r.span(),
                    ErrorKind::UnknownReference,
                    format!("unknown {what} `{}`{scope}", r.get_ref()),
                    Some(format!(
                        "{suggestion}{hint}; known: {}",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    )),
                ));
            }
        }
        Ok(())
    }

    /// Rejects a cycle in `edges` (name → required names), printing it.
    fn acyclic(&self, what: &str, edges: &BTreeMap<String, Vec<Spanned<Name>>>) -> R<()> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Active,
            Done,
        }
        let mut marks: HashMap<&str, Mark> =
            edges.keys().map(|k| (k.as_str(), Mark::New)).collect();
        // Iterative DFS keeping the path so a found cycle can be printed.
        for start in edges.keys() {
            if marks.get(start.as_str()) != Some(&Mark::New) {
                continue;
            }
            let mut path: Vec<(&str, usize)> = vec![(start.as_str(), 0)];
            marks.insert(start, Mark::Active);
            while let Some((node, idx)) = path.last().copied() {
                let next = edges.get(node).and_then(|v| v.get(idx));
                let Some(next) = next else {
                    marks.insert(node, Mark::Done);
                    path.pop();
                    continue;
                };
                if let Some(top) = path.last_mut() {
                    top.1 += 1;
                }
                let n = next.get_ref().as_str();
                match marks.get(n).copied() {
                    Some(Mark::Active) => {
                        let from = path.iter().position(|(p, _)| *p == n).unwrap_or(0);
                        let mut cycle: Vec<&str> = path[from..].iter().map(|(p, _)| *p).collect();
                        cycle.push(n);
                        return Err(self.err(
                            next.span(),
                            ErrorKind::Cycle,
                            format!("`requires` cycle between {what}s: {}", cycle.join(" → ")),
                            Some("remove one of these `requires` entries".into()),
                        ));
                    }
                    Some(Mark::New) => {
                        marks.insert(n, Mark::Active);
                        path.push((n, 0));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn vm(
        &self,
        raw: Spanned<RawVm>,
        host_names: &[&str],
        host_memory: &HashMap<&str, Option<u64>>,
        migrate_default: bool,
    ) -> R<Vm> {
        let span = raw.span();
        let raw = raw.into_inner();
        let vm_name = raw.name.get_ref().clone();
        if raw.hosts.get_ref().is_empty() {
            return Err(self.err(
                raw.hosts.span(),
                ErrorKind::Empty,
                format!("VM `{vm_name}` has an empty `hosts` list"),
                Some(format!(
                    "list the hosts it may run on, e.g. hosts = [\"{}\"]",
                    host_names.first().copied().unwrap_or("kvm1")
                )),
            ));
        }
        self.references(
            "host",
            &format!(" in `hosts` of VM `{vm_name}`"),
            raw.hosts.get_ref(),
            host_names,
            "`hosts` names [[host]] entries",
        )?;
        self.unique(
            "host",
            &format!(" in `hosts` of VM `{vm_name}`"),
            &raw.hosts.get_ref().iter().collect::<Vec<_>>(),
        )?;
        let memory_span = raw.qemu.as_ref().map(|q| {
            q.get_ref()
                .memory_mb
                .as_ref()
                .map_or_else(|| q.span(), Spanned::span)
        });
        let driver_span = raw.driver.as_ref().map_or(span.clone(), Spanned::span);
        let driver = self.driver(&vm_name, span.clone(), raw.driver, raw.qemu, raw.libvirt)?;
        self.fits_somewhere(
            &vm_name,
            &driver,
            memory_span,
            raw.hosts.get_ref(),
            host_memory,
        )?;
        let shared_storage = raw.shared_storage.unwrap_or(d::SHARED_STORAGE);
        self.migratable(&vm_name, &driver, raw.migrate.as_ref(), shared_storage)?;
        // Last of the VM's own checks: a configuration is first made right, then a build found.
        self.included(&vm_name, &driver, driver_span)?;
        self.unique(
            "app",
            &format!(" in VM `{vm_name}`"),
            &raw.app
                .iter()
                .map(|a| &a.get_ref().name)
                .collect::<Vec<_>>(),
        )?;
        let app_names: Vec<String> = raw
            .app
            .iter()
            .map(|a| a.get_ref().name.get_ref().to_string())
            .collect();
        let app_refs: Vec<&str> = app_names.iter().map(String::as_str).collect();
        let mut edges = BTreeMap::new();
        for a in &raw.app {
            let a = a.get_ref();
            self.references(
                "app",
                &format!(" in `requires` of app `{vm_name}/{}`", a.name.get_ref()),
                &a.requires,
                &app_refs,
                "an app can only require apps of its own VM",
            )?;
            if let Some(me) = a.requires.iter().find(|r| r.get_ref() == a.name.get_ref()) {
                return Err(self.err(
                    me.span(),
                    ErrorKind::Cycle,
                    format!(
                        "`requires` cycle between apps: app `{}` requires itself",
                        a.name.get_ref()
                    ),
                    Some("remove it from its own `requires`".into()),
                ));
            }
            edges.insert(a.name.get_ref().to_string(), a.requires.clone());
        }
        self.acyclic("app", &edges)?;
        let policy = raw.policy.as_ref().map_or(d::POLICY, |p| *p.get_ref());
        if let Some(p) = raw
            .policy
            .as_ref()
            .filter(|p| *p.get_ref() == Policy::Critical)
        {
            let any_critical = raw
                .app
                .iter()
                .any(|a| a.get_ref().critical.unwrap_or(d::APP_CRITICAL));
            if !raw.app.is_empty() && !any_critical {
                return Err(self.err(
                    p.span(),
                    ErrorKind::Conflict,
                    format!(
                        "VM `{vm_name}` uses policy = \"critical\" but none of its apps has `critical = true`"
                    ),
                    Some(
                        "mark the apps whose failure justifies a VM restart with critical = true, or choose another policy"
                            .into(),
                    ),
                ));
            }
        }
        let apps = raw
            .app
            .into_iter()
            .map(|a| self.app(a.into_inner()))
            .collect::<R<Vec<_>>>()?;
        Ok(Vm {
            name: raw.name.into_inner(),
            hosts: raw
                .hosts
                .into_inner()
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            policy,
            tie: raw.tie.unwrap_or(d::TIE),
            vm_restart_limit: self.integer_u32(
                "vm_restart_limit",
                raw.vm_restart_limit,
                d::VM_RESTART_LIMIT,
                d::VM_RESTART_LIMIT_RANGE,
            )?,
            vm_restart_window: self.duration(
                "vm_restart_window",
                raw.vm_restart_window,
                d::VM_RESTART_WINDOW,
                d::VM_RESTART_WINDOW_RANGE,
            )?,
            stop_timeout: self.duration(
                "stop_timeout",
                raw.stop_timeout,
                d::STOP_TIMEOUT,
                d::STOP_TIMEOUT_RANGE,
            )?,
            guest_timeout: self.duration(
                "guest_timeout",
                raw.guest_timeout,
                d::GUEST_TIMEOUT,
                d::GUEST_TIMEOUT_RANGE,
            )?,
            boot_timeout: self.duration(
                "boot_timeout",
                raw.boot_timeout,
                d::BOOT_TIMEOUT,
                d::BOOT_TIMEOUT_RANGE,
            )?,
            on_guest_loss: raw.on_guest_loss.unwrap_or(d::ON_GUEST_LOSS),
            placement: raw.placement.unwrap_or(d::PLACEMENT),
            failback: raw.failback.unwrap_or(d::FAILBACK),
            migrate: raw
                .migrate
                .as_ref()
                .map_or(migrate_default, |m| *m.get_ref()),
            shared_storage,
            watch: raw.watch.unwrap_or(d::VM_WATCH),
            watch_period: self.duration(
                "watch_period",
                raw.watch_period,
                d::VM_WATCH_PERIOD,
                d::VM_WATCH_PERIOD_RANGE,
            )?,
            requires: raw.requires.into_iter().map(Spanned::into_inner).collect(),
            driver,
            apps,
        })
    }

    /// Rejects a VM that asks for `migrate = true` itself while it cannot be migrated live: a
    /// `libvirt` VM (not supported), or disks not declared on shared storage (a migration
    /// would leave the target reading its own, different copy). The cluster-wide default does
    /// not make such VMs an error: they are simply stopped and started elsewhere.
    fn migratable(
        &self,
        vm: &Name,
        driver: &Driver,
        migrate: Option<&Spanned<bool>>,
        shared_storage: bool,
    ) -> R<()> {
        let Some(m) = migrate.filter(|m| *m.get_ref()) else {
            return Ok(());
        };
        match driver {
            Driver::Libvirt(_) => Err(self.err(
                m.span(),
                ErrorKind::Conflict,
                format!("VM `{vm}` sets migrate = true, but live migration needs driver = \"qemu\""),
                Some("remove `migrate`, or run the VM with the qemu driver".into()),
            )),
            Driver::Qemu(q) if !q.disks.is_empty() && !shared_storage => Err(self.err(
                m.span(),
                ErrorKind::Conflict,
                format!(
                    "VM `{vm}` sets migrate = true, but its disks are not declared on shared storage"
                ),
                Some(
                    "set shared_storage = true if every acceptable host sees the same disk images (NFS, SAN, Ceph); otherwise remove `migrate`"
                        .into(),
                ),
            )),
            Driver::Qemu(_) => Ok(()),
        }
    }

    /// Rejects a VM that needs more memory than every acceptable host declares: it could never
    /// be placed. Hosts without `memory_mb` report theirs at run time and always count as fitting.
    fn fits_somewhere(
        &self,
        vm: &Name,
        driver: &Driver,
        memory_span: Option<Range<usize>>,
        hosts: &[Spanned<Name>],
        host_memory: &HashMap<&str, Option<u64>>,
    ) -> R<()> {
        let (Driver::Qemu(q), Some(span)) = (driver, memory_span) else {
            return Ok(());
        };
        // `None` as soon as one acceptable host does not declare its memory.
        let largest = hosts
            .iter()
            .map(|h| host_memory.get(h.get_ref().as_str()).copied().flatten())
            .collect::<Option<Vec<u64>>>()
            .and_then(|declared| declared.into_iter().max());
        match largest {
            Some(largest) if q.memory_mb > largest => {
                Err(self.err(
                    span,
                    ErrorKind::OutOfRange,
                    format!(
                        "VM `{vm}` needs `memory_mb` = {} but its largest acceptable host has {largest}",
                        q.memory_mb
                    ),
                    Some("lower memory_mb, or add a larger host to `hosts`".into()),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Refuses a VM whose driver this build does not include ([`ErrorKind::Unsupported`], at
    /// its `driver` key), with the way to get a build that does.
    fn included(&self, vm: &Name, driver: &Driver, kind_span: Range<usize>) -> R<()> {
        if matches!(driver, Driver::Libvirt(_)) && !self.drivers.libvirt {
            return Err(self.err(
                kind_span,
                ErrorKind::Unsupported,
                format!("VM `{vm}` uses driver \"libvirt\", which this build does not include"),
                Some(
                    "build vmha and vmhad with `cargo build --features libvirt` \
                     (needs libvirt-dev and pkg-config), or use driver = \"qemu\""
                        .into(),
                ),
            ));
        }
        Ok(())
    }

    fn driver(
        &self,
        vm: &Name,
        span: Range<usize>,
        kind: Option<Spanned<DriverKind>>,
        qemu: Option<Spanned<RawQemu>>,
        libvirt: Option<Spanned<RawLibvirt>>,
    ) -> R<Driver> {
        let kind_span = kind.as_ref().map_or(span.clone(), Spanned::span);
        let kind = match (kind.map(Spanned::into_inner), &qemu, &libvirt) {
            (Some(k), _, _) => k,
            (None, Some(_), None) => DriverKind::Qemu,
            (None, None, Some(_)) => DriverKind::Libvirt,
            _ => {
                return Err(self.err(
                    span,
                    ErrorKind::Missing,
                    format!("VM `{vm}` has no `driver`"),
                    Some(
                        "set driver = \"qemu\" with a [vm.qemu] table, or driver = \"libvirt\""
                            .into(),
                    ),
                ));
            }
        };
        match kind {
            DriverKind::Qemu => {
                if let Some(l) = libvirt {
                    return Err(self.err(
                        l.span(),
                        ErrorKind::Conflict,
                        format!("VM `{vm}` uses driver \"qemu\" but has a [vm.libvirt] table"),
                        Some("remove [vm.libvirt] or set driver = \"libvirt\"".into()),
                    ));
                }
                let Some(q) = qemu else {
                    return Err(self.err(
                        kind_span,
                        ErrorKind::Missing,
                        format!("VM `{vm}` uses driver \"qemu\" but has no [vm.qemu] table"),
                        Some("add [vm.qemu] with memory_mb, cpus and a disk or kernel".into()),
                    ));
                };
                Ok(Driver::Qemu(self.qemu(q)?))
            }
            DriverKind::Libvirt => {
                if let Some(q) = qemu {
                    return Err(self.err(
                        q.span(),
                        ErrorKind::Conflict,
                        format!("VM `{vm}` uses driver \"libvirt\" but has a [vm.qemu] table"),
                        Some("remove [vm.qemu] or set driver = \"qemu\"".into()),
                    ));
                }
                let l = libvirt.map(Spanned::into_inner);
                Ok(Driver::Libvirt(LibvirtSpec {
                    domain: l
                        .as_ref()
                        .and_then(|l| l.domain.clone())
                        .unwrap_or_else(|| vm.to_string()),
                    uri: l
                        .as_ref()
                        .and_then(|l| l.uri.clone())
                        .unwrap_or_else(|| d::LIBVIRT_URI.to_string()),
                    xml: l.and_then(|l| l.xml),
                }))
            }
        }
    }

    fn qemu(&self, raw: Spanned<RawQemu>) -> R<QemuSpec> {
        let span = raw.span();
        let raw = raw.into_inner();
        let disks = match (raw.disk, raw.disks) {
            (Some(one), Some(_)) => {
                return Err(self.err(
                    one.span(),
                    ErrorKind::Conflict,
                    "use either `disk` or `disks`, not both".into(),
                    Some("`disk = \"path\"` is shorthand for one qcow2 disk".into()),
                ));
            }
            (Some(one), None) => vec![QemuDisk {
                path: self.path("disk", one)?,
                format: d::DISK_FORMAT,
                cache: d::DISK_CACHE,
            }],
            (None, Some(many)) => many
                .into_inner()
                .into_iter()
                .map(|disk| {
                    let disk = disk.into_inner();
                    Ok(QemuDisk {
                        path: self.path("path", disk.path)?,
                        format: disk.format.unwrap_or(d::DISK_FORMAT),
                        cache: disk.cache.unwrap_or(d::DISK_CACHE),
                    })
                })
                .collect::<R<Vec<_>>>()?,
            (None, None) => Vec::new(),
        };
        if raw.kernel.is_none() {
            for (key, s) in [
                ("initrd", raw.initrd.as_ref().map(Spanned::span)),
                ("append", raw.append.as_ref().map(Spanned::span)),
            ] {
                if let Some(s) = s {
                    return Err(self.err(
                        s,
                        ErrorKind::Conflict,
                        format!("`{key}` needs `kernel`"),
                        Some("add kernel = \"/path/to/vmlinuz\" or remove it".into()),
                    ));
                }
            }
            if disks.is_empty() {
                return Err(self.err(
                    span,
                    ErrorKind::Missing,
                    "[vm.qemu] has nothing to boot: no `disk`, `disks` or `kernel`".into(),
                    Some("add disk = \"/path/to/image.qcow2\"".into()),
                ));
            }
        }
        Ok(QemuSpec {
            memory_mb: self.integer(
                "memory_mb",
                raw.memory_mb,
                d::QEMU_MEMORY_MB,
                d::QEMU_MEMORY_MB_RANGE,
            )?,
            cpus: self.integer_u32("cpus", raw.cpus, d::QEMU_CPUS, d::QEMU_CPUS_RANGE)?,
            accel: raw.accel.unwrap_or(d::QEMU_ACCEL),
            kernel: raw.kernel.map(|k| self.path("kernel", k)).transpose()?,
            initrd: raw.initrd.map(|i| self.path("initrd", i)).transpose()?,
            append: raw.append.map(Spanned::into_inner),
            extra_args: raw.extra_args,
            emulator: raw.emulator.map(|e| self.path("emulator", e)).transpose()?,
            disks,
        })
    }

    /// An absolute path: vmhad's working directory is `/`, so relative paths would silently
    /// point somewhere else than the author meant.
    fn path(&self, key: &str, v: Spanned<PathBuf>) -> R<PathBuf> {
        if !v.get_ref().is_absolute() {
            return Err(self.err(
                v.span(),
                ErrorKind::BadValue,
                format!(
                    "`{key}` = \"{}\" is not an absolute path",
                    v.get_ref().display()
                ),
                Some("write the full path, starting with `/`".into()),
            ));
        }
        Ok(v.into_inner())
    }

    fn opt_path(&self, key: &str, v: Option<Spanned<PathBuf>>, default: &str) -> R<PathBuf> {
        v.map_or_else(|| Ok(PathBuf::from(default)), |v| self.path(key, v))
    }

    fn argv(&self, key: &str, app: &Name, v: Spanned<Vec<String>>) -> R<Vec<String>> {
        if v.get_ref().first().is_none_or(String::is_empty) {
            return Err(self.err(
                v.span(),
                ErrorKind::Empty,
                format!("`{key}` of app `{app}` is empty"),
                Some("give the command as an argv list, e.g. [\"systemctl\", \"is-active\", \"--quiet\", \"nginx\"]".into()),
            ));
        }
        Ok(v.into_inner())
    }

    /// An app's `pid_file`: an absolute path of at most [`d::APP_PID_FILE_MAX`] bytes,
    /// without control characters.
    fn pid_file(&self, app: &Name, v: Spanned<String>) -> R<String> {
        let path = v.get_ref();
        let problem = if !path.starts_with('/') {
            Some("is not an absolute path")
        } else if path.len() > d::APP_PID_FILE_MAX {
            Some("is longer than 1024 bytes")
        } else if path.chars().any(char::is_control) {
            Some("contains a control character")
        } else {
            None
        };
        match problem {
            Some(p) => Err(self.err(
                v.span(),
                ErrorKind::BadValue,
                format!("`pid_file` of app `{app}` {p}"),
                Some(
                    "the guest path of the file holding the app's pid, e.g. \"/run/nginx.pid\""
                        .into(),
                ),
            )),
            None => Ok(v.into_inner()),
        }
    }

    /// An app's `process`: 1 to [`d::APP_PROCESS_MAX`] bytes, no `/`, space or control
    /// character (a process name as the kernel keeps it).
    fn process(&self, app: &Name, v: Spanned<String>) -> R<String> {
        let name = v.get_ref();
        let problem = if name.is_empty() {
            Some("is empty")
        } else if name.len() > d::APP_PROCESS_MAX {
            Some("is longer than 15 bytes (the kernel keeps 15)")
        } else if name
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
        {
            Some("contains `/`, a space or a control character")
        } else {
            None
        };
        match problem {
            Some(p) => Err(self.err(
                v.span(),
                ErrorKind::BadValue,
                format!("`process` of app `{app}` {p}"),
                Some("the process name as `pidof` finds it, e.g. \"nginx\"".into()),
            )),
            None => Ok(v.into_inner()),
        }
    }

    fn app(&self, raw: RawApp) -> R<App> {
        let name = raw.name.into_inner();
        if let (Some(_), Some(process)) = (&raw.pid_file, &raw.process) {
            return Err(self.err(
                process.span(),
                ErrorKind::Conflict,
                format!("app `{name}` has both `pid_file` and `process`"),
                Some("name its process one way: `pid_file` (preferred: exact) or `process`".into()),
            ));
        }
        let pid_file = raw.pid_file.map(|v| self.pid_file(&name, v)).transpose()?;
        let process = raw.process.map(|v| self.process(&name, v)).transpose()?;
        let interval = self.duration(
            "interval",
            raw.interval,
            d::APP_INTERVAL,
            d::APP_INTERVAL_RANGE,
        )?;
        let timeout =
            self.duration("timeout", raw.timeout, d::APP_TIMEOUT, d::APP_TIMEOUT_RANGE)?;
        Ok(App {
            priority: self.integer_u32(
                "priority",
                raw.priority,
                d::APP_PRIORITY,
                d::APP_PRIORITY_RANGE,
            )?,
            check: self.argv("check", &name, raw.check)?,
            start: self.argv("start", &name, raw.start)?,
            stop: raw.stop.map(|s| self.argv("stop", &name, s)).transpose()?,
            interval,
            timeout,
            restart_limit: self.integer_u32(
                "restart_limit",
                raw.restart_limit,
                d::APP_RESTART_LIMIT,
                d::APP_RESTART_LIMIT_RANGE,
            )?,
            restart_window: self.duration(
                "restart_window",
                raw.restart_window,
                d::APP_RESTART_WINDOW,
                d::APP_RESTART_WINDOW_RANGE,
            )?,
            stable_after: self.duration(
                "stable_after",
                raw.stable_after,
                d::APP_STABLE_AFTER,
                d::APP_STABLE_AFTER_RANGE,
            )?,
            probe_failures: self.integer_u32(
                "probe_failures",
                raw.probe_failures,
                d::APP_PROBE_FAILURES,
                d::APP_PROBE_FAILURES_RANGE,
            )?,
            critical: raw.critical.unwrap_or(d::APP_CRITICAL),
            pid_file,
            process,
            requires: raw.requires.into_iter().map(Spanned::into_inner).collect(),
            name,
        })
    }
}
