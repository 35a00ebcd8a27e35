//! Executes the engine's actions once they may run. Each action runs in its own task and
//! answers the core with exactly one input, so a slow or hung guest never delays another VM.
//! Controller writes of ownership records are compare-and-swaps fenced by the controller's
//! term and, on etcd, bound to the new owner's lease.

use std::sync::Arc;

use vmha_engine::{
    ActionError, ControllerAction, ControllerActionKind, HostAction, HostActionKind, HostInput,
    MigrationFigures, OwnerRecord,
};
use vmha_model::Name;
use vmha_store::layout::Layout;
use vmha_store::{ClusterStore, Compare, Op, TxnOutcome};

use crate::election::Leadership;
use crate::follow::HostLeases;
use crate::inbox::{HostInputs, Inbox, Msg};
use crate::metrics::{METRICS, StoreOp};
use crate::slots::Slots;

/// The address part of a `[[host]] address` (`IP`, `name`, `IP:port`, `[v6]:port` or a
/// URL), where incoming live migrations listen.
pub fn migration_address(address: &str) -> String {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = rest.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6).to_string();
    }
    if rest.parse::<std::net::Ipv6Addr>().is_ok() {
        return rest.to_string();
    }
    rest.rsplit_once(':').map_or(rest, |(h, _)| h).to_string()
}

/// Runs actions against this host's VM slots and the cluster store.
pub struct Executor<S> {
    /// This host.
    pub host: Name,
    /// The VMs this host may run.
    pub slots: Slots,
    /// Answers to host actions.
    pub answers: HostInputs,
    /// Answers to controller actions.
    pub inbox: Inbox,
    /// The store.
    pub store: S,
    /// Key layout.
    pub layout: Layout,
    /// Bind ownership records to the owner's lease (etcd) or not (embedded: one host, nothing
    /// can take over, and the records must survive a daemon restart).
    pub leased_owners: bool,
    /// Hosts' leases.
    pub leases: Arc<HostLeases>,
    /// This host's leadership (the fence of controller writes).
    pub leadership: Arc<Leadership>,
    /// Where incoming live migrations listen: the host part of this host's `address`.
    pub migration_address: Option<String>,
}

impl<S: ClusterStore> Executor<S> {
    /// Starts executing a host agent action.
    pub fn host_action(&self, action: HostAction) {
        tracing::debug!(id = %action.id, reason = %action.reason, "action {:?}", action.kind);
        let id = action.id;
        let answers = self.answers.clone();
        let vm = match &action.kind {
            HostActionKind::Probe { vm, .. }
            | HostActionKind::Watch { vm, .. }
            | HostActionKind::PingGuest { vm, .. }
            | HostActionKind::StartApp { vm, .. }
            | HostActionKind::StopApp { vm, .. }
            | HostActionKind::StartVm { vm }
            | HostActionKind::StopVm { vm, .. }
            | HostActionKind::KillVm { vm }
            | HostActionKind::PrepareIncoming { vm }
            | HostActionKind::Migrate { vm, .. }
            | HostActionKind::CancelMigration { vm } => vm.clone(),
        };
        let Some(slot) = self.slots.get(&vm) else {
            // Every action is answered exactly once, even for a VM without a slot here.
            let error = ActionError::NotConfigured {
                detail: format!("VM {vm} is not configured on host {}", self.host),
            };
            tokio::spawn(async move {
                let input = match action.kind {
                    HostActionKind::PrepareIncoming { .. } => HostInput::IncomingResult {
                        id,
                        result: Err(error),
                    },
                    HostActionKind::Migrate { .. } => HostInput::MigrationResult {
                        id,
                        result: Err(error),
                    },
                    _ => HostInput::ActionResult {
                        id,
                        result: Err(error),
                    },
                };
                answers.send(input).await;
            });
            return;
        };
        let address = self.migration_address.clone();
        tokio::spawn(async move {
            // What happened, as it is: the engine decides what it means.
            let result = match action.kind {
                HostActionKind::Probe { vm, checks } => {
                    let started = std::time::Instant::now();
                    let probed = slot.probe(&checks).await;
                    METRICS.probe(vm.as_str(), started.elapsed(), probed.is_ok());
                    match probed {
                        Ok(outcomes) => {
                            answers
                                .send(HostInput::ProbeResult { id, vm, outcomes })
                                .await;
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(%vm, "probe failed: {e}");
                            Err(e)
                        }
                    }
                }
                HostActionKind::Watch {
                    vm,
                    targets,
                    period,
                } => match slot.watch(&targets, period).await {
                    Ok(report) => {
                        tracing::debug!(%vm, "watcher ended: {:?}", report.end);
                        answers
                            .send(HostInput::WatchResult { id, vm, report })
                            .await;
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(%vm, "watcher failed: {e}");
                        Err(e)
                    }
                },
                HostActionKind::PingGuest {
                    timeout,
                    check_exec,
                    ..
                } => slot.ping(timeout, check_exec).await,
                HostActionKind::StartApp { vm, app, argv }
                | HostActionKind::StopApp { vm, app, argv } => {
                    let result = slot.run_app_command(&argv).await;
                    if let Err(e) = &result {
                        tracing::info!(%vm, %app, "app command failed: {e}");
                    }
                    result
                }
                HostActionKind::StartVm { .. } => slot.start().await.map_err(ActionError::from),
                HostActionKind::StopVm { timeout, .. } => {
                    slot.stop(timeout).await.map_err(ActionError::from)
                }
                HostActionKind::KillVm { .. } => slot.kill().await.map_err(ActionError::from),
                HostActionKind::PrepareIncoming { .. } => {
                    let result = slot
                        .prepare_incoming(address.as_deref())
                        .await
                        .map_err(ActionError::from);
                    answers.send(HostInput::IncomingResult { id, result }).await;
                    return;
                }
                HostActionKind::Migrate { uri, .. } => {
                    let result = slot
                        .migrate(&uri)
                        .await
                        .map(|s| MigrationFigures {
                            total_ms: s.total_ms,
                            downtime_ms: s.downtime_ms,
                        })
                        .map_err(ActionError::from);
                    answers
                        .send(HostInput::MigrationResult { id, result })
                        .await;
                    return;
                }
                HostActionKind::CancelMigration { .. } => {
                    slot.cancel_migration().await.map_err(ActionError::from)
                }
            };
            answers.send(HostInput::ActionResult { id, result }).await;
        });
    }

