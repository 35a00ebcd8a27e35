//! Reading a configuration file without trusting what the path names: only a regular file of
//! at most [`MAX_CONFIG_BYTES`] is read, and its text must be UTF-8.
//!
//! The path is looked at (following symlinks) before it is opened, because opening a FIFO
//! blocks until a writer comes and opening a device can act on it (a watchdog starts
//! counting). It is then opened non-blocking and looked at again through the open file, so a
//! FIFO swapped in between the two looks is refused too instead of hanging the reader.

use std::fs::{Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{ConfigError, ErrorKind, Source};

/// The largest configuration file read (4 MiB; a configuration of hundreds of VMs is a few
/// hundred KiB).
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// The text of the configuration file at `path`, or why it cannot be a configuration file
/// ([`ConfigError::NotAFile`], [`ConfigError::TooLarge`], [`ErrorKind::Encoding`], I/O).
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    let file = path.display().to_string();
    let io = |source| ConfigError::Io {
        file: file.clone(),
        source,
    };
    check_kind(&file, &std::fs::metadata(path).map_err(io)?)?;
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(io)?;
    check_kind(&file, &handle.metadata().map_err(io)?)?;
    let mut bytes = Vec::new();
    handle
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if read > MAX_CONFIG_BYTES {
        // The file grew after it was looked at.
        return Err(ConfigError::TooLarge { file, size: read });
    }
    String::from_utf8(bytes).map_err(|e| not_utf8(&file, e.as_bytes(), e.utf8_error()))
}

/// Refuses anything but a regular file of at most [`MAX_CONFIG_BYTES`].
fn check_kind(file: &str, meta: &Metadata) -> Result<(), ConfigError> {
    let t = meta.file_type();
    let what = if t.is_file() {
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                file: file.to_string(),
                size: meta.len(),
            });
        }
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a named pipe (FIFO)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(ConfigError::NotAFile {
        file: file.to_string(),
        what,
    })
}

/// The diagnostic of a file that is not UTF-8: line and column of the first bad byte.
fn not_utf8(file: &str, bytes: &[u8], err: std::str::Utf8Error) -> ConfigError {
    let at = err.valid_up_to();
    // Everything before `at` is valid, so offsets and columns there are the file's own.
    let text = String::from_utf8_lossy(bytes);
    let message = match (err.error_len(), bytes.get(at)) {
        (Some(_), Some(b)) => format!("not UTF-8 text: byte 0x{b:02X} is not a valid character"),
        _ => "not UTF-8 text: the file ends inside a character".to_string(),
    };
    Source { file, text: &text }.error(
        at..at + 1,
        ErrorKind::Encoding,
        message,
        Some(
            "a configuration file must be UTF-8; convert it, e.g. `iconv -f latin1 -t utf-8 FILE > NEW`"
                .into(),
        ),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn first_bad_byte_is_located_by_line_and_character_column() {
        let bytes = b"[cluster]\nname = \"\xc3\xa9t\xe9\"\n".to_vec();
        let err = String::from_utf8(bytes).unwrap_err();
        let e = not_utf8("f.toml", err.as_bytes(), err.utf8_error());
        let d = e.diagnostic().unwrap();
        assert_eq!((d.line, d.column, d.kind), (2, 11, ErrorKind::Encoding));
        assert!(d.message.contains("0xE9"), "{}", d.message);
        assert!(e.to_string().starts_with("f.toml:2:11: not UTF-8"), "{e}");
    }
}
