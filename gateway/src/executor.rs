//! The gpu-executor child: supervised like a worker, but one per gateway.
//! Each inference hands its slot lease to the link until the executor
//! answered or was reaped, so a slot is never reused while it may still be
//! read.
//!
//! A live change of a model's instances or batching starts a second
//! executor with the new specs. Once it is ready it takes every new
//! sample, and the old one finishes what it holds and is let go: no sample
//! fails for the change, and a change whose executor does not start leaves
//! the running one as it was.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use config::ModelSpec;
use shm::{
    ExecutorInit, FromExecutor, InferJob, ModelRuntime, RequestContext, Scores, SlotLease,
    ToExecutor,
};
use tokio::net::unix::OwnedReadHalf;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::children::{self, Exit, StartError};
use crate::core::Core;
use crate::error::{ApiError, Code};
use crate::link::ExecutorLink;
use crate::metrics::{DropReason, DropStage};

#[derive(Debug)]
pub struct Executor {
    /// The serving incarnation's link, while it is ready.
    link: RwLock<Option<Arc<ExecutorLink>>>,
    pid: AtomicU32,
    incarnations: AtomicU64,
    /// What runs each model, as the serving executor said.
    runtimes: RwLock<Vec<ModelRuntime>>,
    /// The model specs executors start with: the config's, as changed live.
    models: RwLock<Vec<ModelSpec>>,
    /// Models the admin API unloaded: executors do not load them, and
    /// their requests are refused before any work.
    unloaded: RwLock<Vec<String>>,
    next_job: AtomicU64,
    /// One live change at a time.
    changing: tokio::sync::Mutex<()>,
    handover_tx: mpsc::Sender<Handover>,
    handover_rx: tokio::sync::Mutex<mpsc::Receiver<Handover>>,
    /// Replaced executors finishing their last samples.
    retiring: Mutex<Vec<JoinHandle<Exit>>>,
    /// Set when the first executor refused its config (`Fatal`: a model
    /// that cannot load, a GPU backend with `fallback = "fail"` and no
    /// GPU): the gateway then stops with that reason instead of retrying.
    refused: tokio::sync::watch::Sender<Option<String>>,
}

/// A started, ready executor process and the gateway's end of its socket.
struct Started {
    child: Child,
    pid: u32,
    rd: OwnedReadHalf,
    link: Arc<ExecutorLink>,
    runtimes: Vec<ModelRuntime>,
}

/// A ready executor with new specs, for the supervisor to put in service;
/// `installed` is told once it serves.
struct Handover {
    started: Started,
    installed: oneshot::Sender<()>,
}

/// The executor as `GET /admin/pools` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExecutorView {
    pub desired: u32,
    pub alive: u32,
    pub ready: bool,
    pub pid: Option<u32>,
    pub restarts: u64,
    pub retiring: usize,
    pub models: Vec<ModelView>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelView {
    pub name: String,
    /// False once unloaded by the admin API.
    pub loaded: bool,
    pub instances: u32,
    pub intra_threads: u32,
    pub max_batch: u32,
    pub max_queue_delay_us: u64,
    pub pending: u32,
    pub runtime: Option<ModelRuntime>,
}

/// A live change of one model's engine layout (`PUT /admin/models/{m}`);
/// absent fields keep their value.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelChange {
    pub instances: Option<u32>,
    pub max_batch: Option<u32>,
    pub max_queue_delay_us: Option<u64>,
}

impl Executor {
    pub fn new(models: Vec<ModelSpec>) -> Self {
        let (handover_tx, handover_rx) = mpsc::channel(1);
        Self {
            link: RwLock::new(None),
            pid: AtomicU32::new(0),
            incarnations: AtomicU64::new(0),
            runtimes: RwLock::new(Vec::new()),
            models: RwLock::new(models),
            unloaded: RwLock::new(Vec::new()),
            next_job: AtomicU64::new(1),
            changing: tokio::sync::Mutex::new(()),
            handover_tx,
            handover_rx: tokio::sync::Mutex::new(handover_rx),
            retiring: Mutex::new(Vec::new()),
            refused: tokio::sync::watch::Sender::new(None),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.serving().is_some()
    }

    fn serving(&self) -> Option<Arc<ExecutorLink>> {
        self.link.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How long the serving executor has been silent (no heartbeat nor
    /// answer); `None` while none serves.
    pub fn silent_for(&self) -> Option<Duration> {
        self.serving().map(|l| l.silent_for())
    }

    /// Whether the admin API unloaded `model`.
    pub fn is_unloaded(&self, model: &str) -> bool {
        self.unloaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|m| m == model)
    }

    /// What runs `model` (backend, precision, device), once an executor has
    /// loaded it.
    pub fn runtime(&self, model: &str) -> Option<ModelRuntime> {
        self.runtimes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|r| r.model == model)
            .cloned()
    }

    /// The pids of the executor processes: the serving one first.
    pub fn pids(&self) -> Vec<u32> {
        let pid = self.pid.load(Ordering::Relaxed);
        (pid != 0).then_some(pid).into_iter().collect()
    }

    /// `max_batch` of model `model` as executors run it now.
    pub fn max_batch(&self, model: u16) -> Option<u32> {
        self.models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model as usize)
            .map(|m| m.batching.max_batch)
    }

