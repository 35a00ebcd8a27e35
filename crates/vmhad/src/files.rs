//! File modes that do not depend on the umask vmhad inherits.
//!
//! vmhad runs with umask 077 (set first thing in `main`), so everything it and its QEMUs create
//! is private to its user. The state and runtime dirs are created 0700; an existing one is
//! refused when it is not a directory, is a symlink, belongs to another user, is writable by
//! group or others, or lies under a directory that someone else could rename it from. The API
//! socket is bound under umask 077 (nobody else can connect at any moment) and then given its
//! final mode: 0600, or 0660 with the group given by `--api-group`. A leftover socket is removed
//! only when it is a socket of this user that nobody listens on.

use std::fs::{DirBuilder, Metadata};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, umask};
use nix::unistd::{Gid, Group, Uid, chown};

/// Why a directory or the API socket was refused (nothing was changed).
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A file system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The path is a symlink (someone could point it elsewhere).
    #[error("{path} is a symlink: give the directory's real path instead")]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// The path is not a directory.
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The directory belongs to another user.
    #[error(
        "{path} belongs to uid {owner}, not to vmhad's user (uid {me}): whoever owns it can \
         replace vmhad's files and sockets. Use a directory of vmhad's user, or `chown {me} {path}` \
         if it is vmhad's"
    )]
    Owner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// vmhad's effective uid.
        me: u32,
    },
    /// The directory is writable by group or others.
    #[error(
        "{path} is writable by {who} (mode {mode:o}): anyone who can write there can replace \
         vmhad's files and sockets. Fix it with `chmod 700 {path}`"
    )]
    Writable {
        /// The path.
        path: PathBuf,
        /// "its group", "others" or "its group and others".
        who: &'static str,
        /// Its permission bits.
        mode: u32,
    },
    /// A parent directory lets someone else rename or replace the directory.
    #[error(
        "{parent}, a parent of {path}, {why}: someone else could replace {path}. Put it under \
         directories that only root or vmhad's user can write (`chmod go-w {parent}`)"
    )]
    UnsafeParent {
        /// The parent.
        parent: PathBuf,
        /// The directory.
        path: PathBuf,
        /// What is wrong with the parent.
        why: String,
    },
    /// `--api-group` names no group.
    #[error("--api-group {0:?}: no such group")]
    UnknownGroup(String),
    /// Something other than a leftover socket of vmhad's user is at the API socket path.
    #[error(
        "{path} {why}: it is not a socket left by vmhad, and is left as it is. Remove it if you \
         know what it is"
    )]
    NotOurSocket {
        /// The path.
        path: PathBuf,
        /// What it is.
        why: String,
    },
    /// A process listens on the API socket path.
    #[error(
        "a process is listening on {0} (another vmhad with this state dir?): stop it first; the \
         socket is left as it is"
    )]
    SocketInUse(PathBuf),
}

/// Makes everything vmhad (and the QEMUs it starts) creates private to its user, whatever umask
/// it inherited. Call before any other thread exists.
pub fn private_umask() {
    umask(Mode::from_bits_truncate(0o077));
}

/// Resolves `--api-group`.
pub fn api_group(name: &str) -> Result<Gid, FilesError> {
    match Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid),
        _ => Err(FilesError::UnknownGroup(name.to_owned())),
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FilesError + 'a {
    move |source| FilesError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Checks `dir` as [`private_dir`] does, creating nothing: lets vmhad refuse a bad runtime dir
/// before it creates the state dir.
pub fn check_private_dir(dir: &Path) -> Result<(), FilesError> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) => check_meta(dir, &meta)?,
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io("reading", dir)(e)),
    }
    check_parents(dir)
}

