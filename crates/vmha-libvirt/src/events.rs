//! libvirt's domain event callbacks, turned into [`VmObservation`]s.
//!
//! libvirt delivers events from its own event loop: [`ensure_loop`] registers libvirt's
//! default event loop implementation once per process and runs it on a dedicated thread. A
//! [`Subscription`] registers lifecycle and reboot callbacks on one connection for one domain
//! name and forwards what they report, as it is, to a tokio channel. The FFI is confined to
//! this module.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::raw::{c_int, c_void};
use std::sync::OnceLock;

use tokio::sync::mpsc;
use virt::connect::Connect;
use virt::sys;
use vmha_model::{PauseReason, VmObservation};

/// Starts libvirt's default event loop on its own thread, once per process. Must run before
/// the first connection is opened, or that connection delivers no events.
pub fn ensure_loop() -> Result<(), String> {
    static LOOP: OnceLock<Result<(), String>> = OnceLock::new();
    LOOP.get_or_init(|| {
        virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!("libvirt event loop: {e}");
                    }
                }
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .clone()
}

/// libvirt's lifecycle callback type.
type LifecycleFn =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
/// libvirt's reboot callback type.
type RebootFn = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

/// What a callback forwards: the observation, for the domain the subscription names.
struct Sink {
    domain: String,
    tx: mpsc::UnboundedSender<VmObservation>,
}

/// Event callbacks registered on a connection; deregistered on drop.
pub struct Subscription {
    conn: sys::virConnectPtr,
    ids: Vec<c_int>,
}

// The connection pointer is only used to deregister, which libvirt allows from any thread.
unsafe impl Send for Subscription {}
unsafe impl Sync for Subscription {}

impl Subscription {
    /// Registers lifecycle and reboot callbacks on `conn` (which must outlive the
    /// subscription) for the domain named `domain`; what they report is sent on `tx`.
    pub fn new(
        conn: &Connect,
        domain: &str,
        tx: mpsc::UnboundedSender<VmObservation>,
    ) -> Result<Subscription, String> {
        let mut sub = Subscription {
            conn: conn.as_ptr(),
            ids: Vec::new(),
        };
        for (event, callback) in [
            (
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                // SAFETY: libvirt calls a callback with the signature of its event id; the
                // generic type is only how the API passes it.
                unsafe { std::mem::transmute::<LifecycleFn, unsafe extern "C" fn()>(on_lifecycle) },
            ),
            (sys::VIR_DOMAIN_EVENT_ID_REBOOT, unsafe {
                std::mem::transmute::<RebootFn, unsafe extern "C" fn()>(on_reboot)
            }),
        ] {
            let sink = Box::into_raw(Box::new(Sink {
                domain: domain.to_string(),
                tx: tx.clone(),
            }));
            // SAFETY: the callback and the freecb match libvirt's contract; libvirt owns
            // `sink` from here and frees it through `free_sink` exactly once.
            let id = unsafe {
                sys::virConnectDomainEventRegisterAny(
                    sub.conn,
                    std::ptr::null_mut(),
                    event as c_int,
                    Some(std::mem::transmute::<
                        unsafe extern "C" fn(),
                        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                    >(callback)),
                    sink.cast(),
                    Some(free_sink),
                )
            };
            if id < 0 {
                // SAFETY: not registered, so still ours.
                drop(unsafe { Box::from_raw(sink) });
                return Err(virt::error::Error::last_error().to_string());
            }
            sub.ids.push(id);
        }
        Ok(sub)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            // SAFETY: `conn` is alive (documented requirement of `new`); ids are ours.
            unsafe { sys::virConnectDomainEventDeregisterAny(self.conn, id) };
        }
    }
}

unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Box<Sink>` handed over at registration.
    drop(unsafe { Box::from_raw(opaque.cast::<Sink>()) });
}

/// The sink of `opaque` if the event is about its domain.
unsafe fn sink_for<'a>(dom: sys::virDomainPtr, opaque: *mut c_void) -> Option<&'a Sink> {
    // SAFETY: libvirt passes our sink and a valid domain for the callback's duration.
    let sink = unsafe { opaque.cast::<Sink>().as_ref() }?;
    let name = unsafe { sys::virDomainGetName(dom) };
    if name.is_null() {
        return None;
    }
    let name = unsafe { CStr::from_ptr(name) };
    (name.to_bytes() == sink.domain.as_bytes()).then_some(sink)
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: see `sink_for`.
    if let Some(sink) = unsafe { sink_for(dom, opaque) }
        && let Some(obs) = lifecycle(event, detail)
    {
        let _ = sink.tx.send(obs);
    }
    0
}

unsafe extern "C" fn on_reboot(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    opaque: *mut c_void,
) {
    // SAFETY: see `sink_for`.
    if let Some(sink) = unsafe { sink_for(dom, opaque) } {
        let _ = sink.tx.send(VmObservation::Reset);
    }
}

/// What a lifecycle event says, as it is (`None`: nothing the engine watches).
pub fn lifecycle(event: c_int, detail: c_int) -> Option<VmObservation> {
    let (Ok(event), Ok(detail)) = (u32::try_from(event), u32::try_from(detail)) else {
        return None;
    };
    Some(match event {
        sys::VIR_DOMAIN_EVENT_STARTED => VmObservation::Running,
        sys::VIR_DOMAIN_EVENT_RESUMED => VmObservation::Resumed,
        sys::VIR_DOMAIN_EVENT_SUSPENDED => VmObservation::Paused {
            reason: suspended_reason(detail),
        },
        sys::VIR_DOMAIN_EVENT_CRASHED => VmObservation::Panicked,
        // The guest shut down (guest or host initiated): QEMU reports it before it exits.
        sys::VIR_DOMAIN_EVENT_SHUTDOWN if detail != sys::VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED => {
            VmObservation::Stopped {
                by_guest: detail == sys::VIR_DOMAIN_EVENT_SHUTDOWN_GUEST,
            }
        }
        // The domain is no longer running, whatever ended it (a shutdown was reported above).
        sys::VIR_DOMAIN_EVENT_STOPPED => VmObservation::Gone,
        _ => return None,
    })
}

fn suspended_reason(detail: u32) -> PauseReason {
    match detail {
        sys::VIR_DOMAIN_EVENT_SUSPENDED_PAUSED => PauseReason::Admin,
        sys::VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED
        | sys::VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY
        | sys::VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY_FAILED => PauseReason::Migration,
        sys::VIR_DOMAIN_EVENT_SUSPENDED_IOERROR => PauseReason::IoError,
        sys::VIR_DOMAIN_EVENT_SUSPENDED_WATCHDOG => PauseReason::Watchdog,
        sys::VIR_DOMAIN_EVENT_SUSPENDED_RESTORED
        | sys::VIR_DOMAIN_EVENT_SUSPENDED_FROM_SNAPSHOT => PauseReason::Snapshot,
        _ => PauseReason::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(e: u32, d: u32) -> Option<VmObservation> {
        lifecycle(e as c_int, d as c_int)
    }

    #[test]
    fn maps_lifecycle_events_as_they_are() {
        assert_eq!(
            ev(
                sys::VIR_DOMAIN_EVENT_STOPPED,
                sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED
            ),
            Some(VmObservation::Gone)
        );
        assert_eq!(
            ev(
                sys::VIR_DOMAIN_EVENT_SHUTDOWN,
                sys::VIR_DOMAIN_EVENT_SHUTDOWN_GUEST
            ),
            Some(VmObservation::Stopped { by_guest: true })
        );
        assert_eq!(
            ev(
                sys::VIR_DOMAIN_EVENT_SHUTDOWN,
                sys::VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED
            ),
            None
        );
        assert_eq!(
            ev(
                sys::VIR_DOMAIN_EVENT_SUSPENDED,
                sys::VIR_DOMAIN_EVENT_SUSPENDED_IOERROR
            ),
            Some(VmObservation::Paused {
                reason: PauseReason::IoError
            })
        );
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_DEFINED, 0), None);
        assert_eq!(lifecycle(-1, 0), None);
        assert_eq!(lifecycle(99, -5), None);
    }
}
