//! The preprocess worker pool: bounded job queues shared by all workers (one
//! for images, one for videos), one supervised process per worker index, and
//! one dispatcher task per worker thread. A dispatcher takes a job only when
//! its thread is free, leases the tensor slot, hands the worker the input
//! and keeps the lease until the worker answered or is confirmed dead, so a
//! slot is never reused while a process might still write to it.
//!
//! Videos may hold at most `video.max_worker_share` of the worker threads
//! (always leaving one for images), so hostile or long videos cannot starve
//! image scoring. A job not taken within `server.queue_timeout_ms` is
//! abandoned by its caller (503 `queue_timeout` at that time) and skipped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fair_queue::FairQueue;
use shm::{
    FromWorker, Input, InputRegion, Job, JobDone, RequestContext, SlotLease, ToWorker, WorkerInit,
};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;

use crate::children::{self, Exit, StartError};
use crate::core::{Core, PendingGuard};
use crate::error::{ApiError, Code};
use crate::link::WorkerLink;
use crate::metrics::{DropReason, DropStage};
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
    pub ctx: RequestContext,
    pub model: u16,
    pub data: Bytes,
    pub enqueued: Instant,
    /// Counts the job as "in preprocessing" for the batcher's hint.
    pub pending: PendingGuard,
    /// Taken by a dispatcher, or abandoned by the caller: whichever first.
    pub claim: Claim,
}

/// Who a queued job belongs to now: still queued, taken by a worker thread,
/// or abandoned by its caller after `queue_timeout_ms`. It holds the upload
/// while queued, so an abandoned job frees its bytes at once instead of
/// keeping them in the queue, outside the upload budget, until a dispatcher
/// gets to it.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    state: Arc<AtomicU8>,
    data: Arc<std::sync::Mutex<Option<Bytes>>>,
}

impl Claim {
    const QUEUED: u8 = 0;
    const TAKEN: u8 = 1;
    const ABANDONED: u8 = 2;

    fn holding(data: Bytes) -> Self {
        Self {
            state: Arc::default(),
            data: Arc::new(std::sync::Mutex::new(Some(data))),
        }
    }

