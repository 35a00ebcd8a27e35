//! The host agent: one per host. It holds the VM monitor, the app monitors and the decision
//! agent of every VM group this host may run, and is driven like a sans-IO state machine:
//!
//! 1. feed inputs ([`HostAgent::handle_input`]), admin commands ([`HostAgent::command`]) and
//!    timeouts ([`HostAgent::handle_timeout`] once [`HostAgent::poll_timeout`] is reached);
//! 2. drain [`HostAgent::poll_action`] and [`HostAgent::poll_event`];
//! 3. persist [`HostAgent::state`] when [`HostAgent::take_state_changed`] says so.
//!
//! Same inputs at the same times → same actions and events, always.

use std::collections::VecDeque;
use std::sync::Arc;

use vmha_model::{Config, Name};

use crate::command::{AdminCommand, CommandError};
use crate::event::Event;
use crate::host_io::{HostAction, HostInput};
use crate::persist::HostAgentState;
use crate::status::HostStatus;
use crate::time::Timestamp;

/// Why a host agent could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostAgentError {
    /// The host is not in the configuration.
    #[error("host `{0}` is not in the configuration")]
    UnknownHost(Name),
}

/// The agents of one host (see the module documentation for the driving protocol).
#[derive(Debug)]
pub struct HostAgent {
    config: Arc<Config>,
    host: Name,
    actions: VecDeque<HostAction>,
    events: VecDeque<Event>,
}

impl HostAgent {
    /// Creates the agent of `host`, restoring admin flags, overrides, budgets and plans from
    /// `restored` (entries for VMs and apps no longer configured are ignored). Every VM starts
    /// in state `unknown`; nothing is started or stopped before the VM's
    /// [`HostInput::Ownership`] and a [`HostInput::VmObserved`] arrive.
    pub fn new(
        config: Arc<Config>,
        host: Name,
        restored: Option<HostAgentState>,
        now: Timestamp,
    ) -> Result<HostAgent, HostAgentError> {
        let _ = (config, host, restored, now);
        todo!()
    }

    /// This host's name.
    pub fn host(&self) -> &Name {
        &self.host
    }

    /// The configuration the agent runs.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Feeds one input observed at `now`. Inputs about unknown VMs, unknown apps or stale
    /// action ids are ignored.
    pub fn handle_input(&mut self, now: Timestamp, input: HostInput) {
        let _ = (now, input);
        todo!()
    }

    /// Applies an admin command routed to this host ([`crate::Route::OwnerHost`] or
    /// [`crate::Route::Both`]). On `Err` nothing changed.
    pub fn command(&mut self, now: Timestamp, cmd: AdminCommand) -> Result<(), CommandError> {
        let _ = (now, cmd);
        todo!()
    }

    /// Call when `now` has reached [`HostAgent::poll_timeout`] (calling earlier or later is
    /// harmless: due work is done, nothing else).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let _ = now;
        todo!()
    }

    /// The earliest time the agent needs [`HostAgent::handle_timeout`], if any.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        todo!()
    }

    /// The next action to perform, in the order decided.
    pub fn poll_action(&mut self) -> Option<HostAction> {
        self.actions.pop_front()
    }

    /// The next event, in the order of the state changes.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// A view of every VM group and app on this host.
    pub fn status(&self) -> HostStatus {
        todo!()
    }

    /// The persistent state (see [`HostAgentState`]).
    pub fn state(&self) -> HostAgentState {
        todo!()
    }

    /// `true` once after anything in [`HostAgent::state`] changed; resets the flag.
    pub fn take_state_changed(&mut self) -> bool {
        todo!()
    }
}
