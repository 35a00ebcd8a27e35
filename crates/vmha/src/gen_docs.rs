//! `vmha --gen-docs DIR` (outside clap, so that no completion offers it): writes the man pages (`DIR/man/vmha.1` and one page per
//! subcommand, `vmha-config-validate.1` …) and the shell completions
//! (`DIR/completions/vmha.bash`, `_vmha`, `vmha.fish`) generated from the clap definitions, so
//! they always match the binary. The Debian package build (`packaging/build-deb.sh`) runs it.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

/// The first argument that asks for the docs.
pub const FLAG: &str = "--gen-docs";

/// The shells completions are generated for, with the file name each expects.
pub const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "vmha.bash"),
    (Shell::Zsh, "_vmha"),
    (Shell::Fish, "vmha.fish"),
];

/// With `--gen-docs DIR` as the arguments, writes the docs and returns the exit code;
/// otherwise `None` (the command line is clap's).
pub fn run_if_asked() -> Option<ExitCode> {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.first().is_none_or(|a| a != FLAG) {
        return None;
    }
    let [_, dir] = args.as_slice() else {
        eprintln!("usage: vmha {FLAG} DIR");
        return Some(ExitCode::from(2));
    };
    Some(match generate(Path::new(dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmha: {e:#}");
            ExitCode::FAILURE
        }
    })
}

fn generate(dir: &Path) -> anyhow::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    clap_mangen::generate_to(crate::Cli::command(), &man)
        .with_context(|| format!("writing the man pages in {}", man.display()))?;
    for (shell, file) in SHELLS {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut crate::Cli::command(), "vmha", &mut buf);
        let path = completions.join(file);
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every visible subcommand, as its path of names (`["config", "validate"]`).
    fn subcommands(cmd: &clap::Command, prefix: &[String], out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() == "help" {
                continue;
            }
            let mut path = prefix.to_vec();
            path.push(sub.get_name().to_string());
            subcommands(sub, &path, out);
            out.push(path);
        }
    }

    #[test]
    fn man_pages_and_completions_cover_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        let mut all = Vec::new();
        subcommands(&crate::Cli::command(), &[], &mut all);
        assert!(all.len() > 10, "too few subcommands found: {all:?}");
        let top = std::fs::read_to_string(dir.path().join("man/vmha.1")).unwrap();
        assert!(
            top.starts_with(".ie") || top.contains(".TH vmha 1"),
            "{top}"
        );
        let completions: Vec<(String, String)> = SHELLS
            .iter()
            .map(|(_, f)| {
                let text = std::fs::read_to_string(dir.path().join("completions").join(f)).unwrap();
                (f.to_string(), text)
            })
            .collect();
        for path in &all {
            let page = dir.path().join(format!("man/vmha-{}.1", path.join("-")));
            assert!(page.exists(), "no man page {}", page.display());
            let name = path.last().unwrap();
            if path.len() == 1 {
                assert!(
                    top.contains(name.as_str()),
                    "vmha.1 does not mention {name}"
                );
            }
            for (file, text) in &completions {
                assert!(
                    text.contains(name.as_str()),
                    "{file} does not complete {path:?}"
                );
            }
        }
        // The generator itself is offered and documented nowhere.
        assert!(!top.contains("gen\\-docs"));
        for (file, text) in &completions {
            assert!(!text.contains("gen-docs"), "{file} offers --gen-docs");
        }
    }
}
