//! The gateway's end of one child incarnation's socket: the same type for
//! preprocess workers and the executor.
//!
//! - **Sending** is synchronous and so cannot be cancelled half-way: a frame
//!   is written at once when the socket takes it (the usual case, no task
//!   hop), and otherwise queued whole and written, in order, by the link's
//!   own flusher inside [`ChildLink::run`]. A request task dropped by its
//!   client therefore never leaves half a frame on the socket.
//! - **Answers** are routed by job id. A job registered with
//!   [`ChildLink::expect`] gets a stream of messages that ends with its last
//!   message, or when the child is gone. A job may hand the link slot leases
//!   to keep until then: a slot is never reused while the child may still
//!   read or write it.
//! - **Ending**: [`ChildLink::kill`] says why (an [`Exit`]); the supervisor
//!   runs the link until the child ends, then [`ChildLink::finish`] reaps it
//!   and only then ends the waiting jobs and frees their leases.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shm::{FromExecutor, FromWorker, ShmError, SlotLease, ToExecutor, ToWorker};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::Child;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::children::{self, Exit};

/// The link to a preprocess worker.
pub(crate) type WorkerLink = ChildLink<ToWorker, FromWorker>;
/// The link to the executor.
pub(crate) type ExecutorLink = ChildLink<ToExecutor, FromExecutor>;

/// What the link needs to know of a child's messages.
pub(crate) trait Answer: DeserializeOwned + std::fmt::Debug + Send + 'static {
    /// The job this message answers, and whether it is that job's last one;
    /// `None` for a message that belongs to no job.
    fn job(&self) -> Option<(u64, bool)>;
    /// A message that only says the child is alive.
    fn is_heartbeat(&self) -> bool {
        false
    }
}

impl Answer for FromWorker {
    fn job(&self) -> Option<(u64, bool)> {
        match self {
            FromWorker::Done(d) => Some((d.job_id, true)),
            FromWorker::Failed { job_id, .. } => Some((*job_id, true)),
            FromWorker::VideoDone(d) => Some((d.job_id, true)),
            FromWorker::Frame(f) => Some((f.job_id, false)),
            _ => None,
        }
    }
}

impl Answer for FromExecutor {
    fn job(&self) -> Option<(u64, bool)> {
        match self {
            FromExecutor::Scores(s) => Some((s.job_id, true)),
            FromExecutor::Failed { job_id, .. }
            | FromExecutor::Expired { job_id }
            | FromExecutor::NotLoaded { job_id } => Some((*job_id, true)),
            _ => None,
        }
    }
    fn is_heartbeat(&self) -> bool {
        matches!(self, FromExecutor::Heartbeat)
    }
}

/// A job waiting for answers, with what it keeps alive until then.
struct Waiter<In> {
    tx: Tx<In>,
    _held: Vec<SlotLease>,
}

/// Where a job's answers go: its one answer, or a stream of them.
enum Tx<In> {
    One(oneshot::Sender<In>),
    Many(mpsc::UnboundedSender<In>),
}

/// The receiving end of a job with a single answer (see
/// [`ChildLink::expect_one`]).
pub(crate) struct One<In>(oneshot::Receiver<In>);

impl<In> One<In> {
    /// The job's answer; `None` once the child is gone without one.
    pub async fn recv(self) -> Option<In> {
        self.0.await.ok()
    }
}

/// Whole frames the socket did not take yet.
#[derive(Default)]
struct Backlog {
    bytes: BytesMut,
    broken: bool,
}

pub(crate) struct ChildLink<Out, In> {
    half: OwnedWriteHalf,
    backlog: Mutex<Backlog>,
    /// Wakes the flusher when `backlog` was left non-empty.
    flush: Notify,
    /// Jobs sent and not yet finished; `None` once the child is reaped.
    waiting: Mutex<Option<HashMap<u64, Waiter<In>>>>,
    /// Cancelled when this incarnation is going away: its users stop taking
    /// work for it.
    dying: CancellationToken,
    why: OnceLock<Exit>,
    /// When the child was last heard from (`shm::monotonic_ns`): any
    /// message, heartbeats included; the link's creation at first.
    heard_ns: AtomicU64,
    _out: PhantomData<fn(&Out)>,
}

