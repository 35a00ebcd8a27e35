//! The cluster controller (SPEC §4.4, the patent's "cluster controller"): one elected instance
//! places VM groups on hosts and moves them, writing ownership records only by compare-and-swap.
//!
//! Driving protocol (same shape as [`crate::HostAgent`]): on election, feed the current lease
//! of every configured host ([`ControllerInput::HostLease`], `up = false` for hosts without a
//! live lease), the ownership record of every VM ([`ControllerInput::Ownership`], revision 0
//! when absent) and the latest report of each host per VM; then every change. The controller
//! acts on a VM only once its record is known, and on a host only once its lease is known.
//!
//! Safety (SPEC §4.6): a VM group is given to a new host only when the old owner reported it
//! not running (`running = false`) or the old owner's lease EXPIRED in the store; a move of a
//! running VM first sets `desired = stop` with `move_to` on the old owner's record.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmha_model::{Config, HostState, Name, Placement, VmState};

use crate::command::{AdminCommand, CommandError};
use crate::event::{Event, ObjectRef, Origin};
use crate::host_io::{Desired, MigrationNote, VmReport};
use crate::ids::ActionId;
use crate::records::VmAdmin;
use crate::time::{Timestamp, human, millis};

/// The ownership record of a VM group in the cluster store (without its revision).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The host allowed to run the VM (`None`: nobody).
    pub owner: Option<Name>,
    /// What the owner must do.
    pub desired: Desired,
    /// Set while a move is in progress: the owner stops the VM, then the controller gives it
    /// to this host.
    #[serde(default)]
    pub move_to: Option<Name>,
    /// Stopped by a maintenance drain with nowhere to go: runs again on its owner when the
    /// owner leaves maintenance.
    #[serde(default)]
    pub parked: bool,
    /// Set while a live migration is in progress: the owner keeps running the VM and sends
    /// it to the target; ownership passes only once the target reports it running there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate: Option<Migration>,
}

/// A live migration in progress (in an [`OwnerRecord`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// The target host: it prepares an incoming QEMU.
    pub to: Name,
    /// Where the target listens (`tcp:ADDR:PORT`), once it reported it: the owner then
    /// starts sending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

/// An input to the [`Controller`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "kebab-case")]
pub enum ControllerInput {
    /// A host's lease: `up` when live, `false` once the store EXPIRED it (never on mere
    /// suspicion: only an expired lease lets the controller fail the host's VMs over).
    HostLease {
        /// Host.
        host: Name,
        /// Lease live.
        up: bool,
        /// Which life of the host holds the lease (its daemon's lease id); 0 when down.
        incarnation: u64,
    },
    /// A host's memory for VMs, when its config has no `memory_mb`.
    HostCapacity {
        /// Host.
        host: Name,
        /// MiB available to VMs.
        memory_mb: u64,
    },
    /// A host's report about a VM group (a [`crate::node::Persist`] report, as stored).
    Report {
        /// Reporting host.
        host: Name,
        /// The life of the host that wrote it (see [`ControllerInput::HostLease`]).
        incarnation: u64,
        /// VM.
        vm: Name,
        /// Report.
        report: VmReport,
    },
    /// The ownership record as stored, with its revision (0 and `None`: no record).
    Ownership {
        /// VM.
        vm: Name,
        /// Record.
        record: Option<OwnerRecord>,
        /// Store revision of the record.
        revision: u64,
    },
    /// A VM group's admin record as stored (`None`: absent, i.e. desired run, not frozen).
    Admin {
        /// VM.
        vm: Name,
        /// Record.
        admin: Option<VmAdmin>,
    },
    /// The result of a [`ControllerActionKind::CasOwner`]: the record's new revision when it
    /// was written, `None` when the stored revision did not match (the current record then
    /// arrives as [`ControllerInput::Ownership`]).
    CasResult {
        /// The CAS action.
        id: ActionId,
        /// New revision, if swapped.
        revision: Option<u64>,
    },
}

/// What the controller asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum ControllerActionKind {
    /// Write `record` if the stored revision is still `expected_revision` (0: no record).
    /// Answer with [`ControllerInput::CasResult`].
    CasOwner {
        /// VM.
        vm: Name,
        /// Revision the record must still have.
        expected_revision: u64,
        /// New record.
        record: OwnerRecord,
    },
    /// Raise an alert to operators (the group is faulted cluster-wide). Needs no answer.
    Alert {
        /// VM.
        vm: Name,
    },
}

/// A controller action with its id and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerAction {
    /// Echo in the result.
    pub id: ActionId,
    /// What to do.
    pub kind: ControllerActionKind,
    /// Why.
    pub reason: String,
}

/// What the controller must keep across a failover of the controller itself: maintenance
/// flags, fault history (host → time per VM) and cluster-wide faults. (Desired state and
/// frozen flags are per VM, in [`crate::records::VmAdmin`].)
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ControllerState {
    #[serde(default)]
    pub(crate) maintenance: Vec<Name>,
    #[serde(default)]
    pub(crate) faults: Vec<(Name, Name, Timestamp)>,
    #[serde(default)]
    pub(crate) faulted: Vec<(Name, String)>,
}

/// A host as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// Host.
    pub name: Name,
    /// `None` until its lease is known.
    pub state: Option<HostState>,
    /// Memory for VMs in MiB, if known.
    pub capacity_mb: Option<u64>,
    /// Memory of the VM groups it owns with desired `run`.
    pub used_mb: u64,
}

/// A VM group as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterVmView {
    /// VM.
    pub name: Name,
    /// Cluster-wide state.
    pub state: VmState,
    /// Stored record, if known.
    pub record: Option<OwnerRecord>,
    /// Its revision.
    pub revision: u64,
    /// Frozen.
    pub frozen: bool,
    /// Hosts where it faulted, and when.
    pub faulted_on: Vec<(Name, Timestamp)>,
    /// Why it waits, or why it is faulted cluster-wide.
    pub note: Option<String>,
}

/// The controller's view, for `vmha status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerStatus {
    /// Hosts in config order.
    pub hosts: Vec<HostView>,
    /// VM groups in config order.
    pub vms: Vec<ClusterVmView>,
}

#[derive(Debug, Clone)]
struct HostCtl {
    name: Name,
    lease: Option<bool>,
    /// It has held a live lease since this controller started.
    seen: bool,
    incarnation: u64,
    maintenance: bool,
    capacity: Option<u64>,
    used: u64,
}

