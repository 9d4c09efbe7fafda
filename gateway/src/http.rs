//! The HTTP/1 server: hyper with a timer and caps, so that a client cannot
//! hold the gateway's connections, memory or shutdown for free.
//!
//! - a request head (and the wait for it on a kept-alive connection) must
//!   arrive within `http.header_read_timeout_ms`: slowloris heads and idle
//!   connections are closed;
//! - every write must make progress within `http.write_timeout_ms`: a client
//!   that never reads its answer loses the connection, and the answer's
//!   memory with it;
//! - at most `http.max_connections` are open; past that a connection is
//!   answered 503 `too_many_connections` (JSON, `Connection: close`) and
//!   closed, before any of its bytes are read (at most 64 such answers at
//!   once: past that, a flood is closed unanswered and costs no fd);
//! - on shutdown, idle and half-sent connections close at once, in-flight
//!   requests are drained.
//!
//! Body reading (idle timeout, byte budget) is in `body.rs`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_io_timeout::TimeoutStream;
use tokio_util::task::TaskTracker;

use crate::body::Reservation;
use crate::core::Core;
use crate::error::{ApiError, Code};
use crate::parse_errors::{JsonParseErrors, head_over_limit, read_buffer_bytes};

/// Accepts and serves connections until `shutdown` resolves, then closes
/// the listener and drains: returns when every connection has ended.
/// At most `max_connections` are served at once; more are answered 503.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    core: Arc<Core>,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let limits = core.cfg.http.clone();
    let slots = Arc::new(Semaphore::new(max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let tracker = TaskTracker::new();
    let (stop_tx, stop) = watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .max_headers(limits.max_headers)
        .max_buf_size(read_buffer_bytes(&limits));
    let write_timeout = Duration::from_millis(limits.write_timeout_ms);
    let too_many: Arc<[u8]> = too_many_connections().into();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning;
                    // the connections already open go on.
                    core.metrics.connections.with_label_values(&["accept_error"]).inc();
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            core.metrics
                .connections
                .with_label_values(&["refused"])
                .inc();
            // Answering costs the fd for a moment; past MAX_REFUSING at once
            // a flood is closed unanswered, so it cannot hold fds.
            if let Ok(r) = refusing.clone().try_acquire_owned() {
                let answer = too_many.clone();
                tracker.spawn(async move {
                    refuse(stream, &answer, write_timeout).await;
                    drop(r);
                });
            }
            continue;
        };
        core.metrics
            .connections
            .with_label_values(&["accepted"])
            .inc();
        let _ = stream.set_nodelay(true);
        let mut io = TimeoutStream::new(stream);
        io.set_write_timeout(Some(write_timeout));
        let busy = Arc::new(AtomicUsize::new(0));
        let unwritten = Arc::new(Unwritten::default());
        let service = TowerToHyperService::new(Tracked {
            inner: app.clone(),
            peer,
            busy: busy.clone(),
            unwritten: unwritten.clone(),
            limits: limits.clone(),
        });
        let io = Flushed::new(
            JsonParseErrors::new(Box::pin(io), limits.clone(), unwritten.clone()),
            unwritten,
        );
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let open = core.metrics.open_connections.clone();
        let stop = stop.clone();
        open.inc();
        tracker.spawn(async move {
            if let Err(e) = drive(conn, busy, stop).await {
                tracing::debug!("connection ended: {e}");
            }
            open.dec();
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    tracker.close();
    tracker.wait().await;
}

/// Surplus connections answered 503 at once; more are closed unanswered.
const MAX_REFUSING: usize = 64;

/// How long a connection with no request in progress may take to finish
/// on shutdown (writing the end of an answer) before it is dropped: a
/// half-sent request head must not hold the drain.
const IDLE_DRAIN: Duration = Duration::from_millis(500);

/// Serves one connection; on shutdown, lets a request in progress finish
/// (hyper's graceful shutdown: no keep-alive after it), and drops the
/// connection once nothing is in progress.
async fn drive<C>(
    conn: C,
    busy: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>> + GracefulConn,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = stop.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful();
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            () = tokio::time::sleep(IDLE_DRAIN) => {
                if busy.load(Ordering::Acquire) == 0 {
                    return Ok(());
                }
            }
        }
    }
}

