//! The daemon's side of the cluster store: what it writes (in order, from one writer task),
//! and the watch that turns stored records back into engine inputs (level-triggered: on a
//! lagged or broken watch everything is listed again).

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use vmha_engine::{ControllerInput, Event, HostAgentState, HostInput, OwnerRecord, VmReport};
use vmha_model::Name;
use vmha_store::layout::VmRecord;
use vmha_store::records::{EventLog, Records};
use vmha_store::{ClusterStore, KeyValue, WatchEvent, WatchStream};

use crate::daemon::Msg;

/// A host's membership record (`hosts/<host>`, bound to its lease).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostRecord {
    /// Memory available to VMs (config value, else the machine's total).
    pub memory_mb: u64,
    /// vmhad version.
    pub version: String,
}

/// A host's report about a VM group (`vms/<vm>/state`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredReport {
    /// Reporting host.
    pub host: Name,
    /// What it reported.
    pub report: VmReport,
}

/// A write for the writer task.
pub enum Write {
    /// Append to the event log.
    Event(Event),
    /// Persist this host's agent state.
    AgentState(Name, Box<HostAgentState>),
    /// Persist the controller's state.
    ControllerState(serde_json::Value),
    /// Report a VM group's state for the controller.
    Report(Name, StoredReport),
}

/// Key of the controller's persisted state.
pub fn controller_state_key(records_root: &str) -> String {
    format!("{records_root}controller/state")
}

/// Applies writes in the order they were queued. Failures are logged; the next level-triggered
/// pass writes the state again.
pub async fn writer<S: ClusterStore>(
    records: Records<S>,
    log: EventLog<S>,
    mut rx: mpsc::UnboundedReceiver<Write>,
) {
    while let Some(w) = rx.recv().await {
        let result = match &w {
            Write::Event(e) => log.append(e).await.map(drop),
            Write::AgentState(host, state) => records
                .put_agent_state(host.as_str(), state.as_ref())
                .await
                .map(drop),
            Write::Report(vm, report) => records.put_vm_state(vm.as_str(), report).await.map(drop),
            Write::ControllerState(v) => {
                let key = controller_state_key(records.layout().root());
                match serde_json::to_vec(v) {
                    Ok(bytes) => records
                        .store()
                        .put(&key, bytes, None)
                        .await
                        .map(drop)
                        .map_err(Into::into),
                    Err(e) => {
                        tracing::error!("cannot encode controller state: {e}");
                        Ok(())
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::error!("cluster store write failed: {e}");
        }
    }
}

/// Turns one stored key into engine inputs.
fn inputs_of<S: ClusterStore>(records: &Records<S>, change: &WatchEvent) -> Vec<Msg> {
    let layout = records.layout();
    let key = change.key();
    let value = match change {
        WatchEvent::Put(kv) => Some(kv),
        WatchEvent::Delete { .. } => None,
    };
    let mut out = Vec::new();
    if let Some(host) = layout.parse_host(key) {
        let Ok(host) = Name::new(host) else {
            return out;
        };
        out.push(Msg::Ctrl(ControllerInput::HostLease {
            host: host.clone(),
            up: value.is_some(),
        }));
        if let Some(record) = value.and_then(decode::<HostRecord>) {
            out.push(Msg::Ctrl(ControllerInput::HostCapacity {
                host,
                memory_mb: record.memory_mb,
            }));
        }
        return out;
    }
    let Some((vm, which)) = layout.parse_vm(key) else {
        return out;
    };
    let Ok(vm) = Name::new(vm) else {
        return out;
    };
    match which {
        VmRecord::Owner => {
            let record = value.and_then(decode::<OwnerRecord>);
            let revision = value.map_or(0, |kv| kv.mod_revision);
            out.push(Msg::Host(HostInput::Ownership {
                vm: vm.clone(),
                owner: record.as_ref().and_then(|r| r.owner.clone()),
                desired: record
                    .as_ref()
                    .map_or(vmha_engine::Desired::Stop, |r| r.desired),
                revision,
            }));
            out.push(Msg::Ctrl(ControllerInput::Ownership {
                vm,
                record,
                revision,
            }));
        }
        VmRecord::State => {
            if let Some(r) = value.and_then(decode::<StoredReport>) {
                out.push(Msg::Ctrl(ControllerInput::Report {
                    host: r.host,
                    vm,
                    report: r.report,
                }));
            }
        }
    }
    out
}

fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Option<T> {
    match serde_json::from_slice(&kv.value) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(key = %kv.key, "ignoring undecodable record: {e}");
            None
        }
    }
}

/// Feeds every record under the cluster root to the core, then follows changes; on a lagged
/// or broken watch, lists everything again.
pub async fn follow<S: ClusterStore>(
    records: Records<S>,
    tx: mpsc::Sender<Msg>,
    relist: std::sync::Arc<tokio::sync::Notify>,
) {
    let root = records.layout().root().to_string();
    loop {
        let listing = match records.store().list(&root).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot list the cluster store: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut vms_with_owner = std::collections::BTreeSet::new();
        let mut host = Vec::new();
        let mut controller = Vec::new();
        for kv in &listing.kvs {
            if let Some((vm, VmRecord::Owner)) = records.layout().parse_vm(&kv.key) {
                vms_with_owner.insert(vm.to_string());
            }
            for msg in inputs_of(&records, &WatchEvent::Put(kv.clone())) {
                match msg {
                    Msg::Host(i) => host.push(i),
                    Msg::Ctrl(i) => controller.push(i),
                    _ => {}
                }
            }
        }
        let snapshot = Msg::Snapshot {
            host,
            controller,
            vms_with_owner,
        };
        if tx.send(snapshot).await.is_err() {
            return;
        }
        let mut watch = match records.store().watch(&root, listing.revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("cannot watch the cluster store: {e}");
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                next = watch.next() => next,
                () = relist.notified() => break,
            };
            match next {
                Ok(change) => {
                    tracing::debug!(
                        key = change.key(),
                        revision = change.revision(),
                        "store change"
                    );
                    for msg in inputs_of(&records, &change) {
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("cluster store watch interrupted ({e}); listing again");
                    break;
                }
            }
        }
    }
}
