//! The API's connection layer, on the Unix socket and on each TCP listener (plain or TLS):
//! accepts connections, admits them under the connection limit ([`crate::api_limit`]; every
//! listener has its own), serves each with HTTP/1 and times out the slow and the idle. A TLS
//! handshake must end within [`REQUEST_HEAD_TIMEOUT`] and holds a connection slot meanwhile
//! (idle: it may be shed). What a peer that connects and sends nothing, half a head or half a body, or stops
//! reading its response can hold: one connection slot, for at most [`REQUEST_HEAD_TIMEOUT`],
//! [`BODY_READ_TIMEOUT`] or [`WRITE_STALL_TIMEOUT`]. A body longer than [`MAX_REQUEST_BODY`]
//! is refused with 413 from its `Content-Length` before any of it is read (so
//! `Expect: 100-continue` gets the 413, not a `100 Continue`); a chunked one is cut at the
//! limit with the same 413. Running out of file descriptors makes accepting pause for
//! [`ACCEPT_BACKOFF`] (and sheds an idle connection), never spin.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;
use vmha_api::{ErrorBody, ErrorCode, ErrorReply, MAX_REQUEST_BODY};

use crate::api_error::ApiError;
use crate::api_io::{Io, raw_response};
use crate::api_limit::{Admission, ConnId, Connections, MAX_CONNECTIONS};

/// How long a connection may take, from being ready for a request (just accepted, or its last
/// response sent: keep-alive), to having sent the request's whole head. Past it the connection
/// is closed: this is both the idle timeout and the slow-head timeout.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request's body may take to arrive, from the end of its head. Past it the request
/// is refused with 408 `request-timeout` and the connection closed.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long writing a response may stay blocked because the client does not read it. Past it
/// the connection is closed (a stream that is read, however slowly, is never cut).
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a shed connection may take to finish what it is writing before it is dropped.
const SHED_GRACE: Duration = Duration::from_secs(1);

/// How long accepting pauses after an error that is not about one connection (out of file
/// descriptors or memory).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// After a response, how long vmhad keeps reading (and discarding) what the client still sends
/// — the rest of a refused body — so that the client reads the response rather than a reset.
const LINGER: Duration = Duration::from_secs(2);

type Shared = Arc<Mutex<Connections>>;

fn lock(conns: &Mutex<Connections>) -> MutexGuard<'_, Connections> {
    conns
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Raises this process's soft limit of open files to its hard limit, so that API connections,
/// QMP/QGA sockets and the store share the most file descriptors the system allows. Failing
/// leaves the limit as it was (logged).
pub fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

/// Where API connections come from.
pub enum Listener {
    /// The local socket; its peers' credentials tell the operator (root or vmhad's user).
    Unix(UnixListener),
    /// A TCP listener (`[api] listen`), speaking TLS when it has an acceptor. Nobody on it
    /// counts as the operator: its connections never take the operator's reserved slots.
    Tcp(TcpListener, Option<TlsAcceptor>),
}

/// An accepted connection, before its TLS handshake (if any).
enum Accepted {
    Unix(UnixStream),
    Tcp(TcpStream, Option<TlsAcceptor>),
}

impl Listener {
    /// The next connection, and whether its peer is the operator.
    async fn accept(&self, own_uid: u32) -> std::io::Result<(Accepted, bool)> {
        match self {
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                let operator = stream
                    .peer_cred()
                    .is_ok_and(|c| c.uid() == 0 || c.uid() == own_uid);
                Ok((Accepted::Unix(stream), operator))
            }
            Listener::Tcp(l, tls) => {
                let (stream, _) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Accepted::Tcp(stream, tls.clone()), false))
            }
        }
    }
}

/// Serves `router` on `listener` until the returned future is dropped; dropping it closes every
/// connection.
pub async fn run(listener: Listener, router: Router) {
    let conns: Shared = Arc::default();
    let own_uid = nix::unistd::geteuid().as_raw();
    let mut tasks = JoinSet::new();
    let mut warned: Option<Instant> = None;
    loop {
        while tasks.try_join_next().is_some() {}
        let (stream, operator) = match listener.accept(own_uid).await {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_failed(&e, &conns, &mut warned).await;
                continue;
            }
        };
        let admission = lock(&conns).admit(operator);
        match admission {
            Admission::Admit { id, shed, busy } => {
                let conn = Conn {
                    id,
                    conns: Arc::clone(&conns),
                    shed,
                    busy,
                };
                tasks.spawn(start(stream, router.clone(), conn));
            }
            Admission::Refuse => {
                tracing::debug!("API connection refused: all {MAX_CONNECTIONS} slots busy");
                tasks.spawn(start_refusal(stream));
            }
        }
    }
}

/// Serves an admitted connection, after its TLS handshake if it has one.
async fn start(accepted: Accepted, router: Router, conn: Conn) {
    match accepted {
        Accepted::Unix(stream) => serve(stream, router, conn).await,
        Accepted::Tcp(stream, None) => serve(stream, router, conn).await,
        Accepted::Tcp(stream, Some(tls)) => {
            match tokio::time::timeout(REQUEST_HEAD_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve(stream, router, conn).await,
                Ok(Err(e)) => {
                    lock(&conn.conns).remove(conn.id);
                    tracing::debug!("API TLS handshake failed: {e}");
                }
                Err(_) => {
                    lock(&conn.conns).remove(conn.id);
                    tracing::debug!("API TLS handshake timed out");
                }
            }
        }
    }
}