    /// The model specs executors run now.
    pub fn models(&self) -> Vec<ModelSpec> {
        self.models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The executor now, for the admin API.
    pub fn view(&self, core: &Core) -> ExecutorView {
        let pid = self.pid.load(Ordering::Relaxed);
        let retiring = {
            let mut r = self.retiring.lock().unwrap_or_else(|e| e.into_inner());
            r.retain(|t| !t.is_finished());
            r.len()
        };
        ExecutorView {
            desired: 1,
            alive: u32::from(pid != 0) + retiring as u32,
            ready: self.is_ready(),
            pid: (pid != 0).then_some(pid),
            restarts: self.incarnations.load(Ordering::Relaxed).saturating_sub(1),
            retiring,
            models: self
                .models()
                .into_iter()
                .enumerate()
                .map(|(i, m)| ModelView {
                    loaded: !self.is_unloaded(&m.name),
                    runtime: self.runtime(&m.name),
                    pending: core.pending(i as u16),
                    name: m.name,
                    instances: m.instances.count,
                    intra_threads: m.instances.intra_threads,
                    max_batch: m.batching.max_batch,
                    max_queue_delay_us: m.batching.max_queue_delay_us,
                })
                .collect(),
        }
    }

    /// Runs the sample in `lease` through its model. An executor that does
    /// not answer within `executor.infer_timeout_ms` is killed and restarted.
    pub async fn infer(
        &self,
        ctx: &RequestContext,
        lease: SlotLease,
        pending: u32,
        within: Duration,
    ) -> Result<Scores, ApiError> {
        let job_id = self.next_job.fetch_add(1, Ordering::Relaxed);
        let slot = lease.slot();
        // The link keeps the lease until the executor answered or was
        // reaped. The job is registered under the read lock: a replaced
        // executor is retired (and closed once idle) only after `install`
        // took the write lock, so a serving link never refuses the job.
        let (link, answer) = {
            let serving = self.link.read().unwrap_or_else(|e| e.into_inner());
            let link = serving
                .clone()
                .ok_or_else(|| ApiError::new(Code::NotReady, "the executor is restarting"))?;
            let answer = link
                .expect_one(job_id, vec![lease])
                .map_err(|_| crashed())?;
            (link, answer)
        };
        let msg = ToExecutor::Infer(InferJob {
            job_id,
            ctx: ctx.clone(),
            slot,
            pending,
        });
        // On a send error the link is dying; its reaping ends the job.
        let _ = link.send(&msg);
        match tokio::time::timeout(within, answer.recv()).await {
            Ok(Some(FromExecutor::Scores(s))) => Ok(s),
            Ok(Some(FromExecutor::Failed { message, .. })) => Err(ApiError::new(
                Code::Internal,
                format!("the executor could not score this sample: {message}"),
            )),
            Ok(Some(FromExecutor::Expired { .. })) => Err(crate::score::deadline_exceeded()),
            Ok(Some(FromExecutor::NotLoaded { .. })) => Err(ApiError::new(
                Code::ModelNotLoaded,
                "the model was unloaded while this request ran",
            )),
            Ok(_) => Err(crashed()),
            Err(_) => {
                link.kill(Exit::Timeout);
                Err(ApiError::new(
                    Code::ExecutorCrashed,
                    format!(
                        "the executor did not answer within {} ms; it is being restarted",
                        within.as_millis()
                    ),
                ))
            }
        }
    }

    /// Changes one model's instances or batching live. Answers the spec
    /// now in force.
    pub async fn change_model(
        &self,
        core: &Arc<Core>,
        model: &str,
        change: &ModelChange,
    ) -> Result<ModelSpec, ApiError> {
        self.apply(core, |models, _| {
            let spec = find(models, model)?;
            if let Some(n) = change.instances {
                spec.instances.count = n;
            }
            if let Some(b) = change.max_batch {
                spec.batching.max_batch = b;
                spec.batching.preferred_sizes.retain(|&s| s <= b);
            }
            if let Some(d) = change.max_queue_delay_us {
                spec.batching.max_queue_delay_us = d;
            }
            Ok(())
        })
        .await?;
        Ok(self
            .models()
            .into_iter()
            .find(|m| m.name == model)
            .expect("a changed model stays"))
    }

    /// Loads (`load`) or unloads a model live. Loading a loaded model, or
    /// unloading an unloaded one, changes nothing.
    pub async fn set_loaded(
        &self,
        core: &Arc<Core>,
        model: &str,
        load: bool,
    ) -> Result<(), ApiError> {
        self.apply(core, |models, unloaded| {
            find(models, model)?;
            unloaded.retain(|m| m != model);
            if !load {
                unloaded.push(model.to_string());
            }
            Ok(())
        })
        .await
    }

    /// Applies a reloaded config's model changes: for each `(before, now)`
    /// pair of a model's spec in the files, the `instances` and `batching`
    /// fields that differ take their new value; the others keep theirs
    /// (a live change made since stays). Answers the models changed.
    pub async fn apply_file_changes(
        &self,
        core: &Arc<Core>,
        changes: &[(ModelSpec, ModelSpec)],
    ) -> Result<Vec<String>, ApiError> {
        fn merge<T: serde::Serialize + serde::de::DeserializeOwned>(
            live: &T,
            before: &T,
            now: &T,
        ) -> Result<T, ApiError> {
            let as_json = |v: &T| serde_json::to_value(v).unwrap_or_default();
            let (mut live, before, now) = (as_json(live), as_json(before), as_json(now));
            if let (Some(l), Some(b), Some(n)) =
                (live.as_object_mut(), before.as_object(), now.as_object())
            {
                for (k, v) in n {
                    if b.get(k) != Some(v) {
                        l.insert(k.clone(), v.clone());
                    }
                }
            }
            serde_json::from_value(live)
                .map_err(|e| ApiError::new(Code::BadRequest, format!("bad model settings: {e}")))
        }
        let mut changed = Vec::new();
        self.apply(core, |models, _| {
            for m in models.iter_mut() {
                let Some((before, now)) = changes.iter().find(|(b, _)| b.name == m.name) else {
                    continue;
                };
                let instances = merge(&m.instances, &before.instances, &now.instances)?;
                let batching = merge(&m.batching, &before.batching, &now.batching)?;
                if instances != m.instances || batching != m.batching {
                    (m.instances, m.batching) = (instances, batching);
                    changed.push(m.name.clone());
                }
            }
            Ok(())
        })
        .await?;
        Ok(changed)
    }

    /// A live change of what executors run: `edit` changes copies of the
    /// model specs and the unloaded set; when they differ after
    /// validation, an executor is started with them and put in service
    /// once ready (the old one finishes its samples and goes). Applied
    /// whole or not at all; one change at a time.
    async fn apply(
        &self,
        core: &Arc<Core>,
        edit: impl FnOnce(&mut Vec<ModelSpec>, &mut Vec<String>) -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        let _one = self.changing.lock().await;
        if core.is_shutting_down() {
            return Err(ApiError::new(Code::ShuttingDown, "the gateway is stopping"));
        }
        let mut models = self.models();
        let mut unloaded = self
            .unloaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        edit(&mut models, &mut unloaded)?;
        unloaded.sort_unstable();
        let mut before = self
            .unloaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        before.sort_unstable();
        if models == self.models() && unloaded == before {
            return Ok(());
        }
        for spec in &models {
            spec.validate()
                .map_err(|e| ApiError::new(Code::BadRequest, e.to_string()))?;
        }
        let started = self
            .start(core, models.clone(), unloaded.clone())
            .await
            .map_err(|e| {
                ApiError::new(
                    Code::ChangeFailed,
                    format!(
                        "the executor with the new settings did not start: {e}; nothing changed"
                    ),
                )
            })?;
        let (installed, done) = oneshot::channel();
        let handover = Handover { started, installed };
        if let Err(refused) = self.handover_tx.try_send(handover) {
            // A change not yet in service (the executor is restarting).
            let mut h = match refused {
                mpsc::error::TrySendError::Full(h) | mpsc::error::TrySendError::Closed(h) => h,
            };
            children::reap(&mut h.started.child).await;
            return Err(ApiError::new(
                Code::ChangeFailed,
                "an earlier change waits for the executor to restart; retry once it serves",
            ));
        }
        *self.models.write().unwrap_or_else(|e| e.into_inner()) = models;
        *self.unloaded.write().unwrap_or_else(|e| e.into_inner()) = unloaded;
        // Put in service by the supervisor, or (while it restarts a crashed
        // executor) by its next round.
        match tokio::time::timeout(Duration::from_secs(30), done).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(ApiError::new(
                Code::ChangeFailed,
                "the new executor is ready but not yet in service (the serving one is restarting); it takes over when the restart completes",
            )),
        }
    }

