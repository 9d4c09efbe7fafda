//! Request bodies as they really arrive. An upload reserves its share of
//! `server.max_inflight_body_bytes` byte by byte as it comes in, never what
//! it merely declares, so silent `Content-Length: 268435456` connections or
//! slow chunked uploads reserve nothing they have not sent. An upload that
//! sends nothing for `http.body_idle_timeout_ms` while we wait for it, or
//! that averages under `http.min_body_rate_bytes_per_s` once that long has
//! passed, ends with 408 (a gRPC message with `DEADLINE_EXCEEDED`): a
//! trickle cannot hold a connection, a tenant's slot or the budget. Once
//! the answer is built the reservation is settled to the answer's size and
//! travels with the answer (a response extension), which `http.rs` holds
//! until hyper has flushed it to the socket or the connection is gone:
//! answers nobody reads count too. (A gRPC answer is released once built;
//! it is a few hundred bytes of scores.)

use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::error::{ApiError, Code};

/// Why a body stopped being read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    #[error("the upload sent no data for {0} ms (http.body_idle_timeout_ms)")]
    Idle(u64),
    #[error("the upload averaged {0} bytes/s; http.min_body_rate_bytes_per_s is {1}")]
    TooSlow(u64, u64),
    #[error(
        "the gateway is already buffering server.max_inflight_body_bytes = {0} bytes of uploads and answers"
    )]
    Budget(usize),
    #[error(
        "tenant {0:?} already has its max_inflight_body_bytes = {1} bytes of uploads and answers buffered"
    )]
    TenantBudget(String, usize),
}

impl BodyError {
    pub fn to_api(&self) -> ApiError {
        let code = match self {
            BodyError::Idle(_) | BodyError::TooSlow(..) => Code::BodyTimeout,
            BodyError::Budget(_) => Code::UploadBudgetExhausted,
            BodyError::TenantBudget(..) => Code::TenantUploadBudgetExhausted,
        };
        ApiError::new(code, self.to_string())
    }

    /// The `BodyError` somewhere in `e`'s source chain.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(b) = err.downcast_ref::<BodyError>() {
                return Some(b);
            }
            cur = err.source();
        }
        None
    }
}

/// A budget of bytes held at once: uploads being received and answers not
/// yet written. The server's (`server.max_inflight_body_bytes`) bounds the
/// gateway; each tenant's share of it keeps one tenant from taking it all.
#[derive(Debug, Clone)]
pub struct Budget {
    /// One permit per KiB.
    kib: Arc<Semaphore>,
    total_kib: usize,
    total_bytes: usize,
    /// The tenant whose share this is; `None` for the server's budget.
    tenant: Option<String>,
}

impl Budget {
    pub fn new(total_bytes: usize) -> Self {
        // Rounded up, as reservations are: a budget equal to the largest
        // body always fits one such body.
        let total_kib = total_bytes.div_ceil(1024).min(Semaphore::MAX_PERMITS);
        Self {
            kib: Arc::new(Semaphore::new(total_kib)),
            total_kib,
            total_bytes,
            tenant: None,
        }
    }

    /// `tenant`'s share of the server's budget.
    pub fn for_tenant(total_bytes: usize, tenant: &str) -> Self {
        Self {
            tenant: Some(tenant.to_string()),
            ..Self::new(total_bytes)
        }
    }

    /// An empty reservation of the server's budget, which grows as a body
    /// arrives.
    pub fn reserve(&self) -> Arc<Reservation> {
        Arc::new(Reservation {
            server: self.clone(),
            tenant: std::sync::OnceLock::new(),
            held: Mutex::new(Holding::default()),
        })
    }

    /// Bytes reserved now, by all requests.
    pub fn held_bytes(&self) -> usize {
        (self.total_kib - self.kib.available_permits()) * 1024
    }

    fn take(&self, kib: usize) -> Result<OwnedSemaphorePermit, BodyError> {
        u32::try_from(kib)
            .ok()
            .and_then(|n| self.kib.clone().try_acquire_many_owned(n).ok())
            .ok_or_else(|| match &self.tenant {
                None => BodyError::Budget(self.total_bytes),
                Some(t) => BodyError::TenantBudget(t.clone(), self.total_bytes),
            })
    }
}

/// One request's reservation: the same KiB of the server's budget and, once
/// its tenant is known, of the tenant's share.
#[derive(Debug)]
pub struct Reservation {
    server: Budget,
    tenant: std::sync::OnceLock<Budget>,
    held: Mutex<Holding>,
}

#[derive(Debug, Default)]
struct Holding {
    kib: usize,
    server: Option<OwnedSemaphorePermit>,
    tenant: Option<OwnedSemaphorePermit>,
}

