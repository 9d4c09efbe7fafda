//! The preprocess worker pool: a bounded job queue shared by all workers, one
//! supervised process per worker index, and one dispatcher task per worker
//! thread. A dispatcher takes a job only when its thread is free, leases the
//! tensor slot, hands the worker the input and keeps the lease until the
//! worker answered or is confirmed dead, so a slot is never reused while a
//! process might still write to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shm::{FromWorker, Input, InputRegion, Job, JobDone, SlotLease, ToWorker, WorkerInit};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::children::{self, StartError};
use crate::conn::Conn;
use crate::core::{Core, PendingGuard};
use crate::error::{ApiError, Code};
use crate::video::VideoTask;

/// One upload to preprocess.
#[derive(Debug)]
pub struct WorkJob {
    pub upload: QueuedUpload,
    pub task: Task,
}

/// The upload of a job and its bookkeeping, whatever its kind.
#[derive(Debug)]
pub struct QueuedUpload {
    pub request_id: String,
    pub model: u16,
    pub data: Bytes,
    pub enqueued: Instant,
    /// Counts the job as "in preprocessing" for the batcher's hint.
    pub pending: PendingGuard,
}

impl WorkJob {
    /// A job queued now.
    pub fn new(core: &Arc<Core>, request_id: &str, model: u16, data: Bytes, task: Task) -> Self {
        let upload = QueuedUpload {
            request_id: request_id.to_string(),
            model,
            data,
            enqueued: Instant::now(),
            pending: core.pending_guard(model),
        };
        Self { upload, task }
    }
}

/// What to do with the upload, and where the answer goes.
#[derive(Debug)]
pub enum Task {
    Image(oneshot::Sender<Result<Preprocessed, ApiError>>),
    Video(VideoTask),
}

impl Task {
    fn caller_gone(&self) -> bool {
        match self {
            Task::Image(reply) => reply.is_closed(),
            Task::Video(v) => v.events.is_closed(),
        }
    }
}

/// A sample that is in shared memory, ready for the executor.
#[derive(Debug)]
pub struct Preprocessed {
    pub lease: SlotLease,
    pub done: JobDone,
    /// Waiting for a worker thread and a slot.
    pub queue: Duration,
}

#[derive(Debug)]
pub struct WorkerPool {
    tx: async_channel::Sender<WorkJob>,
    rx: async_channel::Receiver<WorkJob>,
    ready: Vec<AtomicBool>,
    next_job: AtomicU64,
}

impl WorkerPool {
    pub fn new(core: &Core) -> Arc<Self> {
        let (tx, rx) = async_channel::bounded(core.cfg.server.queue_capacity);
        let ready = (0..core.cfg.workers.count)
            .map(|_| AtomicBool::new(false))
            .collect();
        Arc::new(Self {
            tx,
            rx,
            ready,
            next_job: AtomicU64::new(1),
        })
    }

    /// Queues a job, or refuses at once when the queue is full or no worker
    /// is up to take it.
    pub fn submit(&self, job: WorkJob) -> Result<(), ApiError> {
        if self.ready_count() == 0 {
            return Err(ApiError::new(
                Code::NotReady,
                "no preprocess worker is running (they are starting or restarting)",
            ));
        }
        self.tx.try_send(job).map_err(|e| match e {
            async_channel::TrySendError::Full(_) => ApiError::new(
                Code::QueueFull,
                format!(
                    "the preprocess queue is full ({} jobs waiting); retry later",
                    self.tx.capacity().unwrap_or(0)
                ),
            ),
            async_channel::TrySendError::Closed(_) => {
                ApiError::new(Code::ShuttingDown, "the gateway is shutting down")
            }
        })
    }

    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    pub fn ready_count(&self) -> usize {
        self.ready
            .iter()
            .filter(|r| r.load(Ordering::Relaxed))
            .count()
    }

    pub fn size(&self) -> usize {
        self.ready.len()
    }

    /// Stops taking new jobs; queued ones are still served.
    pub fn close(&self) {
        self.tx.close();
    }

    /// Supervises worker `index` until shutdown: start, serve, restart.
    pub async fn supervise(self: Arc<Self>, core: Arc<Core>, index: u32) {
        let name = format!("preprocess-worker {index}");
        children::keep_running(&core, "preprocess", &name, || self.run_once(&core, index)).await;
    }

