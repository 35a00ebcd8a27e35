//! Commands this host cannot carry out itself go, through the cluster store, to the host that
//! can (the VM's owner, or the elected controller): the request is written bound to this
//! host's lease, the receiver applies it and writes the answer in the same commit that makes
//! the change durable (consuming the request), and the caller here gets that answer.
//!
//! A receiver that does not take the request in time: the request is withdrawn by
//! compare-and-swap. If the withdrawal wins, nothing was changed and the caller is told so;
//! if it loses, the request was consumed, so its answer exists and is waited for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vmha_engine::{AdminCommand, CommandError, Receiver};
use vmha_model::Name;
use vmha_store::layout::{Layout, Target};
use vmha_store::{ClusterStore, Compare, LeaseId, Op, TxnOutcome};

use crate::codec::{self, StoredRequest};
use crate::follow::Replies;

/// How long the receiver has to take a forwarded command.
pub const TAKE_WITHIN: Duration = Duration::from_secs(10);
/// How long an answer may take once the request is known to be consumed.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// Sends commands to other hosts.
pub struct Forwarder<S> {
    /// The store.
    pub store: S,
    /// Key layout.
    pub layout: Layout,
    /// This host.
    pub me: Name,
    /// This host's lease (requests vanish with their sender).
    pub lease: Arc<AtomicU64>,
    /// Waiting callers.
    pub replies: Arc<Replies>,
    /// Request counter.
    pub next: AtomicU64,
}

fn unavailable(e: impl std::fmt::Display) -> CommandError {
    CommandError::StoreUnavailable(e.to_string())
}

impl<S: ClusterStore> Forwarder<S> {
    /// Forwards `command` to `to` and returns its answer.
    pub async fn forward(&self, to: Receiver, command: AdminCommand) -> Result<(), CommandError> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let lease = self.lease.load(Ordering::SeqCst);
        let id = format!("{}-{lease:x}-{n}", self.me);
        let target_name;
        let (target, who) = match &to {
            Receiver::Controller => (Target::Controller, "the cluster controller".to_string()),
            Receiver::Host(h) => {
                target_name = h.to_string();
                (Target::Host(&target_name), format!("host {h}"))
            }
        };
        let request = StoredRequest {
            from: self.me.clone(),
            command,
        };
        let lease = i64::try_from(lease).ok().filter(|l| *l != 0).map(LeaseId);
        let op = codec::request_op(&self.layout, target, &id, &request, lease)
            .map_err(|e| CommandError::InvalidValue(e.to_string()))?;
        let key = match &op {
            Op::Put { key, .. } => key.clone(),
            _ => String::new(),
        };
        let answer = self.replies.expect(&id);
        let written = self
            .store
            .txn(vec![Compare::Absent { key: key.clone() }], vec![op])
            .await;
        let revision = match written {
            Ok(TxnOutcome::Committed { revision }) => revision,
            Ok(TxnOutcome::Failed) => {
                self.replies.forget(&id);
                return Err(unavailable("request id already in use"));
            }
            Err(e) => {
                self.replies.forget(&id);
                return Err(unavailable(e));
            }
        };
        let mut answer = answer;
        let result = match tokio::time::timeout(TAKE_WITHIN, &mut answer).await {
            Ok(Ok(reply)) => Ok(reply.result),
            _ => {
                // Withdraw it, unless it was consumed meanwhile.
                let withdraw = self
                    .store
                    .txn(
                        vec![Compare::ModRevision {
                            key: key.clone(),
                            revision,
                        }],
                        vec![Op::Delete { key: key.clone() }],
                    )
                    .await;
                match withdraw {
                    Ok(TxnOutcome::Committed { .. }) => Err(CommandError::NotTaken(who)),
                    _ => match tokio::time::timeout(ANSWER_WITHIN, answer).await {
                        Ok(Ok(reply)) => Ok(reply.result),
                        _ => Err(unavailable(format!(
                            "{who} took the command but its answer did not arrive; \
                             check `vmha status` before retrying"
                        ))),
                    },
                }
            }
        };
        self.replies.forget(&id);
        // The answer was read: remove it (best effort; stale ones are harmless).
        if let Ok(reply_key) = self.layout.reply(&id) {
            let _ = self.store.delete(&reply_key).await;
        }
        result?
    }
}
