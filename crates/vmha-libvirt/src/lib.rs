//! vmha-libvirt: the libvirt driver of vmha — libvirt domains instead of QEMU processes that
//! vmhad launches itself.
//!
//! - [`domain`]: [`Domain`] — one named domain on one libvirt connection: adopted when it
//!   exists, defined from an XML file when it does not; start, graceful shutdown (guest agent,
//!   then ACPI, forced after a timeout), destroy, and its state as a [`VmObservation`].
//! - [`events`]: libvirt's domain event callbacks (lifecycle, reboot) turned into
//!   [`VmObservation`]s on a tokio channel; the caller's status poll is the safety net.
//! - [`agent`]: the guest channel through libvirt's agent passthrough
//!   (`virDomainQemuAgentCommand`): ping, `guest-info`, `guest-exec` and the batched probe,
//!   with the QEMU driver's program building and typed reply parsing (`vmha_qemu`), its caps,
//!   its errors ([`vmha_qemu::QgaError`]), every call bounded in time.
//! - `channel`: the QEMU driver's hostile-guest rules on that passthrough: request ids, reply
//!   caps and byte budget, typed parsing off the runtime workers, a byte rate per domain and
//!   a backoff after [`vmha_qemu::QgaError::Hostile`].
//!
//! Every libvirt call blocks, so each runs on tokio's blocking pool under a timeout: a hung
//! libvirtd stalls the VM whose call it is, never the caller's runtime.

pub mod agent;
mod channel;
pub mod domain;
pub mod events;

pub use agent::Agent;
pub use domain::{Domain, DomainError, StopOutcome};
pub use vmha_model::VmObservation;