impl<Out, In> std::fmt::Debug for ChildLink<Out, In> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildLink")
            .field("dying", &self.dying.is_cancelled())
            .field("why", &self.why.get())
            .finish_non_exhaustive()
    }
}

impl<Out: Serialize, In: Answer> ChildLink<Out, In> {
    /// Wraps the gateway's end of a child's socket, split after the handshake.
    pub fn new(half: OwnedWriteHalf) -> Self {
        Self {
            half,
            backlog: Mutex::new(Backlog::default()),
            flush: Notify::new(),
            waiting: Mutex::new(Some(HashMap::new())),
            dying: CancellationToken::new(),
            why: OnceLock::new(),
            heard_ns: AtomicU64::new(shm::monotonic_ns()),
            _out: PhantomData,
        }
    }

    /// Sends one message, in order after every earlier one; never blocks
    /// and cannot be cancelled half-way. An error means the child is lost:
    /// the link is killed, and the caller must hold its job's slots until the
    /// reaping (or have handed them to [`expect`](Self::expect)).
    pub fn send(&self, msg: &Out) -> Result<(), ShmError> {
        let frame = match shm::encode(msg) {
            Ok(f) => f,
            Err(e) => {
                self.kill(Exit::Killed);
                return Err(e);
            }
        };
        let mut b = self.lock_backlog();
        if b.broken {
            return Err(closed());
        }
        let mut rest = &frame[..];
        if b.bytes.is_empty()
            && let Err(e) = write_now(&self.half, &mut rest)
        {
            b.broken = true;
            drop(b);
            self.kill(Exit::SocketClosed);
            return Err(e.into());
        }
        if !rest.is_empty() {
            b.bytes.extend_from_slice(rest);
            drop(b);
            self.flush.notify_one();
        }
        Ok(())
    }

