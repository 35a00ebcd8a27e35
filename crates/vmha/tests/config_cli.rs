//! Runs the built `vmha` binary: every bad fixture of vmha-model is rejected with exit code 2
//! and its line on stderr; every shipped example validates; `show` output (TOML and JSON)
//! parses back to the same configuration.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vmha_model::Config;

fn vmha(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmha"))
        .args(args)
        .output()
        .unwrap()
}

fn files_in(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .toml in {}", dir.display());
    files
}

fn examples() -> Vec<PathBuf> {
    files_in("../../examples")
}

/// The `line=N` of a fixture's `# expect:` header.
fn expected_line(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    let header = text.lines().next().unwrap();
    header
        .split_whitespace()
        .find_map(|f| f.strip_prefix("line="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}: no line= in {header:?}", path.display()))
}

#[test]
fn every_bad_fixture_exits_2_naming_its_line() {
    for path in files_in("../vmha-model/tests/bad") {
        let p = path.to_str().unwrap();
        for args in [vec!["config", "validate", p], vec!["config", "show", p]] {
            let out = vmha(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}\n{stderr}");
            let line = expected_line(&path);
            assert!(
                stderr.contains(&format!("{p}:{line}:")),
                "{args:?}: stderr lacks `{p}:{line}:`\n{stderr}"
            );
            assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
        }
    }
}

#[test]
fn examples_validate_with_a_summary() {
    for path in examples() {
        let p = path.to_str().unwrap();
        let out = vmha(&["config", "validate", p]);
        let config = Config::from_file(&path).unwrap();
        let libvirt = config
            .vms
            .iter()
            .any(|v| matches!(v.driver, vmha_model::Driver::Libvirt(_)));
        if libvirt && !cfg!(feature = "libvirt") {
            // Refused by a build without the driver, with the way to get it.
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{stderr}");
            assert!(
                stderr.contains("which this build does not include")
                    && stderr.contains("--features libvirt"),
                "{stderr}"
            );
            continue;
        }
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let apps: usize = config.vms.iter().map(|v| v.apps.len()).sum();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(stdout.starts_with(&format!("{p}: ok (")), "{stdout}");
        assert!(stdout.contains(&format!("{apps} app")), "{stdout}");
    }
}

/// A VM with `driver = "libvirt"`: accepted by a build with the `libvirt` feature, refused
/// at its `driver` line with a hint by one without it.
#[test]
fn a_driver_missing_from_this_build_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lv.toml");
    std::fs::write(
        &file,
        "[cluster]\nname = \"c\"\nstore = \"embedded\"\n\n[[host]]\nname = \"h1\"\n\n\
         [[vm]]\nname = \"v1\"\nhosts = [\"h1\"]\ndriver = \"libvirt\"\n",
    )
    .unwrap();
    let p = file.to_str().unwrap();
    let out = vmha(&["config", "validate", p]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "libvirt") {
        assert_eq!(out.status.code(), Some(0), "{stderr}");
    } else {
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(&format!("{p}:11:")), "{stderr}");
        assert!(stderr.contains("--features libvirt"), "{stderr}");
    }
}

#[test]
fn validate_checks_every_file_and_fails_if_any_is_bad() {
    let good = examples()[0].to_str().unwrap().to_string();
    let bad = files_in("../vmha-model/tests/bad")[0]
        .to_str()
        .unwrap()
        .to_string();
    let out = vmha(&["config", "validate", &good, &bad]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{good}: ok")));

    // --json: one object per file, the bad one with its diagnostic; still exit 2.
    let out = vmha(&["config", "validate", "--json", &good, &bad]);
    assert_eq!(out.status.code(), Some(2));
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let config = Config::from_toml_str(&std::fs::read_to_string(&good).unwrap(), "x").unwrap();
    assert_eq!(results[0]["file"], good.as_str());
    assert_eq!(results[0]["valid"], true);
    assert_eq!(results[0]["vms"], config.vms.len());
    assert_eq!(results[1]["file"], bad.as_str());
    assert_eq!(results[1]["valid"], false);
    assert!(
        results[1]["error"].as_str().unwrap().contains(&bad),
        "{results}"
    );
}

#[test]
fn show_toml_parses_back_to_the_same_config() {
    for path in examples() {
        let out = vmha(&["config", "show", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0));
        let shown = String::from_utf8(out.stdout).unwrap();
        let back = Config::from_toml_str(&shown, "<show>").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            back,
            Config::from_file(&path).unwrap(),
            "{}",
            path.display()
        );
    }
}

#[test]
fn show_json_parses_back_to_the_same_config() {
    for path in examples() {
        let out = vmha(&["config", "show", "--json", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // Same schema as the file: re-encode the JSON document as TOML and parse it.
        let as_toml = toml::to_string(&json).unwrap();
        let back =
            Config::from_toml_str(&as_toml, "<show --json>").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            back,
            Config::from_file(&path).unwrap(),
            "{}",
            path.display()
        );
    }
}

#[test]
fn show_prints_every_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("minimal.toml");
    std::fs::write(
        &file,
        "[cluster]\nname = \"c\"\n[[host]]\nname = \"h\"\n[[vm]]\nname = \"v\"\nhosts = [\"h\"]\n\
         [vm.qemu]\ndisk = \"/v.qcow2\"\n[[vm.app]]\nname = \"a\"\ncheck = [\"true\"]\nstart = [\"true\"]\n",
    )
    .unwrap();
    let out = vmha(&["config", "show", "--json", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let app = &v["vm"][0]["app"][0];
    assert_eq!(app["interval"], "2s");
    assert_eq!(app["priority"], 1);
    assert_eq!(app["restart_limit"], 3);
    assert_eq!(app["probe_failures"], 3);
    assert_eq!(v["vm"][0]["policy"], "highest-priority");
    assert_eq!(v["vm"][0]["qemu"]["disks"][0]["cache"], "none");
    assert_eq!(v["cluster"]["state_dir"], "/var/lib/vmha");
}

#[test]
fn unreadable_file_exits_2() {
    let out = vmha(&["config", "validate", "/nonexistent/vmha.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vmha.toml: cannot read"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(vmha(&["config", "validate"]).status.code(), Some(2));
    assert_eq!(vmha(&["config", "frobnicate"]).status.code(), Some(2));
    assert_eq!(vmha(&["nonsense"]).status.code(), Some(2));
}