/// Creates `dir` (mode 0700, missing parents too) if nothing is there, else checks the existing
/// one: a directory, not a symlink, owned by vmhad's user, not writable by group or others, and
/// under parents only root or vmhad's user can write (or sticky ones, like `/tmp`). With
/// `group`, a directory created here gets that group and mode 0710, so the group can reach the
/// API socket in it. A refused directory is left as it is.
pub fn private_dir(dir: &Path, group: Option<Gid>) -> Result<(), FilesError> {
    let created = match std::fs::symlink_metadata(dir) {
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            check_parents(dir)?;
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("creating", dir))?;
            true
        }
        Err(e) => return Err(io("reading", dir)(e)),
    };
    let meta = std::fs::symlink_metadata(dir).map_err(io("reading", dir))?;
    check_meta(dir, &meta)?;
    check_parents(dir)?;
    if let Some(gid) = group {
        if created {
            chown(dir, None, Some(gid)).map_err(|e| io("setting the group of", dir)(e.into()))?;
            std::fs::set_permissions(dir, PermissionsExt::from_mode(0o710))
                .map_err(io("setting the mode of", dir))?;
        } else if meta.gid() != gid.as_raw() || meta.mode() & 0o010 == 0 {
            tracing::warn!(
                "--api-group: the group cannot reach the API socket in {}: run `chgrp {} {0}` and \
                 `chmod 710 {0}`",
                dir.display(),
                gid
            );
        }
    }
    Ok(())
}

fn check_meta(dir: &Path, meta: &Metadata) -> Result<(), FilesError> {
    let path = dir.to_owned();
    if meta.file_type().is_symlink() {
        return Err(FilesError::Symlink { path });
    }
    if !meta.is_dir() {
        return Err(FilesError::NotADirectory { path });
    }
    let me = Uid::effective().as_raw();
    if meta.uid() != me {
        return Err(FilesError::Owner {
            path,
            owner: meta.uid(),
            me,
        });
    }
    let who = match (meta.mode() & 0o020 != 0, meta.mode() & 0o002 != 0) {
        (false, false) => return Ok(()),
        (true, false) => "its group",
        (false, true) => "others",
        (true, true) => "its group and others",
    };
    Err(FilesError::Writable {
        path,
        who,
        mode: meta.mode() & 0o7777,
    })
}

