//! Scenario tests as data: every folder of `tests/scenarios/` holds `config.toml`, `input.txt`
//! (a timed script, see `Sim::run_script`) and `expected.log` (the golden log). The runner
//! plays each through the simulated cluster and diffs; `UPDATE_GOLDEN=1 cargo test` rewrites
//! the goldens (review them by eye against SPEC §4 before committing). Every scenario must
//! also end with no safety violation.
#![allow(clippy::unwrap_used, missing_docs)]

use std::fs;
use std::path::Path;
use std::sync::Arc;

use vmha_engine::sim::Sim;
use vmha_model::Config;

fn run(dir: &Path) -> Result<String, String> {
    let config = fs::read_to_string(dir.join("config.toml")).map_err(|e| e.to_string())?;
    let config = Config::from_toml_str(&config, "config.toml").map_err(|e| e.to_string())?;
    let input = fs::read_to_string(dir.join("input.txt")).map_err(|e| e.to_string())?;
    let mut sim = Sim::new(Arc::new(config)).map_err(|e| e.to_string())?;
    sim.run_script(&input).map_err(|e| e.to_string())?;
    let mut log = sim.log().join("\n");
    log.push('\n');
    for v in sim.violations() {
        log.push_str(&format!("VIOLATION {v}\n"));
    }
    Ok(log)
}

#[test]
fn scenarios() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let only = std::env::var("SCENARIO").ok();
    let mut dirs: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut failures = Vec::new();
    let mut count = 0;
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        count += 1;
        let got = match run(&dir) {
            Ok(log) => log,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        if got.contains("VIOLATION") {
            failures.push(format!("{name}: safety violation\n{got}"));
        }
        let golden = dir.join("expected.log");
        if update {
            fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = fs::read_to_string(&golden).unwrap_or_default();
        if want != got {
            // SCENARIO_OUT=DIR keeps what each differing scenario logged, for `diff`.
            if let Some(out) = std::env::var_os("SCENARIO_OUT") {
                let out = Path::new(&out);
                fs::create_dir_all(out).unwrap();
                fs::write(out.join(format!("{name}.log")), &got).unwrap();
            }
            let diff: Vec<String> = want
                .lines()
                .zip(got.lines())
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .take(3)
                .map(|(i, (a, b))| format!("  line {}:\n   want {a}\n   got  {b}", i + 1))
                .collect();
            failures.push(format!(
                "{name}: log differs ({} vs {} lines)\n{}",
                want.lines().count(),
                got.lines().count(),
                diff.join("\n")
            ));
        }
    }
    assert!(count > 0 || only.is_some(), "no scenarios found");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