impl HostCtl {
    fn state(&self) -> Option<HostState> {
        match self.lease {
            None => None,
            Some(false) => Some(HostState::Down),
            Some(true) if self.maintenance => Some(HostState::Maintenance),
            Some(true) => Some(HostState::Up),
        }
    }
}

#[derive(Debug, Clone)]
struct VmCtl {
    name: Name,
    memory: u64,
    window_ms: u64,
    failback: bool,
    placement: Placement,
    hosts: Vec<usize>,
    requires: Vec<usize>,
    record: Option<Option<OwnerRecord>>,
    revision: u64,
    cas: Option<(ActionId, OwnerRecord)>,
    state: VmState,
    /// The admin record as stored (`None` until known: nothing is decided before).
    admin: Option<VmAdmin>,
    faults: BTreeMap<usize, Timestamp>,
    cluster_fault: Option<String>,
    note: Option<String>,
    /// A write of the record failed: no new attempt before this time, unless the record
    /// changes first (the store unreachable, a term that ended, a conflict).
    retry_at: Option<Timestamp>,
    /// The latest report: host, the host's incarnation that wrote it, report.
    report: Option<(usize, u64, VmReport)>,
    /// `migrate` is on for the VM (the admin asked for live moves).
    migrate_on: bool,
    /// It can be migrated live (`migrate` on, disks on shared storage, qemu driver).
    migratable: bool,
    /// The latest report of the target of the migration in progress: host, report.
    target_report: Option<(usize, VmReport)>,
    /// A live migration failed: no new one is tried before this time (the VM runs on).
    migrate_hold: Option<Timestamp>,
}

impl VmCtl {
    fn frozen(&self) -> bool {
        self.admin.as_ref().is_some_and(|a| a.frozen)
    }
}

/// The cluster controller (see the module documentation for the driving protocol).
#[derive(Debug, Clone)]
pub struct Controller {
    config: Arc<Config>,
    hosts: Vec<HostCtl>,
    host_index: BTreeMap<Name, usize>,
    vms: Vec<VmCtl>,
    vm_index: BTreeMap<Name, usize>,
    order: Vec<usize>,
    next_id: u64,
    now: Timestamp,
    actions: VecDeque<ControllerAction>,
    events: VecDeque<Event>,
    /// [`Controller::state`] changed since the last [`Controller::take_dirty`].
    dirty_state: bool,
    /// VMs whose admin record changed since the last [`Controller::take_dirty`].
    dirty_admin: std::collections::BTreeSet<usize>,
    /// Until then, a VM placed for the first time waits for its preferred hosts that have not
    /// been seen yet (see [`Controller::wait_for_hosts_until`]).
    startup_until: Option<Timestamp>,
}

/// What a controller changed in its persisted records since the last
/// [`Controller::take_dirty`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControllerDirty {
    /// The new [`ControllerState`], when it changed.
    pub state: Option<ControllerState>,
    /// Admin records that changed.
    pub admin: Vec<(Name, VmAdmin)>,
}

/// After a failed write of an ownership record, the next attempt waits this long (or for the
/// record to change).
const CAS_RETRY_MS: u64 = 1_000;

/// Why no host can take a VM now.
#[derive(Debug)]
struct NoHost {
    /// Each acceptable host and why it cannot.
    why: String,
    /// The VM faulted on every acceptable host within its window.
    faulted_everywhere: bool,
}

/// Topological order of VMs by `requires` (config order among equals; a cycle, which the
/// configuration rejects, falls back to config order for the rest).
fn start_order(vms: &[VmCtl]) -> Vec<usize> {
    let mut done = vec![false; vms.len()];
    let mut order = Vec::with_capacity(vms.len());
    while order.len() < vms.len() {
        let before = order.len();
        for (i, v) in vms.iter().enumerate() {
            if !done[i] && v.requires.iter().all(|&r| done[r]) {
                done[i] = true;
                order.push(i);
            }
        }
        if order.len() == before {
            for (i, d) in done.iter_mut().enumerate() {
                if !*d {
                    *d = true;
                    order.push(i);
                }
            }
        }
    }
    order
}

/// A report that licenses starting the VM elsewhere: settled and not running.
fn stopped_there(r: &VmReport) -> bool {
    !r.running && matches!(r.state, VmState::Offline | VmState::Faulted)
}

/// Hosts whose memory a record takes: the owner when it runs there, a move target and a
/// migration target.
fn takes(rec: &OwnerRecord, index: &BTreeMap<Name, usize>) -> [Option<usize>; 3] {
    let owner = match (&rec.owner, rec.desired) {
        (Some(o), Desired::Run) => index.get(o).copied(),
        _ => None,
    };
    let target = rec.move_to.as_ref().and_then(|t| index.get(t).copied());
    let migration = rec.migrate.as_ref().and_then(|m| index.get(&m.to).copied());
    [owner, target, migration]
}

/// Why a side of a live migration failed, if its report says so.
fn failed_note(r: &VmReport) -> Option<String> {
    match &r.migration {
        Some(MigrationNote::Failed { why }) => Some(why.clone()),
        _ => None,
    }
}

/// How long a VM whose live migration failed waits before another one is tried.
const MIGRATE_HOLD_MS: u64 = 60_000;

