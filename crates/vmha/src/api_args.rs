//! Which vmhad the daemon commands talk to: the global `--socket` / `--state-dir` options and
//! the `VMHA_SOCKET` environment variable.

use std::path::PathBuf;

use clap::Args;

/// Environment variable naming vmhad's API socket when neither `--socket` nor `--state-dir`
/// is given.
pub const SOCKET_ENV: &str = "VMHA_SOCKET";

/// Which vmhad to talk to; global options of `vmha`.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// vmhad's API socket [default: $VMHA_SOCKET, else /var/lib/vmha/vmhad.sock].
    #[arg(long, global = true, value_name = "PATH", conflicts_with = "state_dir")]
    socket: Option<PathBuf>,
    /// vmhad's state directory; its API socket is DIR/vmhad.sock.
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

impl ApiArgs {
    /// The socket path: `--socket`, else `--state-dir`/vmhad.sock, else `$VMHA_SOCKET` (when
    /// set and not empty), else the default state dir's socket.
    pub fn socket(&self) -> PathBuf {
        if let Some(socket) = &self.socket {
            return socket.clone();
        }
        if let Some(dir) = &self.state_dir {
            return dir.join("vmhad.sock");
        }
        match std::env::var_os(SOCKET_ENV) {
            Some(s) if !s.is_empty() => PathBuf::from(s),
            _ => PathBuf::from(vmha_model::defaults::STATE_DIR).join("vmhad.sock"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_comes_from_socket_then_state_dir() {
        let explicit = ApiArgs {
            socket: Some("/run/x.sock".into()),
            state_dir: None,
        };
        assert_eq!(explicit.socket(), PathBuf::from("/run/x.sock"));
        let dir = ApiArgs {
            socket: None,
            state_dir: Some("/srv/vmha".into()),
        };
        assert_eq!(dir.socket(), PathBuf::from("/srv/vmha/vmhad.sock"));
    }
}
