//! The watch doorbell: a second virtio-serial port, [`PORT_NAME`], through which the VM's
//! watcher tells vmhad the moment it is armed or has ended, so that vmhad does not have to
//! poll the watcher often to notice its end.
//!
//! QEMU serves the port on a Unix socket (`bell.sock` in the VM's directory); [`Doorbell`]
//! reads it for as long as it lives. The guest's bytes are hints, never evidence: a byte `a`
//! counts as an "armed" ring, a byte `g` as an "ended" ring, anything else is dropped. A ring
//! only makes vmhad ask the agent about its watcher at once (`guest-exec-status`), whose answer
//! stays the truth. After each read the doorbell reads nothing for [`MIN_GAP`]: a guest that
//! writes without pause fills the socket, QEMU stops taking its bytes, and vmhad wakes for it
//! at most once per [`MIN_GAP`].
//!
//! A QEMU started by an older vmhad gets the port hot-plugged when this driver adopts it
//! ([`crate::vm::QemuVm::adopt`]). A QEMU without the port (the libvirt driver's) has no socket:
//! the doorbell then never rings and is closed, and the watcher is polled as before.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// The name of the doorbell's virtio-serial port, as the guest sees it
/// (`/sys/class/virtio-ports/*/name`, and `/dev/virtio-ports/` where udev links it).
pub const PORT_NAME: &str = "org.vmha.watch.0";

/// Least time between two reads of the doorbell: the most often a guest can wake vmhad by it.
pub const MIN_GAP: Duration = Duration::from_millis(100);

/// Bytes taken per read; the rest of a burst waits for the next read (or is dropped by QEMU's
/// flow control while the socket is full).
const READ_CHUNK: usize = 256;

/// How many rings of each kind the doorbell has had since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Rings {
    armed: u64,
    ended: u64,
}

/// What a ring said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// A watcher has found its processes and waits (the doorbell works for this guest).
    Armed,
    /// A watcher is ending: its status is worth asking at once.
    Ended,
}

/// The reader of one QEMU's doorbell socket. Dropping it stops the reader.
#[derive(Debug)]
pub struct Doorbell {
    rings: watch::Receiver<Rings>,
    reader: AbortHandle,
}

impl Doorbell {
    /// Connects to the doorbell socket at `path` and reads it in a task of the current tokio
    /// runtime. Never fails: without a socket (a QEMU without the port) the doorbell is closed
    /// at once and never rings.
    pub fn open(path: &Path) -> Self {
        let (tx, rings) = watch::channel(Rings::default());
        let reader = tokio::spawn(read_rings(path.to_owned(), tx)).abort_handle();
        Self { rings, reader }
    }

    /// A handle that sees the rings from now on (not the ones before).
    pub fn bell(&self) -> Bell {
        Bell::from_now(self.rings.clone())
    }
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// One watcher's view of the doorbell: the rings since the handle was made.
#[derive(Debug, Clone)]
pub struct Bell {
    rx: watch::Receiver<Rings>,
    since: Rings,
    armed_seen: bool,
}

impl Bell {
    fn from_now(mut rx: watch::Receiver<Rings>) -> Self {
        let since = *rx.borrow_and_update();
        Self {
            rx,
            since,
            armed_seen: false,
        }
    }

    /// A handle on the same doorbell that sees the rings from now on (not the ones before).
    pub fn later(&self) -> Self {
        Self::from_now(self.rx.clone())
    }

