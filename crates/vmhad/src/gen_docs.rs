//! `vmhad --gen-docs DIR` (outside clap, like `--fence-guard`, so that no completion offers
//! it): writes the man page (`DIR/man/vmhad.8`: a daemon, section
//! 8) and the shell completions (`DIR/completions/vmhad.bash`, `_vmhad`, `vmhad.fish`)
//! generated from the clap definitions, so they always match the binary. The Debian package
//! build (`packaging/build-deb.sh`) runs it.

use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::Options;

/// The shells completions are generated for, with the file name each expects.
const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "vmhad.bash"),
    (Shell::Zsh, "_vmhad"),
    (Shell::Fish, "vmhad.fish"),
];

/// The first argument that asks for the docs.
pub const FLAG: &str = "--gen-docs";

/// With `--gen-docs DIR` as the arguments, writes the docs and returns the exit code;
/// otherwise `None` (the command line is clap's).
pub fn run_if_asked() -> Option<ExitCode> {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.first().is_none_or(|a| a != FLAG) {
        return None;
    }
    let [_, dir] = args.as_slice() else {
        eprintln!("usage: vmhad {FLAG} DIR");
        return Some(ExitCode::from(2));
    };
    Some(match generate(Path::new(dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "vmhad: writing the docs in {}: {e}",
                Path::new(dir).display()
            );
            ExitCode::FAILURE
        }
    })
}

/// Writes the man page and completions under `dir` (creating `man/` and `completions/`).
fn generate(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::Man::new(Options::command())
        .section("8")
        .generate_to(&man)?;
    for (shell, file) in SHELLS {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut Options::command(), "vmhad", &mut buf);
        std::fs::write(completions.join(file), buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_man_page_and_completions_cover_every_option() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        let page = std::fs::read_to_string(dir.path().join("man/vmhad.8")).unwrap();
        assert!(page.contains(".TH vmhad 8"), "{page}");
        let cmd = Options::command();
        let longs: Vec<&str> = cmd
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long())
            .collect();
        assert!(longs.contains(&"config") && longs.contains(&"stop-vms-on-exit"));
        for (_, file) in SHELLS {
            let text = std::fs::read_to_string(dir.path().join("completions").join(file)).unwrap();
            for long in &longs {
                assert!(text.contains(long), "{file} does not complete --{long}");
                assert!(
                    page.contains(&long.replace('-', "\\-")),
                    "vmhad.8 lacks --{long}"
                );
            }
            assert!(
                !text.contains("gen-docs"),
                "{file} offers the hidden --gen-docs"
            );
        }
        assert!(!page.contains("gen\\-docs"));
    }
}
