//! How a failed command is reported: its message on stderr (vmhad's own text when it refused),
//! a hint when a refused command changed nothing and may simply be retried, and the exit code.
//!
//! Exit codes ([`EXIT_CODES`], also in `vmha --help`): 0 done; [`EXIT_FAILURE`] (1) vmhad
//! refused the command or it failed; [`EXIT_USAGE`] (2) a usage error (clap's, and every
//! argument check done before anything is sent) or an invalid configuration;
//! [`EXIT_UNREACHABLE`] (3) vmhad could not be reached (not running, no answer, not vmhad, TLS
//! failed); [`EXIT_DENIED`] (4) vmhad refused access (no or bad token, a read-only token on an
//! admin command, the socket closed to this user). `vmha guest exec` exits with the guest
//! command's code.

use std::process::ExitCode;

use vmha_engine::CommandError;

use crate::client::ClientError;

/// Exit code of a failure: vmhad refusing the command, or output that cannot be written.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of a usage error or an invalid configuration (clap's usage errors use 2 too).
pub const EXIT_USAGE: u8 = 2;
/// Exit code when vmhad cannot be reached: nothing was done.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit code when vmhad refuses access (401, 403, or a socket closed to this user): nothing
/// was done.
pub const EXIT_DENIED: u8 = 4;

/// The exit-code table of `vmha --help` and the docs.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  vmhad refused the command, or it failed (vmhad's message on stderr)
  2  usage error or invalid configuration: nothing was sent
  3  vmhad unreachable (not running, no answer within --timeout, not vmhad, TLS failed)
  4  access denied (no or invalid token, read-only token on an admin command,
     socket closed to this user)
  `vmha guest exec` exits with the guest command's own code.";

/// A usage error found after parsing (e.g. a bad `$VMHA_TIMEOUT`): nothing was sent; exit
/// [`EXIT_USAGE`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Prints `err` on stderr (with a retry hint when one applies) and returns the exit code. A
/// closed stdout (`vmha events | head`) is the reader's choice, not a failure: exit 0, silent.
pub fn failure(err: &anyhow::Error) -> ExitCode {
    let broken_pipe = err
        .downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    for line in lines(err) {
        eprintln!("vmha: {line}");
    }
    ExitCode::from(exit_code(err))
}

/// The exit code of `err` (see [`EXIT_CODES`]).
fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<UsageError>().is_some() {
        return EXIT_USAGE;
    }
    match err.downcast_ref::<ClientError>() {
        Some(
            ClientError::NoSocket { .. }
            | ClientError::Stale { .. }
            | ClientError::Connect { .. }
            | ClientError::Timeout { .. }
            | ClientError::NotVmhad { .. }
            | ClientError::Untrusted { .. }
            | ClientError::Io { .. }
            | ClientError::Tls { .. },
        ) => EXIT_UNREACHABLE,
        Some(
            ClientError::PermissionDenied { .. }
            | ClientError::Unauthorized { .. }
            | ClientError::Forbidden { .. },
        ) => EXIT_DENIED,
        Some(ClientError::Api { .. }) | None => EXIT_FAILURE,
    }
}

/// The lines that report `err`: its message, then the retry hint if any.
fn lines(err: &anyhow::Error) -> Vec<String> {
    let mut lines = vec![format!("{err:#}")];
    let refused = match err.downcast_ref::<ClientError>() {
        Some(ClientError::Api { body, .. }) => body.command_error.as_ref(),
        _ => None,
    };
    if let Some(hint) = refused.and_then(retry_hint) {
        lines.push(format!("hint: {hint}"));
    }
    lines
}

/// What to tell the operator about a refusal that changed nothing and may be retried as is;
/// `None` when retrying the same command would be refused again.
pub fn retry_hint(err: &CommandError) -> Option<&'static str> {
    match err {
        CommandError::StoreUnavailable(_) => Some(
            "the command changed nothing and may be retried once the cluster store is back \
             (`vmha status` then shows `cluster store: ok`)",
        ),
        CommandError::NoController => Some(
            "the command changed nothing and may be retried once a controller is elected \
             (`vmha status` names it)",
        ),
        CommandError::NotTaken(_) => Some(
            "the command changed nothing and may be retried (check that host with `vmha status`)",
        ),
        CommandError::Overloaded => {
            Some("the command changed nothing and may be retried in a moment")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use vmha_api::ErrorBody;
    use vmha_model::Name;

    fn refusal(command_error: Option<CommandError>) -> anyhow::Error {
        let error = command_error
            .as_ref()
            .map_or_else(|| "bad request".to_string(), ToString::to_string);
        ClientError::Api {
            status: 409,
            body: ErrorBody {
                error,
                command_error,
            },
        }
        .into()
    }

    #[test]
    fn retryable_refusals_get_a_hint_after_vmhads_message() {
        for err in [
            CommandError::StoreUnavailable("etcd: deadline exceeded".into()),
            CommandError::NoController,
            CommandError::NotTaken("kvm2".into()),
            CommandError::Overloaded,
        ] {
            let lines = lines(&refusal(Some(err.clone())));
            assert_eq!(lines.len(), 2, "{lines:?}");
            assert_eq!(lines[0], err.to_string());
            assert!(
                lines[1].starts_with("hint: the command changed nothing and may be retried"),
                "{lines:?}"
            );
        }
    }

    #[test]
    fn other_failures_print_their_message_alone() {
        let frozen = CommandError::Frozen(Name::new("shop").unwrap());
        assert_eq!(
            lines(&refusal(Some(frozen))),
            ["VM `shop` is frozen; unfreeze it first"]
        );
        assert_eq!(lines(&refusal(None)), ["bad request"]);
        assert_eq!(
            lines(&anyhow::anyhow!("vmhad closed the event stream")),
            ["vmhad closed the event stream"]
        );
        assert!(retry_hint(&CommandError::NoOwner(Name::new("shop").unwrap())).is_none());
    }

    #[test]
    fn exit_codes_tell_refused_from_unreachable_from_denied() {
        use crate::transport::Target;
        let at = || Target::Socket("/s".into());
        assert_eq!(exit_code(&refusal(None)), EXIT_FAILURE);
        assert_eq!(exit_code(&UsageError("x".into()).into()), EXIT_USAGE);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), EXIT_FAILURE);
        let unreachable: anyhow::Error = ClientError::Timeout {
            at: at(),
            after: std::time::Duration::from_secs(1),
        }
        .into();
        assert_eq!(exit_code(&unreachable), EXIT_UNREACHABLE);
        let denied: anyhow::Error = ClientError::Forbidden {
            at: at(),
            message: "read-only token".into(),
        }
        .into();
        assert_eq!(exit_code(&denied), EXIT_DENIED);
        for code in [EXIT_FAILURE, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_DENIED] {
            assert!(EXIT_CODES.contains(&format!("\n  {code}  ")), "{code}");
        }
    }
}