    fn swap_from_queued(&self, to: u8) -> bool {
        self.state
            .compare_exchange(Self::QUEUED, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn payload(&self) -> Option<Bytes> {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// A dispatcher takes the job and its upload; `None` if its caller
    /// gave up on it.
    pub fn take(&self) -> Option<Bytes> {
        if self.swap_from_queued(Self::TAKEN) {
            self.payload()
        } else {
            None
        }
    }

    /// The caller gives up on a job no worker took yet, dropping its
    /// upload; false if one took it.
    pub fn abandon(&self) -> bool {
        let abandoned = self.swap_from_queued(Self::ABANDONED);
        if abandoned {
            drop(self.payload());
        }
        abandoned
    }

    fn is_queued(&self) -> bool {
        self.state.load(Ordering::Acquire) == Self::QUEUED
    }

    pub fn is_taken(&self) -> bool {
        self.state.load(Ordering::Acquire) == Self::TAKEN
    }

    /// Abandons the job when dropped, if no worker took it by then: a
    /// caller that goes away (the client hung up, a sibling image failed)
    /// frees its queued upload at once instead of when a worker pops it.
    pub fn abandon_on_drop(&self) -> AbandonOnDrop {
        AbandonOnDrop(self.clone())
    }
}

/// See [`Claim::abandon_on_drop`].
#[derive(Debug)]
pub struct AbandonOnDrop(Claim);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// How long past a decode deadline (`limits.decode_deadline_ms`,
/// `video.decode_deadline_ms`) the gateway waits for a worker's answer
/// before it declares the worker hung and kills it. The worker enforces the
/// deadline itself; this covers the step it was in and the IPC.
pub const DECODE_GRACE: Duration = Duration::from_secs(1);

/// When a worker that got a job with this decode deadline counts as hung.
pub fn hung_after(decode_deadline_ms: u64) -> Duration {
    Duration::from_millis(decode_deadline_ms) + DECODE_GRACE
}

/// When a job no worker thread has taken is given up on:
/// `server.queue_timeout_ms` after it was queued. Callers wait for the
/// job's first answer or this instant, whichever comes first, and then
/// call [`give_up_if_queued`]: nothing polls.
pub fn queue_deadline(core: &Core, enqueued: Instant) -> tokio::time::Instant {
    let limit = Duration::from_millis(core.cfg.server.queue_timeout_ms);
    tokio::time::Instant::from_std(enqueued + limit)
}

/// At the queue deadline: 503 `queue_timeout` if the job is still queued
/// (it is then skipped, never decoded), or `Ok` if a worker thread took it.
pub fn give_up_if_queued(core: &Core, claim: &Claim) -> Result<(), ApiError> {
    if claim.abandon() {
        return Err(ApiError::new(
            Code::QueueTimeout,
            format!(
                "no preprocess worker was free within server.queue_timeout_ms = {} ms",
                core.cfg.server.queue_timeout_ms
            ),
        ));
    }
    Ok(())
}

impl WorkJob {
    /// A job queued now.
    pub fn new(
        core: &Arc<Core>,
        ctx: &RequestContext,
        model: u16,
        data: Bytes,
        task: Task,
    ) -> Self {
        let upload = QueuedUpload {
            ctx: ctx.clone(),
            model,
            // Held by the claim while queued; set when a dispatcher takes it.
            data: Bytes::new(),
            enqueued: Instant::now(),
            pending: core.pending_guard(model),
            claim: Claim::holding(data),
        };
        Self { upload, task }
    }

    /// The job's claim, for its caller to abandon it.
    pub fn claim(&self) -> Claim {
        self.upload.claim.clone()
    }

    fn is_video(&self) -> bool {
        matches!(self.task, Task::Video(_))
    }

    /// Nobody waits for it any more: its deadline passed, or its caller
    /// went away or gave up on it.
    fn is_dead(&self) -> bool {
        self.upload.ctx.expired() || self.task.caller_gone() || !self.upload.claim.is_queued()
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
    queue: Queue,
    /// Worker threads videos may hold at once.
    video_threads: Arc<Semaphore>,
    ready: Vec<AtomicBool>,
    next_job: AtomicU64,
}

/// The preprocess queue: images and videos in two scheduling queues (a
/// video needs a video thread permit too), each `server.queue_capacity`
/// deep. Dispatchers wait on `changed`, notified when a job is queued, a
/// video ends, a worker comes or goes, or the queue closes.
#[derive(Debug)]
struct Queue {
    state: std::sync::Mutex<QueueState>,
    changed: tokio::sync::Notify,
}

#[derive(Debug)]
struct QueueState {
    images: FairQueue<WorkJob>,
    videos: FairQueue<WorkJob>,
    closed: bool,
}

impl Queue {
    fn new(capacity: usize, aging: Duration) -> Self {
        let q = || FairQueue::new(Some(capacity), aging);
        Self {
            state: std::sync::Mutex::new(QueueState {
                images: q(),
                videos: q(),
                closed: false,
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        self.changed.notify_waiters();
    }
}

impl QueueState {
    /// Which queue the next job comes from at `now`: the better-placed
    /// head of the two (by the class it competes as, then the older lane),
    /// videos only when `video` allows; `true` = the video queue.
    fn next_is_video(&self, video: bool, now: Instant) -> Option<bool> {
        let image = self.images.peek_class(now);
        let from_videos = video
            && match (image, self.videos.peek_class(now)) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some((i, _)), Some((v, _))) => v < i,
            };
        (from_videos || image.is_some()).then_some(from_videos)
    }

    /// The next job, if `ok` accepts it.
    fn pop_if(&mut self, video: bool, ok: impl FnOnce(&WorkJob) -> bool) -> Option<WorkJob> {
        let now = Instant::now();
        let q = match self.next_is_video(video, now)? {
            true => &mut self.videos,
            false => &mut self.images,
        };
        if !ok(q.peek(now)?) {
            return None;
        }
        q.pop(now).map(|(job, _)| job)
    }
}

/// What a dispatcher takes: a job, with its video thread permit if it is
/// a video, or its tensor slot if it is an image.
type Taken = (
    WorkJob,
    Option<tokio::sync::OwnedSemaphorePermit>,
    Option<SlotLease>,
);

/// Worker threads videos may hold: `share` of them, at least one, and one
/// fewer than all when there are two or more (one is kept for images).
pub fn video_threads(total: u32, share: f64) -> usize {
    let total = total.max(1) as usize;
    let by_share = (total as f64 * share.clamp(0.0, 1.0)).floor() as usize;
    let cap = if total >= 2 { total - 1 } else { 1 };
    by_share.clamp(1, cap)
}

impl WorkerPool {
    pub fn new(core: &Core) -> Arc<Self> {
        let cfg = &core.cfg;
        let ready = (0..cfg.workers.count)
            .map(|_| AtomicBool::new(false))
            .collect();
        let threads = cfg.workers.count * cfg.workers.threads;
        let videos = video_threads(threads, cfg.video.max_worker_share);
        Arc::new(Self {
            queue: Queue::new(
                cfg.server.queue_capacity,
                Duration::from_millis(cfg.scheduling.aging_ms),
            ),
            video_threads: Arc::new(Semaphore::new(videos)),
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
        let ticket = job.upload.ctx.ticket();
        let arrived = job.upload.enqueued;
        let mut state = self.queue.lock();
        if state.closed {
            return Err(ApiError::new(
                Code::ShuttingDown,
                "the gateway is shutting down",
            ));
        }
        let queue = if job.is_video() {
            &mut state.videos
        } else {
            &mut state.images
        };
        if queue.push(job, &ticket, arrived).is_err() {
            return Err(ApiError::new(
                Code::QueueFull,
                format!(
                    "the preprocess queue is full ({} jobs waiting); retry later",
                    queue.len()
                ),
            ));
        }
        drop(state);
        self.queue.wake();
        Ok(())
    }

    pub fn queued(&self) -> usize {
        let state = self.queue.lock();
        state.images.len() + state.videos.len()
    }

    /// How long the oldest queued image of `classes` has waited: the queue
    /// delay those classes feel now. (A video may wait for a video thread
    /// while image threads are idle: that is no load.)
    pub fn queue_delay(&self, classes: &[config::Class]) -> Duration {
        let state = self.queue.lock();
        state
            .images
            .oldest_of(classes)
            .map_or(Duration::ZERO, |t| t.elapsed())
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
        self.queue.lock().closed = true;
        self.queue.wake();
    }

    /// Supervises worker `index` until shutdown: start, serve, restart.
    pub async fn supervise(self: Arc<Self>, core: Arc<Core>, index: u32) {
        let name = format!("preprocess-worker {index}");
        children::keep_running(&core, "preprocess", &name, || self.run_once(&core, index)).await;
    }

    /// One incarnation of a worker process. Returns why it ended.
    async fn run_once(self: &Arc<Self>, core: &Arc<Core>, index: u32) -> Result<Exit, StartError> {
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
        let (rd, wr) = sp.stream.into_split();
        let link = Arc::new(WorkerLink::new(wr));
        let mut dispatchers = JoinSet::new();
        for k in 0..threads {
            let (pool, core, link, input) =
                (self.clone(), core.clone(), link.clone(), input.clone());
            dispatchers.spawn(async move { pool.dispatch(core, link, input, k).await });
        }
        self.set_ready(index, true);
        core.metrics
            .children_ready
            .with_label_values(&["preprocess"])
            .inc();

        // When it returns, the link is dying: its dispatchers stop taking jobs.
        let reason = link
            .run(&mut sp.child, rd, core.shutting_down(), |_| {})
            .await;
        self.set_ready(index, false);
        core.metrics
            .children_ready
            .with_label_values(&["preprocess"])
            .dec();
        // On shutdown the HTTP server has drained by now. The process must be
        // gone before any lease it could write is freed.
        link.finish(&mut sp.child, reason).await;
        dispatchers.shutdown().await;
        Ok(reason)
    }

    /// Serves worker thread `k`: one job at a time, input slot `k`.
    async fn dispatch(
        self: Arc<Self>,
        core: Arc<Core>,
        link: Arc<WorkerLink>,
        input: Arc<InputRegion>,
        k: u32,
    ) {
        loop {
            // A video is taken only with a video thread permit, held while
            // it runs; images are taken by any free thread.
            let (mut job, video_permit, lease) = tokio::select! {
                biased;
                _ = link.dying() => return,
                next = self.next_job(&core) => match next {
                    Some(next) => next,
                    None => return,
                },
            };
            // A video's end may let a waiting thread take the next video.
            let _video_permit = video_permit.map(|p| VideoPermit {
                permit: Some(p),
                queue: &self.queue,
            });
            // Work nobody waits for any more (its deadline passed, its
            // caller went away or gave up) is not decoded.
            let waited_for = !job.upload.ctx.expired() && !job.task.caller_gone();
            let Some(data) = waited_for.then(|| job.upload.claim.take()).flatten() else {
                job.upload.claim.abandon();
                let reason = DropReason::of(job.upload.ctx.deadline_ns);
                core.metrics.drop_work(DropStage::Preprocess, reason);
                continue;
            };
            job.upload.data = data;
            let job_id = self.next_job.fetch_add(1, Ordering::Relaxed);
            let thread = WorkerThread {
                core: &core,
                link: &link,
                input: &input,
                k,
            };
            if let Err(held) = thread.run(job_id, job, lease).await {
                // The worker is dying. Keep its leases (and the caller's
                // reply) until this task is aborted, which happens only
                // after the process has been reaped.
                let _held = held;
                std::future::pending::<()>().await;
            }
        }
    }
}

impl WorkerPool {
    fn set_ready(&self, index: u32, ready: bool) {
        self.ready[index as usize].store(ready, Ordering::Relaxed);
        self.queue.wake();
    }

    /// The next job in scheduling order (`None` once the queue is closed
    /// and empty), with a video thread permit if it is a video, or its
    /// tensor slot if it is an image. A video is taken only while that
    /// leaves a live thread for images: the share is of the configured
    /// threads, but while a worker restarts fewer are alive, and the last
    /// live thread is never given to a video (unless the pool has a single
    /// thread in all). An image's slot is leased *before* the image is
    /// taken, so a thread never sits on a job while it waits for a slot:
    /// whatever is at the head when a slot frees (a critical job that came
    /// meanwhile, say) gets it. Cancel-safe: a job is only taken when
    /// returned.
    async fn next_job(&self, core: &Core) -> Option<Taken> {
        let cfg = &core.cfg.workers;
        let configured = (cfg.count * cfg.threads) as usize;
        let share = video_threads(configured as u32, core.cfg.video.max_worker_share);
        loop {
            let changed = self.queue.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let permit = self.video_threads.clone().try_acquire_owned().ok();
            let live = self.ready_count() * cfg.threads as usize;
            let videos_running = share - self.video_threads.available_permits();
            let permit = permit.filter(|_| configured == 1 || videos_running < live);
            let head = {
                let mut state = self.queue.lock();
                let now = Instant::now();
                match state.next_is_video(permit.is_some(), now) {
                    Some(true) => {
                        let job = state.videos.pop(now).map(|(job, _)| job);
                        return job.map(|job| (job, permit, None));
                    }
                    // Work nobody waits for any more is taken without a
                    // slot (and dropped by the dispatcher) rather than
                    // wait for one at the head.
                    Some(false) if state.images.peek(now).is_some_and(WorkJob::is_dead) => {
                        let job = state.images.pop(now).map(|(job, _)| job);
                        return job.map(|job| (job, None, None));
                    }
                    Some(false) => state.images.peek(now).map(|job| {
                        let critical = job.upload.ctx.class == config::Class::Critical;
                        (job.upload.model, critical)
                    }),
                    None if state.closed && state.images.is_empty() && state.videos.is_empty() => {
                        return None;
                    }
                    None => None,
                }
            };
            drop(permit);
            let Some((model, critical)) = head else {
                // Woken by any change; the timer only backs up a missed one.
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    () = &mut changed => {}
                }
                continue;
            };
            // A slot for the head image, unless the head changes first.
            let lease = tokio::select! {
                lease = core.ledger.lease_for(model, critical) => lease,
                () = &mut changed => continue,
            };
            let mut state = self.queue.lock();
            // The image the slot was leased for, or one like it: a slot
            // kept for critical work goes to a critical image only.
            let same = |job: &WorkJob| {
                !job.is_video()
                    && job.upload.model == model
                    && (!critical || job.upload.ctx.class == config::Class::Critical)
            };
            if let Some(job) = state.pop_if(false, same) {
                // No slot (the model is unknown to the ledger): the job is
                // answered with the error, not waited on forever.
                return Some((job, None, lease.ok()));
            }
        }
    }
}

/// A video's thread permit: its release wakes the dispatchers, one of
/// which may now take a queued video.
struct VideoPermit<'a> {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    queue: &'a Queue,
}

impl Drop for VideoPermit<'_> {
    fn drop(&mut self) {
        // Released before waking, so a woken dispatcher can take it.
        drop(self.permit.take());
        self.queue.wake();
    }
}

/// One worker thread's view: the link to its worker and its input slot `k`.
pub(crate) struct WorkerThread<'a> {
    pub core: &'a Core,
    pub link: &'a WorkerLink,
    pub input: &'a InputRegion,
    pub k: u32,
}

impl WorkerThread<'_> {
    /// Runs one job. `Err` = the worker is lost; what it holds must outlive it.
    /// An image comes with its slot.
    async fn run(&self, job_id: u64, job: WorkJob, lease: Option<SlotLease>) -> Result<(), Held> {
        match job.task {
            Task::Image(reply) => match lease {
                Some(lease) => self.run_image(job_id, job.upload, lease, reply).await,
                None => {
                    let e = ApiError::new(Code::Internal, "no tensor slot for this model");
                    let _ = reply.send(Err(e));
                    Ok(())
                }
            },
            Task::Video(video) => self.run_video(job_id, job.upload, video).await,
        }
    }

    async fn run_image(
        &self,
        job_id: u64,
        upload: QueuedUpload,
        lease: SlotLease,
        reply: oneshot::Sender<Result<Preprocessed, ApiError>>,
    ) -> Result<(), Held> {
        let QueuedUpload {
            ctx,
            model: _,
            data,
            enqueued,
            pending,
            claim: _,
        } = upload;
        if ctx.expired() {
            // Its deadline passed while it was being taken.
            let (stage, reason) = (DropStage::Preprocess, DropReason::Deadline);
            self.core.metrics.drop_work(stage, reason);
            let _ = reply.send(Err(crate::score::deadline_exceeded()));
            return Ok(());
        }
        let deadline_ns = ctx.deadline_ns;
        let queue = enqueued.elapsed();
        let input = match self.place_input(&data) {
            Ok(i) => i,
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        let mut rx = self.link.expect(job_id, Vec::new());
        let msg = ToWorker::Job(Job {
            job_id,
            ctx,
            slot: lease.slot(),
            input,
        });
        if self.link.send(&msg).is_err() {
            return Err(Held::new(vec![lease], reply));
        }
        let limit = hung_after(self.core.cfg.limits.decode_deadline_ms);
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
                self.link.kill(Exit::Killed);
                return Err(Held::new(vec![lease], ()));
            }
        };
        let _ = self.input.recycle(self.k, data.len());
        if let Err(Ok(_)) = reply.send(result) {
            // Decoded, but the caller is gone: it never reaches the model.
            let reason = DropReason::of(deadline_ns);
            self.core.metrics.drop_work(DropStage::Inference, reason);
        }
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

/// Leases a slot of `model` (a critical job may take a reserved one),
/// waiting at most what is left of the queue timeout.
pub(crate) async fn lease_within(
    core: &Core,
    model: u16,
    enqueued: Instant,
    critical: bool,
) -> Result<SlotLease, ApiError> {
    let limit = Duration::from_millis(core.cfg.server.queue_timeout_ms);
    let left = limit.saturating_sub(enqueued.elapsed());
    match tokio::time::timeout(left, core.ledger.lease_for(model, critical)).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_job_drops_its_upload_and_cannot_be_taken() {
        let data = Bytes::from(vec![7u8; 1 << 20]);
        let claim = Claim::holding(data.clone());
        assert!(!data.is_unique(), "the claim holds the upload");
        assert!(claim.abandon());
        assert!(data.is_unique(), "abandoning freed the upload");
        assert_eq!(claim.take(), None);
        assert!(!claim.abandon());

        let claim = Claim::holding(data.clone());
        assert_eq!(claim.take().as_deref().map(<[u8]>::len), Some(1 << 20));
        assert!(
            claim.is_taken() && !claim.abandon(),
            "a taken job is not abandoned"
        );
    }

    #[test]
    fn videos_get_their_share_but_never_every_thread() {
        assert_eq!(video_threads(1, 0.5), 1);
        assert_eq!(video_threads(2, 0.5), 1);
        assert_eq!(video_threads(2, 1.0), 1);
        assert_eq!(video_threads(4, 0.5), 2);
        assert_eq!(video_threads(8, 0.25), 2);
        assert_eq!(video_threads(8, 0.0), 1);
    }
}