    /// Supervises the executor process until shutdown, then waits for
    /// replaced ones to finish.
    pub async fn supervise(self: Arc<Self>, core: Arc<Core>) {
        let never = CancellationToken::new();
        children::keep_running(&core, "executor", "gpu-executor", &never, || async {
            let first = self.incarnations.fetch_add(1, Ordering::Relaxed) == 0;
            let result = self.run_once(&core).await;
            if let (true, Err(StartError::Fatal(m))) = (first, &result) {
                self.refused.send_replace(Some(m.clone()));
            }
            result
        })
        .await;
        let retiring =
            std::mem::take(&mut *self.retiring.lock().unwrap_or_else(|e| e.into_inner()));
        futures::future::join_all(retiring).await;
        // A change started but never put in service.
        if let Ok(mut h) = self.handover_rx.lock().await.try_recv() {
            children::reap(&mut h.started.child).await;
        }
    }

    /// Tells the serving executor that a sample of `ctx`'s tenant entered
    /// preprocessing for `model`, so its batcher may keep an instance free
    /// for it (`scheduling.tenant_headroom`; nothing is sent when it is 0).
    pub fn expect(&self, core: &Core, model: u16, ctx: &RequestContext) {
        if core.cfg.scheduling.tenant_headroom == 0 {
            return;
        }
        let serving = self.link.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(link) = serving {
            let _ = link.send(&ToExecutor::Expect(shm::Expect {
                model,
                tenant: ctx.tenant.clone(),
                class: ctx.class,
            }));
        }
    }