    /// One incarnation of a worker process. Returns why it ended.
    async fn run_once(
        self: &Arc<Self>,
        core: &Arc<Core>,
        index: u32,
    ) -> Result<&'static str, StartError> {
        let cfg = &core.cfg;
        let threads = cfg.workers.threads;
        let input = Arc::new(InputRegion::create(threads, cfg.input_slot_bytes())?);
        let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned();
        let fds = vec![
            (
                "--tensor-fd",
                dup(core.ledger.tensors().fd()).map_err(shm::ShmError::from)?,
            ),
            ("--input-fd", dup(input.fd()).map_err(shm::ShmError::from)?),
        ];
        let bin = core.bin_dir.join("preprocess-worker");
        let mut sp = children::spawn(&bin, fds)?;
        let init = ToWorker::Init(WorkerInit {
            worker_id: index,
            threads,
            layout: core.ledger.tensors().layout().clone(),
            input_slot_bytes: input.slot_bytes(),
            models: cfg.models.clone(),
            limits: cfg.limits.clone(),
        });
        let hs =
            children::handshake::<FromWorker, _>(&mut sp.stream, &init, Duration::from_secs(30));
        if let Err(e) = hs.await {
            children::reap(&mut sp.child).await;
            return Err(e);
        }
        tracing::info!(worker = index, pid = sp.pid, "preprocess worker ready");
        let (mut rd, wr) = sp.stream.into_split();
        let conn = Arc::new(Conn::new(wr));
        let mut dispatchers = JoinSet::new();
        for k in 0..threads {
            let (pool, core, conn, input) =
                (self.clone(), core.clone(), conn.clone(), input.clone());
            dispatchers.spawn(async move { pool.dispatch(core, conn, input, k).await });
        }
        self.ready[index as usize].store(true, Ordering::Relaxed);
        core.metrics
            .children_ready
            .with_label_values(&["preprocess"])
            .inc();

        let reader = conn.clone();
        let reason = tokio::select! {
            _ = sp.child.wait() => "exited",
            _ = async move {
                while let Ok(Some(msg)) = shm::recv::<FromWorker>(&mut rd).await {
                    reader.deliver(msg);
                }
            } => "socket_closed",
            _ = conn.dying.cancelled() => "killed",
            _ = core.shutting_down() => "shutdown",
        };
        conn.kill(); // its dispatchers stop taking jobs now
        self.ready[index as usize].store(false, Ordering::Relaxed);
        core.metrics
            .children_ready
            .with_label_values(&["preprocess"])
            .dec();
        if reason == "shutdown" {
            // The HTTP server has drained by now: close the socket and give
            // the worker a moment to exit on its own.
            conn.close_writer().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), sp.child.wait()).await;
        }
        // The process must be gone before any lease it could write is freed.
        children::reap(&mut sp.child).await;
        conn.close();
        dispatchers.shutdown().await;
        Ok(reason)
    }

    /// Serves worker thread `k`: one job at a time, input slot `k`.
    async fn dispatch(
        self: Arc<Self>,
        core: Arc<Core>,
        conn: Arc<Conn>,
        input: Arc<InputRegion>,
        k: u32,
    ) {
        loop {
            let job = tokio::select! {
                biased;
                _ = conn.dying.cancelled() => return,
                job = self.rx.recv() => match job {
                    Ok(job) => job,
                    Err(_) => return,
                },
            };
            if job.task.caller_gone() {
                continue; // the caller went away: skip the decode
            }
            let job_id = self.next_job.fetch_add(1, Ordering::Relaxed);
            let thread = WorkerThread {
                core: &core,
                conn: &conn,
                input: &input,
                k,
            };
            if let Err(held) = thread.run(job_id, job).await {
                // The worker is dying. Keep its leases (and the caller's
                // reply) until this task is aborted, which happens only
                // after the process has been reaped.
                let _held = held;
                std::future::pending::<()>().await;
            }
        }
    }
}

/// One worker thread's view: the connection and its input slot `k`.
pub(crate) struct WorkerThread<'a> {
    pub core: &'a Core,
    pub conn: &'a Conn,
    pub input: &'a InputRegion,
    pub k: u32,
}