    /// Registers `job_id`, keeping `held` until the job ends; its messages
    /// arrive on the returned stream, which ends after the job's last
    /// message or once the child is gone. A link that was closed (reaped,
    /// or retired once idle) takes no job and gives `held` back.
    pub fn expect(
        &self,
        job_id: u64,
        held: Vec<SlotLease>,
    ) -> Result<mpsc::UnboundedReceiver<In>, Vec<SlotLease>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.register(job_id, Tx::Many(tx), held).map(|()| rx)
    }

    /// [`expect`](Self::expect) for a job answered by one message (an
    /// image's decode, an inference): no stream to allocate per job.
    pub fn expect_one(&self, job_id: u64, held: Vec<SlotLease>) -> Result<One<In>, Vec<SlotLease>> {
        let (tx, rx) = oneshot::channel();
        self.register(job_id, Tx::One(tx), held).map(|()| One(rx))
    }

    fn register(
        &self,
        job_id: u64,
        tx: Tx<In>,
        held: Vec<SlotLease>,
    ) -> Result<(), Vec<SlotLease>> {
        let mut guard = self.lock_waiting();
        let Some(w) = guard.as_mut() else {
            return Err(held);
        };
        w.insert(job_id, Waiter { tx, _held: held });
        Ok(())
    }

    /// Closes the link to new jobs if none is waiting, and says whether it
    /// did: a retired child is let go only once idle.
    pub fn close_if_idle(&self) -> bool {
        let mut guard = self.lock_waiting();
        if guard.as_ref().is_some_and(|w| !w.is_empty()) {
            return false;
        }
        *guard = None;
        true
    }

    /// Hands a message from the child to its job.
    pub fn deliver(&self, msg: In) {
        let Some((id, last)) = msg.job() else {
            if !msg.is_heartbeat() {
                tracing::warn!(?msg, "unexpected message from a child");
            }
            return;
        };
        let mut guard = self.lock_waiting();
        let Some(w) = guard.as_mut() else { return };
        if !last {
            // A stream's next message (sending on it never blocks).
            if let Some(Waiter {
                tx: Tx::Many(tx), ..
            }) = w.get(&id)
            {
                let _ = tx.send(msg);
            }
            return;
        }
        let Some(waiter) = w.remove(&id) else { return };
        drop(guard);
        // What the job held is let go after its answer is handed over.
        match waiter.tx {
            Tx::One(tx) => drop(tx.send(msg)),
            Tx::Many(tx) => drop(tx.send(msg)),
        }
    }

    /// Has the supervisor end this incarnation; the first reason given is
    /// the one reported.
    pub fn kill(&self, why: Exit) {
        let _ = self.why.set(why);
        self.dying.cancel();
    }

    /// Counts as hearing from the child now (when it is put in service).
    pub fn heard_now(&self) {
        self.heard_ns.store(shm::monotonic_ns(), Ordering::Relaxed);
    }

    /// How long since the child was last heard from.
    pub fn silent_for(&self) -> Duration {
        let heard = self.heard_ns.load(Ordering::Relaxed);
        Duration::from_nanos(shm::monotonic_ns().saturating_sub(heard))
    }

    /// Resolves once the link is being killed.
    pub fn dying(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.dying.cancelled()
    }

    /// Serves the link until this incarnation ends: reads the child's
    /// messages (each seen by `on_msg`, then handed to its job), writes what
    /// `send` queued, and says why it ended: the child's end, a `kill`, or
    /// `stop` (shutdown or retirement). The link is dying afterwards.
    pub async fn run(
        &self,
        child: &mut Child,
        mut rd: OwnedReadHalf,
        stop: impl Future<Output = Exit>,
        mut on_msg: impl FnMut(&In),
    ) -> Exit {
        let read = async {
            while let Ok(Some(msg)) = shm::recv::<In>(&mut rd).await {
                self.heard_ns.store(shm::monotonic_ns(), Ordering::Relaxed);
                on_msg(&msg);
                self.deliver(msg);
            }
        };
        // Ends only when a write fails.
        let flusher = async {
            while self.flush_backlog().await.is_ok() {
                self.flush.notified().await;
            }
        };
        // Messages already read are taken before `stop` judges silence.
        let reason = tokio::select! {
            biased;
            _ = child.wait() => Exit::Exited,
            _ = read => Exit::SocketClosed,
            _ = flusher => Exit::SocketClosed,
            _ = self.dying.cancelled() => self.why.get().copied().unwrap_or(Exit::Killed),
            why = stop => why,
        };
        self.kill(reason);
        reason
    }

    /// Ends the incarnation after [`run`](Self::run): on shutdown or
    /// retirement, writes what is queued and closes our side so the child
    /// exits on its own (2 s at most); then kills and reaps the process, and
    /// only then ends the waiting jobs and frees the slots they hold.
    pub async fn finish(&self, child: &mut Child, reason: Exit) {
        if matches!(reason, Exit::Shutdown | Exit::Retired) {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = self.flush_backlog().await;
                let fd = self.half.as_ref().as_raw_fd();
                let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write);
                let _ = child.wait().await;
            })
            .await;
        }
        children::reap(child).await;
        self.lock_waiting().take();
    }

    /// Writes the backlog until it is empty.
    async fn flush_backlog(&self) -> std::io::Result<()> {
        loop {
            {
                let mut b = self.lock_backlog();
                if b.broken {
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                }
                if b.bytes.is_empty() {
                    return Ok(());
                }
                let mut rest = &b.bytes[..];
                let before = rest.len();
                let r = write_now(&self.half, &mut rest);
                let written = before - rest.len();
                b.bytes.advance(written);
                if let Err(e) = r {
                    b.broken = true;
                    return Err(e);
                }
                if b.bytes.is_empty() {
                    return Ok(());
                }
            }
            self.half.writable().await?;
        }
    }

    fn lock_backlog(&self) -> std::sync::MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Option<HashMap<u64, Waiter<In>>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Writes as much of `buf` as the socket takes without waiting, advancing it.