impl Holding {
    fn add(slot: &mut Option<OwnedSemaphorePermit>, p: OwnedSemaphorePermit) {
        match slot {
            Some(held) => held.merge(p),
            None => *slot = Some(p),
        }
    }

    fn release(&mut self, kib: usize) {
        for p in [&mut self.server, &mut self.tenant].into_iter().flatten() {
            drop(p.split(kib));
        }
        self.kib -= kib;
    }
}

impl Reservation {
    /// Charges this request to `tenant`'s share too, from now on, with what
    /// it already holds. Once charged, it stays charged to that share: a
    /// gRPC message is charged as it arrives, and again (a no-op) when it
    /// is scored.
    pub fn charge_tenant(&self, tenant: Budget) -> Result<(), BodyError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if self.tenant.get().is_some() {
            return Ok(());
        }
        if held.kib > 0 {
            let p = tenant.take(held.kib)?;
            Holding::add(&mut held.tenant, p);
        }
        let _ = self.tenant.set(tenant);
        Ok(())
    }

    /// Reserves up to `bytes` read so far (rounded up to KiB): the tenant's
    /// share first, then the server's.
    fn cover(&self, bytes: usize) -> Result<(), BodyError> {
        let want = bytes.div_ceil(1024);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if want <= held.kib {
            return Ok(());
        }
        let more = want - held.kib;
        let tenant = self.tenant.get().map(|t| t.take(more)).transpose()?;
        let server = self.server.take(more)?;
        Holding::add(&mut held.server, server);
        if let Some(p) = tenant {
            Holding::add(&mut held.tenant, p);
        }
        held.kib = want;
        Ok(())
    }

    /// Sets the reservation to `bytes` (rounded up to KiB), what the
    /// request holds from now on: the upload is gone once the answer is
    /// built, and the answer's bytes take its place. The reservation only
    /// shrinks or grows into what is free: an answer is never refused
    /// after its work is done (answers are small: echoes are clipped).
    pub fn settle(&self, bytes: usize) {
        let want = bytes.div_ceil(1024);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if want < held.kib {
            let surplus = held.kib - want;
            held.release(surplus);
        } else if want > held.kib {
            drop(held);
            let _ = self.cover(bytes);
        }
    }

    /// Bytes reserved now (a multiple of 1024).
    pub fn reserved_bytes(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).kib * 1024
    }
}

/// A body that reserves its bytes as they arrive and times out when idle.
pub struct Metered<B> {
    inner: B,
    reservation: Arc<Reservation>,
    read: usize,
    idle: Duration,
    /// Bytes per second the upload must average once `idle` has passed.
    min_rate: u64,
    started: Instant,
    timer: Pin<Box<Sleep>>,
    /// A poll is waiting for the next frame: the idle clock runs only then,
    /// so a handler that pauses between frames is not charged for it.
    waiting: bool,
}

/// The largest body of a control call (a shared-memory registration, a
/// gRPC call other than `ModelInfer`): a few hundred bytes of JSON or
/// protobuf in practice.
pub const SMALL_BODY_BYTES: usize = 4 << 10;

impl<B> Metered<B> {
    /// `inner` under `[http] body_idle_timeout_ms` and
    /// `min_body_rate_bytes_per_s`.
    pub fn with_limits(inner: B, reservation: Arc<Reservation>, http: &config::HttpLimits) -> Self {
        Self::new(
            inner,
            reservation,
            Duration::from_millis(http.body_idle_timeout_ms),
            http.min_body_rate_bytes_per_s,
        )
    }

    pub fn new(inner: B, reservation: Arc<Reservation>, idle: Duration, min_rate: u64) -> Self {
        Self {
            inner,
            reservation,
            read: 0,
            idle,
            min_rate,
            started: Instant::now(),
            timer: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
        }
    }

