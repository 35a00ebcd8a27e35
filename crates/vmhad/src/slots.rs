//! The VM slots of this host, shared by the core, the executor and the API. A new
//! configuration adds and removes slots here; each user always sees one consistent map.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use vmha_model::{Config, Name};

use crate::driver::VmDriver;
use crate::fence::Fence;
use crate::inbox::HostInputs;

/// The slots, by VM name (cheap to clone: shared).
#[derive(Clone, Default)]
pub struct Slots {
    map: Arc<RwLock<BTreeMap<Name, Arc<dyn VmDriver>>>>,
}

/// What [`Slots::configure`] changed.
#[derive(Default)]
pub struct SlotChanges {
    /// Slots created (their VMs are to be adopted if running).
    pub added: Vec<Arc<dyn VmDriver>>,
    /// VMs whose slot was dropped (no longer managed here; their QEMU keeps running).
    pub removed: Vec<Name>,
}

impl Slots {
    /// The slot of `vm`, if this host may run it.
    pub fn get(&self, vm: &Name) -> Option<Arc<dyn VmDriver>> {
        self.map.read().ok()?.get(vm).cloned()
    }

    /// Every slot, by name.
    pub fn all(&self) -> Vec<(Name, Arc<dyn VmDriver>)> {
        self.map
            .read()
            .map(|m| m.iter().map(|(n, s)| (n.clone(), Arc::clone(s))).collect())
            .unwrap_or_default()
    }

    /// Makes the slots those of the VMs `config` gives `host`: new VMs get a slot, removed
    /// ones lose theirs, the others take their new definition for their next start.
    pub fn configure(
        &self,
        config: &Config,
        host: &Name,
        runtime_dir: &Path,
        inputs: &HostInputs,
        fence: &Arc<Fence>,
    ) -> SlotChanges {
        let mut changes = SlotChanges::default();
        let Ok(mut map) = self.map.write() else {
            return changes;
        };
        let wanted: Vec<_> = config
            .vms
            .iter()
            .filter(|v| v.hosts.contains(host))
            .collect();
        let gone: Vec<Name> = map
            .keys()
            .filter(|n| !wanted.iter().any(|v| &v.name == *n))
            .cloned()
            .collect();
        for name in gone {
            map.remove(&name);
            changes.removed.push(name);
        }
        for vm in wanted {
            match map.get(&vm.name) {
                Some(slot) => slot.set_vm(vm),
                None => {
                    let slot = crate::driver::for_vm(
                        vm,
                        runtime_dir.to_path_buf(),
                        inputs.clone(),
                        Arc::clone(fence),
                    );
                    map.insert(vm.name.clone(), Arc::clone(&slot));
                    changes.added.push(slot);
                }
            }
        }
        changes
    }
}
