//! The preprocess worker pool: bounded job queues shared by all workers (one
//! for images, one for videos), one supervised process per pool member, and
//! one dispatcher task per worker thread. The pool keeps a `desired` size
//! (and thread count) and reconciles its members toward it, so a resize
//! and a crash go through the same code: a new member takes jobs once it
//! says Ready; a retired one finishes its current jobs first. A dispatcher takes a job only when
//! its thread is free, leases the tensor slot, hands the worker the input
//! and keeps the lease until the worker answered or is confirmed dead, so a
//! slot is never reused while a process might still write to it.
//!
//! Videos may hold at most `video.max_worker_share` of the worker threads
//! (always leaving one for images), so hostile or long videos cannot starve
//! image scoring. A job not taken within `server.queue_timeout_ms` is
//! abandoned by its caller (503 `queue_timeout` at that time) and skipped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fair_queue::FairQueue;
use shm::{
    FromWorker, Input, InputRegion, Job, JobDone, RequestContext, SlotLease, ToWorker, WorkerInit,
};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

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
    core: Arc<Core>,
    queue: Queue,
    /// Videos being decoded now (each holds a worker thread).
    videos: AtomicUsize,
    members: std::sync::Mutex<Members>,
    next_job: AtomicU64,
}

/// The pool's size as wanted, and its members as they are.
#[derive(Debug)]
struct Members {
    desired: u32,
    threads: u32,
    next_index: u32,
    /// When `desired` or `threads` last changed (admin or autoscaler).
    changed_at: Instant,
    all: BTreeMap<u32, Arc<Member>>,
    /// Each member's supervisor; awaited at shutdown.
    tasks: JoinSet<()>,
}

/// One worker process slot of the pool, across its restarts.
#[derive(Debug)]
pub struct Member {
    pub index: u32,
    /// Threads its processes run (fixed for the member; a thread change
    /// replaces members).
    pub threads: u32,
    ready: AtomicBool,
    pid: AtomicU32,
    busy: AtomicU32,
    incarnations: AtomicU64,
    jobs: AtomicU64,
    /// Cancelled when the member is to finish its jobs and go.
    retire: CancellationToken,
    /// Due for replacement (jobs or memory over the recycling limits): a
    /// new member is started, and this one retires once it is ready.
    recycle: AtomicBool,
}

/// A member as `GET /admin/pools` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberView {
    pub index: u32,
    pub pid: Option<u32>,
    pub threads: u32,
    pub ready: bool,
    pub busy: u32,
    pub retiring: bool,
    pub recycling: bool,
    pub restarts: u64,
    pub jobs: u64,
}

/// The pool as `GET /admin/pools` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolView {
    pub desired: u32,
    pub threads: u32,
    pub min: u32,
    pub max: u32,
    pub alive: usize,
    pub ready: usize,
    pub busy: u32,
    pub queued_images: usize,
    pub queued_videos: usize,
    pub restarts: u64,
    pub retired: u64,
    pub members: Vec<MemberView>,
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
type Taken<'a> = (WorkJob, Option<VideoPermit<'a>>, Option<SlotLease>);

/// Worker threads videos may hold: `share` of them, at least one, and one
/// fewer than all when there are two or more (one is kept for images).
pub fn video_threads(total: u32, share: f64) -> usize {
    let total = total.max(1) as usize;
    let by_share = (total as f64 * share.clamp(0.0, 1.0)).floor() as usize;
    let cap = if total >= 2 { total - 1 } else { 1 };
    by_share.clamp(1, cap)
}

