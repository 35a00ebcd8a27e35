//! The simulated world inside the VMs: each guest's apps (running or not, hanging or garbled
//! checks, what their start command does), the guest agent (hung, never coming up at boot,
//! blocking `guest-exec`) and the VM's vCPUs (paused, and why).

use std::collections::BTreeMap;

use vmha_model::{Name, PauseReason, Vm};

use super::StartBehaviour;
use crate::host_io::{ActionError, ExitStatus};

/// One app inside a simulated guest.
#[derive(Debug, Clone)]
pub(super) struct AppModel {
    pub running: bool,
    /// Exit code of its check while it does not run.
    pub exit: i32,
    /// Its check never finishes.
    pub hang: bool,
    /// The guest's answer for its check is garbled (no status line for it).
    pub garbled: bool,
    /// What its start command does.
    pub on_start: StartBehaviour,
}

impl AppModel {
    /// Runs its start command in the guest.
    pub fn start(&mut self) -> Result<(), ActionError> {
        match self.on_start {
            StartBehaviour::Ok => {
                self.running = true;
                Ok(())
            }
            StartBehaviour::Fails => Err(ActionError::CommandFailed {
                status: Some(ExitStatus::Code(1)),
                stderr: String::new(),
            }),
            StartBehaviour::Noop => Ok(()),
        }
    }
}

/// One simulated guest (wherever its VM runs).
#[derive(Debug, Clone, Default)]
pub(super) struct GuestModel {
    pub apps: BTreeMap<Name, AppModel>,
    /// The guest agent does not answer.
    pub hung: bool,
    /// QEMU itself does not answer (QMP and the guest agent are silent) until it is killed.
    pub qemu_hung: bool,
    /// Booting never brings the guest agent up.
    pub boot_hang: bool,
    /// The guest agent refuses `guest-exec` (its configuration blocks it).
    pub exec_blocked: bool,
    /// The guest agent floods its channel: the driver disconnects it as hostile.
    pub hostile: bool,
    /// The VM's vCPUs are stopped, and why.
    pub paused: Option<PauseReason>,
}

impl GuestModel {
    /// The guest of `vm`, every app down.
    pub fn new(vm: &Vm) -> Self {
        let apps = vm
            .apps
            .iter()
            .map(|a| {
                let model = AppModel {
                    running: false,
                    exit: 3,
                    hang: false,
                    garbled: false,
                    on_start: StartBehaviour::Ok,
                };
                (a.name.clone(), model)
            })
            .collect();
        GuestModel {
            apps,
            ..GuestModel::default()
        }
    }

    /// The VM stopped: nothing runs in it.
    pub fn apps_down(&mut self) {
        self.apps.values_mut().for_each(|m| m.running = false);
    }

    /// A fresh boot: apps down, a hung guest agent or QEMU is gone with the old guest, the
    /// vCPUs run.
    pub fn fresh_boot(&mut self) {
        self.apps_down();
        self.hung = false;
        self.qemu_hung = false;
        self.paused = None;
    }
}