    /// Waits for the next ring and says what it was ([`Ring::Ended`] if any of the rings
    /// since the last call was one). Never resolves once the doorbell is closed. Cancel-safe:
    /// a ring that comes while the future is dropped is reported by the next call.
    pub async fn ring(&mut self) -> Ring {
        loop {
            let now = *self.rx.borrow_and_update();
            let ended = now.ended > self.since.ended;
            let armed = now.armed > self.since.armed;
            if ended || armed {
                let ring = if ended { Ring::Ended } else { Ring::Armed };
                self.since = now;
                self.armed_seen |= armed;
                return ring;
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// True when an "armed" ring has come since this handle was made and the doorbell is
    /// still open: the watcher can ring, so it needs polling only as a safety net.
    pub fn armed(&self) -> bool {
        self.armed_seen && self.rx.has_changed().is_ok()
    }
}

/// Reads the doorbell until its socket closes, counting rings into `tx`.
async fn read_rings(path: PathBuf, tx: watch::Sender<Rings>) {
    // No socket: a QEMU without the port. Closing `tx` tells the bells.
    let Ok(mut socket) = tokio::net::UnixStream::connect(&path).await else {
        return;
    };
    let mut buf = [0u8; READ_CHUNK];
    loop {
        let n = match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let bytes = buf.get(..n).unwrap_or_default();
        let (armed, ended) = (bytes.contains(&b'a'), bytes.contains(&b'g'));
        tx.send_if_modified(|r| {
            r.armed += u64::from(armed);
            r.ended += u64::from(ended);
            armed || ended
        });
        tokio::time::sleep(MIN_GAP).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use tokio::io::AsyncWriteExt as _;
    use tokio::net::UnixListener;

    /// A doorbell on a fresh socket, and QEMU's end of it.
    async fn pair() -> (Doorbell, tokio::net::UnixStream, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bell.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let doorbell = Doorbell::open(&path);
        let (qemu, _) = listener.accept().await.unwrap();
        (doorbell, qemu, dir)
    }

    async fn next(bell: &mut Bell) -> Option<Ring> {
        tokio::time::timeout(Duration::from_secs(2), bell.ring())
            .await
            .ok()
    }

    #[tokio::test]
    async fn rings_are_told_apart_and_each_handle_sees_only_later_ones() {
        let (doorbell, mut qemu, _dir) = pair().await;
        let mut bell = doorbell.bell();
        assert!(!bell.armed());
        qemu.write_all(b"a\n").await.unwrap();
        assert_eq!(next(&mut bell).await, Some(Ring::Armed));
        assert!(bell.armed());
        let mut later = doorbell.bell();
        assert!(
            !later.armed(),
            "a new handle knows nothing of earlier rings"
        );
        qemu.write_all(b"g\n").await.unwrap();
        assert_eq!(next(&mut bell).await, Some(Ring::Ended));
        assert_eq!(next(&mut later).await, Some(Ring::Ended));
    }

    #[tokio::test]
    async fn other_bytes_do_not_ring() {
        let (doorbell, mut qemu, _dir) = pair().await;
        let mut bell = doorbell.bell();
        qemu.write_all(b"\0\xffxyz\n").await.unwrap();
        let quiet = tokio::time::timeout(MIN_GAP * 3, bell.ring()).await;
        assert!(quiet.is_err(), "rang on junk: {quiet:?}");
    }

    #[tokio::test]
    async fn a_flooding_guest_is_read_at_most_once_per_gap() {
        let (doorbell, mut qemu, _dir) = pair().await;
        let mut bell = doorbell.bell();
        let flood = tokio::spawn(async move {
            let chunk = [b'g'; 4096];
            // Stops when the doorbell is dropped (the socket closes).
            while qemu.write_all(&chunk).await.is_ok() {}
        });
        let window = MIN_GAP * 5;
        let start = tokio::time::Instant::now();
        let mut rings = 0;
        while let Ok(ring) = tokio::time::timeout_at(start + window, bell.ring()).await {
            assert_eq!(ring, Ring::Ended);
            rings += 1;
        }
        // One ring per read, one read per gap (plus the first, at once).
        assert!((1..=6).contains(&rings), "{rings} rings in {window:?}");
        drop(doorbell);
        tokio::time::timeout(Duration::from_secs(5), flood)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn without_a_socket_the_doorbell_is_closed_and_never_rings() {
        let dir = tempfile::tempdir().unwrap();
        let doorbell = Doorbell::open(&dir.path().join("absent.sock"));
        let mut bell = doorbell.bell();
        let quiet = tokio::time::timeout(Duration::from_millis(200), bell.ring()).await;
        assert!(quiet.is_err());
        assert!(!bell.armed());
    }

    #[tokio::test]
    async fn a_closed_doorbell_is_no_longer_armed() {
        let (doorbell, mut qemu, _dir) = pair().await;
        let mut bell = doorbell.bell();
        qemu.write_all(b"a").await.unwrap();
        assert_eq!(next(&mut bell).await, Some(Ring::Armed));
        drop(qemu);
        let closed = async {
            while bell.armed() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(2), closed)
            .await
            .unwrap();
    }
}