/// Refuses a connection that was not admitted (after its TLS handshake if it has one).
async fn start_refusal(accepted: Accepted) {
    match accepted {
        Accepted::Unix(stream) => refuse(stream).await,
        Accepted::Tcp(stream, None) => refuse(stream).await,
        Accepted::Tcp(stream, Some(tls)) => {
            if let Ok(Ok(stream)) = tokio::time::timeout(LINGER, tls.accept(stream)).await {
                refuse(stream).await;
            }
        }
    }
}

/// Handles an accept error without spinning: one about a single connection is skipped; any
/// other (out of file descriptors, of memory) sheds the oldest idle connection and pauses.
async fn accept_failed(
    e: &std::io::Error,
    conns: &Mutex<Connections>,
    warned: &mut Option<Instant>,
) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    ) {
        return;
    }
    let shed = lock(conns).shed_oldest_idle(true);
    if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
        tracing::warn!(
            "accepting API connections failed: {e}; pausing {} ms (idle connection shed: {})",
            ACCEPT_BACKOFF.as_millis(),
            shed.is_some()
        );
        *warned = Some(Instant::now());
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Answers 503 `too-many-connections` on a connection that was not admitted, and closes it.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let reply = ErrorReply {
        code: ErrorCode::TooManyConnections,
        body: ErrorBody {
            error: format!(
                "vmhad serves at most {MAX_CONNECTIONS} API connections and every one is busy \
                 with a request; nothing was changed, retry"
            ),
            command_error: None,
        },
    };
    let answer = raw_response(503, "Service Unavailable", &reply);
    let written = tokio::time::timeout(LINGER, stream.write_all(&answer)).await;
    if matches!(written, Ok(Ok(()))) {
        linger(stream).await;
    }
}

/// An admitted connection's place in [`Connections`].
struct Conn {
    id: ConnId,
    conns: Shared,
    shed: Arc<Notify>,
    busy: Arc<AtomicUsize>,
}

/// Serves one admitted connection until it closes, times out or is shed. A shed connection
/// closes at once when idle; a request that raced in is answered first (the connection closes
/// after it).
async fn serve<S>(stream: S, router: Router, me: Conn)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let busy = Arc::clone(&me.busy);
        hyper::service::service_fn(
            move |req| -> Pin<
                Box<dyn Future<Output = Result<Response<Guarded>, Infallible>> + Send>,
            > { Box::pin(handle(router.clone(), Busy::start(&busy), req)) },
        )
    };
    let mut conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_HEAD_TIMEOUT)
        .serve_connection(Io::new(stream), service);
    let mut shed_signal = std::pin::pin!(me.shed.notified());
    let mut grace: Option<Pin<Box<Sleep>>> = None;
    let ended = std::future::poll_fn(|cx| {
        if grace.is_none() && shed_signal.as_mut().poll(cx).is_ready() {
            Pin::new(&mut conn).graceful_shutdown();
            grace = Some(Box::pin(tokio::time::sleep(SHED_GRACE)));
        }
        let idle = me.busy.load(Ordering::SeqCst) == 0;
        if grace
            .as_mut()
            .is_some_and(|g| g.as_mut().poll(cx).is_ready())
            && idle
        {
            return Poll::Ready(None);
        }
        conn.poll_without_shutdown(cx).map(Some)
    })
    .await;
    lock(&me.conns).remove(me.id);
    match ended {
        _ if grace.is_some() => {
            tracing::debug!("API connection shed to make room for a newer one");
        }
        Some(Ok(())) => linger(conn.into_parts().io.into_inner()).await,
        Some(Err(e)) => tracing::debug!("API connection closed: {e}"),
        None => {}
    }
}

/// Closes a connection whose last response is written: no more writing, then reading (and
/// discarding) what the client still sends for at most [`LINGER`], so that a client still
/// sending a refused body reads the response instead of a connection reset.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let _ = stream.shutdown().await;
    let mut buf = vec![0; 16 * 1024];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// One request: refused with 413 at once when its `Content-Length` is over the limit, else
/// given to the router with its body under [`BODY_READ_TIMEOUT`]. The connection counts as busy
/// (never shed) until the response is written.
async fn handle(
    mut router: Router,
    busy: Busy,
    req: hyper::Request<Incoming>,
) -> Result<Response<Guarded>, Infallible> {
    let too_long =
        usize::try_from(req.body().size_hint().lower()).map_or(true, |len| len > MAX_REQUEST_BODY);
    let response = if too_long {
        ApiError::too_large().into_response()
    } else {
        let req: Request<TimedBody> = req.map(|body| TimedBody {
            body,
            deadline: Box::pin(tokio::time::sleep(BODY_READ_TIMEOUT)),
        });
        match router.call(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    };
    Ok(response.map(|body| Guarded { body, _busy: busy }))
}

/// Marks a connection busy (a request in progress) for as long as it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn start(busy: &Arc<AtomicUsize>) -> Busy {
        busy.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(busy))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its connection busy until it is written (or dropped).
struct Guarded {
    body: axum::body::Body,
    _busy: Busy,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The reading of a request body took longer than [`BODY_READ_TIMEOUT`].
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs())]
pub struct BodyTimedOut;

/// A request body that fails with [`BodyTimedOut`] once its deadline passes.
struct TimedBody {
    body: Incoming,
    deadline: Pin<Box<Sleep>>,
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending if this.deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Some(Err(Box::new(BodyTimedOut))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
