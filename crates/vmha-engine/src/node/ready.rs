//! What a [`crate::Node`] hands out: a [`Ready`] batch — what to persist, then what to do.

use vmha_model::Name;

use crate::command::{AdminCommand, CommandError};
use crate::controller::{ControllerAction, ControllerState};
use crate::event::Event;
use crate::host_io::HostAction;
use crate::records::{HostReport, NodeState, VmAdmin, VmSettings};

/// Where a command came from, so that its answer goes back there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum CommandOrigin {
    /// A client of this host (the API); the number is the caller's, echoed in the reply.
    Local(u64),
    /// Another host forwarded it through the cluster store; the reply is written back there
    /// under this request key, in the same commit as the change it made.
    Remote(String),
}

/// Who must carry out a forwarded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receiver {
    /// The elected cluster controller, whichever host it runs on.
    Controller,
    /// The owner host of the VM.
    Host(Name),
}

/// A command this host cannot apply itself, to hand to the host that can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The local caller waiting for the answer.
    pub id: u64,
    /// Who applies it.
    pub to: Receiver,
    /// The command.
    pub command: AdminCommand,
}

/// The controller's records to write, fenced by its leadership term: the write must only apply
/// while that term still leads (the store compares the term's election key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerPersist {
    /// The leadership term (fencing token).
    pub term: u64,
    /// The controller's state, when it changed.
    pub state: Option<ControllerState>,
    /// Admin records that changed.
    pub admin: Vec<(Name, VmAdmin)>,
}

/// What must be durable before anything of the same [`Ready`] is done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Persist {
    /// This host's own state, when it changed.
    pub node: Option<NodeState>,
    /// Run-time settings of VM groups this host owns, when they changed.
    pub settings: Vec<(Name, VmSettings)>,
    /// The latest report per VM group that changed.
    pub reports: Vec<(Name, HostReport)>,
    /// New events with this host's sequence numbers, in order.
    pub events: Vec<(u64, Event)>,
    /// The controller's writes, while this host leads.
    pub controller: Option<ControllerPersist>,
    /// Answers to commands other hosts forwarded here (request key, answer): written in the
    /// same commit as the change, and the request is consumed with it.
    pub replies: Vec<(String, Result<(), CommandError>)>,
}

impl Persist {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.node.is_none()
            && self.settings.is_empty()
            && self.reports.is_empty()
            && self.events.is_empty()
            && self.controller.is_none()
            && self.replies.is_empty()
    }
}

/// What to do once (or, while the store is degraded, without waiting until) the [`Persist`] of
/// the same [`Ready`] is committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// New events, each exactly once, for logs and live streams (the same events are in a
    /// [`Persist`], possibly again after a failed commit, for durability).
    pub events: Vec<Event>,
    /// Actions for this host's driver.
    pub host_actions: Vec<HostAction>,
    /// Controller actions with the term they must be fenced by.
    pub controller_actions: Vec<(u64, ControllerAction)>,
    /// Answers to this host's own callers.
    pub replies: Vec<(u64, Result<(), CommandError>)>,
    /// Commands to forward to the host that carries them out.
    pub forwards: Vec<Forward>,
}

impl Effects {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.host_actions.is_empty()
            && self.controller_actions.is_empty()
            && self.replies.is_empty()
            && self.forwards.is_empty()
    }
}

/// One batch of a [`crate::Node`]'s output (raft-rs's Ready): persist `persist` durably, call
/// [`crate::Node::advance`] with the outcome, then run the [`Effects`] it returns. `run_now`
/// holds effects to run at once: the store is degraded and monitoring and local restarts do
/// not wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// Identifies the batch in [`crate::Node::advance`].
    pub id: u64,
    /// What to commit.
    pub persist: Persist,
    /// Effects to run now, without waiting for the commit (only while degraded).
    pub run_now: Effects,
    /// The batch holds admin commands and nothing else: if its commit fails, the node undoes
    /// them and refuses them.
    pub commands: bool,
}

/// How the commit of a [`Ready`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// Everything is durable.
    Ok,
    /// The store failed; the decisive part (state, settings, controller records, replies) was
    /// not committed.
    Failed(String),
    /// The controller's writes were refused because its term no longer leads; nothing of the
    /// decisive part was committed. The node stops being the controller.
    Deposed,
}
