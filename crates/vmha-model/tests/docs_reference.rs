//! `docs/config.md` documents every key the resolved configuration has, and every default it
//! states is the value the parser fills in (which comes from `defaults.rs`).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use vmha_model::Config;

/// A configuration setting only the keys without a default, so the rest resolve to defaults.
const MINIMAL: &str = r#"
[cluster]
name = "c"
store = "etcd"
endpoints = ["http://127.0.0.1:2379"]

[[host]]
name = "h1"

[[host]]
name = "h2"

[api]
token = [{ name = "t", role = "admin", secret_file = "/t" }]

[[vm]]
name = "q"
hosts = ["h1"]
[vm.qemu]
disks = [{ path = "/q.qcow2" }]
[[vm.app]]
name = "a"
check = ["true"]
start = ["true"]

[[vm]]
name = "l"
hosts = ["h2"]
driver = "libvirt"
"#;

/// A host with a watchdog: `watchdog_timeout` (default included) is only shown with `watchdog`.
/// Embedded, because on etcd the default `ttl` leaves no room for a watchdog timeout.
const WATCHDOG: &str = r#"
[cluster]
name = "c"

[[host]]
name = "h"
watchdog = "/dev/watchdog"
"#;

/// Rows of each `## ... \`[table]\`` section: key → default column.
fn documented() -> BTreeMap<String, BTreeMap<String, String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with('#') {
            current = line
                .split('`')
                .nth(1)
                .filter(|t| t.starts_with('['))
                .map(|t| t.trim_matches(|c| c == '[' || c == ']').to_string());
            continue;
        }
        let (Some(section), Some(row)) = (&current, line.strip_prefix("| `")) else {
            continue;
        };
        let cells: Vec<&str> = row.split(" | ").collect();
        let key = cells[0].trim_end_matches('`').to_string();
        let default = cells.get(2).unwrap().trim().to_string();
        sections
            .entry(section.clone())
            .or_default()
            .insert(key, default);
    }
    sections
}

/// How a JSON value of `show --json` is written in TOML (and in the docs' default column).
fn as_toml(v: &Value) -> String {
    match v {
        Value::Array(a) if a.is_empty() => "[]".into(),
        other => other.to_string(),
    }
}

#[test]
fn every_resolved_key_is_documented_with_its_default() {
    let c = Config::from_toml_str(MINIMAL, "<minimal>").unwrap_or_else(|e| panic!("{e}"));
    let v: Value = serde_json::from_str(&c.to_json()).unwrap();
    let w = Config::from_toml_str(WATCHDOG, "<watchdog>").unwrap_or_else(|e| panic!("{e}"));
    let w: Value = serde_json::from_str(&w.to_json()).unwrap();
    let objects = [
        ("cluster", &v["cluster"]),
        ("host", &v["host"][0]),
        ("host", &w["host"][0]),
        ("api", &v["api"]),
        ("api.token", &v["api"]["token"][0]),
        ("vm", &v["vm"][0]),
        ("vm.qemu", &v["vm"][0]["qemu"]),
        ("vm.qemu.disks", &v["vm"][0]["qemu"]["disks"][0]),
        ("vm.libvirt", &v["vm"][1]["libvirt"]),
        ("vm.app", &v["vm"][0]["app"][0]),
    ];
    let docs = documented();
    let mut problems = Vec::new();
    for (section, object) in objects {
        let rows = docs
            .get(section)
            .unwrap_or_else(|| panic!("docs/config.md has no [{section}] table"));
        for (key, value) in object.as_object().unwrap() {
            // Sub-tables and arrays of tables are documented in their own sections.
            if ["qemu", "libvirt", "app"].contains(&key.as_str()) && section == "vm" {
                continue;
            }
            let Some(default) = rows.get(key) else {
                problems.push(format!("[{section}] `{key}` is not documented"));
                continue;
            };
            let set_in_minimal = matches!(
                (section, key.as_str()),
                ("cluster", "store") | ("api", "token") | ("vm.qemu", "disks")
            );
            if let Some(d) = default.strip_prefix('`').filter(|_| !set_in_minimal) {
                let d = d.trim_end_matches('`');
                if d != as_toml(value) {
                    problems.push(format!(
                        "[{section}] `{key}`: docs say {d}, the parser fills in {}",
                        as_toml(value)
                    ));
                }
            }
        }
        for key in rows.keys() {
            let shorthand = section == "vm.qemu" && key == "disk";
            if !shorthand && object.get(key).is_none() && !optional_without_default(section, key) {
                problems.push(format!(
                    "[{section}] documents `{key}`, which does not exist"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Keys that `show` leaves out when they are not set: those with no default, and
/// `watchdog_timeout`, which is only written with its `watchdog`.
fn optional_without_default(section: &str, key: &str) -> bool {
    matches!(
        (section, key),
        (
            "host",
            "address" | "memory_mb" | "watchdog" | "watchdog_timeout"
        ) | ("vm.qemu", "kernel" | "initrd" | "append" | "emulator")
            | ("vm.libvirt", "xml")
            | ("vm.app", "stop" | "pid_file" | "process")
            | ("api", "tls_cert" | "tls_key")
    )
}

/// The range column of `key` in the `[section]` table of docs/config.md.
fn documented_range(section: &str, key: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut current = false;
    for line in text.lines() {
        if line.starts_with('#') {
            current = line.contains(&format!("`[{section}]`"))
                || line.contains(&format!("`[[{section}]]`"));
            continue;
        }
        if let Some(row) = line
            .strip_prefix(&format!("| `{key}` | "))
            .filter(|_| current)
        {
            return row.split(" | ").nth(2).unwrap().trim().to_string();
        }
    }
    panic!("[{section}] `{key}` has no row in docs/config.md");
}

/// The settings an admin command changes at run time are documented with the ranges the code
/// checks (the same ranges for the file and for `vmha set …`).
#[test]
fn run_time_settings_are_documented_with_their_ranges() {
    use vmha_model::defaults as d;
    use vmha_model::duration::format;
    let n = |r: &std::ops::RangeInclusive<u32>| format!("{} – {}", r.start(), r.end());
    let t = |r: &std::ops::RangeInclusive<std::time::Duration>| {
        format!("{} – {}", format(*r.start()), format(*r.end()))
    };
    for (section, key, range) in [
        ("vm.app", "priority", n(&d::APP_PRIORITY_RANGE)),
        ("vm.app", "restart_limit", n(&d::APP_RESTART_LIMIT_RANGE)),
        ("vm.app", "restart_window", t(&d::APP_RESTART_WINDOW_RANGE)),
        ("vm", "vm_restart_limit", n(&d::VM_RESTART_LIMIT_RANGE)),
        ("vm", "vm_restart_window", t(&d::VM_RESTART_WINDOW_RANGE)),
    ] {
        assert_eq!(documented_range(section, key), range, "[{section}] `{key}`");
    }
}