    /// Starts executing a controller action of term `term`.
    pub fn controller_action(&self, term: u64, action: ControllerAction) {
        tracing::debug!(id = %action.id, reason = %action.reason, "controller action {:?}", action.kind);
        match action.kind {
            ControllerActionKind::Alert { vm } => {
                tracing::error!(%vm, "ALERT: {}", action.reason);
            }
            ControllerActionKind::CasOwner {
                vm,
                expected_revision,
                record,
            } => {
                let id = action.id;
                let inbox = self.inbox.clone();
                let write = self.cas_owner(term, &vm, expected_revision, &record);
                tokio::spawn(async move {
                    let revision = match write.await {
                        Ok(revision) => revision,
                        Err(e) => {
                            tracing::warn!(%vm, "ownership compare-and-swap failed: {e}");
                            None
                        }
                    };
                    inbox.send(Msg::CasResult { id, revision }).await;
                });
            }
        }
    }

    /// Writes `record` iff the stored revision is still `expected` (0: absent) and term `term`
    /// still leads; the new revision when written.
    fn cas_owner(
        &self,
        term: u64,
        vm: &Name,
        expected: u64,
        record: &OwnerRecord,
    ) -> impl std::future::Future<Output = anyhow::Result<Option<u64>>> + Send + use<S> {
        let store = self.store.clone();
        let prepared = (|| -> anyhow::Result<Option<(Vec<Compare>, Vec<Op>)>> {
            let Some(fence) = self.leadership.fence(term) else {
                return Ok(None);
            };
            let key = self.layout.vm_owner(vm.as_str())?;
            let expect = if expected == 0 {
                Compare::Absent { key: key.clone() }
            } else {
                Compare::ModRevision {
                    key: key.clone(),
                    revision: expected,
                }
            };
            let lease = match (&record.owner, self.leased_owners) {
                (Some(owner), true) => match self.leases.get(owner) {
                    Some(l) => Some(l),
                    // Not a member (any more): it cannot own anything.
                    None => return Ok(None),
                },
                _ => None,
            };
            let value = serde_json::to_vec(record)?;
            Ok(Some((
                vec![expect, fence],
                vec![Op::Put { key, value, lease }],
            )))
        })();
        async move {
            let Some((compares, ops)) = prepared? else {
                return Ok(None);
            };
            let started = std::time::Instant::now();
            let outcome = store.txn(compares, ops).await;
            let error = match &outcome {
                Ok(TxnOutcome::Committed { .. }) => None,
                Ok(TxnOutcome::Failed) | Err(vmha_store::StoreError::LeaseExpired { .. }) => {
                    Some("conflict")
                }
                Err(_) => Some("error"),
            };
            METRICS.store(StoreOp::OwnerCas, started.elapsed(), error);
            Ok(match outcome {
                Ok(TxnOutcome::Committed { revision }) => Some(revision),
                Ok(TxnOutcome::Failed) => None,
                Err(vmha_store::StoreError::LeaseExpired { .. }) => None,
                Err(e) => return Err(e.into()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::migration_address;

    #[test]
    fn the_migration_address_is_the_host_part() {
        assert_eq!(migration_address("10.0.0.2"), "10.0.0.2");
        assert_eq!(migration_address("10.0.0.2:7000"), "10.0.0.2");
        assert_eq!(migration_address("http://kvm2.lab:7000/x"), "kvm2.lab");
        assert_eq!(migration_address("[fd00::2]:7000"), "fd00::2");
        assert_eq!(migration_address("fd00::2"), "fd00::2");
    }
}