fn write_now(half: &OwnedWriteHalf, buf: &mut &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match half.try_write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => *buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn closed() -> ShmError {
    ShmError::Io(std::io::ErrorKind::BrokenPipe.into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shm::{Input, Job, PoolLayout, RequestContext, SharedTensors};
    use tokio::net::UnixStream;

    use super::*;

    fn pair() -> (WorkerLink, OwnedReadHalf, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (rd, wr) = ours.into_split();
        (WorkerLink::new(wr), rd, theirs)
    }

    fn job(job_id: u64, bytes: usize) -> ToWorker {
        let ledger = shm::Ledger::new(Arc::new(
            SharedTensors::create(PoolLayout::new(&[(1, 16)])).unwrap(),
        ));
        ToWorker::Job(Job {
            job_id,
            ctx: RequestContext::default(),
            slot: ledger.try_lease(0).unwrap().unwrap().slot(),
            input: Input::Inline(vec![job_id as u8; bytes]),
        })
    }

    fn internal(message: &str) -> shm::JobError {
        shm::JobError {
            kind: shm::JobErrorKind::Internal,
            message: message.into(),
        }
    }

    fn sleeper() -> Child {
        tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    #[tokio::test]
    async fn a_full_socket_queues_whole_frames_that_arrive_in_order() {
        let (link, rd, mut theirs) = pair();
        // 40 frames of 64 KiB are far more than a socket buffer holds: sends
        // return at once and the rest waits in the backlog.
        for id in 0..40 {
            link.send(&job(id, 64 << 10)).unwrap();
        }
        assert!(
            !link.lock_backlog().bytes.is_empty(),
            "the socket filled up"
        );
        let link = Arc::new(link);
        let served = link.clone();
        let mut child = sleeper();
        let run = tokio::spawn(async move {
            served
                .run(&mut child, rd, std::future::pending::<Exit>(), |_| {})
                .await
        });
        for id in 0..40 {
            match shm::recv::<ToWorker>(&mut theirs).await.unwrap() {
                Some(ToWorker::Job(j)) => {
                    assert_eq!(j.job_id, id);
                    assert_eq!(j.input, Input::Inline(vec![id as u8; 64 << 10]));
                }
                other => panic!("frame {id}: {other:?}"),
            }
        }
        assert!(link.lock_backlog().bytes.is_empty());
        link.kill(Exit::Timeout);
        assert_eq!(
            run.await.unwrap(),
            Exit::Timeout,
            "the first reason given wins"
        );
    }

    #[tokio::test]
    async fn answers_reach_their_job_and_the_reaping_ends_the_rest() {
        let (link, _rd, _theirs) = pair();
        let tensors = Arc::new(SharedTensors::create(PoolLayout::new(&[(2, 16)])).unwrap());
        let ledger = shm::Ledger::new(tensors);
        let mut one = link.expect(1, vec![]).unwrap();
        let mut two = link
            .expect(2, vec![ledger.try_lease(0).unwrap().unwrap()])
            .unwrap();
        assert_eq!(ledger.free(0), 1, "job 2 holds its slot");
        link.deliver(FromWorker::Failed {
            job_id: 1,
            error: internal("x"),
        });
        assert!(matches!(
            one.recv().await,
            Some(FromWorker::Failed { job_id: 1, .. })
        ));
        assert!(
            one.recv().await.is_none(),
            "its last message ended the stream"
        );
        link.deliver(FromWorker::Failed {
            job_id: 7,
            error: internal("nobody waits"),
        });
        assert!(
            two.try_recv().is_err(),
            "another job's answer is not delivered"
        );
        assert_eq!(ledger.free(0), 1);
        let mut child = sleeper();
        link.kill(Exit::Killed);
        link.finish(&mut child, Exit::Killed).await;
        assert!(child.try_wait().unwrap().is_some(), "reaped");
        assert!(
            two.recv().await.is_none(),
            "the child is gone: the job ends"
        );
        assert_eq!(ledger.free(0), 2, "and its slot is free only now");
        let back = link.expect(3, vec![ledger.try_lease(0).unwrap().unwrap()]);
        assert_eq!(
            back.unwrap_err().len(),
            1,
            "a closed link gives the lease back"
        );
    }

    #[tokio::test]
    async fn a_retired_link_closes_only_once_idle() {
        let (link, _rd, _theirs) = pair();
        let one = link.expect(1, vec![]).unwrap();
        assert!(!link.close_if_idle(), "job 1 still waits");
        link.deliver(FromWorker::Failed {
            job_id: 1,
            error: internal("done"),
        });
        drop(one);
        assert!(link.close_if_idle());
        assert!(link.expect(2, vec![]).is_err(), "closed to new jobs");
    }

    #[tokio::test]
    async fn a_send_to_a_closed_child_fails_and_kills_the_link() {
        let (link, _rd, theirs) = pair();
        drop(theirs);
        let mut failed = false;
        for id in 0..100 {
            if link.send(&job(id, 1024)).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "a send to a closed socket fails");
        assert!(link.dying.is_cancelled());
        assert_eq!(link.why.get(), Some(&Exit::SocketClosed));
        assert!(
            link.send(&job(0, 1)).is_err(),
            "and so does every later one"
        );
    }
}