    /// Refuses an upload slower than `min_rate` on average, after a grace
    /// of `idle` from its start.
    fn check_rate(&self) -> Result<(), BodyError> {
        let secs = self.started.elapsed().as_secs_f64();
        if self.min_rate == 0 || secs < self.idle.as_secs_f64() {
            return Ok(());
        }
        let rate = (self.read as f64 / secs) as u64;
        if rate < self.min_rate {
            return Err(BodyError::TooSlow(rate, self.min_rate));
        }
        Ok(())
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if !this.waiting {
            this.waiting = true;
            let deadline = Instant::now() + this.idle;
            this.timer.as_mut().reset(deadline);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                ready!(this.timer.as_mut().poll(cx));
                let ms = this.idle.as_millis() as u64;
                Poll::Ready(Some(Err(Box::new(BodyError::Idle(ms)))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                // Only bytes count as progress: HTTP/2 lets a client send
                // empty DATA frames for free, which must not keep a stalled
                // upload alive.
                if frame.data_ref().is_none_or(|d| !d.is_empty()) {
                    this.waiting = false;
                } else if this.timer.deadline() <= Instant::now() {
                    // Empty frames that are always ready never leave the
                    // timer a chance to fire.
                    let ms = this.idle.as_millis() as u64;
                    this.reservation.settle(0);
                    return Poll::Ready(Some(Err(Box::new(BodyError::Idle(ms)))));
                }
                if let Some(data) = frame.data_ref() {
                    this.read += data.len();
                    let checked = this
                        .reservation
                        .cover(this.read)
                        .and_then(|()| this.check_rate());
                    if let Err(e) = checked {
                        // The upload ends here: what it held is free now,
                        // not when the request is dropped, so uploads
                        // arriving meanwhile are not refused for it.
                        this.reservation.settle(0);
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn chunks(n: usize, size: usize) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        let frames =
            (0..n).map(move |_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![7u8; size]))));
        StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_reserves_what_it_sent_and_frees_it_on_drop() {
        let budget = Budget::new(100 * 1024);
        let r = budget.reserve();
        let body = Metered::new(chunks(10, 1000), r.clone(), Duration::from_secs(5), 1);
        let data = body.collect().await.unwrap().to_bytes();
        assert_eq!(data.len(), 10_000);
        assert_eq!(r.reserved_bytes(), 10 * 1024);
        assert_eq!(budget.held_bytes(), 10 * 1024);
        drop(r);
        assert_eq!(budget.held_bytes(), 0);
    }

    #[tokio::test]
    async fn an_answer_holds_its_settled_bytes_until_it_is_dropped() {
        let budget = Budget::new(100 * 1024);
        let r = budget.reserve();
        let body = Metered::new(chunks(40, 1000), r.clone(), Duration::from_secs(5), 1);
        body.collect().await.unwrap();
        assert_eq!(budget.held_bytes(), 40 * 1024);
        // The upload is gone; the answer (3 KiB) takes its place.
        r.settle(2_500);
        assert_eq!(budget.held_bytes(), 3 * 1024);
        // The answer holds it (see http.rs: until it is flushed).
        let answer = r;
        assert_eq!(budget.held_bytes(), 3 * 1024);
        // Growing takes only what is free.
        let other = budget.reserve();
        other.settle(200 * 1024);
        assert_eq!(
            budget.held_bytes(),
            3 * 1024,
            "an impossible growth takes nothing"
        );
        other.settle(10 * 1024);
        assert_eq!(budget.held_bytes(), 13 * 1024);
        drop(other);
        drop(answer);
        assert_eq!(budget.held_bytes(), 0);
    }

    #[tokio::test]
    async fn a_body_over_the_budget_fails_with_budget_exhausted() {
        let budget = Budget::new(4 * 1024);
        let r = budget.reserve();
        let body = Metered::new(chunks(10, 1000), r.clone(), Duration::from_secs(5), 1);
        let err = body.collect().await.unwrap_err();
        let e = BodyError::find(err.as_ref()).expect("a BodyError");
        assert!(matches!(e, BodyError::Budget(_)), "{e}");
        assert_eq!(e.to_api().code, Code::UploadBudgetExhausted);
    }

    #[tokio::test]
    async fn a_budget_of_an_odd_size_fits_a_body_of_that_size() {
        let budget = Budget::for_tenant(10_000_000, "acme");
        let r = Budget::new(10_000_000).reserve();
        r.charge_tenant(budget).unwrap();
        let body = Metered::new(chunks(10_000, 1000), r.clone(), Duration::from_secs(5), 1);
        body.collect().await.unwrap();
        assert_eq!(r.reserved_bytes(), 10_000_000usize.div_ceil(1024) * 1024);
    }

    #[tokio::test]
    async fn a_tenant_is_held_to_its_share_and_others_keep_the_rest() {
        let server = Budget::new(100 * 1024);
        let share = Budget::for_tenant(30 * 1024, "acme");
        let upload = |r: &Arc<Reservation>, kib: usize| {
            Metered::new(chunks(kib, 1024), r.clone(), Duration::from_secs(5), 1).collect()
        };
        let a1 = server.reserve();
        a1.charge_tenant(share.clone()).unwrap();
        upload(&a1, 20).await.unwrap();
        let a2 = server.reserve();
        a2.charge_tenant(share.clone()).unwrap();
        let err = upload(&a2, 20).await.unwrap_err();
        let e = BodyError::find(err.as_ref()).unwrap();
        assert!(
            matches!(e, BodyError::TenantBudget(t, _) if t == "acme"),
            "{e}"
        );
        assert_eq!(e.to_api().code, Code::TenantUploadBudgetExhausted);
        // The failed upload gave back what it held, in both budgets.
        drop(a2);
        assert_eq!(
            (server.held_bytes(), share.held_bytes()),
            (20 * 1024, 20 * 1024)
        );
        // Another tenant still has the rest of the server's budget.
        let b = server.reserve();
        b.charge_tenant(Budget::for_tenant(100 * 1024, "other"))
            .unwrap();
        upload(&b, 80).await.unwrap();
        // Settling shrinks both.
        a1.settle(1024);
        assert_eq!((server.held_bytes(), share.held_bytes()), (81 * 1024, 1024));
        drop((a1, b));
        assert_eq!((server.held_bytes(), share.held_bytes()), (0, 0));
    }

    #[test]
    fn empty_frames_always_ready_still_time_out() {
        // On a thread of its own: a body that never ends never yields, so
        // nothing on its runtime could time it out.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let err = rt.block_on(async {
                let r = Budget::new(100 * 1024).reserve();
                let empty = futures::stream::repeat_with(|| {
                    Ok::<_, std::io::Error>(Frame::data(Bytes::new()))
                });
                // No minimum rate: only the idle clock can end it.
                let body = Metered::new(StreamBody::new(empty), r, Duration::from_millis(50), 0);
                body.collect().await.unwrap_err()
            });
            let _ = tx.send(matches!(
                BodyError::find(err.as_ref()),
                Some(BodyError::Idle(50))
            ));
        });
        let idle = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("empty frames kept the body alive for 5 s");
        assert!(idle);
    }

    #[tokio::test]
    async fn a_refused_body_frees_what_it_held_at_once() {
        let budget = Budget::new(10 * 1024);
        let r = budget.reserve();
        let body = Metered::new(chunks(3, 4096), r.clone(), Duration::from_secs(5), 1);
        let err = body.collect().await.unwrap_err();
        assert!(matches!(
            BodyError::find(err.as_ref()),
            Some(BodyError::Budget(_))
        ));
        // The request (and its reservation) is still alive, its bytes are not.
        assert_eq!((r.reserved_bytes(), budget.held_bytes()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_body_times_out() {
        let r = Budget::new(100 * 1024).reserve();
        let silent = StreamBody::new(futures::stream::pending::<
            Result<Frame<Bytes>, std::io::Error>,
        >());
        let body = Metered::new(silent, r.clone(), Duration::from_millis(500), 1);
        let err = body.collect().await.unwrap_err();
        let e = BodyError::find(err.as_ref()).unwrap();
        assert!(matches!(e, BodyError::Idle(500)), "{e}");
        assert_eq!(r.reserved_bytes(), 0, "nothing sent, nothing reserved");
    }

    #[tokio::test(start_paused = true)]
    async fn empty_frames_do_not_keep_a_stalled_body_alive() {
        let r = Budget::new(1000 * 1024).reserve();
        // 100 KB at once, then an empty DATA frame every 100 ms (free in
        // HTTP/2): the average rate stays high, but no byte arrives.
        let first = futures::stream::once(async {
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![1u8; 100_000])))
        });
        let empty = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((Ok::<_, std::io::Error>(Frame::data(Bytes::new())), ()))
        });
        let body = Metered::new(
            StreamBody::new(Box::pin(first.chain(empty))),
            r,
            Duration::from_millis(500),
            1,
        );
        let err = tokio::time::timeout(Duration::from_secs(60), body.collect())
            .await
            .expect("the stalled body was cut off")
            .unwrap_err();
        let e = BodyError::find(err.as_ref()).unwrap();
        assert!(matches!(e, BodyError::Idle(500)), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_under_the_minimum_rate_is_cut_off() {
        let r = Budget::new(100 * 1024).reserve();
        // One byte every 400 ms: never idle for 500 ms, but 2.5 bytes/s.
        let trickle = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Some((
                Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"x"))),
                (),
            ))
        });
        let body = Metered::new(
            StreamBody::new(Box::pin(trickle)),
            r,
            Duration::from_millis(500),
            100,
        );
        let err = body.collect().await.unwrap_err();
        let e = BodyError::find(err.as_ref()).unwrap();
        assert!(matches!(e, BodyError::TooSlow(2, 100)), "{e}");
        assert_eq!(e.to_api().code, Code::BodyTimeout);
    }
}