/// Every existing parent of `dir` (symlinks resolved) belongs to root or vmhad's user and is
/// writable by nobody else, unless it is sticky (then nobody else can rename `dir` out of it).
fn check_parents(dir: &Path) -> Result<(), FilesError> {
    let absolute = std::path::absolute(dir).map_err(io("resolving", dir))?;
    let Some(parent) = absolute.parent() else {
        return Ok(());
    };
    // The nearest parent that exists (missing ones are created by vmhad, mode 0700).
    let mut existing = parent;
    while std::fs::symlink_metadata(existing).is_err() {
        match existing.parent() {
            Some(p) => existing = p,
            None => return Ok(()),
        }
    }
    let real = std::fs::canonicalize(existing).map_err(io("resolving", existing))?;
    let me = Uid::effective().as_raw();
    for ancestor in real.ancestors() {
        let meta = std::fs::metadata(ancestor).map_err(io("reading", ancestor))?;
        let mode = meta.mode();
        let why = if meta.uid() != 0 && meta.uid() != me {
            Some(format!("belongs to uid {}", meta.uid()))
        } else if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            Some(format!(
                "is writable by group or others and not sticky (mode {:o})",
                mode & 0o7777
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(FilesError::UnsafeParent {
                parent: ancestor.to_owned(),
                path: dir.to_owned(),
                why,
            });
        }
    }
    Ok(())
}

/// Binds the API socket at `path` (in a directory checked by [`private_dir`]) with its final
/// mode: owner-only, or 0660 with `group`. The socket is created under umask 077, so nobody else
/// can connect before its mode is set. A socket left by an earlier vmhad is replaced; anything
/// else at `path` (a file, a socket of another user, a socket someone listens on) is refused and
/// left as it is.
pub fn bind_api_socket(path: &Path, group: Option<Gid>) -> Result<UnixListener, FilesError> {
    if check_api_socket(path)? {
        std::fs::remove_file(path).map_err(io("removing the stale socket", path))?;
    }
    // Already vmhad's umask; set again so that this never depends on the caller.
    private_umask();
    let listener = UnixListener::bind(path).map_err(io("binding the API socket", path))?;
    let mode = match group {
        Some(gid) => {
            chown(path, None, Some(gid)).map_err(|e| io("setting the group of", path)(e.into()))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, PermissionsExt::from_mode(mode))
        .map_err(io("setting the mode of", path))?;
    Ok(listener)
}

/// Checks what is at the API socket path, changing nothing: `Ok(false)` if nothing, `Ok(true)`
/// for a stale socket of vmhad's user that nobody listens on; anything else is refused.
pub fn check_api_socket(path: &Path) -> Result<bool, FilesError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            let why = if !meta.file_type().is_socket() {
                Some("exists and is not a socket".to_owned())
            } else if meta.uid() != Uid::effective().as_raw() {
                Some(format!("is a socket of uid {}", meta.uid()))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(FilesError::NotOurSocket {
                    path: path.to_owned(),
                    why,
                });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(FilesError::SocketInUse(path.to_owned()));
            }
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io("reading", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_new_dir_is_private_and_an_existing_good_one_is_kept() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        private_dir(&dir, None).unwrap();
        for d in [base.path().join("a"), dir.clone()] {
            assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o7777, 0o700);
        }
        std::fs::set_permissions(&dir, PermissionsExt::from_mode(0o755)).unwrap();
        private_dir(&dir, None).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o7777,
            0o755,
            "an accepted dir is not changed"
        );
    }

    #[test]
    fn writable_symlinked_and_file_dirs_are_refused_and_left_alone() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        for mode in [0o777, 0o770, 0o702, 0o1777] {
            std::fs::set_permissions(&dir, PermissionsExt::from_mode(mode)).unwrap();
            let e = private_dir(&dir, None).unwrap_err();
            assert!(matches!(e, FilesError::Writable { .. }), "{mode:o}: {e}");
            assert!(
                e.to_string()
                    .contains(&format!("chmod 700 {}", dir.display())),
                "{e}"
            );
            assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, mode);
        }
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(
            private_dir(&link, None),
            Err(FilesError::Symlink { .. })
        ));
        let file = base.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            private_dir(&file, None),
            Err(FilesError::NotADirectory { .. })
        ));
    }

    #[test]
    fn a_dir_under_a_writable_parent_is_refused_but_sticky_tmp_is_fine() {
        let base = tempfile::tempdir().unwrap();
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, PermissionsExt::from_mode(0o777)).unwrap();
        let dir = open.join("state");
        let e = private_dir(&dir, None).unwrap_err();
        assert!(matches!(e, FilesError::UnsafeParent { .. }), "{e}");
        assert!(!dir.exists(), "nothing is created under an unsafe parent");
        std::fs::set_permissions(&open, PermissionsExt::from_mode(0o1777)).unwrap();
        private_dir(&dir, None).unwrap();
    }

    #[test]
    fn a_relative_dir_has_its_parents_checked_too() {
        let base = tempfile::tempdir().unwrap();
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, PermissionsExt::from_mode(0o777)).unwrap();
        let cwd = std::env::current_dir().unwrap();
        let relative = pathdiff(&open.join("state"), &cwd);
        let e = check_private_dir(&relative).unwrap_err();
        assert!(matches!(e, FilesError::UnsafeParent { .. }), "{e}");
    }

    /// `path` relative to `base` (both absolute), with `..` as needed.
    fn pathdiff(path: &Path, base: &Path) -> PathBuf {
        let mut up = PathBuf::new();
        let mut b = base;
        while !path.starts_with(b) {
            up.push("..");
            b = b.parent().unwrap();
        }
        up.join(path.strip_prefix(b).unwrap())
    }

    #[test]
    fn the_socket_is_private_and_foreign_things_at_its_path_are_left_alone() {
        let base = tempfile::tempdir().unwrap();
        let path = base.path().join("vmhad.sock");
        let listener = bind_api_socket(&path, None).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        // Someone listens: refused, and the listener keeps its socket.
        let e = bind_api_socket(&path, None).unwrap_err();
        assert!(matches!(e, FilesError::SocketInUse(_)), "{e}");
        let _client = UnixStream::connect(&path).unwrap();
        assert!(
            listener.accept().is_ok(),
            "the listener still owns the path"
        );
        // A stale socket of ours is replaced.
        drop(listener);
        drop(bind_api_socket(&path, None).unwrap());
        // A regular file is refused and kept.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"mine").unwrap();
        let e = bind_api_socket(&path, None).unwrap_err();
        assert!(matches!(e, FilesError::NotOurSocket { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"mine");
    }

    #[test]
    fn an_unknown_api_group_is_refused() {
        assert!(matches!(
            api_group("no-such-group-vmha"),
            Err(FilesError::UnknownGroup(_))
        ));
    }
}
