//! Executes the engine's actions. Each action runs in its own task and answers the core with
//! exactly one input, so a slow or hung guest never delays another VM's probes or actions.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use vmha_engine::{
    ControllerAction, ControllerActionKind, ControllerInput, HostAction, HostActionKind, HostInput,
};
use vmha_model::Name;
use vmha_store::ClusterStore;
use vmha_store::records::Records;
use vmha_store::{CasOutcome, Expect, Mutation};

use crate::daemon::Msg;
use crate::store_io::{StoredReport, Write};
use crate::vm_slot::{SlotError, VmSlot};

/// Runs actions against this host's VM slots and the cluster store.
pub struct Executor<S> {
    /// This host.
    pub host: Name,
    /// The VMs this host may run.
    pub slots: BTreeMap<Name, Arc<VmSlot>>,
    /// Answers go here.
    pub tx: mpsc::Sender<Msg>,
    /// Ordered store writes.
    pub writes: mpsc::UnboundedSender<Write>,
    /// Typed store access for compare-and-swap.
    pub records: Records<S>,
}

impl<S: ClusterStore> Executor<S> {
    /// Starts executing a host agent action.
    pub fn host_action(&self, action: HostAction) {
        tracing::debug!(id = %action.id, reason = %action.reason, "action {:?}", action.kind);
        let id = action.id;
        let tx = self.tx.clone();
        let is_probe = matches!(action.kind, HostActionKind::Probe { .. });
        // Every action is answered exactly once, even for a VM this host has no slot for.
        let slot_of = |vm: &Name| {
            let slot = self.slots.get(vm).cloned();
            if slot.is_none() {
                let answer = if is_probe {
                    HostInput::GuestUnreachable { vm: vm.clone() }
                } else {
                    HostInput::ActionResult {
                        id,
                        result: Err(format!("VM {vm} is not configured on host {}", self.host)),
                    }
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(Msg::Host(answer)).await;
                });
            }
            slot
        };
        match action.kind {
            HostActionKind::Report { vm, report } => {
                let stored = StoredReport {
                    host: self.host.clone(),
                    report,
                };
                // The writer only stops when the daemon exits.
                let _ = self.writes.send(Write::Report(vm, stored));
            }
            HostActionKind::Probe { vm, checks } => {
                let Some(slot) = slot_of(&vm) else { return };
                tokio::spawn(async move {
                    let input = match slot.probe(&checks).await {
                        Ok(outcomes) => HostInput::ProbeResult { id, vm, outcomes },
                        // Answered by the engine's GuestExec input: the channel itself is fine.
                        Err(SlotError::ExecBlocked { .. }) => return slot.exec_refused().await,
                        Err(e) => {
                            tracing::debug!(%vm, "probe failed: {e}");
                            HostInput::GuestUnreachable { vm }
                        }
                    };
                    let _ = tx.send(Msg::Host(input)).await;
                });
            }
            HostActionKind::StartApp { vm, app, argv }
            | HostActionKind::StopApp { vm, app, argv } => {
                let Some(slot) = slot_of(&vm) else { return };
                tokio::spawn(async move {
                    let result = slot.run_app_command(&argv).await.map_err(|e| e.to_string());
                    if let Err(e) = &result {
                        tracing::info!(%vm, %app, "app command failed: {e}");
                    }
                    let _ = tx
                        .send(Msg::Host(HostInput::ActionResult { id, result }))
                        .await;
                });
            }
            HostActionKind::StartVm { vm } => {
                let Some(slot) = slot_of(&vm) else { return };
                tokio::spawn(async move {
                    let result = slot.start().await.map_err(|e| e.to_string());
                    let _ = tx
                        .send(Msg::Host(HostInput::ActionResult { id, result }))
                        .await;
                });
            }
            HostActionKind::StopVm { vm, timeout } => {
                let Some(slot) = slot_of(&vm) else { return };
                tokio::spawn(async move {
                    let result = slot.stop(timeout).await.map_err(|e| e.to_string());
                    let _ = tx
                        .send(Msg::Host(HostInput::ActionResult { id, result }))
                        .await;
                });
            }
            HostActionKind::KillVm { vm } => {
                let Some(slot) = slot_of(&vm) else { return };
                tokio::spawn(async move {
                    let result = slot.kill().await.map_err(|e| e.to_string());
                    let _ = tx
                        .send(Msg::Host(HostInput::ActionResult { id, result }))
                        .await;
                });
            }
        }
    }

    /// Starts executing a controller action.
    pub fn controller_action(&self, action: ControllerAction) {
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
                let records = self.records.clone();
                let tx = self.tx.clone();
                let id = action.id;
                tokio::spawn(async move {
                    let revision = match cas_owner(&records, &vm, expected_revision, &record).await
                    {
                        Ok(revision) => revision,
                        Err(e) => {
                            tracing::error!(%vm, "ownership compare-and-swap failed: {e}");
                            None
                        }
                    };
                    let _ = tx
                        .send(Msg::Ctrl(ControllerInput::CasResult { id, revision }))
                        .await;
                });
            }
        }
    }
}

/// Writes `record` iff the stored revision is still `expected` (0: absent); the new revision
/// when written. On the embedded
/// store ownership is not bound to a lease: one host, and the admin's desired state (a stopped
/// VM stays stopped) must survive a daemon restart.
async fn cas_owner<S: ClusterStore>(
    records: &Records<S>,
    vm: &Name,
    expected: u64,
    record: &vmha_engine::OwnerRecord,
) -> anyhow::Result<Option<u64>> {
    let key = records.layout().vm_owner(vm.as_str())?;
    let expect = if expected == 0 {
        Expect::Absent
    } else {
        Expect::Revision(expected)
    };
    let value = serde_json::to_vec(record)?;
    let outcome = records
        .store()
        .compare_and_swap(&key, expect, Mutation::Put { value, lease: None })
        .await?;
    Ok(match outcome {
        CasOutcome::Swapped { revision } => Some(revision),
        CasOutcome::Conflict { .. } => None,
    })
}