/// hyper's HTTP/1 connection, seen through what `drive` needs of it.
trait GracefulConn {
    fn graceful(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConn for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    fn graceful(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// The app, counting the requests in progress on one connection. A
/// request is in progress until its answer is on the socket: hyper drops an
/// answer's body once it has taken its last bytes into its own write
/// buffer, so the body and what the answer holds (its `Busy` count, and
/// the request's budget reservation, which the app attaches as a response
/// extension) are parked on the connection until hyper has flushed that
/// buffer, or the connection ends.
#[derive(Clone)]
struct Tracked {
    inner: Router,
    /// The client's address, given to handlers as `ConnectInfo`.
    peer: std::net::SocketAddr,
    busy: Arc<AtomicUsize>,
    unwritten: Arc<Unwritten>,
    limits: config::HttpLimits,
}

/// Answer bodies hyper is done with but has not flushed yet, with what
/// they hold; and whether the connection's close should linger.
#[derive(Default)]
pub(crate) struct Unwritten {
    parked: std::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>>,
    /// An answer refused its request before reading the body and closes
    /// the connection: see [`LINGER`].
    linger: std::sync::atomic::AtomicBool,
}

impl Unwritten {
    /// The connection's close must linger: an answer refused a request
    /// whose rest the client may still be sending.
    pub(crate) fn linger_on_close(&self) {
        self.linger.store(true, Ordering::Release);
    }

    fn park(&self, held: Box<dyn std::any::Any + Send>) {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(held);
    }

    /// hyper's buffer is on the socket (or the connection is gone).
    fn release(&self) {
        let parked = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()));
        drop(parked);
    }
}

/// After an answer that refused its request before reading the body (and
/// closes the connection), the rest of the upload is read and dropped for
/// up to this long before the socket is closed (a lingering close, as
/// nginx does). Closing with unread bytes would reset the connection, and
/// a client that sends its whole upload before reading (most HTTP
/// libraries) would see a failed send instead of the JSON answer.
const LINGER: Duration = Duration::from_secs(2);

/// An answer's body that, when hyper drops it, parks itself and its
/// `Busy` on the connection until the next completed flush.
struct Answer {
    body: Option<axum::body::Body>,
    busy: Option<Busy>,
    reservation: Option<Arc<Reservation>>,
    unwritten: Arc<Unwritten>,
}

impl http_body::Body for Answer {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        match self.body.as_mut() {
            Some(b) => std::pin::Pin::new(b).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.as_ref().map_or_else(
            || http_body::SizeHint::with_exact(0),
            http_body::Body::size_hint,
        )
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        let held = (self.body.take(), self.busy.take(), self.reservation.take());
        self.unwritten.park(Box::new(held));
    }
}

/// The connection's IO, releasing the parked answers whenever a flush
/// completes (hyper flushes the socket only once its buffer is written)
/// and when the connection is dropped.
struct Flushed<T> {
    inner: T,
    unwritten: Arc<Unwritten>,
    /// Set once the write side is shut, with the end of the lingering.
    lingering: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Flushed<T> {
    fn new(inner: T, unwritten: Arc<Unwritten>) -> Self {
        Self {
            inner,
            unwritten,
            lingering: None,
        }
    }
}

impl<T> Drop for Flushed<T> {
    fn drop(&mut self) {
        self.unwritten.release();
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Flushed<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Flushed<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_flush(cx));
        if r.is_ok() {
            self.unwritten.release();
        }
        std::task::Poll::Ready(r)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        if self.lingering.is_none() {
            std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_shutdown(cx))?;
            if !self.unwritten.linger.load(Ordering::Acquire) {
                return Poll::Ready(Ok(()));
            }
            // The answer is out (FIN sent); drain until the client's EOF.
            self.lingering = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut scratch = [0u8; 16 << 10];
        loop {
            let mut buf = tokio::io::ReadBuf::new(&mut scratch);
            match std::pin::Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    let until = self.lingering.as_mut().expect("set above");
                    return match until.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Ok(())),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

impl<B> tower::Service<hyper::Request<B>> for Tracked
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: hyper::Request<B>) -> Self::Future {
        if let Some(e) = head_over_limit(req.headers(), &self.limits) {
            // Refused before its body was read: the connection closes,
            // lingering.
            self.unwritten.linger_on_close();
            return Box::pin(std::future::ready(Ok(e.into_closing_response())));
        }
        let busy = Busy::new(self.busy.clone());
        let unwritten = self.unwritten.clone();
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        let fut = tower::Service::call(&mut self.inner.clone(), req);
        Box::pin(async move {
            let mut r = fut.await?;
            // The app closes the connection when it refused a request
            // before reading its body: that close lingers.
            if r.headers()
                .get(axum::http::header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
            {
                unwritten.linger_on_close();
            }
            let reservation = r.extensions_mut().remove::<Arc<Reservation>>();
            Ok(r.map(|b| {
                axum::body::Body::new(Answer {
                    body: Some(b),
                    busy: Some(busy),
                    reservation,
                    unwritten,
                })
            }))
        })
    }
}

/// One request in progress on a connection, until dropped.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The answer to a connection over `http.max_connections`.
fn too_many_connections() -> Vec<u8> {
    ApiError::new(
        Code::TooManyConnections,
        "the gateway has too many open connections; retry later",
    )
    .to_http1_closing()
}

/// Answers 503 and closes without serving the request; what the client
/// already sent is read and dropped for a moment, so that closing does not
/// reset the connection before the client has read the answer.
async fn refuse(mut stream: TcpStream, answer: &[u8], within: Duration) {
    let _ = tokio::time::timeout(within, async {
        let _ = stream.write_all(answer).await;
        let _ = stream.shutdown().await;
    })
    .await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Raises the soft limit on open files to the hard limit, and returns the
/// limit in force.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!("cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!("cannot read RLIMIT_NOFILE: {e}");
            1024
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request is in progress until its answer is flushed to the socket:
    /// the drain must not drop a connection that is still writing an
    /// answer, and the answer's budget is held until then.
    #[tokio::test]
    async fn a_request_is_busy_until_its_answer_is_flushed() {
        use axum::routing::get;
        let app = Router::new().route(
            "/",
            get(|| async {
                // An answer whose body never ends.
                axum::body::Body::from_stream(futures::stream::pending::<
                    Result<bytes::Bytes, std::io::Error>,
                >())
            }),
        );
        let busy = Arc::new(AtomicUsize::new(0));
        let unwritten = Arc::new(Unwritten::default());
        let mut svc = Tracked {
            inner: app,
            peer: ([127, 0, 0, 1], 9).into(),
            busy: busy.clone(),
            unwritten: unwritten.clone(),
            limits: config::HttpLimits::default(),
        };
        let req = axum::http::Request::get("/")
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = tower::Service::call(&mut svc, req).await.unwrap();
        assert_eq!(busy.load(Ordering::Acquire), 1, "answer not yet written");
        // hyper drops the body once it holds its last bytes: still unwritten.
        drop(resp);
        assert_eq!(busy.load(Ordering::Acquire), 1, "answer not yet flushed");
        // A completed flush writes it.
        let (mut io, _peer) = tokio::io::duplex(64);
        let mut flushed = Flushed::new(&mut io, unwritten.clone());
        tokio::io::AsyncWriteExt::flush(&mut flushed).await.unwrap();
        assert_eq!(busy.load(Ordering::Acquire), 0);
    }

    #[test]
    fn the_canned_answer_has_the_right_length_and_is_json() {
        let answer = too_many_connections();
        let text = std::str::from_utf8(&answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert!(head.ends_with("\r\nretry-after: 1"), "{head}");
    }
}