impl Controller {
    /// Creates the controller, restoring maintenance flags, fault history and cluster-wide faults
    /// from `restored` (names no longer configured are ignored).
    pub fn new(config: Arc<Config>, restored: Option<ControllerState>, now: Timestamp) -> Self {
        let hosts: Vec<HostCtl> = config
            .hosts
            .iter()
            .map(|h| HostCtl {
                name: h.name.clone(),
                lease: None,
                seen: false,
                incarnation: 0,
                maintenance: false,
                capacity: h.memory_mb,
                used: 0,
            })
            .collect();
        let host_index: BTreeMap<Name, usize> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.clone(), i))
            .collect();
        let vm_index: BTreeMap<Name, usize> = config
            .vms
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), i))
            .collect();
        let vms: Vec<VmCtl> = config
            .vms
            .iter()
            .map(|v| VmCtl {
                name: v.name.clone(),
                memory: v.memory_mb(),
                window_ms: millis(v.vm_restart_window),
                failback: v.failback,
                placement: v.placement,
                hosts: v
                    .hosts
                    .iter()
                    .filter_map(|h| host_index.get(h).copied())
                    .collect(),
                requires: v
                    .requires
                    .iter()
                    .filter_map(|r| vm_index.get(r).copied())
                    .collect(),
                record: None,
                revision: 0,
                cas: None,
                state: VmState::Unknown,
                admin: None,
                retry_at: None,
                faults: BTreeMap::new(),
                cluster_fault: None,
                note: None,
                report: None,
                migrate_on: v.migrate,
                migratable: v.live_migratable(),
                target_report: None,
                migrate_hold: None,
            })
            .collect();
        let order = start_order(&vms);
        let mut c = Controller {
            config,
            hosts,
            host_index,
            vms,
            vm_index,
            order,
            next_id: 0,
            now,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            dirty_state: false,
            dirty_admin: std::collections::BTreeSet::new(),
            startup_until: None,
        };
        if let Some(r) = restored {
            for h in &r.maintenance {
                if let Some(&i) = c.host_index.get(h) {
                    c.hosts[i].maintenance = true;
                }
            }
            for (v, h, t) in &r.faults {
                if let (Some(&vi), Some(&hi)) = (c.vm_index.get(v), c.host_index.get(h)) {
                    c.vms[vi].faults.insert(hi, *t);
                }
            }
            for (v, why) in &r.faulted {
                if let Some(&vi) = c.vm_index.get(v) {
                    c.vms[vi].cluster_fault = Some(why.clone());
                    c.vms[vi].state = VmState::Faulted;
                }
            }
        }
        c
    }

    /// A cold start: until `until`, a VM that is placed for the first time (no owner, not
    /// known to run anywhere, not a failover) is not put on a host while a host it prefers
    /// (listed before it with `placement = "priority"`, any of its hosts with
    /// `"least-loaded"`) has not taken a lease since this controller started: hosts boot at
    /// different speeds, and the first one up must not collect every VM. Failovers never wait.
    pub fn wait_for_hosts_until(&mut self, until: Timestamp) {
        self.startup_until = Some(until);
        self.reconcile();
    }

    /// Why VM `i`'s first placement waits for hosts still joining, if it does.
    fn startup_hold(&self, i: usize) -> Option<String> {
        let until = self.startup_until.filter(|u| self.now < *u)?;
        let (chosen, _) = self.choose(i, None).ok()?;
        let v = &self.vms[i];
        let candidates: &[usize] = match v.placement {
            Placement::Priority => {
                let pos = v.hosts.iter().position(|&h| h == chosen)?;
                &v.hosts[..pos]
            }
            Placement::LeastLoaded => &v.hosts,
        };
        let unseen: Vec<&str> = candidates
            .iter()
            .filter(|&&h| !self.hosts[h].seen)
            .map(|&h| self.hosts[h].name.as_str())
            .collect();
        if unseen.is_empty() {
            return None;
        }
        Some(format!(
            "waiting up to {} for {} to join before placing it (startup_wait)",
            human(until.since(self.now)),
            unseen.join(", ")
        ))
    }

    /// The configuration the controller runs.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    fn event(&mut self, object: ObjectRef, from: &str, to: &str, reason: &str) {
        self.events.push_back(Event {
            time: self.now,
            origin: Origin::Controller,
            object,
            from: from.to_string(),
            to: to.to_string(),
            reason: reason.to_string(),
        });
    }

    fn set_vm_state(&mut self, i: usize, to: VmState, reason: &str) {
        let from = self.vms[i].state;
        if from != to {
            self.vms[i].state = to;
            let name = self.vms[i].name.clone();
            self.event(ObjectRef::Vm(name), from.as_str(), to.as_str(), reason);
        }
    }

    fn set_host(&mut self, h: usize, f: impl FnOnce(&mut HostCtl), reason: &str) {
        let before = self.hosts[h].state();
        f(&mut self.hosts[h]);
        let after = self.hosts[h].state();
        if before != after {
            let from = before.map_or("unknown", HostState::as_str);
            let to = after.map_or("unknown", HostState::as_str);
            let name = self.hosts[h].name.clone();
            self.event(ObjectRef::Host(name), from, to, reason);
        }
    }

    fn act(&mut self, kind: ControllerActionKind, reason: String) -> ActionId {
        self.next_id = self.next_id.saturating_add(1);
        let id = ActionId(self.next_id);
        self.actions
            .push_back(ControllerAction { id, kind, reason });
        id
    }

    fn cas(&mut self, i: usize, record: OwnerRecord, reason: String) {
        let vm = self.vms[i].name.clone();
        // An absent record is expected absent, whatever revision deleted it.
        let expected_revision = match &self.vms[i].record {
            Some(Some(_)) => self.vms[i].revision,
            _ => 0,
        };
        let id = self.act(
            ControllerActionKind::CasOwner {
                vm,
                expected_revision,
                record: record.clone(),
            },
            reason,
        );
        self.account(i, false);
        self.vms[i].cas = Some((id, record));
        self.account(i, true);
    }

    /// The record that counts for memory: the one being written, else the stored one.
    fn effective(&self, i: usize) -> Option<&OwnerRecord> {
        match &self.vms[i].cas {
            Some((_, rec)) => Some(rec),
            None => self.vms[i].record.as_ref().and_then(Option::as_ref),
        }
    }

    /// Adds (or removes) VM `i`'s memory on the hosts its effective record takes.
    fn account(&mut self, i: usize, add: bool) {
        let Some(rec) = self.effective(i) else {
            return;
        };
        let memory = self.vms[i].memory;
        for h in takes(rec, &self.host_index).into_iter().flatten() {
            let used = &mut self.hosts[h].used;
            *used = if add {
                used.saturating_add(memory)
            } else {
                used.saturating_sub(memory)
            };
        }
    }

    fn set_record(&mut self, i: usize, record: Option<OwnerRecord>, revision: u64) {
        self.account(i, false);
        self.vms[i].record = Some(record);
        self.vms[i].revision = revision;
        self.account(i, true);
    }

    fn finish_cas(&mut self, i: usize, revision: Option<u64>) {
        self.account(i, false);
        let pending = self.vms[i].cas.take();
        match (revision, pending) {
            (Some(rev), Some((_, rec))) if rev >= self.vms[i].revision => {
                self.vms[i].record = Some(Some(rec));
                self.vms[i].revision = rev;
            }
            (None, _) => self.vms[i].retry_at = Some(self.now.plus_ms(CAS_RETRY_MS)),
            _ => {}
        }
        self.account(i, true);
    }

    fn fault_cluster(&mut self, i: usize, why: String) {
        if self.vms[i].cluster_fault.is_some() {
            return;
        }
        self.vms[i].cluster_fault = Some(why.clone());
        self.dirty_state = true;
        let r = format!("{why}; alert raised (clear with `vmha clear`)");
        self.set_vm_state(i, VmState::Faulted, &r);
        let vm = self.vms[i].name.clone();
        self.act(ControllerActionKind::Alert { vm }, why);
    }

    /// Why host `h` cannot take VM `i` now, if it cannot.
    fn unavailable(&self, i: usize, h: usize) -> Option<String> {
        let host = &self.hosts[h];
        let v = &self.vms[i];
        match host.state() {
            None => return Some(format!("{} not known yet", host.name)),
            Some(HostState::Down | HostState::Fenced) => {
                return Some(format!("{} down", host.name));
            }
            Some(HostState::Maintenance) => return Some(format!("{} in maintenance", host.name)),
            Some(HostState::Up) => {}
        }
        if let Some(t) = v.faults.get(&h)
            && self.now.since(*t) < v.window_ms
        {
            return Some(format!(
                "faulted on {} {} ago (window {})",
                host.name,
                human(self.now.since(*t)),
                human(v.window_ms)
            ));
        }
        if let Some(cap) = host.capacity {
            let free = self.free(i, h, cap);
            if free < v.memory {
                return Some(format!(
                    "{} has no room ({free} MiB free < {} MiB)",
                    host.name, v.memory
                ));
            }
        }
        None
    }

    /// Free memory on `h` for VM `i` (not counting what `i` itself takes there).
    fn free(&self, i: usize, h: usize, cap: u64) -> u64 {
        let mut used = self.hosts[h].used;
        if let Some(rec) = self.effective(i)
            && takes(rec, &self.host_index).contains(&Some(h))
        {
            used = used.saturating_sub(self.vms[i].memory);
        }
        cap.saturating_sub(used)
    }

    /// Picks a host for VM `i` per its placement policy, never `exclude`.
    fn choose(&self, i: usize, exclude: Option<usize>) -> Result<(usize, String), NoHost> {
        let v = &self.vms[i];
        let mut why = Vec::new();
        let mut best: Option<(usize, Option<u64>)> = None;
        for &h in &v.hosts {
            if Some(h) == exclude {
                why.push(format!("{} is the one it leaves", self.hosts[h].name));
                continue;
            }
            if let Some(w) = self.unavailable(i, h) {
                why.push(w);
                continue;
            }
            let free = self.hosts[h].capacity.map(|c| self.free(i, h, c));
            match v.placement {
                Placement::Priority => {
                    best = Some((h, free));
                    break;
                }
                Placement::LeastLoaded => {
                    if best.is_none_or(|(_, f)| free > f) {
                        best = Some((h, free));
                    }
                }
            }
        }
        match best {
            Some((h, free)) => {
                let how = match v.placement {
                    Placement::Priority => "priority: first acceptable host".to_string(),
                    Placement::LeastLoaded => match free {
                        Some(f) => format!("least-loaded: {f} MiB free"),
                        None => "least-loaded: capacity unknown".to_string(),
                    },
                };
                Ok((h, how))
            }
            None => {
                let now = self.now;
                let faulted_everywhere = v
                    .hosts
                    .iter()
                    .all(|h| v.faults.get(h).is_some_and(|t| now.since(*t) < v.window_ms));
                Err(NoHost {
                    why: format!("no acceptable host ({})", why.join(", ")),
                    faulted_everywhere,
                })
            }
        }
    }

    fn requirements_down(&self, i: usize) -> Vec<String> {
        self.vms[i]
            .requires
            .iter()
            .filter(|&&r| self.vms[r].state != VmState::Online)
            .map(|&r| self.vms[r].name.to_string())
            .collect()
    }

    fn wait_requirements(&mut self, i: usize) -> bool {
        let down = self.requirements_down(i);
        if down.is_empty() {
            return false;
        }
        self.vms[i].note = Some(format!("waiting for {} to be online", down.join(", ")));
        true
    }

    fn reconcile(&mut self) {
        for k in 0..self.order.len() {
            let i = self.order[k];
            self.reconcile_vm(i);
        }
    }

    fn run_record(owner: &Name) -> OwnerRecord {
        OwnerRecord {
            owner: Some(owner.clone()),
            desired: Desired::Run,
            move_to: None,
            parked: false,
            migrate: None,
        }
    }

    fn place(&mut self, i: usize, exclude: Option<usize>, cause: &str, state: VmState) {
        if self.wait_requirements(i) {
            return;
        }
        match self.choose(i, exclude) {
            Ok((h, how)) => {
                let host = self.hosts[h].name.clone();
                let reason = format!("{cause}placed on {host} ({how})");
                self.vms[i].note = None;
                self.cas(i, Self::run_record(&host), reason.clone());
                self.set_vm_state(i, state, &reason);
            }
            Err(no) => self.no_host(i, cause, no, state),
        }
    }

    /// Nowhere to go: faulted on every acceptable host within the window → faulted
    /// cluster-wide with an alert (until `vmha clear`); otherwise the group waits and is placed
    /// by itself as soon as a host can take it (SPEC §4.4).
    fn no_host(&mut self, i: usize, cause: &str, no: NoHost, state: VmState) {
        if no.faulted_everywhere {
            self.fault_cluster(i, format!("{cause}{}", no.why));
            return;
        }
        let reason = format!("{cause}waiting: {}", no.why);
        self.set_vm_state(i, state, &reason);
        self.vms[i].note = Some(reason);
    }

    fn reconcile_vm(&mut self, i: usize) {
        let v = &self.vms[i];
        if v.cas.is_some() || v.frozen() || v.cluster_fault.is_some() {
            return;
        }
        if v.retry_at.is_some_and(|t| self.now < t) {
            return;
        }
        let (Some(record), Some(admin)) = (v.record.clone(), v.admin.clone()) else {
            return;
        };
        let owner = record.as_ref().and_then(|r| r.owner.clone());
        let (Some(rec), Some(owner)) = (record, owner) else {
            self.unowned(i, admin.desired);
            return;
        };
        let Some(&h) = self.host_index.get(&owner) else {
            // Owner no longer configured: treat like a lost host.
            self.place(
                i,
                None,
                &format!("owner {owner} not configured: "),
                VmState::FailingOver,
            );
            return;
        };
        // Only a report from the owner that answers the record as stored counts.
        let revision = self.vms[i].revision;
        let report = self.vms[i]
            .report
            .as_ref()
            .filter(|(rh, _, r)| *rh == h && r.revision == revision)
            .map(|(_, _, r)| r.clone());
        match self.hosts[h].lease {
            None => {}
            Some(false) if rec.desired == Desired::Run || rec.move_to.is_some() => {
                let cause = format!("{owner} down (lease expired): ");
                if let Some(t) = self.arrived(i) {
                    let host = self.hosts[t].name.clone();
                    let reason = format!(
                        "{cause}the live migration completed and {host} runs it: ownership passed"
                    );
                    self.cas(i, Self::run_record(&host), reason.clone());
                    self.set_vm_state(i, VmState::FailingOver, &reason);
                    return;
                }
                let target = rec
                    .move_to
                    .as_ref()
                    .and_then(|t| self.host_index.get(t).copied())
                    .filter(|&t| self.unavailable(i, t).is_none());
                match target {
                    Some(t) if !self.wait_requirements(i) => {
                        let host = self.hosts[t].name.clone();
                        let reason = format!("{cause}moving to {host}");
                        self.cas(i, Self::run_record(&host), reason.clone());
                        self.set_vm_state(i, VmState::FailingOver, &reason);
                    }
                    Some(_) => {}
                    None => self.place(i, Some(h), &cause, VmState::FailingOver),
                }
            }
            Some(false) => {}
            Some(true) => {
                let maintenance = self.hosts[h].maintenance;
                match rec.desired {
                    Desired::Stop => {
                        if let Some(t) = rec.move_to.clone() {
                            if report.as_ref().is_some_and(stopped_there) {
                                if self.wait_requirements(i) {
                                    return;
                                }
                                let ti = self.host_index.get(&t).copied();
                                match ti.filter(|&x| self.unavailable(i, x).is_none()) {
                                    Some(_) => {
                                        let reason = format!("{owner} stopped it: starting on {t}");
                                        self.cas(i, Self::run_record(&t), reason.clone());
                                        self.set_vm_state(i, VmState::FailingOver, &reason);
                                    }
                                    None => self.place(
                                        i,
                                        Some(h),
                                        &format!("{t} no longer acceptable: "),
                                        VmState::FailingOver,
                                    ),
                                }
                            }
                        } else if rec.parked && !maintenance {
                            let reason = format!("{owner} left maintenance: running it again");
                            self.cas(i, Self::run_record(&owner), reason.clone());
                            self.set_vm_state(i, VmState::Starting, &reason);
                        } else if report.as_ref().is_some_and(stopped_there) {
                            self.set_vm_state(i, VmState::Offline, &format!("stopped on {owner}"));
                        }
                    }
                    Desired::Run if rec.migrate.is_some() => {
                        self.follow_migration(i, &rec, report.as_ref());
                    }
                    Desired::Run => {
                        let faulted_here =
                            report.as_ref().is_some_and(|r| r.state == VmState::Faulted)
                                && self.vms[i].faults.contains_key(&h);
                        if faulted_here || maintenance {
                            let cause = if faulted_here {
                                format!("faulted on {owner}: ")
                            } else {
                                format!("drain {owner} (maintenance): ")
                            };
                            let live = maintenance
                                && !faulted_here
                                && self.vms[i].migratable
                                && report
                                    .as_ref()
                                    .is_some_and(|r| r.running && r.state == VmState::Online);
                            if live && let Some(until) = self.vms[i].migrate_hold {
                                let note = format!(
                                    "{cause}a live migration failed: it runs on here; next attempt at {until}"
                                );
                                self.vms[i].note = Some(note);
                                return;
                            }
                            match self.choose(i, Some(h)) {
                                Ok((t, how)) if live => {
                                    let target = self.hosts[t].name.clone();
                                    let reason =
                                        format!("{cause}migrating live to {target} ({how})");
                                    self.begin_migration(i, &rec, target, &reason);
                                }
                                Ok((t, how)) => {
                                    // Two phases, even if it looks stopped: the owner stops
                                    // (or confirms) first, then the target gets it.
                                    let target = self.hosts[t].name.clone();
                                    let reason = format!("{cause}moving to {target} ({how})");
                                    self.begin_move(i, owner.clone(), target, &reason);
                                }
                                Err(no) if maintenance => {
                                    let reason = format!("{cause}{}: stopping it", no.why);
                                    let record = OwnerRecord {
                                        owner: Some(owner.clone()),
                                        desired: Desired::Stop,
                                        move_to: None,
                                        parked: true,
                                        migrate: None,
                                    };
                                    self.cas(i, record, reason.clone());
                                    self.set_vm_state(i, VmState::Stopping, &reason);
                                }
                                Err(no) => self.no_host(i, &cause, no, VmState::FailingOver),
                            }
                            return;
                        }
                        if self.vms[i].failback
                            && report.as_ref().is_some_and(|r| r.state == VmState::Online)
                            && let Some(p) = self.preferred_before(i, h)
                        {
                            let target = self.hosts[p].name.clone();
                            let reason = format!("failback: preferred host {target} is back");
                            self.begin_move(i, owner.clone(), target, &reason);
                        }
                    }
                }
            }
        }
    }

    /// VM `i` has no owner: a live acceptable host that reports it running gets it (it already
    /// runs there, whatever the admin wants: the owner then carries out the desired state);
    /// else it is placed when it should run, or stays offline.
    fn unowned(&mut self, i: usize, desired: Desired) {
        // Only a report from the host's current life tells where the VM runs now.
        let report = self.vms[i].report.clone();
        let current = report.as_ref().filter(|(h, inc, _)| {
            self.hosts[*h].lease == Some(true) && self.hosts[*h].incarnation == *inc
        });
        let running_on = current
            .filter(|(h, _, r)| r.running && self.vms[i].hosts.contains(h))
            .map(|(h, _, _)| *h);
        if let Some(h) = running_on {
            let host = self.hosts[h].name.clone();
            let reason = format!("already running on {host}: adopted");
            let record = OwnerRecord {
                desired,
                ..Self::run_record(&host)
            };
            self.cas(i, record, reason.clone());
            let state = match desired {
                Desired::Run => VmState::Online,
                Desired::Stop => VmState::Stopping,
            };
            self.set_vm_state(i, state, &reason);
            return;
        }
        // Its last known host is gone: say so, it is a failover.
        let lost = report
            .as_ref()
            .filter(|(h, _, r)| r.running && self.hosts[*h].lease == Some(false))
            .map(|(h, _, _)| *h);
        match (desired, lost) {
            (Desired::Run, Some(h)) => {
                let cause = format!("{} down (lease expired): ", self.hosts[h].name);
                self.place(i, Some(h), &cause, VmState::FailingOver);
            }
            (Desired::Run, None) => match self.startup_hold(i) {
                Some(reason) => {
                    self.set_vm_state(i, VmState::Starting, &reason);
                    self.vms[i].note = Some(reason);
                }
                None => self.place(i, None, "", VmState::Starting),
            },
            (Desired::Stop, _) => {
                self.set_vm_state(i, VmState::Offline, "desired stop (admin), no owner")
            }
        }
    }

    /// The first acceptable host listed before `h` in VM `i`'s `hosts`, if any.
    fn preferred_before(&self, i: usize, h: usize) -> Option<usize> {
        let hosts = &self.vms[i].hosts;
        let pos = hosts.iter().position(|&x| x == h)?;
        hosts[..pos]
            .iter()
            .copied()
            .find(|&p| self.unavailable(i, p).is_none())
    }

    /// Feeds one input at `now`. Inputs about unknown hosts or VMs are ignored.
    pub fn handle_input(&mut self, now: Timestamp, input: ControllerInput) {
        self.apply_input(now, input);
        self.reconcile();
    }

    /// Feeds several inputs that arrived together (the listing at election, a burst of watch
    /// events) and decides once: same result as feeding them one by one when no decision in
    /// between would have changed, far cheaper on big clusters (one placement pass).
    pub fn handle_inputs(
        &mut self,
        now: Timestamp,
        inputs: impl IntoIterator<Item = ControllerInput>,
    ) {
        for input in inputs {
            self.apply_input(now, input);
        }
        self.reconcile();
    }

    fn apply_input(&mut self, now: Timestamp, input: ControllerInput) {
        self.now = self.now.max(now);
        match input {
            ControllerInput::HostLease {
                host,
                up,
                incarnation,
            } => {
                let Some(&h) = self.host_index.get(&host) else {
                    return;
                };
                let reason = match (up, self.hosts[h].lease) {
                    (true, _) => "lease live",
                    (false, None) => "no lease in the cluster store",
                    (false, Some(_)) => "lease expired in the cluster store",
                };
                self.hosts[h].incarnation = incarnation;
                self.hosts[h].seen |= up;
                self.set_host(h, |x| x.lease = Some(up), reason);
            }
            ControllerInput::HostCapacity { host, memory_mb } => {
                let Some(&h) = self.host_index.get(&host) else {
                    return;
                };
                if self.config.hosts[h].memory_mb.is_none() {
                    self.hosts[h].capacity = Some(memory_mb);
                }
            }
            ControllerInput::Report {
                host,
                incarnation,
                vm,
                report,
            } => {
                let (Some(&h), Some(&i)) = (self.host_index.get(&host), self.vm_index.get(&vm))
                else {
                    return;
                };
                let is_owner = matches!(
                    &self.vms[i].record,
                    Some(Some(OwnerRecord { owner: Some(o), .. })) if *o == host
                );
                let target = matches!(
                    &self.vms[i].record,
                    Some(Some(OwnerRecord { migrate: Some(m), .. })) if m.to == host
                );
                if target {
                    self.vms[i].target_report = Some((h, report));
                    return;
                }
                if !is_owner {
                    // Not the owner's: only tells where an unowned VM already runs.
                    let unowned = matches!(
                        &self.vms[i].record,
                        Some(None | Some(OwnerRecord { owner: None, .. }))
                    );
                    if unowned {
                        self.vms[i].report = Some((h, incarnation, report));
                    }
                    return;
                }
                if report.state == VmState::Faulted && !self.vms[i].frozen() {
                    self.vms[i].faults.insert(h, self.now);
                    self.dirty_state = true;
                }
                let moving = matches!(
                    &self.vms[i].record,
                    Some(
                        Some(OwnerRecord {
                            move_to: Some(_),
                            ..
                        }) | Some(OwnerRecord {
                            migrate: Some(_),
                            ..
                        })
                    )
                );
                let reason = format!("{host} reports {}: {}", report.state, report.reason);
                match report.state {
                    VmState::Online if !moving => {
                        if self.vms[i].cluster_fault.take().is_some() {
                            self.dirty_state = true;
                            self.vms[i].note = None;
                        }
                        self.set_vm_state(i, VmState::Online, &reason);
                    }
                    VmState::Offline if !moving && !report.running => {
                        self.set_vm_state(i, VmState::Offline, &reason)
                    }
                    _ => {}
                }
                self.vms[i].report = Some((h, incarnation, report));
            }
            ControllerInput::Ownership {
                vm,
                record,
                revision,
            } => {
                let Some(&i) = self.vm_index.get(&vm) else {
                    return;
                };
                // An older record than the one known is stale; a deletion is not (the store
                // deleted a record the controller knew: its owner's lease ended). A wrong
                // belief is harmless either way: every write is a compare-and-swap.
                if revision < self.vms[i].revision && record.is_some() {
                    return;
                }
                self.vms[i].retry_at = None;
                self.set_record(i, record, revision);
            }
            ControllerInput::Admin { vm, admin } => {
                let Some(&i) = self.vm_index.get(&vm) else {
                    return;
                };
                // The controller is the only writer: once it knows the record, its own copy
                // is newer than any echo still on its way.
                if self.vms[i].admin.is_none() {
                    self.vms[i].admin = Some(admin.unwrap_or_default());
                }
            }
            ControllerInput::CasResult { id, revision } => {
                let Some(i) = self
                    .vms
                    .iter()
                    .position(|v| v.cas.as_ref().is_some_and(|(c, _)| *c == id))
                else {
                    return;
                };
                self.finish_cas(i, revision);
            }
        }
    }

    fn vm_of(&self, vm: &Name) -> Result<usize, CommandError> {
        self.vm_index
            .get(vm)
            .copied()
            .ok_or_else(|| CommandError::UnknownVm(vm.clone()))
    }

    fn settled(&self, i: usize) -> Result<OwnerRecord, CommandError> {
        let v = &self.vms[i];
        if v.frozen() {
            return Err(CommandError::Frozen(v.name.clone()));
        }
        match (&v.cas, &v.record) {
            (None, Some(Some(rec))) if rec.move_to.is_none() && rec.migrate.is_none() => {
                Ok(rec.clone())
            }
            (None, Some(None)) => Ok(OwnerRecord {
                owner: None,
                desired: Desired::Run,
                move_to: None,
                parked: false,
                migrate: None,
            }),
            _ => Err(CommandError::Busy(v.name.clone())),
        }
    }

    /// Applies an admin command routed to the controller ([`crate::Route::Controller`]). On
    /// `Err` nothing changed.
    pub fn command(&mut self, now: Timestamp, cmd: AdminCommand) -> Result<(), CommandError> {
        let before = self.now;
        self.now = self.now.max(now);
        let result = self.apply_command(cmd);
        if result.is_err() {
            // Refused: not even the clock moved.
            self.now = before;
        }
        result
    }

    /// Changes VM `i`'s admin record (marked for persisting).
    fn edit_admin(&mut self, i: usize, f: impl FnOnce(&mut VmAdmin)) {
        let admin = self.vms[i].admin.get_or_insert_with(VmAdmin::default);
        let before = admin.clone();
        f(admin);
        if *admin != before {
            self.dirty_admin.insert(i);
        }
    }

    fn apply_command(&mut self, cmd: AdminCommand) -> Result<(), CommandError> {
        enum Kind {
            Freeze,
            Other,
        }
        let cmd_kind = match cmd {
            AdminCommand::Freeze { .. } => Kind::Freeze,
            _ => Kind::Other,
        };
        match cmd {
            AdminCommand::HostMaintenance { host, on } => {
                let h = *self
                    .host_index
                    .get(&host)
                    .ok_or(CommandError::UnknownHost(host))?;
                let reason = if on {
                    "maintenance on (admin): draining"
                } else {
                    "maintenance off (admin)"
                };
                self.set_host(h, |x| x.maintenance = on, reason);
                self.dirty_state = true;
            }
            AdminCommand::Freeze { vm } | AdminCommand::Unfreeze { vm } => {
                let i = self.vm_of(&vm)?;
                let on = matches!(cmd_kind, Kind::Freeze);
                self.edit_admin(i, |a| a.frozen = on);
            }
            AdminCommand::Clear { vm } => {
                let i = self.vm_of(&vm)?;
                self.edit_admin(i, |a| a.clear = a.clear.saturating_add(1));
                self.dirty_state |= !self.vms[i].faults.is_empty();
                self.vms[i].faults.clear();
                self.vms[i].note = None;
                if self.vms[i].cluster_fault.take().is_some() {
                    self.set_vm_state(i, VmState::Unknown, "fault cleared by admin: re-armed");
                }
            }
            AdminCommand::VmStart { vm } => {
                let i = self.vm_of(&vm)?;
                self.admin_desire(i, Desired::Run, VmState::Starting, "started by admin")?;
            }
            AdminCommand::VmStop { vm } => {
                let i = self.vm_of(&vm)?;
                self.admin_desire(i, Desired::Stop, VmState::Stopping, "stopped by admin")?;
            }
            AdminCommand::VmMove { vm, to, restart } => {
                let i = self.vm_of(&vm)?;
                let t = *self
                    .host_index
                    .get(&to)
                    .ok_or_else(|| CommandError::UnknownHost(to.clone()))?;
                if !self.vms[i].hosts.contains(&t) {
                    return Err(CommandError::HostNotAcceptable {
                        vm,
                        host: to,
                        acceptable: self.config.vms[i].hosts.clone(),
                    });
                }
                let rec = self.settled(i)?;
                if rec.owner.as_ref() == Some(&to) {
                    return Err(CommandError::AlreadyThere { vm, host: to });
                }
                if let Some(why) = self.unavailable(i, t) {
                    return Err(CommandError::HostUnavailable { vm, host: to, why });
                }
                let reason = format!("moved to {to} by admin");
                let owner_down = rec
                    .owner
                    .as_ref()
                    .and_then(|o| self.host_index.get(o))
                    .is_none_or(|&h| self.hosts[h].lease == Some(false));
                let live = !restart && !owner_down && self.vms[i].migrate_on;
                if live && !self.vms[i].migratable {
                    return Err(CommandError::NotSharedStorage(vm));
                }
                if live && self.online_on_owner(i) {
                    let reason = format!("moved live to {to} by admin");
                    self.begin_migration(i, &rec, to, &reason);
                    self.reconcile();
                    return Ok(());
                }
                let record = if owner_down {
                    Self::run_record(&to)
                } else {
                    OwnerRecord {
                        desired: Desired::Stop,
                        move_to: Some(to),
                        parked: false,
                        ..rec
                    }
                };
                self.cas(i, record, reason.clone());
                self.set_vm_state(i, VmState::FailingOver, &reason);
            }
            _ => {
                return Err(CommandError::WrongReceiver(
                    "owner host's agent".to_string(),
                ));
            }
        }
        self.reconcile();
        Ok(())
    }

    /// Call when `now` has reached [`Controller::poll_timeout`]: fault windows that ended are
    /// forgotten and placement is re-evaluated (e.g. a failback to a host whose window ended).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.now = self.now.max(now);
        let now = self.now;
        for v in &mut self.vms {
            let window = v.window_ms;
            let before = v.faults.len();
            v.faults.retain(|_, t| now.since(*t) < window);
            self.dirty_state |= v.faults.len() != before;
            if v.retry_at.is_some_and(|t| t <= now) {
                v.retry_at = None;
            }
            if v.migrate_hold.is_some_and(|t| t <= now) {
                v.migrate_hold = None;
            }
        }
        self.reconcile();
    }

    /// The earliest time a fault window ends, a failed write may be retried or the startup
    /// wait ends (then
    /// [`Controller::handle_timeout`] is due), if any.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let retries = self
            .vms
            .iter()
            .flat_map(|v| [v.retry_at, v.migrate_hold])
            .flatten();
        let startup = self.startup_until.filter(|u| self.now < *u);
        self.vms
            .iter()
            .flat_map(|v| v.faults.values().map(move |t| t.plus_ms(v.window_ms)))
            .chain(retries)
            .chain(startup)
            .min()
    }

    /// The next action.
    pub fn poll_action(&mut self) -> Option<ControllerAction> {
        self.actions.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The controller's view of hosts and VM groups.
    pub fn status(&self) -> ControllerStatus {
        ControllerStatus {
            hosts: self
                .hosts
                .iter()
                .map(|h| HostView {
                    name: h.name.clone(),
                    state: h.state(),
                    capacity_mb: h.capacity,
                    used_mb: h.used,
                })
                .collect(),
            vms: self
                .vms
                .iter()
                .map(|v| ClusterVmView {
                    name: v.name.clone(),
                    state: v.state,
                    record: v.record.clone().flatten(),
                    revision: v.revision,
                    frozen: v.frozen(),
                    faulted_on: v
                        .faults
                        .iter()
                        .map(|(h, t)| (self.hosts[*h].name.clone(), *t))
                        .collect(),
                    note: v.cluster_fault.clone().or_else(|| v.note.clone()),
                })
                .collect(),
        }
    }

    /// The persistent state (see [`ControllerState`]).
    pub fn state(&self) -> ControllerState {
        ControllerState {
            maintenance: self
                .hosts
                .iter()
                .filter(|h| h.maintenance)
                .map(|h| h.name.clone())
                .collect(),
            faults: self
                .vms
                .iter()
                .flat_map(|v| {
                    v.faults
                        .iter()
                        .map(|(h, t)| (v.name.clone(), self.hosts[*h].name.clone(), *t))
                })
                .collect(),
            faulted: self
                .vms
                .iter()
                .filter_map(|v| v.cluster_fault.clone().map(|w| (v.name.clone(), w)))
                .collect(),
        }
    }

    /// Phase one of a move off a live owner: the owner stops the VM, then `target` gets it.
    fn begin_move(&mut self, i: usize, owner: Name, target: Name, reason: &str) {
        let record = OwnerRecord {
            owner: Some(owner),
            desired: Desired::Stop,
            move_to: Some(target),
            parked: false,
            migrate: None,
        };
        self.cas(i, record, reason.to_string());
        self.set_vm_state(i, VmState::FailingOver, reason);
    }

    /// Starts a live migration of VM `i` (running on the owner of `rec`) to `target`: the
    /// owner keeps it and sends it; the target prepares an incoming QEMU.
    fn begin_migration(&mut self, i: usize, rec: &OwnerRecord, target: Name, reason: &str) {
        let record = OwnerRecord {
            desired: Desired::Run,
            move_to: None,
            parked: false,
            migrate: Some(Migration {
                to: target,
                uri: None,
            }),
            ..rec.clone()
        };
        self.vms[i].target_report = None;
        self.vms[i].note = None;
        self.cas(i, record, reason.to_string());
        self.set_vm_state(i, VmState::Migrating, reason);
    }

    /// Whether VM `i`'s owner reported it online (and running) for the current record.
    fn online_on_owner(&self, i: usize) -> bool {
        let v = &self.vms[i];
        let owner = match &v.record {
            Some(Some(OwnerRecord { owner: Some(o), .. })) => self.host_index.get(o).copied(),
            _ => None,
        };
        v.report.as_ref().is_some_and(|(h, _, r)| {
            Some(*h) == owner && r.revision == v.revision && r.running && r.state == VmState::Online
        })
    }

    /// The migration target of VM `i` when it reported the VM running there (the migration
    /// completed) for the current record, with a live lease.
    fn arrived(&self, i: usize) -> Option<usize> {
        let v = &self.vms[i];
        let Some(Some(OwnerRecord {
            migrate: Some(m), ..
        })) = &v.record
        else {
            return None;
        };
        let t = self.host_index.get(&m.to).copied()?;
        let (h, r) = v.target_report.as_ref()?;
        let done = *h == t
            && r.revision == v.revision
            && r.running
            && r.state == VmState::Online
            && r.migration.is_none();
        (done && self.hosts[t].lease == Some(true)).then_some(t)
    }

    /// Follows the live migration in `rec` (its owner's lease is live): hands the target's
    /// URI to the owner, passes ownership once the target runs the VM, and withdraws the
    /// migration when the target is down or either side failed (the owner runs on).
    fn follow_migration(&mut self, i: usize, rec: &OwnerRecord, report: Option<&VmReport>) {
        let Some(m) = rec.migrate.clone() else {
            return;
        };
        if let Some(t) = self.arrived(i) {
            let host = self.hosts[t].name.clone();
            let reason = format!("live migration completed: {host} runs it, ownership passed");
            self.cas(i, Self::run_record(&host), reason.clone());
            self.set_vm_state(i, VmState::Online, &reason);
            return;
        }
        let t = self.host_index.get(&m.to).copied();
        let revision = self.vms[i].revision;
        let target_report = self.vms[i]
            .target_report
            .as_ref()
            .filter(|(h, r)| Some(*h) == t && r.revision == revision)
            .map(|(_, r)| r.clone());
        let failed = match (t, &target_report, report) {
            (None, _, _) => Some(format!("{} is no longer configured", m.to)),
            (Some(t), _, _) if self.hosts[t].lease == Some(false) => {
                Some(format!("{} down (lease expired)", m.to))
            }
            (_, Some(r), _) | (_, _, Some(r)) if failed_note(r).is_some() => failed_note(r),
            _ => None,
        };
        if let Some(why) = failed {
            let owner = rec
                .owner
                .clone()
                .map_or_else(String::new, |o| o.to_string());
            let reason = format!(
                "live migration to {} withdrawn: {why}; it runs on {owner}",
                m.to
            );
            let record = OwnerRecord {
                migrate: None,
                ..rec.clone()
            };
            self.vms[i].migrate_hold = Some(self.now.plus_ms(MIGRATE_HOLD_MS));
            self.cas(i, record, reason.clone());
            self.set_vm_state(i, VmState::Online, &reason);
            return;
        }
        if m.uri.is_none()
            && let Some(MigrationNote::Incoming { uri }) =
                target_report.as_ref().and_then(|r| r.migration.clone())
        {
            let reason = format!("{} waits for the migration at {uri}: sending", m.to);
            let record = OwnerRecord {
                migrate: Some(Migration {
                    to: m.to.clone(),
                    uri: Some(uri),
                }),
                ..rec.clone()
            };
            self.cas(i, record, reason.clone());
            self.set_vm_state(i, VmState::Migrating, &reason);
        }
    }

    /// An admin's VM start or stop: writes `desired` (and unparks) unless it already holds.
    fn admin_desire(
        &mut self,
        i: usize,
        desired: Desired,
        state: VmState,
        reason: &str,
    ) -> Result<(), CommandError> {
        let rec = self.settled(i)?;
        self.edit_admin(i, |a| a.desired = desired);
        if rec.owner.is_some() && (rec.desired != desired || rec.parked) {
            let record = OwnerRecord {
                desired,
                parked: false,
                ..rec
            };
            self.cas(i, record, reason.to_string());
            self.set_vm_state(i, state, reason);
        }
        Ok(())
    }

    /// The admin record of `vm` as the controller knows it.
    pub fn admin(&self, vm: &Name) -> Option<crate::records::VmAdmin> {
        let &i = self.vm_index.get(vm)?;
        self.vms[i].admin.clone()
    }

    /// What changed in the controller's persisted records since the last call (the marks are
    /// reset). Every change marks it where it happens; nothing compares whole states.
    pub fn take_dirty(&mut self) -> ControllerDirty {
        let state = std::mem::take(&mut self.dirty_state).then(|| self.state());
        let admin = std::mem::take(&mut self.dirty_admin)
            .into_iter()
            .filter_map(|i| {
                let v = &self.vms[i];
                v.admin.clone().map(|a| (v.name.clone(), a))
            })
            .collect();
        ControllerDirty { state, admin }
    }
}