    /// Resolves with the reason if the first executor refused its config;
    /// pending forever otherwise.
    pub async fn refused_at_start(&self) -> String {
        let mut rx = self.refused.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(m) => m.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// Starts an executor process with `models` and waits until it is ready.
    async fn start(
        &self,
        core: &Core,
        models: Vec<ModelSpec>,
        unloaded: Vec<String>,
    ) -> Result<Started, StartError> {
        let fd = core
            .ledger
            .tensors()
            .fd()
            .try_clone_to_owned()
            .map_err(shm::ShmError::from)?;
        let bin = core.bin_dir.join("gpu-executor");
        let mut sp = children::spawn(&bin, vec![("--tensor-fd", fd)], &core.cfg.executor.cpus)?;
        let init = ToExecutor::Init(ExecutorInit {
            layout: core.ledger.tensors().layout().clone(),
            models,
            executor: core.cfg.executor.clone(),
            scheduling: core.cfg.scheduling.clone(),
            unloaded,
        });
        let hs = children::handshake::<FromExecutor, _>(
            &mut sp.stream,
            &init,
            Duration::from_millis(core.cfg.executor.ready_timeout_ms),
        );
        let runtimes = match hs.await {
            Ok(FromExecutor::Ready(runtimes)) => runtimes,
            other => {
                children::reap(&mut sp.child).await;
                return Err(other.err().unwrap_or(StartError::Unexpected));
            }
        };
        for r in &runtimes {
            tracing::info!(
                pid = sp.pid,
                model = %r.model,
                backend = r.backend.as_str(),
                precision = r.precision.as_str(),
                device = %r.device,
                layout = %r.layout,
                fallbacks = ?r.fallbacks,
                "model serving"
            );
        }
        tracing::info!(pid = sp.pid, "gpu-executor ready");
        let (rd, wr) = sp.stream.into_split();
        Ok(Started {
            child: sp.child,
            pid: sp.pid,
            rd,
            link: Arc::new(ExecutorLink::new(wr)),
            runtimes,
        })
    }

    /// One supervised round: serves an executor, swapping in replacements
    /// with new specs as they come, until the serving one ends.
    async fn run_once(&self, core: &Arc<Core>) -> Result<Exit, StartError> {
        let mut handovers = self.handover_rx.lock().await;
        // A change made while the executor was down is already started.
        let (mut current, mut installed) = match handovers.try_recv() {
            Ok(h) => (h.started, Some(h.installed)),
            Err(_) => {
                let unloaded = self
                    .unloaded
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                (self.start(core, self.models(), unloaded).await?, None)
            }
        };
        self.install(core, &current);
        loop {
            if let Some(tell) = installed.take() {
                let _ = tell.send(());
            }
            let retire = CancellationToken::new();
            let (ended_tx, ended) = oneshot::channel();
            let serving = tokio::spawn(serve(core.clone(), current, retire.clone(), ended_tx));
            tokio::select! {
                reason = ended => {
                    // Out of service at once; the reaping comes after.
                    self.pid.store(0, Ordering::Relaxed);
                    core.metrics
                        .children_ready
                        .with_label_values(&["executor"])
                        .set(0);
                    self.link.write().unwrap_or_else(|e| e.into_inner()).take();
                    let _ = serving.await;
                    return Ok(reason.unwrap_or(Exit::Exited));
                }
                Some(next) = handovers.recv() => {
                    tracing::info!(old = self.pid.load(Ordering::Relaxed), new = next.started.pid,
                        "executor replaced with new settings; the old one finishes its samples");
                    // New samples go to the new one before the old is
                    // let go, so a sample always finds a serving link.
                    self.install(core, &next.started);
                    retire.cancel();
                    self.retiring.lock().unwrap_or_else(|e| e.into_inner()).push(serving);
                    current = next.started;
                    installed = Some(next.installed);
                }
            }
        }
    }

    /// Puts a ready executor in service: new samples go to it.
    fn install(&self, core: &Core, started: &Started) {
        // A ready executor may have waited for its turn unread.
        started.link.heard_now();
        *self.runtimes.write().unwrap_or_else(|e| e.into_inner()) = started.runtimes.clone();
        core.metrics.observe_runtimes(&started.runtimes);
        *self.link.write().unwrap_or_else(|e| e.into_inner()) = Some(started.link.clone());
        self.pid.store(started.pid, Ordering::Relaxed);
        core.metrics
            .children_ready
            .with_label_values(&["executor"])
            .set(1);
    }
}

/// Serves one executor until it ends, is replaced and idle, or shutdown;
/// says so on `ended`, then reaps it.
async fn serve(
    core: Arc<Core>,
    started: Started,
    retire: CancellationToken,
    ended: oneshot::Sender<Exit>,
) -> Exit {
    let Started {
        mut child,
        rd,
        link,
        ..
    } = started;
    let stop = async {
        tokio::select! {
            () = core.shutting_down() => Exit::Shutdown,
            () = async {
                retire.cancelled().await;
                // Its samples are answered (or their infer timeout passed:
                // a hung old executor is let go all the same).
                let limit = Duration::from_millis(core.cfg.executor.infer_timeout_ms);
                let _ = tokio::time::timeout(limit, async {
                    while !link.close_if_idle() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await;
            } => Exit::Retired,
            () = async {
                let every = Duration::from_millis(core.cfg.executor.heartbeat_ms);
                let limit = every * core.cfg.executor.heartbeat_misses;
                while link.silent_for() < limit {
                    tokio::time::sleep(every).await;
                }
                tracing::error!(silent = ?link.silent_for(),
                    "the executor missed its heartbeats; killing it");
            } => Exit::Unresponsive,
        }
    };
    let reason = link
        .run(&mut child, rd, stop, |msg| observe(&core, msg))
        .await;
    let _ = ended.send(reason);
    link.finish(&mut child, reason).await;
    reason
}

/// Counts and logs the executor's failures and drops, whether or not their
/// caller still waits.
fn observe(core: &Core, msg: &FromExecutor) {
    match msg {
        FromExecutor::Failed { job_id, message } => {
            tracing::error!(job_id, message, "executor failed a job");
        }
        FromExecutor::Expired { .. } => {
            core.metrics
                .drop_work(DropStage::Inference, DropReason::Deadline);
        }
        _ => {}
    }
}

fn find<'a>(models: &'a mut [ModelSpec], name: &str) -> Result<&'a mut ModelSpec, ApiError> {
    models
        .iter_mut()
        .find(|m| m.name == name)
        .ok_or_else(|| crate::api::unknown_model(name))
}

fn crashed() -> ApiError {
    ApiError::new(
        Code::ExecutorCrashed,
        "the executor failed while running this request; retry it",
    )
}