impl WorkerThread<'_> {
    /// Runs one job. `Err` = the worker is lost; what it holds must outlive it.
    async fn run(&self, job_id: u64, job: WorkJob) -> Result<(), Held> {
        match job.task {
            Task::Image(reply) => self.run_image(job_id, job.upload, reply).await,
            Task::Video(video) => self.run_video(job_id, job.upload, video).await,
        }
    }

    async fn run_image(
        &self,
        job_id: u64,
        upload: QueuedUpload,
        reply: oneshot::Sender<Result<Preprocessed, ApiError>>,
    ) -> Result<(), Held> {
        let QueuedUpload {
            request_id,
            model,
            data,
            enqueued,
            pending,
        } = upload;
        let lease = match lease_within(self.core, model, enqueued).await {
            Ok(lease) => lease,
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        let queue = enqueued.elapsed();
        let input = match self.place_input(&data) {
            Ok(i) => i,
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        let mut rx = self.conn.expect(job_id);
        let msg = ToWorker::Job(Job {
            job_id,
            request_id,
            slot: lease.slot(),
            input,
        });
        if self.conn.send(&msg).await.is_err() {
            return Err(Held::new(vec![lease], reply));
        }
        let limit = Duration::from_millis(self.core.cfg.limits.decode_deadline_ms + 500);
        let answer = tokio::time::timeout(limit, rx.recv()).await;
        drop(pending);
        let result = match answer {
            Ok(Some(FromWorker::Done(done))) => Ok(Preprocessed { lease, done, queue }),
            Ok(Some(FromWorker::Failed { error, .. })) => Err(ApiError::from(error)),
            Ok(_) => return Err(Held::new(vec![lease], reply)),
            Err(_) => {
                let msg = format!(
                    "decoding took longer than limits.decode_deadline_ms = {} ms",
                    self.core.cfg.limits.decode_deadline_ms
                );
                let _ = reply.send(Err(ApiError::new(Code::DecodeDeadlineExceeded, msg)));
                self.conn.kill();
                return Err(Held::new(vec![lease], ()));
            }
        };
        let _ = self.input.recycle(self.k, data.len());
        let _ = reply.send(result);
        Ok(())
    }

    /// Puts the upload where the worker will read it: inline when small,
    /// else in this thread's slot of the shared input region.
    pub(crate) fn place_input(&self, data: &Bytes) -> Result<Input, ApiError> {
        if data.len() <= self.core.cfg.workers.inline_input_max_bytes {
            return Ok(Input::Inline(data.to_vec()));
        }
        self.input
            .write(self.k, data)
            .map_err(|e| ApiError::new(Code::PayloadTooLarge, e.to_string()))?;
        Ok(Input::Shared {
            index: self.k,
            len: data.len(),
        })
    }
}

/// Leases a slot of `model`, waiting at most what is left of the queue timeout.
pub(crate) async fn lease_within(
    core: &Core,
    model: u16,
    enqueued: Instant,
) -> Result<SlotLease, ApiError> {
    let limit = Duration::from_millis(core.cfg.server.queue_timeout_ms);
    let left = limit.saturating_sub(enqueued.elapsed());
    match tokio::time::timeout(left, core.ledger.lease(model)).await {
        Ok(Ok(lease)) => Ok(lease),
        Ok(Err(e)) => Err(ApiError::new(Code::Internal, e.to_string())),
        Err(_) => Err(ApiError::new(
            Code::QueueTimeout,
            format!(
                "no tensor slot freed up within server.queue_timeout_ms = {} ms",
                limit.as_millis()
            ),
        )),
    }
}

/// What a job of a lost worker keeps alive until the worker is reaped: its
/// slot leases, and the caller's reply (dropping it reports the crash).
pub(crate) struct Held {
    _leases: Vec<SlotLease>,
    _reply: Box<dyn std::any::Any + Send>,
}

impl Held {
    pub(crate) fn new(leases: Vec<SlotLease>, reply: impl std::any::Any + Send) -> Self {
        Self {
            _leases: leases,
            _reply: Box::new(reply),
        }
    }
}