impl WorkerPool {
    pub fn new(core: &Arc<Core>) -> Arc<Self> {
        let cfg = &core.cfg;
        Arc::new(Self {
            core: core.clone(),
            queue: Queue::new(
                cfg.server.queue_capacity,
                Duration::from_millis(cfg.scheduling.aging_ms),
            ),
            videos: AtomicUsize::new(0),
            members: std::sync::Mutex::new(Members {
                desired: cfg.workers.count,
                threads: cfg.workers.threads,
                next_index: 0,
                changed_at: Instant::now(),
                all: BTreeMap::new(),
                tasks: JoinSet::new(),
            }),
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

    /// Members ready to take jobs (retiring ones excluded).
    pub fn ready_count(&self) -> usize {
        self.lock_members()
            .all
            .values()
            .filter(|m| m.is_live())
            .count()
    }

    /// The size the pool is reconciled toward.
    pub fn desired(&self) -> u32 {
        self.lock_members().desired
    }

    /// The pool now, for the admin API.
    pub fn view(&self) -> PoolView {
        let cfg = &self.core.cfg.workers;
        let m = self.lock_members();
        let members: Vec<MemberView> = m.all.values().map(|x| x.view()).collect();
        let retired = self
            .core
            .metrics
            .worker_restarts
            .with_label_values(&["preprocess", Exit::Retired.as_str()])
            .get();
        let (queued_images, queued_videos) = {
            let q = self.queue.lock();
            (q.images.len(), q.videos.len())
        };
        PoolView {
            desired: m.desired,
            threads: m.threads,
            min: cfg.min,
            max: cfg.max,
            alive: members.iter().filter(|x| x.pid.is_some()).count(),
            ready: members.iter().filter(|x| x.ready && !x.retiring).count(),
            busy: members.iter().map(|x| x.busy).sum(),
            queued_images,
            queued_videos,
            restarts: members.iter().map(|x| x.restarts).sum(),
            retired,
            members,
        }
    }

    /// Sets the pool's size (and, if given, the threads per worker) and
    /// reconciles toward it. New members take jobs once ready; removed ones
    /// finish their current jobs first; a thread change replaces each
    /// member once a new one is ready. Refused whole when out of bounds.
    pub fn resize(
        self: &Arc<Self>,
        workers: Option<u32>,
        threads: Option<u32>,
    ) -> Result<(), String> {
        self.check_resize(workers, threads)?;
        {
            let mut m = self.lock_members();
            if let Some(n) = workers {
                m.desired = n;
            }
            if let Some(t) = threads {
                m.threads = t;
            }
            m.changed_at = Instant::now();
        }
        self.reconcile();
        Ok(())
    }

    /// Whether [`resize`](Self::resize) would take these values.
    pub fn check_resize(&self, workers: Option<u32>, threads: Option<u32>) -> Result<(), String> {
        let cfg = &self.core.cfg.workers;
        if let Some(n) = workers
            && !(cfg.min..=cfg.max).contains(&n)
        {
            return Err(format!(
                "workers must be within [workers] min..=max = {}..={}; got {n}",
                cfg.min, cfg.max
            ));
        }
        if let Some(t) = threads
            && !(1..=config::MAX_WORKER_THREADS).contains(&t)
        {
            return Err(format!(
                "threads must be within 1..={}; got {t}",
                config::MAX_WORKER_THREADS
            ));
        }
        Ok(())
    }

    /// Marks `member` for replacement, once.
    fn recycle(self: &Arc<Self>, member: &Member, why: &str) {
        if !member.recycle.swap(true, Ordering::Relaxed) {
            tracing::info!(worker = member.index, why, "recycling preprocess worker");
            self.reconcile();
        }
    }

    /// The pids of the pool's processes now.
    pub fn pids(&self) -> Vec<u32> {
        self.lock_members()
            .all
            .values()
            .map(|m| m.pid.load(Ordering::Relaxed))
            .filter(|&p| p != 0)
            .collect()
    }

    /// Every `AUTOSCALE_TICK`: recycles members over the memory limit and,
    /// with `[workers] autoscale`, moves `desired` within `min..=max`.
    async fn watch(self: Arc<Self>) {
        let cfg = self.core.cfg.workers.clone();
        let mut scaler = Autoscaler::new(&cfg, Instant::now());
        let mut tick = tokio::time::interval(AUTOSCALE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.core.is_shutting_down() {
                return;
            }
            let members: Vec<Arc<Member>> = self.lock_members().all.values().cloned().collect();
            if cfg.recycle_above_rss_mib > 0 {
                for m in &members {
                    let pid = m.pid.load(Ordering::Relaxed);
                    let rss = (pid != 0)
                        .then(|| crate::metrics::read_process(pid))
                        .flatten()
                        .map_or(0, |(_, b)| b);
                    if rss > cfg.recycle_above_rss_mib << 20 {
                        self.recycle(m, "resident memory over workers.recycle_above_rss_mib");
                    }
                }
            }
            let (live, busy) = members
                .iter()
                .filter(|m| m.is_live())
                .fold((0, 0), |(l, b), m| {
                    (l + m.threads, b + m.busy.load(Ordering::Relaxed))
                });
            let starting = members
                .iter()
                .any(|m| !m.is_ready() && !m.retire.is_cancelled());
            let load = Load {
                starting,
                delay: self.queue_delay(&config::Class::ALL),
                critical_delay: self.queue_delay(&[config::Class::Critical]),
                busy: if live == 0 {
                    1.0
                } else {
                    f64::from(busy) / f64::from(live)
                },
            };
            let (desired, changed_at) = {
                let m = self.lock_members();
                (m.desired, m.changed_at)
            };
            self.core
                .metrics
                .pool_desired
                .with_label_values(&["preprocess"])
                .set(i64::from(desired));
            if !cfg.autoscale {
                continue;
            }
            let now = Instant::now();
            let Some(next) = scaler.decide(now, changed_at, desired, &load) else {
                continue;
            };
            {
                let mut m = self.lock_members();
                if m.desired != desired || m.changed_at != changed_at {
                    continue; // an admin change came first
                }
                m.desired = next;
                m.changed_at = now;
            }
            let direction = if next > desired { "up" } else { "down" };
            tracing::info!(
                from = desired,
                to = next,
                ?load,
                "autoscaling the preprocess pool"
            );
            self.core
                .metrics
                .autoscale
                .with_label_values(&["preprocess", direction])
                .inc();
            self.reconcile();
        }
    }

    /// Starts the pool's members; the task ends once shutdown began and
    /// every member's process is reaped.
    pub async fn run(self: Arc<Self>) {
        self.reconcile();
        tokio::spawn(self.clone().watch());
        self.core.shutting_down().await;
        loop {
            let mut tasks = std::mem::take(&mut self.lock_members().tasks);
            if tasks.is_empty() {
                break;
            }
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Moves the members toward `desired` workers of `threads` threads:
    /// starts what is missing, retires extra members (newest first), and
    /// retires members of another thread count once enough new ones are
    /// ready to stand in for them.
    fn reconcile(self: &Arc<Self>) {
        if self.core.is_shutting_down() {
            return;
        }
        let mut m = self.lock_members();
        let desired = m.desired as usize;
        let active: Vec<Arc<Member>> = m
            .all
            .values()
            .filter(|x| !x.retire.is_cancelled())
            .cloned()
            .collect();
        let (mut fresh, stale): (Vec<_>, Vec<_>) = active
            .into_iter()
            .partition(|x| x.threads == m.threads && !x.recycle.load(Ordering::Relaxed));
        // Ready members are kept first: scaling down never retires a ready
        // worker while one that is (re)starting stays.
        fresh.sort_by_key(|x| (!x.is_ready(), x.index));
        for x in fresh.iter().skip(desired) {
            tracing::info!(
                worker = x.index,
                "retiring preprocess worker (pool scaled down)"
            );
            x.retire.cancel();
        }
        while m.tasks.try_join_next().is_some() {}
        for _ in fresh.len()..desired {
            let member = Arc::new(Member::new(m.next_index, m.threads));
            m.next_index += 1;
            m.all.insert(member.index, member.clone());
            let pool = self.clone();
            m.tasks
                .spawn(async move { pool.serve_member(member).await });
        }
        let fresh_ready = fresh.iter().take(desired).filter(|x| x.is_ready()).count();
        for x in stale.iter().skip(desired.saturating_sub(fresh_ready)) {
            tracing::info!(
                worker = x.index,
                "retiring preprocess worker (thread count changed, or recycled)"
            );
            x.retire.cancel();
        }
        drop(m);
        // Retired members stop taking jobs: let the others look again.
        self.queue.wake();
    }

    fn lock_members(&self) -> std::sync::MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops taking new jobs; queued ones are still served.
    pub fn close(&self) {
        self.queue.lock().closed = true;
        self.queue.wake();
    }

    /// Supervises one member until it is retired or shutdown: start,
    /// serve, restart; then takes it out of the pool.
    async fn serve_member(self: Arc<Self>, member: Arc<Member>) {
        let name = format!("preprocess-worker {}", member.index);
        let core = self.core.clone();
        children::keep_running(&core, "preprocess", &name, &member.retire, || {
            member.incarnations.fetch_add(1, Ordering::Relaxed);
            self.run_once(&core, &member)
        })
        .await;
        self.lock_members().all.remove(&member.index);
        self.reconcile();
    }

    /// One incarnation of a worker process. Returns why it ended.
    async fn run_once(
        self: &Arc<Self>,
        core: &Arc<Core>,
        member: &Arc<Member>,
    ) -> Result<Exit, StartError> {
        let cfg = &core.cfg;
        let (index, threads) = (member.index, member.threads);
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
        let mut sp = children::spawn(&bin, fds, &core.cfg.workers.cpus)?;
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
        tracing::info!(
            worker = index,
            pid = sp.pid,
            threads,
            "preprocess worker ready"
        );
        let (rd, wr) = sp.stream.into_split();
        let link = Arc::new(WorkerLink::new(wr));
        let mut dispatchers = JoinSet::new();
        for k in 0..threads {
            let (pool, core, link, input, member) = (
                self.clone(),
                core.clone(),
                link.clone(),
                input.clone(),
                member.clone(),
            );
            dispatchers.spawn(async move { pool.dispatch(core, link, input, member, k).await });
        }
        member.pid.store(sp.pid, Ordering::Relaxed);
        self.set_ready(member, true);

        // A retired member's dispatchers end after their current job; the
        // worker then goes. When `run` returns, the link is dying: the
        // dispatchers stop taking jobs.
        let stop = async {
            tokio::select! {
                () = core.shutting_down() => Exit::Shutdown,
                () = async {
                    member.retire.cancelled().await;
                    while dispatchers.join_next().await.is_some() {}
                } => Exit::Retired,
            }
        };
        let reason = link.run(&mut sp.child, rd, stop, |_| {}).await;
        self.set_ready(member, false);
        // On shutdown the HTTP server has drained by now. The process must be
        // gone before any lease it could write is freed.
        link.finish(&mut sp.child, reason).await;
        member.pid.store(0, Ordering::Relaxed);
        dispatchers.shutdown().await;
        if reason == Exit::Retired {
            tracing::info!(worker = index, "preprocess worker retired");
        }
        Ok(reason)
    }

    /// Serves worker thread `k`: one job at a time, input slot `k`.
    async fn dispatch(
        self: Arc<Self>,
        core: Arc<Core>,
        link: Arc<WorkerLink>,
        input: Arc<InputRegion>,
        member: Arc<Member>,
        k: u32,
    ) {
        loop {
            // A video is taken only with a video thread permit, held while
            // it runs; images are taken by any free thread. A retired
            // member takes no new job.
            let (mut job, _video_permit, lease) = tokio::select! {
                biased;
                _ = link.dying() => return,
                _ = member.retire.cancelled() => return,
                next = self.next_job(&core) => match next {
                    Some(next) => next,
                    None => return,
                },
            };
            // Work nobody waits for any more (its deadline passed, its
            // caller went away or gave up) is not decoded, and is no job of
            // the worker's: it counts neither as busy nor toward recycling.
            let waited_for = !job.upload.ctx.expired() && !job.task.caller_gone();
            let Some(data) = waited_for.then(|| job.upload.claim.take()).flatten() else {
                job.upload.claim.abandon();
                let reason = DropReason::of(job.upload.ctx.deadline_ns);
                core.metrics.drop_work(DropStage::Preprocess, reason);
                continue;
            };
            let _busy = Busy::new(&member);
            let recycle_after = core.cfg.workers.recycle_after_jobs;
            if recycle_after > 0 && member.jobs.load(Ordering::Relaxed) >= recycle_after {
                self.recycle(&member, "workers.recycle_after_jobs reached");
            }
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
    fn set_ready(self: &Arc<Self>, member: &Member, ready: bool) {
        if member.ready.swap(ready, Ordering::Relaxed) == ready {
            return;
        }
        let gauge = self
            .core
            .metrics
            .children_ready
            .with_label_values(&["preprocess"]);
        if ready {
            gauge.inc();
        } else {
            gauge.dec();
        }
        // A ready member may let a stale one retire; either way the
        // dispatchers look at the queue again.
        self.reconcile();
    }

    /// A video thread permit, if videos may take one more thread: at most
    /// their share of the desired threads, and never the last live one
    /// (unless the pool has a single thread in all).
    fn video_permit(&self) -> Option<VideoPermit<'_>> {
        let (desired, live) = {
            let m = self.lock_members();
            let live: usize = m
                .all
                .values()
                .filter(|x| x.is_live())
                .map(|x| x.threads as usize)
                .sum();
            ((m.desired * m.threads) as usize, live)
        };
        let share = video_threads(desired as u32, self.core.cfg.video.max_worker_share);
        self.videos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
                // After taking it, a live thread is still left for images.
                (running < share && (desired == 1 || running + 1 < live)).then_some(running + 1)
            })
            .ok()
            .map(|_| VideoPermit {
                pool: self,
                taken: false,
            })
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
    async fn next_job(&self, core: &Core) -> Option<Taken<'_>> {
        // The slot wait for the head image (model, critical), kept while the
        // head needs the same kind of slot: a queue change then costs the
        // wait neither its place in line nor a slot it was just given.
        type SlotWait<'a> =
            std::pin::Pin<Box<dyn Future<Output = Result<SlotLease, shm::ShmError>> + Send + 'a>>;
        let mut waiting: Option<((u16, bool), SlotWait<'_>)> = None;
        loop {
            let changed = self.queue.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let permit = self.video_permit();
            let head = {
                let mut state = self.queue.lock();
                let now = Instant::now();
                match state.next_is_video(permit.is_some(), now) {
                    Some(true) => {
                        let job = state.videos.pop(now).map(|(job, _)| job);
                        let permit = permit.map(|mut p| {
                            p.taken = true;
                            p
                        });
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
            let Some(key) = head else {
                waiting = None;
                // Woken by any change; the timer only backs up a missed one.
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    () = &mut changed => {}
                }
                continue;
            };
            if !matches!(&waiting, Some((k, _)) if *k == key) {
                waiting = Some((key, Box::pin(core.ledger.lease_for(key.0, key.1))));
            }
            let Some((_, wait)) = waiting.as_mut() else {
                continue;
            };
            // A slot for the head image; on a queue change, look again.
            let lease = tokio::select! {
                biased;
                lease = wait => lease,
                () = &mut changed => continue,
            };
            waiting = None;
            let (model, critical) = key;
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

/// A video's thread permit. Once a video was taken with it, its release
/// wakes the dispatchers, one of which may now take a queued video (a
/// permit only looked at while choosing a job wakes nobody: that would
/// wake the chooser itself).
struct VideoPermit<'a> {
    pool: &'a WorkerPool,
    taken: bool,
}

impl Drop for VideoPermit<'_> {
    fn drop(&mut self) {
        // Released before waking, so a woken dispatcher can take it.
        self.pool.videos.fetch_sub(1, Ordering::AcqRel);
        if self.taken {
            self.pool.queue.wake();
        }
    }
}

impl Member {
    fn new(index: u32, threads: u32) -> Self {
        Self {
            index,
            threads,
            ready: AtomicBool::new(false),
            pid: AtomicU32::new(0),
            busy: AtomicU32::new(0),
            incarnations: AtomicU64::new(0),
            jobs: AtomicU64::new(0),
            retire: CancellationToken::new(),
            recycle: AtomicBool::new(false),
        }
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Ready and not retiring: it takes jobs.
    fn is_live(&self) -> bool {
        self.is_ready() && !self.retire.is_cancelled()
    }

    fn view(&self) -> MemberView {
        let pid = self.pid.load(Ordering::Relaxed);
        MemberView {
            index: self.index,
            pid: (pid != 0).then_some(pid),
            threads: self.threads,
            ready: self.is_ready(),
            busy: self.busy.load(Ordering::Relaxed),
            retiring: self.retire.is_cancelled(),
            recycling: self.recycle.load(Ordering::Relaxed),
            restarts: self.incarnations.load(Ordering::Relaxed).saturating_sub(1),
            jobs: self.jobs.load(Ordering::Relaxed),
        }
    }
}

/// A worker thread busy with a job, counted while it lives.
struct Busy<'a>(&'a Member);

impl<'a> Busy<'a> {
    fn new(member: &'a Member) -> Self {
        member.busy.fetch_add(1, Ordering::Relaxed);
        member.jobs.fetch_add(1, Ordering::Relaxed);
        Self(member)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
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
        let Ok(rx) = self.link.expect_one(job_id, Vec::new()) else {
            return Err(Held::new(vec![lease], reply));
        };
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

/// How often the pool checks memory and load.
const AUTOSCALE_TICK: Duration = Duration::from_millis(250);

/// The load the autoscaler sees at one tick.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// A worker is still starting: what it will take is not known yet.
    starting: bool,
    /// How long the oldest queued image has waited.
    delay: Duration,
    /// The same, for critical images.
    critical_delay: Duration,
    /// Busy share of the live worker threads.
    busy: f64,
}

/// Decides the preprocess pool's size from its load. Up when images wait
/// (critical ones sooner); down only after a whole cooldown with nothing
/// waiting and few threads busy, so a steady load settles instead of
/// oscillating: after one worker fewer, the busy share stays under
/// `2 × scale_down_busy`, below the queueing that scales up. At most one
/// change per cooldown, counted from any change (admin ones too).
#[derive(Debug)]
struct Autoscaler {
    min: u32,
    max: u32,
    up_after: Duration,
    down_busy: f64,
    cooldown: Duration,
    quiet_since: Option<Instant>,
}

impl Autoscaler {
    fn new(cfg: &config::WorkerPool, now: Instant) -> Self {
        Self {
            min: cfg.min,
            max: cfg.max,
            up_after: Duration::from_millis(cfg.scale_up_queue_ms),
            down_busy: cfg.scale_down_busy,
            cooldown: Duration::from_millis(cfg.cooldown_ms),
            quiet_since: Some(now),
        }
    }

    /// The new desired size, if it should change now.
    fn decide(
        &mut self,
        now: Instant,
        changed_at: Instant,
        desired: u32,
        load: &Load,
    ) -> Option<u32> {
        let quiet = load.delay.is_zero() && load.busy < self.down_busy;
        if !quiet {
            self.quiet_since = None;
        } else if self.quiet_since.is_none() {
            self.quiet_since = Some(now);
        }
        let cooled = now.duration_since(changed_at) >= self.cooldown;
        let waiting = load.delay >= self.up_after || load.critical_delay >= self.up_after / 4;
        let next = if waiting && desired < self.max && !load.starting {
            desired + 1
        } else if desired > self.min
            && self
                .quiet_since
                .is_some_and(|t| now.duration_since(t) >= self.cooldown)
        {
            desired - 1
        } else {
            return None;
        };
        if !cooled {
            return None;
        }
        self.quiet_since = None;
        Some(next)
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

    fn scaler() -> (Autoscaler, Instant) {
        let cfg = config::WorkerPool {
            min: 1,
            max: 3,
            cooldown_ms: 1000,
            scale_up_queue_ms: 100,
            scale_down_busy: 0.3,
            ..config::WorkerPool::default()
        };
        let t0 = Instant::now();
        (Autoscaler::new(&cfg, t0), t0)
    }

    fn load(delay_ms: u64, critical_ms: u64, busy: f64) -> Load {
        Load {
            starting: false,
            delay: Duration::from_millis(delay_ms),
            critical_delay: Duration::from_millis(critical_ms),
            busy,
        }
    }

    #[test]
    fn the_autoscaler_climbs_on_waiting_at_most_once_per_cooldown_and_stops_at_max() {
        let (mut s, t0) = scaler();
        let ms = |n| t0 + Duration::from_millis(n);
        let busy = load(150, 0, 1.0);
        assert_eq!(s.decide(ms(500), t0, 1, &busy), None, "cooling down");
        let starting = Load {
            starting: true,
            ..busy
        };
        assert_eq!(
            s.decide(ms(1000), t0, 1, &starting),
            None,
            "one is starting"
        );
        assert_eq!(s.decide(ms(1000), t0, 1, &busy), Some(2));
        assert_eq!(s.decide(ms(1500), ms(1000), 2, &busy), None);
        assert_eq!(s.decide(ms(2000), ms(1000), 2, &busy), Some(3));
        assert_eq!(s.decide(ms(9000), ms(2000), 3, &busy), None, "at max");
        // Critical work scales sooner: a quarter of the delay is enough.
        let (mut s, t0) = scaler();
        let at = t0 + Duration::from_millis(1000);
        assert_eq!(s.decide(at, t0, 1, &load(0, 30, 1.0)), Some(2));
        assert_eq!(s.decide(at, t0, 1, &load(20, 20, 1.0)), None);
    }

    #[test]
    fn the_autoscaler_comes_down_only_after_a_quiet_cooldown_and_holds_a_steady_load() {
        let (mut s, t0) = scaler();
        let ms = |n| t0 + Duration::from_millis(n);
        // Steady half-busy load with no queue: never a change.
        for n in (0..20_000).step_by(250) {
            assert_eq!(s.decide(ms(n), t0, 2, &load(0, 0, 0.5)), None);
        }
        // Quiet from 20 s: down after a whole cooldown of quiet, then again
        // only after another one, and never below min.
        let q = load(0, 0, 0.1);
        assert_eq!(s.decide(ms(20_000), t0, 3, &q), None);
        assert_eq!(s.decide(ms(20_750), t0, 3, &q), None);
        assert_eq!(s.decide(ms(21_000), t0, 3, &q), Some(2));
        assert_eq!(s.decide(ms(21_500), ms(21_000), 2, &q), None);
        assert_eq!(
            s.decide(ms(22_000), ms(21_000), 2, &q),
            None,
            "quiet restarts after a change"
        );
        assert_eq!(s.decide(ms(22_250), ms(21_000), 2, &q), None);
        assert_eq!(s.decide(ms(22_600), ms(21_000), 2, &q), Some(1));
        assert_eq!(s.decide(ms(30_000), ms(22_600), 1, &q), None, "at min");
        // One busy tick restarts the quiet count.
        let (mut s, t0) = scaler();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(s.decide(ms(900), t0, 2, &q), None);
        assert_eq!(s.decide(ms(950), t0, 2, &load(0, 0, 0.9)), None);
        assert_eq!(s.decide(ms(1500), t0, 2, &q), None);
        assert_eq!(s.decide(ms(2500), t0, 2, &q), Some(1));
    }
}
