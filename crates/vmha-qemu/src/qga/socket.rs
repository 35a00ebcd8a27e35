//! The guest channel's socket, registered with the runtime for reading only.
//!
//! tokio registers a socket for reading and writing at once. QEMU reads each command from the
//! channel as soon as it is written, and each time the kernel then reports the socket writable
//! again: the runtime wakes for nothing, once per command (on a quiet host a wake is a context
//! switch, which costs about as much as the call). Here only readability wakes the runtime.
//! Commands are written straight to the non-blocking socket; only when it is full (a guest
//! that does not read) does a duplicate of it, registered for writability, wait for room.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::sys::socket::{MsgFlags, send};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

/// A connected, non-blocking Unix stream socket that wakes the runtime when it can be read
/// (and, while a write waits for room, when it can be written).
#[derive(Debug)]
pub struct ChannelSocket {
    read: AsyncFd<UnixStream>,
}

impl ChannelSocket {
    /// Connects to `path` (tokio's non-blocking connect), then registers for reading only.
    pub async fn connect(path: &Path) -> io::Result<Self> {
        let stream = tokio::net::UnixStream::connect(path).await?.into_std()?;
        Ok(Self {
            read: register(stream, Interest::READABLE)?,
        })
    }

    /// Writes all of `bytes`. Not cancel-safe as to content (a dropped call may leave part of
    /// `bytes` written), like tokio's `write_all`: the guest channel resynchronises after one.
    pub async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        // Registered for writability only while one write waits for room.
        let mut room: Option<AsyncFd<UnixStream>> = None;
        while !bytes.is_empty() {
            let written = match &room {
                None => send_now(self.read.get_ref(), bytes),
                Some(room) => {
                    let mut guard = room.writable().await?;
                    match guard.try_io(|fd| send_now(fd.get_ref(), bytes)) {
                        Ok(result) => result,
                        Err(_would_block) => continue,
                    }
                }
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n.min(bytes.len())..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && room.is_none() => {
                    let dup = self.read.get_ref().try_clone()?;
                    room = Some(register(dup, Interest::WRITABLE)?);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// `stream` registered with the runtime for `interest` only.
fn register(stream: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: the `AsyncFd` owns `stream`, whose descriptor stays open and the same until the
    // `AsyncFd` drops it.
    #[allow(unsafe_code)]
    unsafe { AsyncFd::register_with_interest(stream, interest) }.map_err(io::Error::from)
}

/// One non-blocking `send` (no `SIGPIPE` on a closed peer: `EPIPE` instead).
fn send_now(socket: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    send(
        socket.as_raw_fd(),
        bytes,
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)
}

impl AsyncRead for ChannelSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.read.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| io::Read::read(&mut fd.get_ref(), unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A connected client and its peer (the agent's end); the directory holds the socket.
    async fn pair() -> (ChannelSocket, tokio::net::UnixStream, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (client, accepted) = tokio::join!(ChannelSocket::connect(&path), listener.accept());
        (client.unwrap(), accepted.unwrap().0, dir)
    }

    #[tokio::test]
    async fn carries_bytes_both_ways_and_waits_for_room_when_the_peer_does_not_read() {
        let (mut client, mut peer, _dir) = pair().await;
        // Far more than the socket buffer: the write must wait for the peer to read.
        let big = vec![7u8; 4 << 20];
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 4 << 20];
            peer.read_exact(&mut got).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut peer, b"pong\n")
                .await
                .unwrap();
            (got, peer)
        });
        client.write_all(&big).await.unwrap();
        let (got, _peer) = reader.await.unwrap();
        assert!(got == big);
        let mut line = [0u8; 5];
        client.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"pong\n");
    }

    #[tokio::test]
    async fn a_closed_peer_is_an_error_not_a_signal() {
        let (mut client, peer, _dir) = pair().await;
        drop(peer);
        let mut byte = [0u8; 1];
        assert_eq!(client.read(&mut byte).await.unwrap(), 0, "end of stream");
        assert!(client.write_all(b"x\n").await.is_err());
    }
}
