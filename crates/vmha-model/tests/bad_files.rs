//! A configuration path that is not a regular UTF-8 file of sane size is refused at once with
//! a clear error: a directory, a FIFO (whose open would block), a device, a file that is not
//! UTF-8 (located by line and column) or too large. Values and lines of megabytes are
//! shortened in the message.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use vmha_model::error::SHOWN_CHARS;
use vmha_model::file::MAX_CONFIG_BYTES;
use vmha_model::{Config, ConfigError, ErrorKind};

/// `Config::from_file(path)`, on a thread: a regression that blocks (a FIFO opened for
/// reading) fails the test instead of hanging it.
fn load(path: &Path) -> Result<Config, ConfigError> {
    let (tx, rx) = mpsc::channel();
    let owned = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Config::from_file(&owned));
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("reading {} blocked", path.display()))
}

fn not_a_file(path: &Path, what: &str) {
    let err = load(path).unwrap_err();
    assert!(
        matches!(&err, ConfigError::NotAFile { what: w, .. } if *w == what),
        "{}: {err:?}",
        path.display()
    );
    assert_eq!(err.kind(), ErrorKind::Io);
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("{}: is {what}", path.display())),
        "{msg}"
    );
}

#[test]
fn directories_fifos_and_devices_are_refused_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    not_a_file(dir.path(), "a directory");
    let fifo = dir.path().join("vmha.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    not_a_file(&fifo, "a named pipe (FIFO)");
    // Through a symlink as well: the target is what counts.
    let link = dir.path().join("link.toml");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    not_a_file(&link, "a named pipe (FIFO)");
    not_a_file(Path::new("/dev/null"), "a character device");
}

#[test]
fn a_file_that_is_not_utf8_is_located_by_its_first_bad_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latin1.toml");
    // "café" written in Latin-1 on line 3.
    std::fs::write(
        &path,
        b"[cluster]\nname = \"lab\"\n# caf\xe9\n\n[[host]]\nname = \"h\"\n",
    )
    .unwrap();
    let err = load(&path).unwrap_err();
    let d = err.diagnostic().unwrap();
    assert_eq!((d.kind, d.line, d.column), (ErrorKind::Encoding, 3, 6));
    assert!(d.message.contains("0xE9"), "{}", d.message);
    assert!(d.hint.as_deref().unwrap().contains("UTF-8"));
    assert!(
        err.to_string()
            .starts_with(&format!("{}:3:6: not UTF-8", path.display())),
        "{err}"
    );
}

#[test]
fn a_file_larger_than_the_limit_is_refused_unparsed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.toml");
    let big = usize::try_from(MAX_CONFIG_BYTES).unwrap() + 1;
    std::fs::write(&path, "#".repeat(big)).unwrap();
    let err = load(&path).unwrap_err();
    assert!(matches!(err, ConfigError::TooLarge { size, .. } if size == MAX_CONFIG_BYTES + 1));
    assert!(
        err.to_string()
            .contains("more than a configuration file may have")
    );
}

/// The largest message a diagnostic may print for one line of the file.
const BOUND: usize = 8 * SHOWN_CHARS;

#[test]
fn megabyte_values_and_lines_are_shortened_in_messages() {
    let huge = "x".repeat(1024 * 1024);
    let head = "[cluster]\nname = \"lab\"\n\n[[host]]\nname = \"h\"\n\n[[vm]]\nname = \"v\"\nhosts = [\"h\"]\n";
    let qemu = "[vm.qemu]\ndisk = \"/d\"\n";
    for (what, text, expect) in [
        // Bad values, reported with the value in the message.
        (
            "duration",
            format!("{head}stop_timeout = \"{huge}\"\n{qemu}"),
            "invalid duration",
        ),
        (
            "endpoint with spaces",
            format!(
                "[cluster]\nname = \"lab\"\nstore = \"etcd\"\nendpoints = [\"x{}\"]\n",
                " ".repeat(1024 * 1024)
            ),
            "is not an http(s) URL",
        ),
        (
            "path",
            format!("{head}[vm.qemu]\ndisk = \"{huge}\"\n"),
            "is not an absolute path",
        ),
        (
            "unknown key",
            format!("{head}{huge} = 1\n{qemu}"),
            "unknown key",
        ),
        // Syntax errors deep inside, and at the start of, a long value.
        (
            "syntax",
            format!("{head}{qemu}extra_args = [\"{huge}\" \"b\"]\n"),
            "invalid TOML",
        ),
        (
            "unquoted",
            format!("{head}[vm.qemu]\ndisk = {huge}\n"),
            "invalid TOML in `disk`",
        ),
    ] {
        let err = Config::from_toml_str(&text, "big.toml").unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains(expect), "{what}: {shown}");
        assert!(
            shown.len() < 3 * BOUND,
            "{what}: {} bytes of message",
            shown.len()
        );
        assert!(shown.contains('…'), "{what}: {shown}");
        let d = err.diagnostic().unwrap();
        assert!(d.line >= 4, "{what}: line {}", d.line);
        assert!(
            d.message.len() < BOUND && d.source_line.len() < BOUND,
            "{what}"
        );
        // The caret still points at the column's character of the shown part.
        assert!(
            d.caret <= d.source_line.chars().count() + 1,
            "{what}: {shown}"
        );
    }
}
